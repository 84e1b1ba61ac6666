import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ttakit.cli import EXIT_BAD_INPUT, main

from ._fixtures import write_halves_npz

FASHION = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


def _fails_cleanly(capsys, argv, *fragments):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == EXIT_BAD_INPUT
    assert len(err.splitlines()) == 1, err  # one line, no traceback
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err
    return err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data = write_halves_npz(root / "halves.npz", n=160)
    out = root / "ckpt"
    code = main(["--no-progress", "train", "--data", str(data), "--epochs", "2", "--batch-size", "16", "--out", str(out)])
    assert code == 0
    return root, data, out


def test_train_then_evaluate(checkpoint, capsys, tmp_path):
    root, data, ckpt = checkpoint
    assert (ckpt / "model.safetensors").exists() and (ckpt / "checkpoint.json").exists()
    code = main(["--no-progress", "evaluate", str(ckpt), "--policy", "none,vflip,hflip", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert "vflip" in out and "results written to" in out
    assert "held-out test split (24 images" in out  # 15% of 160, carved at training time
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["split"] == "test" and results["held_out"] and results["n_images"] == 24
    summary = {s["policy"]: s for s in results["summary"]}
    assert list(summary) == ["none", "vflip", "hflip"]
    # the halves task is learnt; a vertical flip keeps left and right, a horizontal one swaps them
    assert summary["none"]["accuracy_mean"] >= 0.9
    assert summary["vflip"]["accuracy_mean"] >= 0.9
    assert summary["hflip"]["accuracy_mean"] <= 0.6 and summary["hflip"]["lift_accuracy_mean"] <= -0.3
    assert summary["hflip"]["lift_ci_high_mean"] < 0  # the interval says it hurts, and the table shows it
    assert f"{100 * summary['hflip']['lift_ci_low_mean']:+.2f}, {100 * summary['hflip']['lift_ci_high_mean']:+.2f}]" in out
    # the training images are scored only by name, and the title says so
    code = main(["--no-progress", "evaluate", str(ckpt), "--policy", "none", "--split", "train", "--out", str(tmp_path / "tr")])
    assert code == 0 and "TRAINING images" in capsys.readouterr().out


def test_missing_dataset_folder(capsys, tmp_path):
    _fails_cleanly(
        capsys,
        ["train", "--data", "fashion-mnist", "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")],
        "fashion-mnist",
    )


def test_corrupt_npz(capsys, tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"this is not a zip archive")
    _fails_cleanly(capsys, ["train", "--data", str(bad), "--out", str(tmp_path / "o")], "bad.npz")


def test_class_folder_without_images(capsys, tmp_path):
    for name in ("cat", "dog"):
        (tmp_path / "imgs" / name).mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "imgs" / "cat" / "a.png")
    _fails_cleanly(capsys, ["train", "--data", str(tmp_path / "imgs"), "--out", str(tmp_path / "o")], "dog")


def test_checkpoint_for_three_channels_given_one(checkpoint, capsys, tmp_path):
    _, _, ckpt = checkpoint
    rgb = write_halves_npz(tmp_path / "rgb.npz", channels=3)
    _fails_cleanly(capsys, ["evaluate", str(ckpt), "--data", str(rgb)], "1-channel", "3-channel")


def test_unknown_policy_and_architecture(checkpoint, capsys, tmp_path):
    root, data, ckpt = checkpoint
    _fails_cleanly(capsys, ["evaluate", str(ckpt), "--policy", "rot45"], "rot45", "hflip")
    _fails_cleanly(capsys, ["train", "--data", str(data), "--arch", "vgg99", "--out", str(tmp_path / "o")], "vgg99", "seed-cnn")


def test_not_a_checkpoint(capsys, tmp_path):
    (tmp_path / "checkpoint.json").write_text('{"hello": "world"}')
    _fails_cleanly(capsys, ["evaluate", str(tmp_path)], "checkpoint")


@pytest.mark.slow
@pytest.mark.skipif(not FASHION.exists(), reason="Fashion-MNIST is not installed (make setup installs it)")
def test_demo_quick_end_to_end(tmp_path, capsys, saved_figures):
    code = main(["--no-progress", "demo", "--quick", "--out", str(tmp_path)])
    printed = capsys.readouterr()
    assert code == 0, printed.err[-2000:]
    assert "TTA on Fashion-MNIST" in printed.out and "d4" in printed.out
    results = json.loads((tmp_path / "results.json").read_text())
    rows = {(m, r["policy"]): r for m, info in results["models"].items() for r in info["run"]["rows"]}
    assert results["n_test_images"] == 2000
    # Real numbers from real training: both baselines learn the task...
    assert rows[("no-aug", "none")]["accuracy"] > 0.8
    assert rows[("flip+shift", "none")]["accuracy"] > 0.78
    # ...and rotations a model never saw destroy its accuracy, as the reference experiment found.
    assert rows[("no-aug", "d4")]["accuracy"] < rows[("no-aug", "none")]["accuracy"] - 0.2
    assert len(results["lessons"]) >= 4
    for png in ("policy_metrics.png", "reliability.png"):
        assert (tmp_path / png).stat().st_size > 10_000
    # The lift figure shows one bar per TTA policy and model, each at its lift in points
    # (clipped to the axis when off scale) and labelled with the lift of results.json.
    ax_lift = saved_figures["policy_metrics.png"].axes[0]
    tta_rows = [(model, r) for (model, policy), r in rows.items() if policy != "none"]
    assert len(ax_lift.patches) == len(tta_rows) == 8
    limit = max(abs(p.get_width()) for p in ax_lift.patches)
    for bar, (model, row) in zip(ax_lift.patches, tta_rows, strict=True):
        lift = 100 * (row["accuracy"] - rows[(model, "none")]["accuracy"])
        assert bar.get_width() == pytest.approx(max(-limit, min(limit, lift)), abs=1e-6)
    reliability = saved_figures["reliability.png"].axes[0]
    assert len(reliability.get_lines()) >= 3  # the diagonal and a curve per policy shown


def test_search_then_evaluate_the_saved_policy(checkpoint, capsys, tmp_path):
    _, _, ckpt = checkpoint
    policy_path = tmp_path / "policy.json"
    code = main(
        ["--no-progress", "search", str(ckpt), "--budget", "3", "--out", str(policy_path), "--report-dir", str(tmp_path / "report")]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "selected" in out and str(policy_path) in out
    saved = json.loads(policy_path.read_text())
    assert saved["format"] == "ttakit-policy" and saved["name"] == "searched"
    assert 1 <= len(saved["views"]) <= 3 and saved["views"][0]["name"] == "identity"
    assert (tmp_path / "report" / "search.md").exists() and (tmp_path / "report" / "views_curve.png").exists()
    # The checkpoint was trained on left/right halves: a policy with a horizontal flip would
    # swap the classes, so the search must not pick one.
    assert not any("hflip" in v["name"] for v in saved["views"])
    code = main(["--no-progress", "evaluate", str(ckpt), "--policy", f"none,{policy_path}", "--out", str(tmp_path / "ev")])
    assert code == 0
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    # scored on the held-out test split, not on the images the search or training saw
    assert results["split"] == "test" and results["n_images"] == 24
    searched = next(s for s in results["summary"] if s["policy"] == "searched")
    none = next(s for s in results["summary"] if s["policy"] == "none")
    assert none["accuracy_mean"] >= 0.9
    # search never returns a policy worse than no TTA on validation; on this clean task it
    # must not lose a single test image either (one image is 4.2 points here)
    assert searched["accuracy_mean"] >= none["accuracy_mean"]
    assert searched["lift_accuracy_mean"] >= 0.0


def _class_biased_checkpoint(root: Path) -> Path:
    """A real checkpoint whose model favours class 0: trained on 5,000 8x8 images of two
    overlapping classes, then its last bias shifted by +-1.5. A temperature cannot undo a class
    bias; matrix scaling can, so a real search keeps it (enough validation rows for 6 numbers)."""
    import torch

    from ttakit.models import load_checkpoint, save_checkpoint

    rng = np.random.default_rng(0)
    n, size = 5000, 8
    labels = np.arange(n) % 2
    x = rng.uniform(0.0, 1.0, size=(n, size, size)).astype(np.float32)
    for i, label in enumerate(labels):  # a weak bright half: the classes overlap
        x[i, :, : size // 2] += rng.uniform(0.0, 0.5) if label == 0 else 0.0
        x[i, :, size // 2 :] += rng.uniform(0.0, 0.5) if label == 1 else 0.0
    np.savez(root / "biased.npz", x=x / x.max(), y=labels, classes=np.array(["left", "right"]))
    ckpt = root / "biased"
    assert main(["--no-progress", "train", "--data", str(root / "biased.npz"), "--epochs", "1",
                 "--batch-size", "32", "--out", str(ckpt)]) == 0
    model, meta = load_checkpoint(ckpt)
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.bias += torch.tensor([1.5, -1.5])
    save_checkpoint(ckpt, model, meta)
    return ckpt


def test_search_writes_the_no_tta_control_when_the_policy_holds_a_matrix(capsys, tmp_path):
    """When the saved policy holds matrix scaling, search also writes the identity with the same
    calibration (what the matrix gives without TTA) and the evaluate hint scores it beside."""
    ckpt = _class_biased_checkpoint(tmp_path)
    capsys.readouterr()
    policy_path = tmp_path / "policy.json"
    code = main(["--no-progress", "search", str(ckpt), "--budget", "2", "--out", str(policy_path),
                 "--report-dir", str(tmp_path / "r")])
    out = capsys.readouterr().out
    control_path = tmp_path / "policy-no-tta.json"
    assert code == 0 and "then matrix scaling" in out and f"(no TTA) written to {control_path}" in out
    assert f"--policy none,{control_path},{policy_path}" in out
    searched, control = (json.loads(p.read_text()) for p in (policy_path, control_path))
    assert searched["matrix_scaling"] is not None  # the real search kept the matrix
    assert control["name"] == "none (matrix-scaled)" and [v["name"] for v in control["views"]] == ["identity"]
    assert control["format_version"] == 2 and control["matrix_scaling"]["bias"][0] < 0  # it undoes the bias
    code = main(["--no-progress", "evaluate", str(ckpt), "--policy", f"none,{control_path},{policy_path}",
                 "--out", str(tmp_path / "ev")])
    assert code == 0
    summary = json.loads((tmp_path / "ev" / "results.json").read_text())["summary"]
    assert [s["policy"] for s in summary] == ["none", "none (matrix-scaled)", "searched"]
    # on the held-out test images the matrix undoes the bias the temperature cannot
    assert summary[1]["accuracy_mean"] > summary[0]["accuracy_mean"] + 0.05
    assert main(["--no-progress", "search", str(ckpt), "--budget", "2", "--no-matrix-scaling",
                 "--out", str(tmp_path / "p2.json"), "--report-dir", str(tmp_path / "r2")]) == 0
    assert "then matrix scaling" not in capsys.readouterr().out
    assert json.loads((tmp_path / "p2.json").read_text()).get("matrix_scaling") is None
    assert not (tmp_path / "p2-no-tta.json").exists()


def test_search_refuses_the_test_split(checkpoint, capsys):
    _, _, ckpt = checkpoint
    _fails_cleanly(capsys, ["search", str(ckpt), "--split", "test"], "--split test", "val")


def test_search_rejects_a_bad_budget_and_objective(checkpoint, capsys):
    _, _, ckpt = checkpoint
    with pytest.raises(SystemExit):  # argparse: budget must be a positive integer
        main(["search", str(ckpt), "--budget", "0"])
    capsys.readouterr()
    _fails_cleanly(capsys, ["search", str(ckpt), "--objective", "f1"], "f1", "nll")
