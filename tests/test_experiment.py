import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import ttakit.jobs._eval_data as eval_data
import ttakit.jobs.train as train_job
from ttakit.data import load_dataset
from ttakit.errors import CheckpointError, DataError, InvalidInputError
from ttakit.jobs import evaluate as experiment
from ttakit.jobs._eval_data import load_eval_data
from ttakit.jobs._policies import check_input_sizes, resolve_named_policies
from ttakit.jobs.evaluate import evaluate_checkpoint, summarize_runs
from ttakit.jobs.train import train_run
from ttakit.models import load_checkpoint
from ttakit.policy import Compose, Policy
from ttakit.training.config import TrainConfig
from ttakit.transforms import HorizontalFlip, Scale, VerticalFlip

from ._fixtures import write_halves_npz

CONFIG = TrainConfig(epochs=2, batch_size=16, lr=3e-3)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("exp")
    data = write_halves_npz(root / "halves.npz")
    result = train_run(str(data), out_dir=root / "ckpt", config=CONFIG, val_fraction=0.25, progress=False)
    return root, data, result


def _rows(images: torch.Tensor) -> set[bytes]:
    """Each image's exact bytes: the fixtures' images are all distinct (random noise)."""
    return {img.numpy().tobytes() for img in images}


def _write_halves_folder(root, n=60):
    """A flat image folder (class sub-folders, no train/ or test/): left/ and right/ halves."""
    rng = np.random.default_rng(1)
    for i in range(n):
        label = i % 2
        pixels = rng.integers(0, 50, size=(8, 8), dtype=np.uint8)
        pixels[:, 4 * label : 4 * label + 4] += 180
        folder = root / ("left", "right")[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"img{i:03d}.png")
    return root


def test_train_run_records_its_data_recipe(trained):
    root, data, result = trained
    model, meta = load_checkpoint(root / "ckpt")
    recipe = meta.extra["data"]
    assert {k: recipe[k] for k in ("spec", "data_dir", "val_fraction", "split_seed", "test_source", "test_fraction")} == {
        "spec": str(data),
        "data_dir": None,
        "val_fraction": 0.25,
        "split_seed": 0,
        "test_source": "carved",  # an .npz has no test split of its own
        "test_fraction": 0.15,
    }
    assert recipe["n_images"] == 96 and len(recipe["sha256"]) == 64
    # 15% of each class of 48 (7 each) held out for test; a quarter of the other 41 per class for val
    assert len(recipe["test_index"]) == 14 and len(recipe["val_index"]) == 20
    assert not set(recipe["test_index"]) & set(recipe["val_index"])
    assert meta.extra["train_config"]["epochs"] == 2
    assert meta.metrics["train_images"] == 96 - 14 - 20
    val = load_eval_data(meta, split="val")
    test = load_eval_data(meta, split="test")
    assert len(val) == 20 and len(test) == 14
    assert torch.bincount(test.labels).tolist() == [7, 7]  # stratified
    assert len(load_eval_data(meta, split="test", limit=10)) == 10


@pytest.mark.parametrize("kind", ["npz", "folder"])
def test_evaluate_never_scores_the_images_train_trained_on(kind, tmp_path, monkeypatch):
    data = write_halves_npz(tmp_path / "d.npz", n=80) if kind == "npz" else _write_halves_folder(tmp_path / "imgs")
    seen = {}
    real_train, real_evaluate = train_job.train_model, experiment.evaluate_policies

    def spy_train(train_ds, *args, **kwargs):
        seen["train"] = train_ds.images.clone()
        seen["val"] = kwargs["val_ds"].images.clone()
        return real_train(train_ds, *args, **kwargs)

    def spy_evaluate(model, dataset, *args, **kwargs):
        seen.setdefault("scored", []).append(dataset.images.clone())
        return real_evaluate(model, dataset, *args, **kwargs)

    monkeypatch.setattr(train_job, "train_model", spy_train)
    monkeypatch.setattr(experiment, "evaluate_policies", spy_evaluate)
    train_run(str(data), out_dir=tmp_path / "ckpt", config=TrainConfig(epochs=1, batch_size=16), progress=False)
    results = evaluate_checkpoint(tmp_path / "ckpt", policies=["none"], out_dir=tmp_path / "ev", plots=False, progress=False)

    everything = _rows(load_dataset(str(data)).images)
    trained_on, val, scored = _rows(seen["train"]), _rows(seen["val"]), _rows(seen["scored"][0])
    assert len(everything) == (80 if kind == "npz" else 60)  # distinct images, so sets count them
    assert not scored & trained_on and not scored & val and not trained_on & val
    assert scored | trained_on | val == everything
    assert 0.13 < len(scored) / len(everything) < 0.17 and results["n_images"] == len(scored)
    assert "held-out test split" in results["table"] and results["held_out"] is True

    # the training images only by name, and the title says so
    train_results = evaluate_checkpoint(
        tmp_path / "ckpt", policies=["none"], split="train", out_dir=tmp_path / "tr", plots=False, progress=False
    )
    assert _rows(seen["scored"][1]) == trained_on
    assert "TRAINING images" in train_results["table"] and train_results["held_out"] is False
    if kind == "folder":
        _, meta = load_checkpoint(tmp_path / "ckpt")
        files = meta.extra["data"]["test_files"]
        assert len(files) == len(scored) and all(f.startswith(("left/", "right/")) for f in files)


def test_changed_data_cannot_prove_its_held_out_split(tmp_path):
    data = write_halves_npz(tmp_path / "d.npz", n=40)
    train_run(str(data), out_dir=tmp_path / "ckpt", config=TrainConfig(epochs=1, batch_size=16), progress=False)
    _, meta = load_checkpoint(tmp_path / "ckpt")
    write_halves_npz(data, n=40, seed=7)  # same path, other images
    with pytest.raises(DataError, match=r"d.npz has changed since the checkpoint was trained"):
        load_eval_data(meta)
    # other data of a different content, without a split of its own: never trained on, used whole
    other = write_halves_npz(tmp_path / "other.npz", n=30, seed=3)
    whole = load_eval_data(meta, data=str(other))
    assert len(whole) == 30 and "not the training data" in whole.name
    with pytest.raises(DataError, match="use --split test"):
        load_eval_data(meta, data=str(other), split="val")
    # a copy of the training data under another name is recognised by content
    write_halves_npz(data, n=40)
    shutil.copy(data, tmp_path / "copy.npz")
    assert len(load_eval_data(meta, data=str(tmp_path / "copy.npz"))) == 6


def test_a_checkpoint_from_before_test_splits_is_not_scored_on_its_training_data(trained, tmp_path):
    root, data, _ = trained
    legacy = tmp_path / "legacy"
    shutil.copytree(root / "ckpt", legacy)
    meta_json = json.loads((legacy / "checkpoint.json").read_text())
    meta_json["extra"]["data"] = {"spec": str(data), "data_dir": None, "val_fraction": 0.25, "split_seed": 0}
    (legacy / "checkpoint.json").write_text(json.dumps(meta_json))
    _, meta = load_checkpoint(legacy)
    with pytest.raises(DataError, match="trained on all of .*halves.npz.*--split train"):
        load_eval_data(meta)
    assert len(load_eval_data(meta, split="val")) == 24  # its validation split is still known


def test_evaluate_checkpoint_writes_results_tables_and_plots(trained, tmp_path):
    root, _, _ = trained
    results = evaluate_checkpoint(root / "ckpt", policies=["none,hflip,vflip"], out_dir=tmp_path, progress=False)
    names = [s["policy"] for s in results["summary"]]
    assert names == ["none", "hflip", "vflip"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["format"] == "ttakit-results" and saved["n_images"] == 14 and saved["split"] == "test"
    assert "| hflip" in (tmp_path / "results.md").read_text()
    for png in ("policy_metrics.png", "reliability.png"):
        with Image.open(tmp_path / png) as im:
            pixels = np.asarray(im.convert("RGB"))
        assert im.format == "PNG" and pixels.shape[0] >= 300 and pixels.shape[1] >= 500
        assert (pixels < 235).any(axis=2).mean() > 0.02  # something was drawn, not a blank canvas
    hflip = next(s for s in results["summary"] if s["policy"] == "hflip")
    none = next(s for s in results["summary"] if s["policy"] == "none")
    assert hflip["accuracy_mean"] - none["accuracy_mean"] == pytest.approx(hflip["lift_accuracy_mean"])
    # the lift column carries the paired bootstrap interval evaluate computed
    row = results["runs"][0]["rows"][1]
    assert row["policy"] == "hflip" and row["lift_ci_low"] <= row["lift_accuracy"] <= row["lift_ci_high"]
    assert f"[{100 * row['lift_ci_low']:+.2f}, {100 * row['lift_ci_high']:+.2f}]" in results["table"]
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


def test_resumed_repeats_are_keyed_by_content_not_names(trained, tmp_path, monkeypatch):
    root, _, _ = trained
    policy_file = tmp_path / "mine.json"
    Compose([HorizontalFlip()]).to_policy("mine").save(policy_file)
    retrained = []
    real_retrain = experiment._retrain
    monkeypatch.setattr(experiment, "_retrain", lambda *a: retrained.append(a[1]) or real_retrain(*a))

    def run():
        retrained.clear()
        args = dict(policies=["none", str(policy_file)], repeats=2, out_dir=tmp_path / "ev", plots=False, progress=False)
        return evaluate_checkpoint(root / "ckpt", **args)

    first = run()
    assert retrained == [1]
    run()
    assert retrained == []  # nothing changed: the finished repeat is reused
    Compose([VerticalFlip()]).to_policy("mine").save(policy_file)  # same name, other views
    second = run()
    assert retrained == [1]  # recomputed (the retrained checkpoint itself is reused from disk)
    views = lambda r: r["runs"][1]["policies"]["mine"]  # noqa: E731
    assert views(first) == ["identity", "hflip"] and views(second) == ["identity", "vflip"]
    Policy(Compose([VerticalFlip()]).views, name="mine", temperature=2.0).save(policy_file)
    run()
    assert retrained == [1]  # a temperature change alone recomputes too

    # a retrained base checkpoint (other weights, same name and recipe) recomputes
    ckpt2 = tmp_path / "ckpt2"
    shutil.copytree(root / "ckpt", ckpt2)
    data = json.loads((ckpt2 / "checkpoint.json").read_text())
    args = dict(policies=["none"], repeats=2, out_dir=tmp_path / "ev2", plots=False, progress=False)
    evaluate_checkpoint(ckpt2, **args)
    model, meta = load_checkpoint(ckpt2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    train_job.save_checkpoint(ckpt2, model, meta)
    assert json.loads((ckpt2 / "checkpoint.json").read_text())["weights_sha256"] != data["weights_sha256"]
    retrained.clear()
    evaluate_checkpoint(ckpt2, **args)
    assert retrained == [1]


def test_retrain_does_not_reuse_a_checkpoint_of_another_recipe(trained, tmp_path, monkeypatch):
    root, data, _ = trained
    _, meta = load_checkpoint(root / "ckpt")
    out = tmp_path / "seed-1"
    # a checkpoint of the right seed but trained for one epoch only sits where the repeat goes
    train_run(str(data), out_dir=out, config=TrainConfig(epochs=1, batch_size=16, lr=3e-3, seed=1), val_fraction=0.25, progress=False)
    trainings = []
    real_train_run = eval_data.train_run
    monkeypatch.setattr(eval_data, "train_run", lambda *a, **k: trainings.append(k["config"]) or real_train_run(*a, **k))
    _, found = eval_data._retrain(meta, 1, out, progress=False)
    assert len(trainings) == 1 and found.extra["train_config"]["epochs"] == 2 and found.seed == 1
    # now the recipe matches: reused, not trained again
    _, again = eval_data._retrain(meta, 1, out, progress=False)
    assert len(trainings) == 1 and json.dumps(again.extra["train_config"]) == json.dumps(found.extra["train_config"])


def test_policies_that_resolve_to_the_same_name(trained, tmp_path):
    root, _, _ = trained
    _, meta = load_checkpoint(root / "ckpt")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    Compose([HorizontalFlip()]).to_policy("searched").save(tmp_path / "a" / "policy.json")
    Compose([VerticalFlip()]).to_policy("searched").save(tmp_path / "b" / "policy.json")
    with pytest.raises(InvalidInputError) as info:
        resolve_named_policies([f"{tmp_path}/a/policy.json,{tmp_path}/b/policy.json"], meta)
    message = str(info.value)
    assert "a/policy.json" in message and "b/policy.json" in message and "'policy'" in message
    # distinct file stems name them apart
    shutil.move(tmp_path / "b" / "policy.json", tmp_path / "b" / "vertical.json")
    named = resolve_named_policies([str(tmp_path / "a" / "policy.json"), str(tmp_path / "b" / "vertical.json")], meta)
    assert [p.name for p in named] == ["policy", "vertical"]
    assert [p.view_names for p in named] == [["identity", "hflip"], ["identity", "vflip"]]
    # a user file named "none" is never merged into the plain-inference row
    Compose([HorizontalFlip()]).to_policy("none").save(tmp_path / "flipped.json")
    named = resolve_named_policies(["none", str(tmp_path / "flipped.json")], meta)
    assert [(p.name, len(p)) for p in named] == [("none", 1), ("flipped", 2)]
    results = evaluate_checkpoint(
        root / "ckpt", policies=["none", str(tmp_path / "flipped.json")], out_dir=tmp_path / "ev", plots=False, progress=False
    )
    assert [(s["policy"], s["views"]) for s in results["summary"]] == [("none", 1), ("flipped", 2)]
    # the very same policy twice is one row; a library Policy clashing with a name is refused
    assert [p.name for p in resolve_named_policies(["hflip", "hflip,none"], meta)] == ["hflip", "none"]
    with pytest.raises(InvalidInputError, match="'hflip'.*both resolve to the name 'hflip'"):
        resolve_named_policies(["hflip", Compose([VerticalFlip()]).to_policy("hflip")], meta)


def test_class_names_must_match_in_order(trained, tmp_path):
    root, _, _ = trained
    _, meta = load_checkpoint(root / "ckpt")
    x = np.random.default_rng(0).uniform(0, 1, size=(20, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "swapped.npz", x=x, y=np.arange(20) % 2, classes=np.array(["right", "left"]))
    with pytest.raises(CheckpointError) as info:
        load_eval_data(meta, data=str(tmp_path / "swapped.npz"))
    assert str(info.value).endswith(
        "was trained on classes ['left', 'right'] but the data has classes ['right', 'left'] (names and order must match)"
    )


def test_size_changing_views_are_refused_on_a_fixed_size_model(trained, tmp_path):
    root, _, _ = trained
    model, meta = load_checkpoint(root / "ckpt")
    multiscale = Compose([Scale([1.0, 1.25])]).to_policy("multiscale")
    with pytest.raises(InvalidInputError) as info:
        check_input_sizes(model, meta, [multiscale])
    message = str(info.value)
    assert "view 'scale1.25'" in message or "view 'scale" in message
    assert "8x8 images into 10x10" in message and "takes only 8x8 images" in message
    multiscale.save(tmp_path / "ms.json")
    with pytest.raises(InvalidInputError, match="multiscale.*takes only 8x8"):
        evaluate_checkpoint(root / "ckpt", policies=["none", str(tmp_path / "ms.json")], out_dir=tmp_path / "e", progress=False)
    check_input_sizes(model, meta, [Compose([HorizontalFlip()]).to_policy("hflip")])  # same size: fine

    # an architecture not registered as fixed-size is probed: a model that pools passes...
    class Pooling(torch.nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3)).repeat(1, 2)

    custom = dataclasses.replace(meta, arch="my-net")
    check_input_sizes(Pooling(), custom, [multiscale])
    # ...and one with a dense layer of fixed width is refused before any real inference
    dense = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))
    with pytest.raises(InvalidInputError, match="view 'scale1.25' turns the 8x8 images into 10x10.*my-net"):
        check_input_sizes(dense, custom, [multiscale])


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
         "brier": 0.2, "ms_per_image": 2.0, "lift_accuracy": 0.01, "lift_mcnemar_p": 0.01,
         "lift_ci_low": acc - 0.9, "lift_ci_high": acc - 0.88},
    ]
    summary = summarize_runs([{"rows": rows(0.90)}, {"rows": rows(0.92)}])
    none, hflip = summary
    assert none["accuracy_mean"] == pytest.approx(0.91) and none["accuracy_std"] == pytest.approx(0.0141421, rel=1e-4)
    assert hflip["significant_runs"] == 2 and hflip["lift_accuracy_mean"] == pytest.approx(0.01)
    assert hflip["lift_ci_low_mean"] == pytest.approx(0.01) and hflip["lift_ci_high_mean"] == pytest.approx(0.03)


def test_repeats_refit_a_fitted_policy_per_seed_and_record_it(trained, tmp_path):
    """`evaluate --repeats R --policy policy.json`: a retrained seed keeps the policy's views and
    refits its weights, gate and temperature on its own validation rows (the rows the search
    fitted on, never the ones it left for conformal), and results.json/results.md say so."""
    from ttakit.data import dataset_sha256
    from ttakit.jobs._eval_data import load_eval_data
    from ttakit.models import read_checkpoint_meta

    root, _, _ = trained
    meta = read_checkpoint_meta(root / "ckpt")
    val = load_eval_data(meta, split="val")
    held = [0, 1, 2, 3]
    policy = Policy(
        Compose([VerticalFlip()]).views, name="fitted", weights=[0.9, 0.1], temperature=7.0, gate_threshold=0.999,
        meta={"weights_sha256": meta.weights_sha256, "checkpoint": str(root / "ckpt"),
              "validation_rows": {"split": "val", "n": len(val), "sha256": dataset_sha256(val), "held_out": held}},
    )
    policy.save(tmp_path / "fitted.json")
    results = evaluate_checkpoint(root / "ckpt", policies=["none", "hflip", str(tmp_path / "fitted.json")], repeats=2,
                                  out_dir=tmp_path / "ev", plots=False, progress=False)
    first, second = results["runs"]
    assert first["refit"] == {}  # seed 0: the policy as saved
    assert list(second["refit"]) == ["fitted"]  # views-only policies (none, hflip) are carried as they are
    info = second["refit"]["fitted"]
    assert info["views"] == ["identity", "vflip"] and second["policies"]["fitted"] == ["identity", "vflip"]
    assert info["refit"] == ["weights", "temperature", "gate"]
    assert info["weights"] == "per view" and info["temperature"] != 7.0 and info["gate_threshold"] is not None
    assert info["n_rows"] == len(val) - len(held)
    saved = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert saved["runs"][1]["refit"]["fitted"]["temperature"] == info["temperature"]
    markdown = (tmp_path / "ev" / "results.md").read_text()
    assert "## Fitted policies on retrained seeds" in markdown and f"seed {second['seed']}, `fitted`" in markdown


def test_split_seed_lives_with_the_splits_and_stays_importable_from_experiment():
    """SPLIT_SEED belongs to ttakit.data.splits (layer 2); experiment re-exports it, and neither
    lr-find nor audit reaches up into experiment for it."""
    import inspect

    from ttakit.data import splits
    from ttakit.jobs import audit
    from ttakit.training import lr_find

    assert experiment.SPLIT_SEED is splits.SPLIT_SEED and splits.SPLIT_SEED == 0
    assert "SPLIT_SEED" in splits.__all__
    assert inspect.signature(splits.make_splits).parameters["seed"].default == splits.SPLIT_SEED
    for module in (audit, lr_find):
        assert "from .experiment import SPLIT_SEED" not in inspect.getsource(module), module.__name__
