"""Tests for ttakit.ensemble: soft and hard votes against hand-computed cases, the tie-breaks,
members as Predictors with policies and calibration, the evaluation rows, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.conftest import TinyClassifier
from ttakit.ensemble_vote import hard_vote, member_disagreement, soft_vote
from ttakit.errors import InvalidInputError, UnknownNameError
from ttakit.jobs._ensemble_predict import combine, ensemble_predict
from ttakit.jobs.ensemble import MemberSpec, evaluate_ensemble, parse_member
from ttakit.metrics import mcnemar_test


def stack(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)  # (M, N, C)


def test_soft_vote_is_weighted_mean() -> None:
    probs = stack([[0.9, 0.1], [0.2, 0.8]], [[0.3, 0.7], [0.6, 0.4]])
    torch.testing.assert_close(soft_vote(probs), torch.tensor([[0.6, 0.4], [0.4, 0.6]]))
    torch.testing.assert_close(soft_vote(probs, [1, 3]), torch.tensor([[0.45, 0.55], [0.5, 0.5]]))
    torch.testing.assert_close(soft_vote(probs, [2, 0]), probs[0])


def test_hard_vote_majority_and_shares() -> None:
    probs = stack(
        [[0.6, 0.3, 0.1], [0.1, 0.1, 0.8]],
        [[0.5, 0.4, 0.1], [0.2, 0.7, 0.1]],
        [[0.1, 0.8, 0.1], [0.1, 0.6, 0.3]],
    )
    labels, shares = hard_vote(probs)
    assert labels.tolist() == [0, 1]  # image 0: 2 votes for class 0 although class 1 has the higher mean
    torch.testing.assert_close(shares[0], torch.tensor([2 / 3, 1 / 3, 0.0], dtype=torch.float64))
    assert soft_vote(probs).argmax(1).tolist() == [1, 1]
    # Weights: the third member counts three times -> class 1 wins image 0.
    assert hard_vote(probs, weights=[1, 1, 3])[0].tolist() == [1, 1]


def test_hard_vote_tie_goes_to_higher_mean_probability() -> None:
    probs = stack([[0.55, 0.45]], [[0.1, 0.9]])  # one vote each; mean 0.325 vs 0.675
    for seed in range(10):
        assert hard_vote(probs, seed=seed)[0].tolist() == [1]


def test_hard_vote_exact_tie_and_random_tie_break_are_seeded_picks() -> None:
    # Two members, two images each tied on votes; means tie exactly -> seeded random pick.
    probs = stack([[0.6, 0.4]] * 200, [[0.4, 0.6]] * 200)
    a = hard_vote(probs, seed=1)[0]
    assert torch.equal(a, hard_vote(probs, seed=1)[0])  # same seed, same picks
    assert not torch.equal(a, hard_vote(probs, seed=2)[0])
    assert 60 < int(a.sum()) < 140  # both classes picked, roughly half each
    # "random" ignores the mean probability: the tie of votes is broken at random even when
    # one class has the higher mean.
    probs = stack([[0.55, 0.45]] * 200, [[0.1, 0.9]] * 200)
    mean_pick = hard_vote(probs, tie_break="mean")[0]
    random_pick = hard_vote(probs, tie_break="random", seed=3)[0]
    assert mean_pick.tolist() == [1] * 200
    assert 60 < int(random_pick.sum()) < 140
    # Never a class outside the tie.
    probs = stack([[0.5, 0.3, 0.2]] * 50, [[0.2, 0.3, 0.5]] * 50)
    picks = hard_vote(probs, tie_break="random", seed=0)[0]
    assert set(picks.tolist()) <= {0, 2}


def test_vote_validation() -> None:
    probs = stack([[0.5, 0.5]], [[0.5, 0.5]])
    with pytest.raises(InvalidInputError, match=r"weights.*one number per member \(2\)"):
        soft_vote(probs, [1, 2, 3])
    with pytest.raises(InvalidInputError, match="non-negative"):
        soft_vote(probs, [1, -1])
    with pytest.raises(InvalidInputError, match="not all zero"):
        hard_vote(probs, [0, 0])
    with pytest.raises(UnknownNameError, match="mean, random"):
        hard_vote(probs, tie_break="coin")
    with pytest.raises(UnknownNameError, match="hard, soft"):
        combine(probs, vote="median")
    with pytest.raises(InvalidInputError, match=r"\(M, N, C\)"):
        soft_vote(torch.rand(3, 2))


def members(n: int = 3, classes: int = 5) -> list[nn.Module]:
    out = []
    for seed in range(n):
        torch.manual_seed(seed)
        out.append(TinyClassifier(in_channels=1, classes=classes, softmax=False).eval())
    return out


def test_ensemble_predict_soft_equals_mean_of_member_engines() -> None:
    from ttakit.engine import TTAEngine

    images = torch.rand(12, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    models = members()
    out = ensemble_predict(models, images, policies=["hflip", "none", "d4"])
    expected = torch.stack(
        [TTAEngine(m, p)(images) for m, p in zip(models, ["hflip", "none", "d4"], strict=True)]
    ).mean(0)
    torch.testing.assert_close(out.probs, expected, atol=1e-5, rtol=1e-5)
    assert out.passes_per_image == 2 + 1 + 8
    assert out.labels.tolist() == expected.argmax(1).tolist()
    hard = ensemble_predict(models, images, policies=["hflip", "none", "d4"], vote="hard")
    assert hard.labels.shape == (12,)
    torch.testing.assert_close(hard.probs.sum(1), torch.ones(12))


def test_ensemble_predict_calibrates_each_member() -> None:
    g = torch.Generator().manual_seed(1)
    images, cal_images = torch.rand(20, 1, 8, 8, generator=g), torch.rand(40, 1, 8, 8, generator=g)
    cal_labels = torch.randint(0, 5, (40,), generator=g)
    models = members(2)
    out = ensemble_predict(models, images, calibration=(cal_images, cal_labels))
    assert all(t is not None and t > 0 for t in out.temperatures)
    # Random labels: the fitted temperatures soften, so the calibrated members are less sure.
    raw = ensemble_predict(models, images)
    assert out.probs.max(1).values.mean() < raw.probs.max(1).values.mean()
    given = ensemble_predict(models, images, temperatures=[2.0, None])
    assert given.temperatures == [2.0, None]


def test_members_with_different_class_lists_are_refused() -> None:
    from ttakit.predictors import load

    a = load(members(1)[0], classes=["a", "b", "c", "d", "e"], outputs="logits", channels=1)
    b = load(members(2)[1], classes=["a", "b", "c", "d", "x"], outputs="logits", channels=1)
    with pytest.raises(InvalidInputError, match=r"same classes in the same order.*5 classes \[a, b, c, d, x\]"):
        ensemble_predict([a, b], torch.rand(2, 1, 8, 8))
    c = members(1, classes=4)[0]
    with pytest.raises(InvalidInputError, match=r"same classes: they return \[4, 5\]"):
        ensemble_predict([a, c], torch.rand(2, 1, 8, 8))


def test_ensemble_predict_argument_errors() -> None:
    images = torch.rand(2, 1, 8, 8)
    with pytest.raises(InvalidInputError, match="at least one member"):
        ensemble_predict([], images)
    with pytest.raises(InvalidInputError, match="one policy per member: 2 members but 1"):
        ensemble_predict(members(2), images, policies=["none"])
    with pytest.raises(UnknownNameError, match="policy"):
        ensemble_predict(members(2), images, policies=["none", "no-such-policy"])


def test_evaluate_ensemble_rows_and_mcnemar() -> None:
    g = torch.Generator().manual_seed(2)
    images = torch.rand(60, 1, 8, 8, generator=g)
    models = members(3)
    with torch.no_grad():
        labels = torch.stack([m(images) for m in models]).mean(0).argmax(1)
    labels[:15] = (labels[:15] + 1) % 5  # some errors
    result = evaluate_ensemble(models, images, labels, policies=["hflip"] * 3, names=["a", "b", "c"])
    rows = result["rows"]
    assert [(r["model"], r["mode"]) for r in rows[:6]] == [
        ("a", "plain"), ("a", "tta"), ("b", "plain"), ("b", "tta"), ("c", "plain"), ("c", "tta")
    ]
    ens_plain, ens_tta = rows[6], rows[7]
    assert ens_plain["passes_per_image"] == 3 and ens_tta["passes_per_image"] == 6
    # compared with the best member under ANY policy (plain or hflip), named in "vs"
    best = max(rows[:6], key=lambda r: r["accuracy"])
    assert ens_tta["lift_accuracy"] == pytest.approx(ens_tta["accuracy"] - best["accuracy"])
    assert ens_plain["lift_accuracy"] == pytest.approx(ens_plain["accuracy"] - best["accuracy"])
    assert ens_tta["vs"] == ens_plain["vs"] == f"{best['model']} {best['policy']}"
    assert result["best_member"]["any"]["accuracy"] == best["accuracy"]
    out = ensemble_predict(models, images, policies=["hflip"] * 3)
    assert ens_tta["accuracy"] == pytest.approx(float((out.labels == labels).double().mean()))
    from ttakit.engine import TTAEngine

    best_correct = TTAEngine(models[best["member"]], best["policy"])(images).argmax(1) == labels
    assert ens_tta["mcnemar_p"] == pytest.approx(mcnemar_test(best_correct, out.labels == labels).p_value)
    mixed = evaluate_ensemble(models, images, labels, policies=["vflip", "hflip", "none"], names=["a", "b", "c"])
    assert mixed["rows"][-1]["policy"] == "vflip+hflip+none"  # member order
    assert mixed["rows"][-2]["policy"] == "none"
    hard = evaluate_ensemble(models, images, labels, vote="hard")
    assert hard["rows"][-1]["nll"] is None  # vote shares are not probabilities of the label


def test_parse_member(tmp_path) -> None:
    assert parse_member("runs/a:hflip").policy == "hflip"
    assert parse_member("runs/a").policy is None
    odd = tmp_path / "model:v2"
    odd.mkdir()
    assert parse_member(str(odd)).model == str(odd)  # an existing path with a colon is a model
    assert parse_member(f"{tmp_path}/a:{tmp_path}/p.json").policy == f"{tmp_path}/p.json"
    with pytest.raises(InvalidInputError, match="MODEL:POLICY"):
        parse_member("runs/a:")
    # a NumPy callable package.module:function stays whole unless a policy follows it
    assert parse_member("mypkg.models:predict") == MemberSpec("mypkg.models:predict", None)
    assert parse_member("mypkg.models:predict:d4") == MemberSpec("mypkg.models:predict", "d4")
    assert parse_member("runs/a:train-aug").policy == "train-aug"
    model = tmp_path / "m"
    model.mkdir()
    assert parse_member(f"{model}:no-such-policy") == MemberSpec(str(model), "no-such-policy")  # reported later


def test_member_disagreement_and_per_row_tie_break_seeds() -> None:
    probs = stack([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]], [[0.2, 0.8], [0.7, 0.3], [0.4, 0.6]],
                  [[0.7, 0.3], [0.1, 0.9], [0.45, 0.55]])
    labels = torch.tensor([0, 0, 1])
    torch.testing.assert_close(member_disagreement(probs, labels), torch.tensor([1 / 3, 1 / 3, 0.0], dtype=torch.float64))
    torch.testing.assert_close(member_disagreement(probs, labels, weights=[1, 2, 1]),
                               torch.tensor([0.5, 0.25, 0.0], dtype=torch.float64))
    # two members, disagreeing everywhere: every row ties; with row seeds a row's pick depends on
    # its own seed only, not on the rows around it
    g = torch.Generator().manual_seed(3)
    a = torch.softmax(torch.randn(40, 4, generator=g), 1)
    b = torch.roll(a, 1, dims=1)
    two = torch.stack([a, b])
    seeds = torch.arange(1000, 1040)
    full, _ = hard_vote(two, tie_break="random", seed=5, row_seeds=seeds)
    part, _ = hard_vote(two[:, 10:20], tie_break="random", seed=5, row_seeds=seeds[10:20])
    assert torch.equal(full[10:20], part)
    assert set(full.tolist()) <= set(a.argmax(1).tolist()) | set(b.argmax(1).tolist())
    assert all(int(full[i]) in (int(a[i].argmax()), int(b[i].argmax())) for i in range(40))
    picks_a = (full == a.argmax(1)).float().mean()
    assert 0.2 < picks_a < 0.8  # a fair pick, not always the first member
    other, _ = hard_vote(two, tie_break="random", seed=6, row_seeds=seeds)
    assert not torch.equal(full, other)
    with pytest.raises(InvalidInputError, match="row_seeds"):
        hard_vote(two, row_seeds=seeds[:3])


# --------------------------------------------------------------------------- the command (slow)


def _fashion_npz(path, n: int = 1500, classes=None) -> str:
    import numpy as np

    from ttakit.data import load_fashion_mnist

    ds = load_fashion_mnist("train")
    x = (ds.images[:n, 0] * 255).round().to(torch.uint8).numpy()
    names = np.array(classes if classes is not None else ds.classes)
    np.savez(path, x=x, y=ds.labels[:n].numpy(), classes=names)
    return str(path)


@pytest.mark.slow
def test_ensemble_command_end_to_end(tmp_path, capsys) -> None:
    import json

    from ttakit.cli import main

    data = _fashion_npz(tmp_path / "fm.npz")
    for seed in (0, 1):
        code = main(["--no-progress", "train", "--data", data, "--epochs", "1", "--augment", "flip",
                     "--seed", str(seed), "--out", str(tmp_path / f"m{seed}")])
        assert code == 0
    capsys.readouterr()
    out = tmp_path / "ens"
    code = main(["--no-progress", "ensemble", f"{tmp_path / 'm0'}:hflip", str(tmp_path / "m1"), "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "soft vote, 2 members" in printed and "temperature-scaled on the validation split" in printed
    result = json.loads((out / "results.json").read_text())
    rows = result["rows"]
    assert [r["mode"] for r in rows] == ["plain", "tta"] * 3
    assert rows[1]["policy"] == "hflip" and rows[3]["policy"] == "train-aug"  # m1 defaults to its training augs
    assert rows[-1]["passes_per_image"] == 2 + 2
    assert 0.5 < rows[-1]["accuracy"] <= 1
    # hard vote with the random tie-break and weights
    code = main(["--no-progress", "ensemble", str(tmp_path / "m0"), str(tmp_path / "m1"), "--vote", "hard",
                 "--tie-break", "random", "--weights", "1,2", "--out", str(tmp_path / "hard")])
    assert code == 0
    # members with different class lists: one line, exit 2
    other = _fashion_npz(tmp_path / "other.npz", n=600, classes=[f"c{i}" for i in range(10)])
    assert main(["--no-progress", "train", "--data", other, "--epochs", "1", "--out", str(tmp_path / "m2")]) == 0
    capsys.readouterr()
    code = main(["--no-progress", "ensemble", str(tmp_path / "m0"), str(tmp_path / "m2"), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "same classes in the same order" in err


@pytest.mark.parametrize("split", ["train", "val"])
def test_ensemble_refuses_rows_its_members_were_fitted_on(tmp_path, capsys, split) -> None:
    """Issue "sound answers": ``train`` rows trained the members; ``val`` rows fitted their
    temperatures (and chose their searched policies). Both are refused, before any model loads."""
    from ttakit.cli import main
    from ttakit.jobs.ensemble import ensemble_checkpoints

    members = [str(tmp_path / "m0"), str(tmp_path / "m1")]  # never loaded: the refusal comes first
    with pytest.raises(InvalidInputError, match=f"--split {split}") as info:
        ensemble_checkpoints(members, split=split, out_dir=tmp_path / "out")
    assert "--split test" in str(info.value)
    assert main(["--no-progress", "ensemble", *members, "--split", split, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--split {split}" in err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- calibration rows (issue "sound answers")


def _val_set(n: int = 40):
    from ttakit.data import ImageDataset

    g = torch.Generator().manual_seed(0)
    return ImageDataset(torch.rand(n, 1, 4, 4, generator=g), torch.arange(n) % 2, ["a", "b"], "val")


def test_calibration_rows_keep_temperatures_and_conformal_sets_apart() -> None:
    """Member temperatures are fitted on rows the conformal calibration never uses: with views-only
    policies the seeded share ``ttakit search`` keeps unseen; with searched policies the rows
    they record as unseen. Disjoint, and every row is in one of them."""
    from ttakit.aliases import get_policy
    from ttakit.data import dataset_sha256, stratified_indices
    from ttakit.jobs._ensemble_predict import calibration_rows
    from ttakit.jobs._eval_data import CONFORMAL_HOLDOUT, HOLDOUT_SEED
    from ttakit.policy import Policy, View

    val = _val_set()
    fit, held = calibration_rows(val, [get_policy("none"), get_policy("hflip")])
    assert not set(fit) & set(held) and sorted(fit + held) == list(range(len(val)))
    assert held == stratified_indices(val.labels, CONFORMAL_HOLDOUT, HOLDOUT_SEED)[1].tolist()
    record = {"split": "val", "n": len(val), "sha256": dataset_sha256(val), "held_out": [1, 2, 5, 8, 13, 21]}
    searched = Policy([View.identity()], name="searched", temperature=1.2, meta={"validation_rows": record})
    fit, held = calibration_rows(val, [searched, get_policy("none")], strict=True)
    assert held == record["held_out"] and fit == [r for r in range(len(val)) if r not in held]
    # a fitted policy that does not say which rows it saw: refused for conformal sets, passed over otherwise
    unrecorded = Policy([View.identity()], name="old", temperature=1.2)
    with pytest.raises(InvalidInputError, match="'old'"):
        calibration_rows(val, [unrecorded], strict=True)
    fit, held = calibration_rows(val, [unrecorded])
    assert not set(fit) & set(held) and held == stratified_indices(val.labels, CONFORMAL_HOLDOUT, HOLDOUT_SEED)[1].tolist()


@pytest.fixture(scope="module")
def halves_members(tmp_path_factory):
    """Two tiny checkpoints trained on the same .npz (so they share their validation split)."""
    from tests._fixtures import write_halves_npz
    from ttakit.jobs.train import train_run
    from ttakit.training.config import TrainConfig

    root = tmp_path_factory.mktemp("halves-ensemble")
    data = write_halves_npz(root / "h.npz", n=120)
    for seed in (0, 1):
        train_run(str(data), out_dir=root / f"m{seed}", config=TrainConfig(epochs=1, batch_size=32, seed=seed),
                  val_fraction=0.4, progress=False)
    return root


@pytest.mark.usefixtures("single_thread")
def test_predict_ensemble_fits_temperatures_on_rows_its_conformal_sets_never_see(halves_members, monkeypatch) -> None:
    """The ensemble path of ``predict``: each member's temperature is fitted on the temperature rows
    of :func:`calibration_rows`, the conformal sets calibrate on the other rows only."""
    from ttakit import conformal
    from ttakit.aliases import get_policy
    from ttakit.jobs import _ensemble_predict as E
    from ttakit.jobs._eval_data import load_eval_data
    from ttakit.jobs._predict_runners import _ensemble_runner
    from ttakit.models import load_checkpoint

    members = [str(halves_members / "m0"), str(halves_members / "m1")]
    val = load_eval_data(load_checkpoint(members[0])[1], None, "val")
    fit, held = E.calibration_rows(val, [get_policy("none"), get_policy("hflip")])
    assert fit and held and not set(fit) & set(held)
    seen: dict[str, list] = {"temperature": [], "conformal": []}
    fit_temperature, calibrate = E._fit_temperature, conformal.calibrate

    def spy_temperature(probs, labels):
        seen["temperature"].append(labels.clone())
        return fit_temperature(probs, labels)

    def spy_calibrate(probs, labels, *args, **kwargs):
        seen["conformal"].append(labels.clone())
        return calibrate(probs, labels, *args, **kwargs)

    monkeypatch.setattr(E, "_fit_temperature", spy_temperature)
    monkeypatch.setattr(conformal, "calibrate", spy_calibrate)
    runner = _ensemble_runner(members, ["none", "hflip"], model_options={}, device=None, amp=False, max_batch=64,
                              conformal=0.5, conformal_method="lac", vote="soft", weights=None, tie_break="mean",
                              seed=0, calibrate=True, progress=False)
    assert len(seen["temperature"]) == 2 and len(seen["conformal"]) == 1
    for labels in seen["temperature"]:
        assert torch.equal(labels, val.labels[fit])
    assert torch.equal(seen["conformal"][0], val.labels[held])
    assert f"{len(fit)} of its {len(val)} images; conformal sets calibrated on the other {len(held)}" in \
        runner.extra["calibration"]
    # without --conformal the members get the very same temperatures
    plain = _ensemble_runner(members, ["none", "hflip"], model_options={}, device=None, amp=False, max_batch=64,
                             conformal=None, conformal_method="lac", vote="soft", weights=None, tie_break="mean",
                             seed=0, calibrate=True, progress=False)
    assert [m["temperature"] for m in plain.extra["members"]] == [m["temperature"] for m in runner.extra["members"]]


@pytest.mark.usefixtures("single_thread")
def test_ensemble_on_other_data_calibrates_on_the_members_own_validation_split(halves_members, tmp_path,
                                                                                 capsys) -> None:
    """``ensemble --data OTHER``: other data has no validation split the members held out, so
    they are temperature-scaled on their own (it used to fail on loading OTHER's "val"); when
    their own data is gone, one line naming --no-calibrate."""
    import json
    import shutil

    from tests._fixtures import write_halves_npz
    from ttakit.cli import main

    other = write_halves_npz(tmp_path / "other.npz", n=40, seed=5)
    members = [str(halves_members / "m0"), str(halves_members / "m1")]
    out = tmp_path / "ens"
    code = main(["--no-progress", "ensemble", *members, "--data", str(other), "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads((out / "results.json").read_text())
    assert result["calibrated"] and "temperature-scaled on the validation split" in result["calibration"]
    assert result["n_images"] == 40
    # the members' own data moved away: a clear line, not a traceback
    copies = tmp_path / "copies"
    for m in members:
        shutil.copytree(m, copies / m.rsplit("/", 1)[-1])
    meta_path = copies / "m0" / "checkpoint.json"
    meta = json.loads(meta_path.read_text())
    meta["extra"]["data"]["spec"] = str(tmp_path / "gone.npz")
    meta_path.write_text(json.dumps(meta))
    meta_path = copies / "m1" / "checkpoint.json"
    meta1 = json.loads(meta_path.read_text())
    meta1["extra"]["data"]["spec"] = str(tmp_path / "gone.npz")
    meta_path.write_text(json.dumps(meta1))
    code = main(["--no-progress", "ensemble", str(copies / "m0"), str(copies / "m1"), "--data", str(other),
                 "--out", str(tmp_path / "ens2")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--no-calibrate" in err and "own validation split" in err
    assert main(["--no-progress", "ensemble", str(copies / "m0"), str(copies / "m1"), "--data", str(other),
                 "--no-calibrate", "--out", str(tmp_path / "ens3")]) == 0
