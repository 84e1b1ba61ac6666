import pytest
import torch
from torch import nn

from ttakit import Compose, HorizontalFlip, Policy, UnknownNameError, get_policy
from ttakit.data import ImageDataset
from ttakit.errors import InvalidInputError, PolicyFormatError
from ttakit.jobs._policies import resolve_policies, resolve_policy
from ttakit.jobs._policy_eval import evaluate_policies, predict_probs
from ttakit.models import CheckpointMeta


class HalvesModel(nn.Module):
    """Scores 'left' vs 'right' by the brightness of each half: exact, not learned."""

    def forward(self, x):
        w = x.shape[-1]
        left = x[..., : w // 2].mean(dim=(1, 2, 3))
        right = x[..., w // 2 :].mean(dim=(1, 2, 3))
        return torch.stack([left, right], dim=1) * 20


def _halves(n=40, size=8):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, size, size, generator=g) * 0.2
    labels = torch.arange(n) % 2
    x[labels == 0, :, :, : size // 2] += 0.7
    x[labels == 1, :, :, size // 2 :] += 0.7
    return ImageDataset(x, labels, ["left", "right"])


def _meta(augs):
    return CheckpointMeta(arch="seed-cnn", classes=["a", "b"], in_channels=1, image_size=[8, 8], train_augmentations=augs)


def test_resolve_policy_names_json_and_train_aug(tmp_path):
    assert resolve_policy("d4").view_names == get_policy("d4").view_names
    assert len(resolve_policy("train-aug", _meta([{"name": "flip", "p": 0.5}]))) == 2
    path = tmp_path / "p.json"
    Compose([HorizontalFlip()]).to_policy("mine").save(path)
    assert resolve_policy(str(path)).name == "mine"
    assert [p.name for p in resolve_policies(["none,hflip", "hflip", "d4"])] == ["none", "hflip", "d4"]


def test_resolve_policy_errors_name_the_value_and_choices(tmp_path):
    with pytest.raises(UnknownNameError, match="'rot45'.*hflip.*train-aug"):
        resolve_policy("rot45")
    with pytest.raises(InvalidInputError, match="train-aug"):
        resolve_policy("train-aug")
    with pytest.raises(PolicyFormatError, match="does not exist"):
        resolve_policy(str(tmp_path / "missing.json"))
    with pytest.raises(InvalidInputError, match="at least one policy"):
        resolve_policies([" , "])


def test_evaluate_policies_lift_and_significance():
    data = _halves()
    results = evaluate_policies(HalvesModel(), data, [get_policy("hflip"), get_policy("vflip")], progress=False)
    by_name = {r.name: r for r in results}
    assert list(by_name) == ["none", "hflip", "vflip"]  # plain inference is added first
    plain, hflip, vflip = by_name["none"], by_name["hflip"], by_name["vflip"]
    assert plain.metrics["accuracy"] == 1.0
    # vflip keeps left/right: identical predictions, zero lift, McNemar p = 1.
    assert vflip.metrics["accuracy"] == 1.0
    assert vflip.lift["accuracy"] == 0.0 and vflip.lift["mcnemar_p"] == 1.0
    # hflip swaps the classes; the mean of the two views is a coin toss near 0.5 confidence.
    assert hflip.metrics["accuracy"] < 1.0
    assert hflip.lift["accuracy"] == pytest.approx(hflip.metrics["accuracy"] - 1.0)
    assert hflip.lift["nll"] > 0
    assert hflip.forward_passes_per_image == 2.0 and plain.forward_passes_per_image == 1.0
    assert hflip.lift["ci_low"] <= hflip.lift["accuracy"] <= hflip.lift["ci_high"]
    row = hflip.row()
    assert row["policy"] == "hflip" and row["views"] == 2 and row["lift_accuracy"] == hflip.lift["accuracy"]


def test_predict_probs_applies_policy_temperature():
    data = _halves(10)
    policy = Policy.identity()
    plain, _ = predict_probs(HalvesModel(), data.images, policy)
    policy.temperature = 3.0
    soft, passes = predict_probs(HalvesModel(), data.images, policy)
    assert passes == 1.0
    assert torch.equal(plain.argmax(1), soft.argmax(1))
    assert (soft.max(1).values < plain.max(1).values).all()
    assert torch.allclose(soft.sum(1), torch.ones(10))


def test_evaluate_policies_rejects_empty_data():
    empty = ImageDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long), ["a", "b"])
    with pytest.raises(InvalidInputError, match="empty"):
        evaluate_policies(HalvesModel(), empty, [get_policy("hflip")], progress=False)


def test_evaluate_uncertainty_report_costs_no_second_pass(tmp_path, monkeypatch):
    """`evaluate` scores each policy and reports its uncertainty from the same engine run: the
    test images go through the model once per view (1 + 2 + 8 for none, hflip, d4), not twice,
    and the report equals the one computed by separate runs."""
    from ttakit.jobs import evaluate as experiment
    from ttakit.jobs._conformal import evaluate_extras
    from ttakit.jobs.evaluate import evaluate_checkpoint
    from ttakit.jobs.train import train_run
    from ttakit.training.config import TrainConfig

    from ._fixtures import write_halves_npz

    data = write_halves_npz(tmp_path / "halves.npz")
    train_run(str(data), out_dir=tmp_path / "ckpt", config=TrainConfig(epochs=1, batch_size=16), val_fraction=0.25,
              progress=False)

    class Counting(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.images = inner, 0

        def forward(self, x):
            self.images += x.shape[0]
            return self.inner(x)

    counted = {}
    real_load = experiment.load_checkpoint

    def load_counting(path):
        model, meta = real_load(path)
        counted["model"] = Counting(model)
        return counted["model"], meta

    monkeypatch.setattr(experiment, "load_checkpoint", load_counting)
    results = evaluate_checkpoint(tmp_path / "ckpt", policies=["none,hflip,d4"], out_dir=tmp_path / "ev", plots=False,
                                  progress=False, uncertainty=True)
    n = results["n_images"]
    assert n >= 10
    assert counted["model"].images == n * (1 + 2 + 8)
    scores = {(r["policy"], r["score"]) for r in results["uncertainty"]}
    assert ("none", "softmax 1 - max p (baseline)") in scores and ("d4", "mutual information") in scores
    # The same numbers as running each policy again for the report (the old, doubled path).
    model, meta = real_load(tmp_path / "ckpt")
    dataset = experiment.load_eval_data(meta, None, "test", None)
    again = evaluate_extras(model, dataset, experiment.resolve_named_policies(["none,hflip,d4"], meta), progress=False)
    assert len(again["uncertainty"]) == len(results["uncertainty"])
    for mine, ref in zip(results["uncertainty"], again["uncertainty"], strict=True):
        assert (mine["policy"], mine["score"]) == (ref["policy"], ref["score"])
        assert mine["auroc"] == pytest.approx(ref["auroc"], abs=1e-6, nan_ok=True)
        assert mine["accuracy_at_coverage"] == pytest.approx(ref["accuracy_at_coverage"], abs=1e-9)
