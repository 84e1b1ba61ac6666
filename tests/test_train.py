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
from ttakit.train import (
    TrainConfig,
    accuracy_of,
    augment_batch,
    mixup,
    predict_logits,
    random_crop,
    random_flip,
    random_shift,
    train_model,
    translate,
)

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
    with pytest.raises(UnknownNameError, match="unknown schedule 'cosine'"):
        TrainConfig(schedule="cosine")


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
    assert len(set(zip(ys.tolist(), xs.tolist()))) > 10


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
    for (name, pa), pb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
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
