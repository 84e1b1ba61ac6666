"""Trainer: config validation, train-time augmentations, reproducibility, and one real run."""

from __future__ import annotations

import gzip
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ttakit.data.core import ImageDataset
from ttakit.errors import InvalidInputError, UnknownNameError
from ttakit.models import load_checkpoint
from ttakit.training.augment import (
    augment_batch,
    mixup,
    random_crop,
    random_flip,
    random_shift,
    translate,
)
from ttakit.training.config import TrainConfig
from ttakit.training.loop import accuracy_of, predict_logits, train_model

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def _toy(n: int = 64, seed: int = 0) -> ImageDataset:
    """Two classes told apart by which half of an 8x8 image is bright."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    images = torch.rand(n, 1, 8, 8, generator=g) * 0.3
    images[labels == 0, :, :, :4] += 0.6
    images[labels == 1, :, :, 4:] += 0.6
    return ImageDataset(images, labels, ["left", "right"], name="toy")


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"epochs": 0}, "epochs must be a positive integer, got 0"),
        ({"batch_size": -1}, "batch_size must be a positive integer, got -1"),
        ({"lr": 0.0}, "lr must be a number > 0, got 0.0"),
        ({"limit": 0}, "limit must be a positive integer"),
        ({"max_shift": -1}, "max_shift must be an integer >= 0"),
        ({"mixup_alpha": 0}, "mixup_alpha must be a number > 0"),
        ({"weight_decay": -1.0}, "weight_decay must be a number >= 0"),
        ({"augment": ("flip", "flip")}, "twice"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(InvalidInputError, match=match):
        TrainConfig(**kwargs)


def test_config_unknown_names_list_choices():
    with pytest.raises(
        UnknownNameError,
        match="unknown augmentation 'rotate'; expected one of: crop, flip, mixup, shift",
    ):
        TrainConfig(augment=("flip", "rotate"))
    with pytest.raises(UnknownNameError, match="unknown optimizer 'lion'"):
        TrainConfig(optimizer="lion")
    with pytest.raises(
        UnknownNameError, match="unknown schedule 'step'; expected one of: constant, cosine, onecycle, sgdr"
    ):
        TrainConfig(schedule="step")


def test_config_defaults_per_optimizer():
    adam = TrainConfig()
    assert (adam.schedule, adam.weight_decay) == ("constant", 0.0)
    sgd = TrainConfig(optimizer="sgd")
    assert (sgd.schedule, sgd.weight_decay) == ("onecycle", 5e-4)
    assert TrainConfig(augment="flip, shift").augment == ("flip", "shift")


def test_augmentation_records():
    config = TrainConfig(augment=("flip", "shift", "crop", "mixup"), max_shift=3, crop_padding=4)
    assert config.augmentation_records() == [
        {"name": "flip", "p": 0.5},
        {"name": "shift", "max_pixels": 3},
        {"name": "crop", "padding": 4, "max_pixels": 4},
        {"name": "mixup", "alpha": 0.2},
    ]


# ----------------------------------------------------------------------------- augmentations


def test_translate_known_amounts_is_exact():
    image = torch.arange(1, 26, dtype=torch.float32).reshape(1, 1, 5, 5)
    batch = image.repeat(3, 2, 1, 1)  # (3, 2, 5, 5)
    out = translate(batch, dx=torch.tensor([1, -2, 0]), dy=torch.tensor([0, 1, -1]))
    right = torch.zeros(5, 5)
    right[:, 1:] = image[0, 0, :, :4]
    left_down = torch.zeros(5, 5)
    left_down[1:, :3] = image[0, 0, :4, 2:]
    up = torch.zeros(5, 5)
    up[:4, :] = image[0, 0, 1:, :]
    for channel in range(2):
        assert torch.equal(out[0, channel], right)
        assert torch.equal(out[1, channel], left_down)
        assert torch.equal(out[2, channel], up)


def test_translate_by_zero_is_identity():
    x = torch.rand(4, 3, 6, 7)
    assert torch.equal(
        translate(x, torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long)), x
    )


def test_augmentations_keep_shape_and_are_random_per_sample():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(32, 3, 9, 11)
    for out in (random_flip(x, g), random_shift(x, 2, g), random_crop(x, 3, g)):
        assert out.shape == x.shape and out.dtype == x.dtype
        changed = (out != x).flatten(1).any(1)
        assert 0 < int(changed.sum()) < 32  # some samples changed, some kept
    flipped = random_flip(x, g)
    for i in range(32):
        assert torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(-1))


def test_shift_stays_within_max_shift():
    g = torch.Generator().manual_seed(1)
    x = torch.zeros(64, 1, 9, 9)
    x[:, :, 4, 4] = 1.0  # one bright pixel in the centre
    out = random_shift(x, 2, g)
    ys, xs = torch.nonzero(out[:, 0] == 1.0, as_tuple=True)[1:]
    assert len(ys) == 64
    assert ys.min() >= 2 and ys.max() <= 6 and xs.min() >= 2 and xs.max() <= 6
    assert len(set(zip(ys.tolist(), xs.tolist(), strict=True))) > 10


def test_mixup_mixes_images_and_targets_alike():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 1, 4, 4)
    labels = torch.arange(16) % 4
    targets = torch.nn.functional.one_hot(labels, 4).float()
    mixed_x, mixed_t = mixup(x, targets, alpha=0.4, generator=g)
    assert mixed_x.shape == x.shape and mixed_t.shape == (16, 4)
    torch.testing.assert_close(mixed_t.sum(1), torch.ones(16))
    assert not torch.equal(mixed_x, x)


def test_augment_batch_targets():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(8, 1, 6, 6), torch.arange(8) % 3
    _, targets = augment_batch(x, y, TrainConfig(augment=("flip", "shift")), 3, g)
    assert torch.equal(targets, y)
    _, soft = augment_batch(x, y, TrainConfig(augment=("crop", "mixup")), 3, g)
    assert soft.shape == (8, 3)


# ----------------------------------------------------------------------------- training


def test_same_seed_gives_identical_weights():
    ds = _toy(40)
    config = TrainConfig(epochs=2, batch_size=16, augment=("flip", "shift", "mixup"), seed=5)
    a = train_model(ds, config, progress=False)
    b = train_model(ds, config, progress=False)
    for (name, pa), pb in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert [h["train_loss"] for h in a.history] == [h["train_loss"] for h in b.history]
    c = train_model(ds, TrainConfig(epochs=2, batch_size=16, seed=6), progress=False)
    assert not torch.equal(a.model.state_dict()["1.0.weight"], c.model.state_dict()["1.0.weight"])


@pytest.mark.parametrize("arch", ["seed-cnn", "resnet20"])
def test_train_records_meta_and_saves(tmp_path, arch):
    ds, val = _toy(64), _toy(32, seed=1)
    config = TrainConfig(
        epochs=1, batch_size=16, optimizer="sgd", lr=0.05, augment=("crop",), limit=48
    )
    result = train_model(
        ds, config, arch=arch, val_ds=val, progress=False, out_dir=tmp_path / "run"
    )
    assert not result.model.training
    meta = result.meta
    assert meta.arch == arch and meta.dataset == "toy" and meta.seed == 0
    assert meta.train_augmentations == [{"name": "crop", "padding": 2, "max_pixels": 2}]
    expected_mean = ds.images[:48].mean().item()
    assert meta.mean == pytest.approx([expected_mean], rel=1e-5)  # stats from the limited train set
    assert meta.metrics["train_images"] == 48
    (record,) = result.history
    assert set(record) >= {"train_loss", "train_acc", "val_loss", "val_acc", "seconds"}
    loaded, loaded_meta = load_checkpoint(tmp_path / "run")
    assert loaded_meta.train_augmentations == meta.train_augmentations
    torch.testing.assert_close(
        predict_logits(loaded, val.images), predict_logits(result.model, val.images)
    )


def test_toy_task_is_learned():
    result = train_model(_toy(256), TrainConfig(epochs=3, batch_size=32, lr=3e-3), progress=False)
    assert accuracy_of(result.model, _toy(128, seed=2)) > 0.9


def test_predict_logits_restores_mode_and_batches():
    model = train_model(_toy(32), TrainConfig(epochs=1, batch_size=16), progress=False).model
    model.train()
    x = torch.rand(7, 1, 8, 8)
    out = predict_logits(model, x, batch_size=3)
    assert out.shape == (7, 2) and model.training
    model.eval()
    with torch.inference_mode():
        torch.testing.assert_close(out, model(x))


def test_train_refuses_mismatched_validation_set():
    other = ImageDataset(torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 0, 1]), ["left", "right"])
    with pytest.raises(InvalidInputError, match="val_ds must match"):
        train_model(_toy(16), TrainConfig(epochs=1), val_ds=other, progress=False)


# ----------------------------------------------------------------------------- real data


def _read_idx(prefix: str) -> ImageDataset:
    with gzip.open(FASHION_DIR / f"{prefix}-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
    with gzip.open(FASHION_DIR / f"{prefix}-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    return ImageDataset(
        torch.from_numpy(images.astype(np.float32) / 255.0),
        torch.from_numpy(labels.astype(np.int64)),
        [str(i) for i in range(10)],
        name=f"fashion-mnist/{'train' if prefix == 'train' else 'test'}",
    )


def _fashion_mnist(split: str) -> ImageDataset:
    try:
        from ttakit.data import load_fashion_mnist
    except ImportError:
        return _read_idx("train" if split == "train" else "t10k")
    return load_fashion_mnist(split, data_dir=FASHION_DIR)


@pytest.mark.slow
@pytest.mark.skipif(
    not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST IDX files not found in {FASHION_DIR} (Debian package dataset-fashion-mnist)",
)
def test_seed_cnn_learns_fashion_mnist_in_one_epoch():
    train = _fashion_mnist("train").head(10_000)
    test = _fashion_mnist("test").head(2_000)
    started = time.perf_counter()
    result = train_model(train, TrainConfig(epochs=1, batch_size=128), progress=False)
    accuracy = accuracy_of(result.model, test)
    print(
        f"seed-cnn, 1 epoch on 10k Fashion-MNIST: test acc {accuracy:.4f} in {time.perf_counter() - started:.1f} s"
    )
    assert accuracy > 0.80


# ----------------------------------------------------------------------------- recipe (issue 12)
# One intra-op thread for these small models: on a loaded 2-core machine each multi-threaded
# op can stall waiting for a descheduled thread (see conftest.single_thread).
recipe = pytest.mark.usefixtures("single_thread")

import json  # noqa: E402

from ttakit.cli import EXIT_BAD_INPUT, main  # noqa: E402
from ttakit.errors import CheckpointError  # noqa: E402
from ttakit.models import create_model, save_checkpoint  # noqa: E402
from ttakit.training.schedules import schedule_factor, slice_rates  # noqa: E402
from ttakit.training.transfer import load_init_weights, read_state_dict  # noqa: E402

from ._fixtures import write_halves_npz  # noqa: E402


@recipe
def test_onecycle_hits_documented_rates_and_matches_torch():
    total = 100
    assert schedule_factor("onecycle", 0, total) == pytest.approx(1 / 25)
    assert schedule_factor("onecycle", 29, total) == pytest.approx(1.0)  # peak at 0.3 * T - 1
    assert schedule_factor("onecycle", 99, total) == pytest.approx(1 / 25 / 1e4)
    assert schedule_factor("onecycle", 14, total) < schedule_factor("onecycle", 15, total) < 1.0
    # the same rates as torch's OneCycleLR (cosine annealing), at every step
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.1)
    ref = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=total, cycle_momentum=False)
    for step in range(total):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * schedule_factor("onecycle", step, total), rel=1e-9)
        opt.step()
        ref.step()


@recipe
def test_cosine_and_sgdr_hit_documented_rates():
    assert schedule_factor("cosine", 0, 40) == 1.0
    assert schedule_factor("cosine", 20, 40) == pytest.approx(0.5)
    assert schedule_factor("cosine", 39, 40) == pytest.approx(0.5 * (1 + np.cos(np.pi * 39 / 40)))
    for restart in (0, 10, 20):  # SGDR restarts at the start of every cycle of C = 10 steps
        assert schedule_factor("sgdr", restart, 30, cycle_steps=10) == 1.0
        assert schedule_factor("sgdr", restart + 5, 30, cycle_steps=10) == pytest.approx(0.5)
        assert schedule_factor("sgdr", restart + 9, 30, cycle_steps=10) == pytest.approx(0.5 * (1 + np.cos(0.9 * np.pi)))
    assert schedule_factor("constant", 7, 30) == 1.0


@recipe
def test_training_follows_the_schedule_step_by_step():
    ds = _toy(64)  # batch 16: 4 steps per epoch
    sgdr = train_model(ds, TrainConfig(epochs=3, batch_size=16, lr=0.01, schedule="sgdr", cycle_epochs=1), progress=False)
    expected = [0.01 * schedule_factor("sgdr", s, 12, cycle_steps=4) for s in range(12)]
    assert sgdr.lr_history == pytest.approx(expected)
    assert [sgdr.lr_history[i] for i in (0, 4, 8)] == pytest.approx([0.01] * 3)  # restarts
    one = train_model(ds, TrainConfig(epochs=2, batch_size=16, lr=0.02, schedule="onecycle"), progress=False)
    assert one.lr_history[0] == pytest.approx(0.02 / 25)
    assert one.lr_history == pytest.approx([0.02 * schedule_factor("onecycle", s, 8) for s in range(8)])


@recipe
def test_slice_rates_are_geometric_and_bad_slice_is_refused():
    assert slice_rates(1e-4, 1e-2, 3) == pytest.approx([1e-4, 1e-3, 1e-2])
    assert slice_rates(1e-4, 1e-2, 1) == [1e-2]
    with pytest.raises(InvalidInputError, match="LOW must not exceed HIGH.*LOW=0.01 > HIGH=0.0001"):
        TrainConfig(lr_slice=(1e-2, 1e-4))
    with pytest.raises(InvalidInputError, match="lr_slice must be two rates"):
        TrainConfig(lr_slice=(1e-2,))


@recipe
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"label_smoothing": 1.0}, "label_smoothing must be a number in \\[0, 1\\)"),
        ({"freeze_epochs": 4, "epochs": 3}, "freeze_epochs must be at most epochs \\(3\\), got 4"),
        ({"progressive": "14,x"}, "progressive must be image sizes like 14,28"),
        ({"progressive": (8, 16, 28), "epochs": 2}, "3 sizes but only 2 epochs"),
        ({"lr": "fast"}, "lr must be a number > 0 or 'auto', got 'fast'"),
        ({"cycle_epochs": 0}, "cycle_epochs must be a positive integer"),
    ],
)
def test_recipe_options_reject_bad_values(kwargs, match):
    with pytest.raises(InvalidInputError, match=match):
        TrainConfig(**kwargs)


@recipe
def test_recipe_is_recorded_and_rebuilds_from_json(tmp_path):
    config = TrainConfig(
        epochs=2, lr=3e-3, schedule="sgdr", label_smoothing=0.1, augment="mixup", mixup_alpha=0.4,
        freeze_epochs=1, lr_slice=(1e-4, 1e-3), progressive="4,8", init=str(tmp_path / "w.safetensors"),
    )
    saved = json.loads(json.dumps(asdict_config(config)))  # as checkpoint.json stores it
    saved["augment"] = tuple(saved["augment"])
    assert TrainConfig(**saved) == config  # evaluate --repeats rebuilds exactly this recipe
    assert config.progressive == (4, 8) and config.augmentation_records() == [{"name": "mixup", "alpha": 0.4}]


def asdict_config(config):
    from dataclasses import asdict

    return asdict(config)


# seed-cnn's head group: the dense layers after the convolutions (Dense128, its BatchNorm, the classifier)
HEAD = [
    "4.weight", "4.bias", "6.weight", "6.bias", "6.running_mean", "6.running_var", "6.num_batches_tracked",
    "7.weight", "7.bias",
]
CLASSIFIER = ["7.weight", "7.bias"]  # the only tensors transfer to other classes starts afresh


@pytest.fixture
def pretrained_dir(tmp_path):
    """A seed-cnn trained on the 2-class toy task, saved as a ttakit checkpoint."""
    result = train_model(_toy(64), TrainConfig(epochs=1, batch_size=16), progress=False)
    return save_checkpoint(tmp_path / "pre", result.model, result.meta), result.model


def _three_classes(n: int = 48) -> ImageDataset:
    ds = _toy(n, seed=3)
    labels = torch.arange(n) % 3
    return ImageDataset(ds.images, labels, ["a", "b", "c"], name="toy3")


@recipe
def test_init_reports_loaded_new_and_skipped(pretrained_dir):
    directory, pre = pretrained_dir
    result = train_model(_three_classes(), TrainConfig(epochs=1, batch_size=16, init=str(directory)), progress=False)
    report = result.init_report
    assert report.new == CLASSIFIER  # only the classifier starts afresh: other classes (3, not 2)
    assert sorted(report.skipped) == ["7.bias (shape (2,) vs (3,))", "7.weight (shape (2, 128) vs (3, 128))"]
    assert set(report.loaded) == set(pre.state_dict()) - set(CLASSIFIER)  # the pretrained Dense128 too
    for key in ("4.weight", "6.running_mean"):
        assert key in report.loaded
    assert "loaded 23 tensors, new 2 (7.weight, 7.bias), skipped 2" in report.summary()
    assert result.meta.extra["init"]["new"] == report.new
    # the normalization the body was trained with comes along
    assert result.meta.mean == pytest.approx(pre[0].mean.flatten().tolist())


@recipe
def test_init_reads_torch_files_with_weights_only(tmp_path, pretrained_dir):
    _, pre = pretrained_dir
    torch.save({"state_dict": {f"module.{k}": v for k, v in pre.state_dict().items()}}, tmp_path / "w.pt")
    state = read_state_dict(tmp_path / "w.pt")  # wrapper and DataParallel prefix removed
    assert set(state) == set(pre.state_dict())
    model = create_model("seed-cnn", in_channels=1, num_classes=2, image_size=(8, 8))
    report = load_init_weights(model, tmp_path / "w.pt", "seed-cnn")
    assert report.new == [] and report.skipped == []
    for key, value in pre.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


class _NotWeights:
    def __init__(self):
        self.payload = [1, 2, 3]


@recipe
def test_init_refusals(tmp_path, pretrained_dir):
    directory, _ = pretrained_dir
    resnet = create_model("resnet20", in_channels=1, num_classes=2)
    save_checkpoint(tmp_path / "resnet", resnet, _meta_for(resnet))
    model = create_model("seed-cnn", in_channels=1, num_classes=2, image_size=(8, 8))
    with pytest.raises(CheckpointError, match="none of its tensors matches seed-cnn by name and shape; weights for another architecture"):
        load_init_weights(model, tmp_path / "resnet", "seed-cnn")
    torch.save({"7.weight": torch.zeros(2, 128), "7.bias": torch.zeros(2)}, tmp_path / "head.pt")
    with pytest.raises(CheckpointError, match=r"only head tensors \(7.weight, 7.bias\) match"):
        load_init_weights(model, tmp_path / "head.pt", "seed-cnn")
    torch.save(_NotWeights(), tmp_path / "object.pt")
    with pytest.raises(CheckpointError, match="is a pickle that is not a plain state dict"):
        load_init_weights(model, tmp_path / "object.pt", "seed-cnn")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="holds a list, not a state dict"):
        load_init_weights(model, tmp_path / "list.pt", "seed-cnn")
    (tmp_path / "junk.bin").write_bytes(b"\x00junk" * 10)
    with pytest.raises(CheckpointError, match="neither a safetensors file nor a torch weights file"):
        load_init_weights(model, tmp_path / "junk.bin", "seed-cnn")
    with pytest.raises(CheckpointError, match="do not exist"):
        load_init_weights(model, tmp_path / "nowhere.pt", "seed-cnn")


def _meta_for(model):
    from ttakit.models import CheckpointMeta

    return CheckpointMeta(arch="resnet20", classes=["a", "b"], in_channels=1, image_size=[8, 8])


@recipe
def test_freeze_leaves_body_bit_identical_then_unfreezes(pretrained_dir):
    directory, pre = pretrained_dir
    head = train_model(
        _three_classes(), TrainConfig(epochs=2, freeze_epochs=2, batch_size=16, lr=0.01, init=str(directory)), progress=False
    )
    state = head.model.state_dict()
    for key, value in pre.state_dict().items():
        if key in HEAD:
            continue
        assert torch.equal(state[key], value), key  # weights and BatchNorm statistics untouched
    assert not torch.equal(state["4.weight"], pre.state_dict()["4.weight"])
    assert [h["frozen"] for h in head.history] == [1, 1]
    assert all(p.requires_grad for p in head.model.parameters())  # handed back unfrozen
    full = train_model(
        _three_classes(),
        TrainConfig(epochs=2, freeze_epochs=1, batch_size=16, lr=0.01, lr_slice=(1e-4, 1e-2), init=str(directory)),
        progress=False,
    )
    assert [h["frozen"] for h in full.history] == [1, 0]
    assert not torch.equal(full.model.state_dict()["1.0.weight"], pre.state_dict()["1.0.weight"])
    assert full.history[1]["lr"] == pytest.approx(1e-2)  # the head gets HIGH after unfreezing


@recipe
def test_progressive_resizing_changes_the_input_size(monkeypatch):
    import ttakit.training.build as train_module

    seen: list[tuple[int, ...]] = []
    real_create = train_module.create_model

    def create_and_watch(*args, **kwargs):
        model = real_create(*args, **kwargs)
        model.register_forward_pre_hook(lambda m, inputs: seen.append(tuple(inputs[0].shape[-2:])) if m.training else None)
        return model

    monkeypatch.setattr(train_module, "create_model", create_and_watch)
    result = train_model(_toy(32), TrainConfig(epochs=3, batch_size=16, progressive=(4, 8)), arch="resnet20", progress=False)
    assert seen == [(4, 4)] * 2 + [(8, 8)] * 4  # epoch 1 at 4x4, epochs 2-3 at the data's 8x8
    assert [h["image_size"] for h in result.history] == [4, 8, 8]
    assert result.meta.image_size == [8, 8]


@recipe
def test_progressive_with_repeated_sizes_on_the_global_pooling_seed_cnn():
    """One size per epoch when the sizes are listed per epoch (the benchmark's 14,14,14,28,28)."""
    config = TrainConfig(epochs=3, batch_size=16, progressive="4,4,8")
    result = train_model(_toy(32), config, arch="seed-cnn-gap", progress=False)
    assert [h["image_size"] for h in result.history] == [4, 4, 8]
    assert result.meta.extra["train_config"]["progressive"] == (4, 4, 8)
    with pytest.raises(InvalidInputError, match="use one of: .*seed-cnn-gap"):
        train_model(_toy(32), config, arch="seed-cnn", progress=False)


@recipe
def test_progressive_refusals():
    with pytest.raises(InvalidInputError, match="needs a fully convolutional architecture.*'seed-cnn' is built for one input size \\(8x8\\)"):
        train_model(_toy(32), TrainConfig(epochs=2, batch_size=16, progressive=(4, 8)), arch="seed-cnn", progress=False)
    with pytest.raises(InvalidInputError, match="must end at the data's own image size 8"):
        train_model(_toy(32), TrainConfig(epochs=2, batch_size=16, progressive=(4, 6)), arch="resnet20", progress=False)


@recipe
def test_label_smoothing_changes_the_loss():
    plain = train_model(_toy(32), TrainConfig(epochs=1, batch_size=16), progress=False)
    smooth = train_model(_toy(32), TrainConfig(epochs=1, batch_size=16, label_smoothing=0.2), progress=False)
    assert smooth.history[0]["train_loss"] > plain.history[0]["train_loss"]


def _cli_fails(capsys, argv, *fragments):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == EXIT_BAD_INPUT, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


@recipe
def test_cli_recipe_bad_input_is_one_line(tmp_path, capsys, pretrained_dir):
    data = str(write_halves_npz(tmp_path / "halves.npz", n=40))
    base = ["--no-progress", "train", "--data", data, "--epochs", "2", "--out", str(tmp_path / "out")]
    _cli_fails(capsys, [*base, "--lr-slice", "1e-2", "1e-4"], "LOW must not exceed HIGH")
    _cli_fails(capsys, [*base, "--progressive", "4,8"], "needs a fully convolutional", "'seed-cnn'")
    torch.save(_NotWeights(), tmp_path / "object.pt")
    _cli_fails(capsys, [*base, "--init", str(tmp_path / "object.pt")], "pickle that is not a plain state dict")
    resnet = create_model("resnet20", in_channels=1, num_classes=2)
    save_checkpoint(tmp_path / "resnet", resnet, _meta_for(resnet))
    _cli_fails(capsys, [*base, "--init", str(tmp_path / "resnet")], "weights for another architecture")
    _cli_fails(capsys, ["--no-progress", "lr-find", "--data", data, "--out", str(tmp_path / "lr.png")], "at least one full batch", "batch_size is 128")


@recipe
def test_cli_train_with_init_prints_the_report(tmp_path, capsys, pretrained_dir):
    directory, _ = pretrained_dir
    data = str(write_halves_npz(tmp_path / "halves.npz", n=40))
    code = main(
        ["--no-progress", "train", "--data", data, "--epochs", "2", "--batch-size", "16", "--init", str(directory),
         "--freeze-epochs", "1", "--lr-slice", "1e-4", "1e-3", "--schedule", "onecycle", "--mixup", "0.3",
         "--label-smoothing", "0.1", "--out", str(tmp_path / "run")]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "loaded 25 tensors, new 0, skipped 0" in out
    saved = json.loads((tmp_path / "run" / "checkpoint.json").read_text())["extra"]["train_config"]
    assert saved["augment"] == ["mixup"] and saved["mixup_alpha"] == 0.3 and saved["label_smoothing"] == 0.1
    assert saved["freeze_epochs"] == 1 and saved["lr_slice"] == [1e-4, 1e-3] and saved["schedule"] == "onecycle"


@recipe
def test_init_from_a_checkpoint_for_other_classes_gets_a_new_head(pretrained_dir):
    directory, pre = pretrained_dir  # trained on classes left/right
    ds = _toy(32)
    other = ImageDataset(ds.images, ds.labels, ["cat", "dog"], name="toy-other")  # same shapes, other classes
    result = train_model(other, TrainConfig(epochs=1, batch_size=16, freeze_epochs=1, init=str(directory)), progress=False)
    assert result.init_report.new == CLASSIFIER  # same shapes, but the logits mean other classes
    assert sorted(result.init_report.skipped) == sorted(f"{k} (new classifier: other classes)" for k in CLASSIFIER)
    for key, value in pre.state_dict().items():  # the frozen epoch trained the head group only
        if key not in HEAD:
            assert torch.equal(result.model.state_dict()[key], value), key
    same = train_model(ds, TrainConfig(epochs=1, batch_size=16, init=str(directory)), progress=False)
    assert same.init_report.new == []  # same classes: the head is loaded too
