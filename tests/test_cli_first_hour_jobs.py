"""Issue "The first hour of a user", the jobs' leftovers: --device and --amp on audit, ensemble
and export; the evaluate, ensemble and audit reports in the language of every report (accuracy
in percent, lifts in points, "NLL change", "passes/img", singular and plural right)."""

from __future__ import annotations

import json

import pytest

from ttakit.cli import EXIT_BAD_INPUT, main

from ._fixtures import write_halves_npz

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("jobs")
    data = write_halves_npz(root / "halves.npz", n=120)
    out = root / "ckpt"
    assert main(["--no-progress", "train", "--data", str(data), "--epochs", "1", "--batch-size", "16",
                 "--out", str(out)]) == 0
    return out


def _one_line_exit_2(capsys, argv, *fragments) -> str:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_BAD_INPUT, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


# --------------------------------------------------------------------------- --device and --amp


def test_audit_runs_with_device_and_amp(checkpoint, tmp_path, capsys):
    argv = ["--no-progress", "audit", str(checkpoint), "--split", "test", "--method", "rule", "--device", "cpu",
            "--amp", "--out", str(tmp_path / "a")]
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "a" / "audit.json").read_text())
    assert result["n_images"] == 18 and "(18 images): flagged images" in out
    assert (tmp_path / "a" / "issues.csv").exists()


def test_audit_folds_train_on_the_device_asked(checkpoint, tmp_path, capsys):
    from ttakit.jobs.audit import _train_config
    from ttakit.models import load_checkpoint

    _, meta = load_checkpoint(checkpoint)
    config = _train_config(meta, 1, "cpu", True)
    assert (config.device, config.amp, config.epochs) == ("cpu", True, 1)
    assert main(["--no-progress", "audit", str(checkpoint), "--folds", "2", "--epochs", "1", "--limit", "20",
                 "--method", "rule", "--amp", "--out", str(tmp_path / "f")]) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "f" / "audit.json").read_text())["scored_by"].startswith("2-fold")


def test_ensemble_runs_with_device_and_amp(checkpoint, tmp_path, capsys):
    argv = ["--no-progress", "ensemble", str(checkpoint), f"{checkpoint}:hflip", "--device", "cpu", "--amp",
            "--out", str(tmp_path / "e")]
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "ensemble of 2 members" in out and "(18 images" in out
    assert "lift vs best member (points)" in out and "accuracy %" in out and "passes/img" in out
    result = json.loads((tmp_path / "e" / "results.json").read_text())
    assert all(0 <= row["accuracy"] <= 1 for row in result["rows"])  # the JSON keeps fractions
    md = (tmp_path / "e" / "results.md").read_text()
    assert "lift vs best member (points)" in md and "Accuracy is in percent" in md


def test_export_takes_device_and_refuses_amp_in_one_line(checkpoint, tmp_path, capsys):
    out = tmp_path / "m.pt"
    assert main(["export", str(checkpoint), "--out", str(out), "--device", "cpu"]) == 0, capsys.readouterr().err
    assert out.exists() and "exported" in capsys.readouterr().out
    _one_line_exit_2(capsys, ["export", checkpoint, "--out", tmp_path / "n.pt", "--amp"],
                     "ttakit export: error:", "--amp", "full precision")
    assert not (tmp_path / "n.pt").exists()


# --------------------------------------------------------------------------- one language


def test_evaluate_tables_in_percent_points_and_nll_change(checkpoint, tmp_path, capsys):
    argv = ["--no-progress", "evaluate", str(checkpoint), "--policy", "none,hflip", "--no-plots",
            "--no-uncertainty", "--out", str(tmp_path / "ev")]
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "(18 images, 1 run)" in out and "run(s)" not in out
    for column in ("accuracy %", "lift (points)", "95% CI (points)", "NLL change", "passes/img"):
        assert column in out, column
    assert "(pts)" not in out
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    summary = {s["policy"]: s for s in results["summary"]}
    assert 0 <= summary["none"]["accuracy_mean"] <= 1  # fractions in JSON
    change = summary["hflip"]["nll_mean"] - summary["none"]["nll_mean"]
    md = (tmp_path / "ev" / "results.md").read_text()
    assert f"{change:+.4f}" in md and "NLL change" in md and "1 run (seed 0)" in md
    assert f"{100 * summary['none']['accuracy_mean']:.2f}" in out
