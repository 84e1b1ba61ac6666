"""``ttakit audit`` as a new user runs it (issue "The first hour of a user"): the default split
of a checkpoint is audited by cross-validation, issues.csv's probability is the one each rule
judged, --write-clean drops only likely-mislabelled images by default, and weak fold models are
said out loud and keep --write-clean from writing unless --force."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from ttakit.cli import main

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def random_labels_checkpoint(tmp_path_factory):
    """A checkpoint trained on labels that say nothing about the images: any model scores ~50%."""
    from tests._fixtures import write_halves_npz

    root = tmp_path_factory.mktemp("audit-cli")
    data = write_halves_npz(root / "halves.npz", n=120)
    with np.load(data) as archive:
        x, classes = archive["x"], archive["classes"]
    y = np.random.default_rng(1).integers(0, 2, len(x))
    np.savez(data, x=x, y=y, classes=classes)
    out = root / "ckpt"
    assert main(["--no-progress", "train", "--data", str(data), "--epochs", "1", "--batch-size", "16",
                 "--out", str(out)]) == 0
    return root, out


def _issues(folder):
    return list(csv.DictReader(open(folder / "issues.csv")))


def test_default_audit_uses_5_fold_cross_validation_and_refuses_write_clean_when_weak(
        random_labels_checkpoint, tmp_path, capsys):
    _, ckpt = random_labels_checkpoint
    capsys.readouterr()
    out, clean = tmp_path / "audit", tmp_path / "clean.npz"
    code = main(["--no-progress", "audit", str(ckpt), "--epochs", "1", "--method", "rule", "--out", str(out),
                 "--write-clean", str(clean)])
    captured = capsys.readouterr()
    # 1. the default split (train) of the checkpoint is audited, by 5-fold cross-validation, and said so
    assert "auditing the training split with 5-fold cross-validation:" in captured.out
    assert "scored by 5-fold cross-validation" in captured.out
    # 4. models that learnt nothing (random labels): a warning line, recorded, and no cleaned copy
    warning = [line for line in captured.out.splitlines() if line.startswith("warning: the 5 fold models score")]
    assert len(warning) == 1 and "below 70%" in warning[0], captured.out
    assert code == 2
    err = [line for line in captured.err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("ttakit audit: error: --write-clean refused") and "--force" in err[0]
    assert not clean.exists()
    record = json.loads((out / "audit.json").read_text())
    assert record["warning"] == warning[0] and record["scorer"]["weak"] and record["clean"] is None
    assert len(record["scorer"]["fold_accuracy"]) == 5 and record["scorer"]["accuracy"] < 0.7
    assert record["clean_refused"] == err[0][len("ttakit audit: error: "):]
    assert (out / "issues.csv").exists() and (out / "review.html").exists()  # the audit itself is kept
    assert f"<strong>Warning:</strong> {record['warning']}" in (out / "report.html").read_text()  # and the report says it


def test_issues_csv_probability_is_the_one_the_rule_judged(random_labels_checkpoint, tmp_path, capsys):
    _, ckpt = random_labels_checkpoint
    out = tmp_path / "audit"
    assert main(["--no-progress", "audit", str(ckpt), "--epochs", "1", "--folds", "2", "--method", "rule",
                 "--mislabel-threshold", "0.8", "--ambiguous-range", "0.6-0.75", "--out", str(out)]) == 0
    assert "issues: " in capsys.readouterr().out
    rows = _issues(out)
    ambiguous = [r for r in rows if r["kind"] == "ambiguous"]
    mislabelled = [r for r in rows if r["kind"] == "mislabelled"]
    assert ambiguous and mislabelled
    for r in ambiguous:  # the top probability, the one inside --ambiguous-range 0.6-0.75
        assert r["probability_of"] == "p(top)" and 0.6 <= float(r["probability"]) <= 0.75, r
        assert float(r["probability"]) >= max(float(r["p_suggested"]), float(r["p_given"]))
    # where the label is the top class, the suggestion's own p lies below 0.5: the old column's value
    assert any(float(r["p_given"]) >= 0.5 > float(r["p_suggested"]) for r in ambiguous)
    for r in mislabelled:  # --mislabel-by others: 1 - p(given)
        assert r["probability_of"] == "1-p(given)"
        assert abs(float(r["probability"]) - (1 - float(r["p_given"]))) < 2e-4 and float(r["probability"]) > 0.8


def test_write_clean_drops_only_the_likely_mislabelled_by_default_and_says_so(
        random_labels_checkpoint, tmp_path, capsys):
    from ttakit.data import load_dataset

    _, ckpt = random_labels_checkpoint
    out, clean = tmp_path / "audit", tmp_path / "clean.npz"
    code = main(["--no-progress", "audit", str(ckpt), "--epochs", "1", "--folds", "2", "--method", "rule",
                 "--mislabel-threshold", "0.8", "--ambiguous-range", "0.6-0.75", "--out", str(out), "--write-clean", str(clean), "--force"])
    said = capsys.readouterr().out
    assert code == 0, said
    rows = _issues(out)
    mislabelled = {int(r["row"]) for r in rows if r["kind"] == "mislabelled"}
    ambiguous = {int(r["row"]) for r in rows if r["kind"] == "ambiguous"} - mislabelled
    assert mislabelled and ambiguous
    line = next(line for line in said.splitlines() if line.startswith("cleaned data"))
    assert (f"{len(mislabelled)} removed: the images flagged likely mislabelled (ambiguous images kept), "
            "--remove mislabelled") in line
    manifest = json.loads((out / "audit.json").read_text())["clean_manifest"]
    assert manifest["removed_rows"] == sorted(mislabelled)
    assert len(load_dataset(str(clean))) == manifest["n_kept"]
    # --remove disputed: also the ambiguous rows whose label is not the model's top class
    disputed = {int(r["row"]) for r in rows if r["kind"] == "ambiguous" and float(r["p_given"]) < 0.5}
    assert disputed and disputed != ambiguous
    assert main(["--no-progress", "audit", str(ckpt), "--epochs", "1", "--folds", "2", "--method", "rule",
                 "--mislabel-threshold", "0.8", "--ambiguous-range", "0.6-0.75", "--out", str(tmp_path / "a2"), "--write-clean",
                 str(tmp_path / "c2.npz"), "--force", "--remove", "disputed"]) == 0
    assert "--remove disputed" in capsys.readouterr().out
    again = json.loads((tmp_path / "a2" / "audit.json").read_text())["clean_manifest"]
    assert again["removed_rows"] == sorted(mislabelled | disputed)


def test_models_that_learnt_the_data_give_no_warning_and_write_clean(tmp_path, capsys):
    from tests._fixtures import write_halves_npz

    data = write_halves_npz(tmp_path / "halves.npz", n=160)
    assert main(["--no-progress", "train", "--data", str(data), "--epochs", "4", "--batch-size", "16",
                 "--out", str(tmp_path / "ckpt")]) == 0
    capsys.readouterr()
    clean = tmp_path / "clean.npz"
    code = main(["--no-progress", "audit", str(tmp_path / "ckpt"), "--folds", "2", "--method", "rule",
                 "--out", str(tmp_path / "audit"), "--write-clean", str(clean)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    record = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert record["scorer"]["accuracy"] >= 0.7 and record["warning"] is None, record["scorer"]
    assert "warning:" not in captured.out and clean.exists()
