"""Tests for ttakit.conformal: finite-sample quantile, LAC/APS sets against NumPy references,
coverage on synthetic and real Fashion-MNIST probabilities, bad input."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from ttakit.conformal import (
    calibrate,
    check_alpha,
    conformal_quantile,
    conformal_report,
    min_calibration_size,
    nonconformity_scores,
)
from ttakit.errors import InvalidInputError, UnknownNameError
from ttakit.metrics import set_coverage, set_size


@pytest.fixture(scope="module")
def fashion_probs() -> dict:
    """A seed CNN trained 1 epoch (flip augmentation) on 12,000 Fashion-MNIST training images;
    its plain and hflip-TTA probabilities on 5,000 other training images (calibration) and on
    the 10,000 test images."""
    from ttakit.data import load_fashion_mnist
    from ttakit.engine import TTAEngine
    from ttakit.training.config import TrainConfig
    from ttakit.training.loop import train_model

    full = load_fashion_mnist("train")
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(0))
    train, val = full.subset(order[:12000]), full.subset(order[12000:17000])
    test = load_fashion_mnist("test")
    torch.manual_seed(0)
    model = train_model(train, TrainConfig(epochs=1, augment=("flip",), seed=0), progress=False).model
    probs = {}
    for policy in ("none", "hflip"):
        engine = TTAEngine(model, policy, max_batch=2048)
        probs[policy] = (engine(val.images), engine(test.images))
    return {"probs": probs, "val_labels": val.labels, "test_labels": test.labels}


def synthetic(n: int, c: int = 10, seed: int = 0, temp: float = 2.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities with labels drawn from them: a perfectly calibrated model."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(n, c, generator=g, dtype=torch.float64) * temp, 1)
    labels = torch.multinomial(probs, 1, generator=g).squeeze(1)
    return probs, labels


def test_quantile_is_the_kth_smallest() -> None:
    scores = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6])  # n = 9
    # alpha = 0.1: k = ceil(10 * 0.9) = 9 -> the largest; alpha = 0.2: k = ceil(8.0) = 8
    assert conformal_quantile(scores, 0.1) == pytest.approx(0.9)
    assert conformal_quantile(scores, 0.2) == pytest.approx(0.8)
    assert conformal_quantile(scores, 0.5) == pytest.approx(0.5)  # k = ceil(5.0) = 5
    # numpy's inverted-CDF quantile at level ceil((n+1)(1-a))/n is the same element
    ref = np.quantile(scores.numpy(), math.ceil(10 * 0.8) / 9, method="inverted_cdf")
    assert conformal_quantile(scores, 0.2) == pytest.approx(float(ref))


def test_too_small_calibration_split_is_refused() -> None:
    assert min_calibration_size(0.1) == 9
    assert min_calibration_size(0.05) == 19
    conformal_quantile(torch.rand(9), 0.1)  # exactly enough
    with pytest.raises(InvalidInputError, match=r"8 images, too few for alpha=0.1.*at least 9"):
        conformal_quantile(torch.rand(8), 0.1)
    probs, labels = synthetic(18)
    with pytest.raises(InvalidInputError, match="18 images, too few for alpha=0.05"):
        calibrate(probs, labels, 0.05)


@pytest.mark.parametrize("alpha", [0, 1, -0.1, 1.5, float("nan"), "0.1", True, None])
def test_alpha_outside_unit_interval(alpha) -> None:
    with pytest.raises(InvalidInputError, match=r"alpha.*strictly between 0 and 1"):
        check_alpha(alpha)
    probs, labels = synthetic(50)
    with pytest.raises(InvalidInputError, match="alpha"):
        calibrate(probs, labels, alpha)


def test_unknown_method() -> None:
    probs, labels = synthetic(50)
    with pytest.raises(UnknownNameError, match="aps, lac"):
        calibrate(probs, labels, 0.1, method="raps")


def test_lac_sets_match_numpy_reference() -> None:
    probs, labels = synthetic(600, seed=3)
    cal = calibrate(probs[:300], labels[:300], 0.1, "lac")
    p, y = probs.numpy(), labels.numpy()
    n = 300
    scores = 1 - p[np.arange(n), y[:n]]
    qhat = np.sort(scores)[math.ceil((n + 1) * 0.9) - 1]
    assert cal.qhat == pytest.approx(qhat, abs=1e-12)
    ref_sets = p[300:] >= 1 - qhat
    np.testing.assert_array_equal(cal.predict_sets(probs[300:]).numpy(), ref_sets)


def test_aps_sets_match_numpy_reference_non_randomized() -> None:
    probs, labels = synthetic(600, seed=4)
    cal = calibrate(probs[:300], labels[:300], 0.1, "aps", randomized=False)
    p, y = probs.numpy(), labels.numpy()
    order = np.argsort(-p, axis=1, kind="stable")
    srt = np.take_along_axis(p, order, 1).cumsum(1)
    cum = np.take_along_axis(srt, order.argsort(1), 1)  # gentle-intro reference
    scores = cum[np.arange(300), y[:300]]
    qhat = np.sort(scores)[math.ceil(301 * 0.9) - 1]
    assert cal.qhat == pytest.approx(qhat, abs=1e-12)
    np.testing.assert_array_equal(cal.predict_sets(probs[300:]).numpy(), cum[300:] <= qhat + 1e-12)
    # APS sets are nested by rank: a class is in only if every higher-ranked class is.
    sets = cal.predict_sets(probs[300:]).numpy()
    ranked = np.take_along_axis(sets, order[300:], 1)
    assert (np.diff(ranked.astype(int), axis=1) <= 0).all()


def test_lac_score_of_a_label_is_one_minus_its_probability() -> None:
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    labels = torch.tensor([1, 2])
    torch.testing.assert_close(nonconformity_scores(probs, labels), torch.tensor([0.8, 0.4], dtype=torch.float64))
    aps = nonconformity_scores(probs, labels, "aps", randomized=False)
    torch.testing.assert_close(aps, torch.tensor([0.9, 0.6], dtype=torch.float64))


@pytest.mark.parametrize("method", ["lac", "aps"])
@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.2])
def test_coverage_holds_on_exchangeable_data(method: str, alpha: float) -> None:
    # Averaged over 20 calibration/test splits, coverage is within 1 point of 1 - alpha.
    coverages = []
    for seed in range(20):
        probs, labels = synthetic(2000, seed=100 + seed)
        cal = calibrate(probs[:1000], labels[:1000], alpha, method, seed=seed)
        coverages.append(set_coverage(cal.predict_sets(probs[1000:]), labels[1000:]))
    assert abs(float(np.mean(coverages)) - (1 - alpha)) < 0.01
    assert min(coverages) > 1 - alpha - 0.05


def test_aps_sets_are_larger_than_lac_on_average() -> None:
    probs, labels = synthetic(4000, seed=7)
    lac = calibrate(probs[:2000], labels[:2000], 0.1, "lac").predict_sets(probs[2000:])
    aps = calibrate(probs[:2000], labels[:2000], 0.1, "aps").predict_sets(probs[2000:])
    assert set_size(lac) < set_size(aps)  # LAC minimises the mean set size


def test_report_rows() -> None:
    probs, labels = synthetic(1000, seed=8)
    sharp = torch.softmax(torch.log(probs) * 1.5, 1)
    rows = conformal_report(
        {"plain": (probs[:500], labels[:500]), "sharp": (sharp[:500], labels[:500])},
        {"plain": (probs[500:], labels[500:]), "sharp": (sharp[500:], labels[500:])},
        0.1,
    )
    assert [r["policy"] for r in rows] == ["plain", "sharp"]
    assert rows[0]["n_calibration"] == 500 and rows[0]["n_test"] == 500
    assert rows[0]["target_coverage"] == pytest.approx(0.9)
    for row in rows:
        assert 0.85 < row["coverage"] < 0.95
        assert 1.0 <= row["mean_set_size"] < 10.0


@pytest.mark.slow
@pytest.mark.parametrize("alpha", [0.05, 0.1])
def test_coverage_on_fashion_mnist(fashion_probs, alpha: float) -> None:
    """Real Fashion-MNIST: a seed CNN's probabilities on 5,000 held-out training images calibrate
    LAC sets (the default) whose coverage on the 10,000 test images is within 1.5 points of
    1 - alpha, plain and TTA. APS gets 2.5 points: the test images are slightly harder than the
    training split (this model: about 1 point less accurate on test than on the held-out
    training images), which breaks exchangeability a little, and randomized APS sets vary more
    (measured: 88.4% at alpha 0.1)."""
    for name, (val, test) in fashion_probs["probs"].items():
        for method, tolerance in (("lac", 0.015), ("aps", 0.025)):
            cal = calibrate(val, fashion_probs["val_labels"], alpha, method)
            sets = cal.predict_sets(test)
            cov = set_coverage(sets, fashion_probs["test_labels"])
            assert abs(cov - (1 - alpha)) <= tolerance, (name, method, alpha, cov)
            assert 1.0 <= set_size(sets) < 3.0


@pytest.mark.slow
def test_evaluate_conformal_command(tmp_path, capsys) -> None:
    """`evaluate --conformal` on a small Fashion-MNIST .npz: the tables, and the bad inputs."""
    import json

    from ttakit.cli import main
    from ttakit.data import load_fashion_mnist

    ds = load_fashion_mnist("train")
    data = tmp_path / "fm.npz"
    np.savez(data, x=(ds.images[:1500, 0] * 255).round().to(torch.uint8).numpy(), y=ds.labels[:1500].numpy(),
             classes=np.array(ds.classes))
    assert main(["--no-progress", "train", "--data", str(data), "--epochs", "1", "--augment", "flip",
                 "--out", str(tmp_path / "cnn")]) == 0
    capsys.readouterr()
    code = main(["--no-progress", "evaluate", str(tmp_path / "cnn"), "--policy", "none,hflip", "--conformal", "0.1",
                 "--conformal-method", "aps", "--no-plots", "--out", str(tmp_path / "ev")])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "AUROC vs error" in printed and "conformal sets (APS, alpha=0.1)" in printed
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert [r["policy"] for r in results["conformal"]] == ["none", "hflip"]
    assert all(0.8 < r["coverage"] <= 1 for r in results["conformal"])
    assert results["uncertainty"][0]["score"] == "softmax 1 - max p (baseline)"
    assert 0.5 < results["uncertainty"][0]["auroc"] < 1
    # ALPHA outside (0, 1), and a validation split too small for ALPHA: one line, exit 2.
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", str(tmp_path / "cnn"), "--conformal", "1.5"])
    assert exit_info.value.code == 2
    capsys.readouterr()
    assert main(["--no-progress", "evaluate", str(tmp_path / "cnn"), "--conformal", "0.001", "--out",
                 str(tmp_path / "ev2")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "too few for alpha=0.001" in err


def test_format_set_and_calibrate_predictor_needs_a_checkpoint() -> None:
    from torch import nn

    from ttakit.conformal import format_set
    from ttakit.jobs._conformal import calibrate_predictor

    assert format_set(torch.tensor([True, False, True]), ["a", "b", "c"]) == "a|c"
    assert format_set(torch.tensor([False, False, False]), ["a", "b", "c"]) == ""
    with pytest.raises(InvalidInputError, match="not a ttakit checkpoint"):
        calibrate_predictor(nn.Linear(2, 2), "none", 0.1)
    with pytest.raises(InvalidInputError, match="alpha"):
        calibrate_predictor(nn.Linear(2, 2), "none", 1.0)


# --------------------------------------------------------------------------- sound answers: rows, identity


def test_aps_sets_do_not_depend_on_the_batch() -> None:
    """An image's randomized APS set is drawn from its identity, so the same images give the same
    sets in batches of 1, of 3 and all at once (and in any order)."""
    g = torch.Generator().manual_seed(3)
    probs = torch.softmax(2 * torch.randn(300, 6, generator=g), 1)
    labels = torch.multinomial(probs, 1, generator=g).squeeze(1)
    cal = calibrate(probs[:200], labels[:200], 0.2, "aps")
    test, ids = probs[200:], torch.arange(1000, 1100)
    whole = cal.predict_sets(test, ids)
    for size in (1, 3):
        parts = [cal.predict_sets(test[i : i + size], ids[i : i + size]) for i in range(0, 100, size)]
        assert torch.equal(torch.cat(parts), whole)
    order = torch.randperm(100, generator=g)
    assert torch.equal(cal.predict_sets(test[order], ids[order]), whole[order])
    # the draw is random across images: some sets differ from the unrandomized ones
    plain = dataclasses.replace(cal, randomized=False).predict_sets(test, ids)
    assert not torch.equal(plain, whole)
    with pytest.raises(InvalidInputError, match="`ids`"):
        cal.predict_sets(test, ids[:5])


def _tiny_checkpoint(root, seed: int = 0, name: str = "ckpt"):
    from ttakit.cli import main

    from ._fixtures import write_halves_npz

    data = root / "halves.npz"
    if not data.exists():
        write_halves_npz(data, n=400)
    out = root / name
    assert main(["--no-progress", "train", "--data", str(data), "--epochs", "2", "--batch-size", "32",
                 "--val-fraction", "0.3", "--seed", str(seed), "--out", str(out)]) == 0
    return data, out


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """A tiny checkpoint (102 validation rows) and a policy searched on it."""
    from ttakit.cli import main

    root = tmp_path_factory.mktemp("conformal-rows")
    data, ckpt = _tiny_checkpoint(root)
    assert main(["--no-progress", "search", str(ckpt), "--budget", "3"]) == 0
    return root, data, ckpt


def _one_line_error(capsys, argv, *fragments) -> str:
    from ttakit.cli import main

    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_search_leaves_validation_rows_for_conformal_and_evaluate_calibrates_on_them(searched, capsys) -> None:
    import json

    from ttakit.cli import main
    from ttakit.jobs._eval_data import load_eval_data
    from ttakit.models import load_checkpoint

    root, _, ckpt = searched
    policy = json.loads((ckpt / "policy.json").read_text())
    rows = policy["meta"]["validation_rows"]
    _, meta = load_checkpoint(ckpt)
    n_val = len(load_eval_data(meta, split="val"))
    assert rows["split"] == "val" and rows["n"] == n_val
    held = rows["held_out"]
    assert 0 < len(held) < n_val and rows["searched"] == n_val - len(held) and len(set(held)) == len(held)
    assert rows["conformal_holdout"] == 0.2
    capsys.readouterr()
    assert main(["--no-progress", "evaluate", str(ckpt), "--policy", f"none,hflip,{ckpt / 'policy.json'}",
                 "--conformal", "0.2", "--no-plots", "--no-uncertainty", "--out", str(root / "ev")]) == 0
    assert "rows no policy was fitted on" in capsys.readouterr().out
    results = json.loads((root / "ev" / "results.json").read_text())
    assert {r["n_calibration"] for r in results["conformal"]} == {len(held)}
    # views-only policies, with nothing fitted on validation, calibrate on every validation row
    assert main(["--no-progress", "evaluate", str(ckpt), "--policy", "none,hflip", "--conformal", "0.2",
                 "--no-plots", "--no-uncertainty", "--out", str(root / "ev-views")]) == 0
    results = json.loads((root / "ev-views" / "results.json").read_text())
    assert {r["n_calibration"] for r in results["conformal"]} == {n_val}


def test_conformal_refuses_rows_a_policy_was_fitted_on(searched, tmp_path, capsys) -> None:
    import json

    from ttakit.cli import main

    _, _, ckpt = searched
    policy = json.loads((ckpt / "policy.json").read_text())
    # calibrating and scoring the same validation rows
    _one_line_error(capsys, ["--no-progress", "evaluate", str(ckpt), "--policy", "none", "--conformal", "0.2",
                             "--split", "val", "--out", str(tmp_path / "a")], "--split val", "--split test")
    # a fitted policy that does not record its rows (as files written before this check)
    del policy["meta"]["validation_rows"]
    (tmp_path / "old.json").write_text(json.dumps(policy))
    _one_line_error(capsys, ["--no-progress", "evaluate", str(ckpt), "--policy", f"none,{tmp_path / 'old.json'}",
                             "--conformal", "0.2", "--out", str(tmp_path / "b")], "does not record", "--conformal-holdout")
    # a search on every validation row leaves none
    assert main(["--no-progress", "search", str(ckpt), "--budget", "2", "--conformal-holdout", "0",
                 "--out", str(tmp_path / "all.json"), "--report-dir", str(tmp_path / "rep")]) == 0
    _one_line_error(capsys, ["--no-progress", "evaluate", str(ckpt), "--policy", f"none,{tmp_path / 'all.json'}",
                             "--conformal", "0.2", "--out", str(tmp_path / "c")], "all", "--conformal-holdout")
    _one_line_error(capsys, ["--no-progress", "search", str(ckpt), "--conformal-holdout", "1.5",
                             "--out", str(tmp_path / "x.json")], "--conformal-holdout", "1.5")


def test_predict_aps_sets_are_the_same_in_any_batch_size(searched, tmp_path) -> None:
    """`predict --conformal --conformal-method aps`: each image's set is the same with
    --batch-size 1, 3 and all images in one batch."""
    import csv

    from PIL import Image

    from ttakit.cli import main

    _, data, ckpt = searched
    x = np.load(data)["x"][:13]
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(x):
        Image.fromarray((image * 255).round().astype(np.uint8)).save(folder / f"{i:02d}.png")
    sets = {}
    for size in (1, 3, 13):
        out = tmp_path / f"p{size}.csv"
        assert main(["--no-progress", "predict", str(ckpt), str(folder), "--policy", "hflip", "--conformal", "0.3",
                     "--conformal-method", "aps", "--batch-size", str(size), "--workers", "0", "--out", str(out)]) == 0
        with open(out, newline="") as f:
            sets[size] = {row["path"]: row["set"] for row in csv.DictReader(f)}
    assert len(sets[1]) == 13 and sets[1] == sets[3] == sets[13]
