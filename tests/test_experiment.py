import json

import pytest

from ttakit import experiment
from ttakit.errors import CheckpointError
from ttakit.experiment import evaluate_checkpoint, load_eval_data, summarize_runs, train_run
from ttakit.models import load_checkpoint
from ttakit.train import TrainConfig

from ._fixtures import write_halves_npz

CONFIG = TrainConfig(epochs=2, batch_size=16, lr=3e-3)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("exp")
    data = write_halves_npz(root / "halves.npz")
    result = train_run(str(data), out_dir=root / "ckpt", config=CONFIG, val_fraction=0.25, progress=False)
    return root, data, result


def test_train_run_records_its_data_recipe(trained):
    root, data, result = trained
    model, meta = load_checkpoint(root / "ckpt")
    assert meta.extra["data"] == {"spec": str(data), "data_dir": None, "val_fraction": 0.25, "split_seed": 0}
    assert meta.extra["train_config"]["epochs"] == 2
    val = load_eval_data(meta, split="val")
    assert len(val) == 24  # a quarter of 96, the same split every time
    assert len(load_eval_data(meta, split="test", limit=10)) == 10


def test_evaluate_checkpoint_writes_results_tables_and_plots(trained, tmp_path):
    root, _, _ = trained
    results = evaluate_checkpoint(root / "ckpt", policies=["none,hflip,vflip"], out_dir=tmp_path, progress=False)
    names = [s["policy"] for s in results["summary"]]
    assert names == ["none", "hflip", "vflip"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["format"] == "ttakit-results" and saved["n_images"] == 96
    assert "| hflip" in (tmp_path / "results.md").read_text()
    for png in ("policy_metrics.png", "reliability.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    hflip = next(s for s in results["summary"] if s["policy"] == "hflip")
    none = next(s for s in results["summary"] if s["policy"] == "none")
    assert hflip["accuracy_mean"] - none["accuracy_mean"] == pytest.approx(hflip["lift_accuracy_mean"])
    assert "hflip" in results["table"] and "baseline" in results["table"]


def test_interrupted_repeats_keep_finished_runs_and_resume(trained, tmp_path, monkeypatch):
    root, _, _ = trained
    real_retrain = experiment._retrain
    calls = []

    def interrupt_on_third(meta, seed, out_dir, progress):
        calls.append(seed)
        if seed == 2:
            raise KeyboardInterrupt
        return real_retrain(meta, seed, out_dir, progress)

    monkeypatch.setattr(experiment, "_retrain", interrupt_on_third)
    with pytest.raises(KeyboardInterrupt):
        evaluate_checkpoint(root / "ckpt", policies=["none"], repeats=3, out_dir=tmp_path, plots=False, progress=False)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["seed-0.json", "seed-1.json"]

    calls.clear()
    monkeypatch.setattr(experiment, "_retrain", lambda *a: calls.append(a[1]) or real_retrain(*a))
    results = evaluate_checkpoint(root / "ckpt", policies=["none"], repeats=3, out_dir=tmp_path, plots=False, progress=False)
    assert calls == [2]  # seed 1 was reused from disk, only seed 2 trained
    (summary,) = results["summary"]
    assert summary["runs"] == 3 and summary["accuracy_std"] >= 0.0


def test_load_eval_data_refuses_mismatched_checkpoint(trained, tmp_path):
    root, _, _ = trained
    _, meta = load_checkpoint(root / "ckpt")
    rgb = write_halves_npz(tmp_path / "rgb.npz", channels=3)
    with pytest.raises(CheckpointError, match="1-channel 8x8.*3-channel 8x8"):
        load_eval_data(meta, data=str(rgb))


def test_summarize_runs_mean_and_std():
    rows = lambda acc: [  # noqa: E731
        {"policy": "none", "views": 1, "passes_per_image": 1.0, "accuracy": acc, "nll": 0.5, "ece": 0.1, "brier": 0.2, "ms_per_image": 1.0},
        {"policy": "hflip", "views": 2, "passes_per_image": 2.0, "accuracy": acc + 0.01, "nll": 0.4, "ece": 0.1,
         "brier": 0.2, "ms_per_image": 2.0, "lift_accuracy": 0.01, "lift_mcnemar_p": 0.01},
    ]
    summary = summarize_runs([{"rows": rows(0.90)}, {"rows": rows(0.92)}])
    none, hflip = summary
    assert none["accuracy_mean"] == pytest.approx(0.91) and none["accuracy_std"] == pytest.approx(0.0141421, rel=1e-4)
    assert hflip["significant_runs"] == 2 and hflip["lift_accuracy_mean"] == pytest.approx(0.01)
