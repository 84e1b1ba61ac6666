import json
import os
import subprocess
import sys
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
def test_demo_quick_end_to_end(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "ttakit.cli", "--no-progress", "demo", "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "TTA on Fashion-MNIST" in proc.stdout and "d4" in proc.stdout
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


def test_search_writes_the_no_tta_control_when_the_policy_holds_a_matrix(checkpoint, capsys, tmp_path, monkeypatch):
    """When the saved policy holds matrix scaling, search also writes the identity with the same
    calibration (what the matrix gives without TTA) and the evaluate hint scores it beside."""
    import torch
    import torch.nn.functional as F

    from ttakit.policy import Compose, View
    from ttakit.search import ViewCache, greedy_search
    from ttakit.transforms import VerticalFlip

    _, _, ckpt = checkpoint
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (1500,), generator=g)
    logits = 1.5 * F.one_hot(y, 2) + torch.randn(2, 1500, 2, generator=g) + torch.tensor([1.0, 0.0])
    views = [View.identity(), Compose([VerticalFlip()]).views[1]]
    result = greedy_search(ViewCache(logits, y, views), budget=2)  # a biased "model": the matrix wins
    assert result.policy.matrix_scaling is not None and result.fallback.matrix_scaling is not None
    calls = []
    monkeypatch.setattr("ttakit.search.search_policy", lambda *args, **kwargs: calls.append(kwargs) or result)
    policy_path = tmp_path / "policy.json"
    code = main(["--no-progress", "search", str(ckpt), "--out", str(policy_path), "--report-dir", str(tmp_path / "r")])
    out = capsys.readouterr().out
    control_path = tmp_path / "policy-no-tta.json"
    assert code == 0 and "then matrix scaling" in out and f"(no TTA) written to {control_path}" in out
    assert f"--policy none,{control_path},{policy_path}" in out
    control = json.loads(control_path.read_text())
    assert control["name"] == "none (matrix-scaled)" and [v["name"] for v in control["views"]] == ["identity"]
    assert control["matrix_scaling"] == result.fallback.matrix_scaling and control["format_version"] == 2
    code = main(["--no-progress", "evaluate", str(ckpt), "--policy", f"none,{control_path},{policy_path}",
                 "--out", str(tmp_path / "ev")])
    assert code == 0
    summary = json.loads((tmp_path / "ev" / "results.json").read_text())["summary"]
    assert [s["policy"] for s in summary] == ["none", "none (matrix-scaled)", "searched"]
    assert calls[0]["matrix_scaling"] is True
    main(["--no-progress", "search", str(ckpt), "--no-matrix-scaling", "--out", str(tmp_path / "p2.json"),
          "--report-dir", str(tmp_path / "r2")])
    assert calls[1]["matrix_scaling"] is False


def test_search_refuses_the_test_split(checkpoint, capsys):
    _, _, ckpt = checkpoint
    _fails_cleanly(capsys, ["search", str(ckpt), "--split", "test"], "--split test", "val")


def test_search_rejects_a_bad_budget_and_objective(checkpoint, capsys):
    _, _, ckpt = checkpoint
    with pytest.raises(SystemExit):  # argparse: budget must be a positive integer
        main(["search", str(ckpt), "--budget", "0"])
    capsys.readouterr()
    _fails_cleanly(capsys, ["search", str(ckpt), "--objective", "f1"], "f1", "nll")
