"""Tests for ttakit.ensemble: soft and hard votes against hand-computed cases, the tie-breaks,
members as Predictors with policies and calibration, the evaluation rows, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.conftest import TinyClassifier
from ttakit.ensemble import (
    MemberSpec,
    combine,
    ensemble_predict,
    evaluate_ensemble,
    hard_vote,
    member_disagreement,
    parse_member,
    soft_vote,
)
from ttakit.errors import InvalidInputError, UnknownNameError
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
    best = max((r for r in rows[:6] if r["mode"] == "tta"), key=lambda r: r["accuracy"])
    assert ens_tta["lift_accuracy"] == pytest.approx(ens_tta["accuracy"] - best["accuracy"])
    out = ensemble_predict(models, images, policies=["hflip"] * 3)
    assert ens_tta["accuracy"] == pytest.approx(float((out.labels == labels).double().mean()))
    from ttakit.engine import TTAEngine

    best_correct = TTAEngine(models[best["member"]], "hflip")(images).argmax(1) == labels
    assert ens_tta["mcnemar_p"] == pytest.approx(mcnemar_test(best_correct, out.labels == labels).p_value)
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
