"""A small, straight-line trainer (nanoGPT style): Adam or SGD, one-cycle schedule,
vectorised train-time augmentation (flip, shift, crop, mixup), a progress bar, and a
self-describing checkpoint.

Example:
    >>> from ttakit.data import ImageDataset
    >>> ds = ImageDataset(torch.rand(64, 1, 8, 8), torch.arange(64) % 2, ["a", "b"])
    >>> result = train_model(ds, TrainConfig(epochs=1, batch_size=16), progress=False)
    >>> len(result.history)
    1
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data.core import ImageDataset, normalization_stats
from .errors import InvalidInputError, unknown_name
from .models import CheckpointMeta, create_model, save_checkpoint

AUGMENTATIONS = ("flip", "shift", "crop", "mixup")


# ----------------------------------------------------------------------------- config


@dataclass
class TrainConfig:
    """Training hyper-parameters, validated on construction.

    ``schedule`` defaults to ``"constant"`` for Adam and ``"onecycle"`` for SGD (peak lr =
    ``lr``); SGD uses momentum 0.9 with Nesterov. ``weight_decay`` defaults to 0 for Adam and
    5e-4 for SGD. ``augment`` names train-time augmentations from ``AUGMENTATIONS``; a
    comma-separated string such as ``"flip,shift"`` is accepted too.
    """

    epochs: int = 3
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: Literal["adam", "sgd"] = "adam"
    schedule: Literal["constant", "onecycle"] | None = None
    augment: tuple[str, ...] = ()
    seed: int = 0
    limit: int | None = None
    weight_decay: float | None = None
    max_shift: int = 2
    crop_padding: int = 2
    mixup_alpha: float = 0.2
    device: str = "cpu"

    def __post_init__(self) -> None:
        def positive_int(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidInputError(
                    f"TrainConfig.{name} must be a positive integer, got {value!r}"
                )

        def non_negative_int(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidInputError(
                    f"TrainConfig.{name} must be an integer >= 0, got {value!r}"
                )

        positive_int("epochs")
        positive_int("batch_size")
        if self.limit is not None:
            positive_int("limit")
        non_negative_int("max_shift")
        non_negative_int("crop_padding")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise InvalidInputError(f"TrainConfig.seed must be an integer, got {self.seed!r}")
        for name in ("lr", "mixup_alpha"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise InvalidInputError(f"TrainConfig.{name} must be a number > 0, got {value!r}")
        if self.optimizer not in ("adam", "sgd"):
            raise unknown_name("optimizer", self.optimizer, ("adam", "sgd"))
        if self.schedule is None:
            self.schedule = "onecycle" if self.optimizer == "sgd" else "constant"
        if self.schedule not in ("constant", "onecycle"):
            raise unknown_name("schedule", self.schedule, ("constant", "onecycle"))
        if self.weight_decay is None:
            self.weight_decay = 5e-4 if self.optimizer == "sgd" else 0.0
        wd = self.weight_decay
        if not isinstance(wd, (int, float)) or isinstance(wd, bool) or not wd >= 0:
            raise InvalidInputError(f"TrainConfig.weight_decay must be a number >= 0, got {wd!r}")
        augment = self.augment
        if isinstance(augment, str):
            augment = tuple(a.strip() for a in augment.split(",") if a.strip())
        if not isinstance(augment, (tuple, list)) or not all(isinstance(a, str) for a in augment):
            raise InvalidInputError(
                f"TrainConfig.augment must be a tuple of augmentation names, got {self.augment!r}"
            )
        for name in augment:
            if name not in AUGMENTATIONS:
                raise unknown_name("augmentation", name, AUGMENTATIONS)
        if len(set(augment)) != len(augment):
            raise InvalidInputError(
                f"TrainConfig.augment names an augmentation twice: {tuple(augment)}"
            )
        self.augment = tuple(augment)

    def augmentation_records(self) -> list[dict[str, Any]]:
        """The augmentations with their parameters, as stored in ``CheckpointMeta.train_augmentations``."""
        params: dict[str, dict[str, Any]] = {
            "flip": {"p": 0.5},
            "shift": {"max_pixels": self.max_shift},
            "crop": {"padding": self.crop_padding, "max_pixels": self.crop_padding},
            "mixup": {"alpha": self.mixup_alpha},
        }
        return [{"name": name, **params[name]} for name in self.augment]


# ----------------------------------------------------------------------------- augmentations


def translate(images: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Shift each image by whole pixels with zero fill: ``out[b, :, y, x] = in[b, :, y - dy[b], x - dx[b]]``.

    Positive ``dx`` moves content right, positive ``dy`` moves it down.

    Shape:
        - images: ``(B, C, H, W)``; dx, dy: ``(B,)`` integers.
        - Output: ``(B, C, H, W)``.
    """
    _, _, height, width = images.shape
    pad = int(max(dx.abs().max(), dy.abs().max())) if len(dx) else 0
    if pad == 0:
        return images.clone()
    padded = F.pad(images, (pad, pad, pad, pad))  # (B, C, H+2p, W+2p)
    rows = torch.arange(height)[None, :] + pad - dy.long()[:, None]  # (B, H)
    cols = torch.arange(width)[None, :] + pad - dx.long()[:, None]  # (B, W)
    batch = torch.arange(images.shape[0])[:, None, None]  # (B, 1, 1)
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def random_flip(
    images: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.5
) -> torch.Tensor:
    """Flip each image horizontally with probability ``p``. ``(B, C, H, W) -> (B, C, H, W)``."""
    flip = torch.rand(images.shape[0], generator=generator) < p  # (B,)
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def random_shift(
    images: torch.Tensor, max_shift: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Translate each image by a random integer ``(dx, dy)`` in ``[-max_shift, max_shift]^2``, zero fill."""
    offsets = torch.randint(-max_shift, max_shift + 1, (2, images.shape[0]), generator=generator)
    return translate(images, offsets[0], offsets[1])


def random_crop(
    images: torch.Tensor, padding: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Zero-pad by ``padding`` and crop a random window of the original size.

    A crop at offset ``o`` in ``[0, 2 * padding]`` is a translation by ``padding - o``, so this
    is :func:`random_shift` with ``max_shift = padding``.
    """
    return random_shift(images, padding, generator)


def mixup(
    images: torch.Tensor,
    targets: torch.Tensor,
    alpha: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix each sample with a random partner: ``lam * x + (1 - lam) * x[perm]``, ``lam ~ Beta(alpha, alpha)``
    drawn per sample; the one-hot (or soft) ``targets`` ``(B, K)`` are mixed the same way."""
    batch = images.shape[0]
    perm = torch.randperm(batch, generator=generator)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    lam = torch.from_numpy(np.random.default_rng(seed).beta(alpha, alpha, size=batch)).to(
        images.dtype
    )
    mixed_images = lam[:, None, None, None] * images + (1 - lam[:, None, None, None]) * images[perm]
    mixed_targets = lam[:, None] * targets + (1 - lam[:, None]) * targets[perm]
    return mixed_images, mixed_targets


def augment_batch(
    images: torch.Tensor,
    labels: torch.Tensor,
    config: TrainConfig,
    num_classes: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply ``config.augment`` to a batch: geometric ops first, mixup last.

    Returns ``(images, targets)`` with targets ``(B,)`` class indices, or ``(B, K)``
    probabilities when mixup is on.
    """
    targets: torch.Tensor = labels
    for name in config.augment:
        if name == "flip":
            images = random_flip(images, generator)
        elif name == "shift":
            images = random_shift(images, config.max_shift, generator)
        elif name == "crop":
            images = random_crop(images, config.crop_padding, generator)
    if "mixup" in config.augment:
        images, targets = mixup(
            images, F.one_hot(labels, num_classes).float(), config.mixup_alpha, generator
        )
    return images, targets


# ----------------------------------------------------------------------------- inference


def predict_logits(model: nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Plain inference in eval mode under ``torch.inference_mode``: ``(N, C, H, W) -> (N, K)`` logits on CPU.

    The model's train/eval mode is restored afterwards.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidInputError(f"batch_size must be a positive integer, got {batch_size!r}")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    outputs = []
    with torch.inference_mode():
        for start in range(0, images.shape[0], batch_size):
            outputs.append(model(images[start : start + batch_size].to(device)).float().cpu())
    model.train(was_training)
    if not outputs:
        return torch.empty(0, 0)
    return torch.cat(outputs)


def accuracy_of(model: nn.Module, dataset: ImageDataset, batch_size: int = 512) -> float:
    """Top-1 accuracy of plain (no TTA) predictions on ``dataset``."""
    if len(dataset) == 0:
        raise InvalidInputError("cannot compute accuracy on an empty data set")
    logits = predict_logits(model, dataset.images, batch_size)
    return float((logits.argmax(1) == dataset.labels).float().mean())


# ----------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    """What :func:`train_model` returns: the model (eval mode), its checkpoint metadata and
    per-epoch history (``train_loss``, ``train_acc``, ``val_loss``/``val_acc`` when validated,
    ``seconds``)."""

    model: nn.Module
    meta: CheckpointMeta
    history: list[dict[str, float]] = field(default_factory=list)
    checkpoint_dir: Path | None = None


def train_model(
    train_ds: ImageDataset,
    config: TrainConfig | None = None,
    arch: str = "seed-cnn",
    arch_kwargs: dict[str, Any] | None = None,
    val_ds: ImageDataset | None = None,
    progress: bool = True,
    out_dir: str | os.PathLike | None = None,
) -> TrainResult:
    """Train ``arch`` on ``train_ds``; same config and data give identical weights.

    Normalization statistics come from the (limited) training images only and are built into
    the model, which therefore takes raw images in ``[0, 1]``. When ``out_dir`` is given, the
    checkpoint is saved there.
    """
    config = config if config is not None else TrainConfig()
    if not isinstance(config, TrainConfig):
        raise InvalidInputError(f"config must be a TrainConfig, got {type(config).__name__}")
    if not isinstance(train_ds, ImageDataset):
        raise InvalidInputError(f"train_ds must be an ImageDataset, got {type(train_ds).__name__}")
    train_ds = train_ds.head(config.limit)
    if len(train_ds) < 2:
        raise InvalidInputError(f"training needs at least 2 images, got {len(train_ds)}")
    if val_ds is not None and (
        val_ds.channels != train_ds.channels
        or val_ds.image_size != train_ds.image_size
        or list(val_ds.classes) != list(train_ds.classes)
    ):
        raise InvalidInputError(
            f"val_ds must match train_ds in channels, image size and classes: got "
            f"{val_ds.channels}x{val_ds.image_size} with {val_ds.num_classes} classes, expected "
            f"{train_ds.channels}x{train_ds.image_size} with {train_ds.num_classes} classes"
        )
    arch_kwargs = dict(arch_kwargs or {})
    device = torch.device(config.device)

    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)  # shuffling and augmentation
    mean, std = normalization_stats(train_ds.images)
    model = create_model(
        arch,
        in_channels=train_ds.channels,
        num_classes=train_ds.num_classes,
        image_size=train_ds.image_size,
        mean=mean,
        std=std,
        **arch_kwargs,
    ).to(device)

    n = len(train_ds)
    steps_per_epoch = math.ceil(n / config.batch_size)
    if config.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(
            model.parameters(),
            lr=config.lr,
            momentum=0.9,
            nesterov=True,
            weight_decay=config.weight_decay,
        )
    else:
        optimizer = torch.optim.Adam(
            model.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
    scheduler = None
    if config.schedule == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch
        )

    history: list[dict[str, float]] = []
    for epoch in range(config.epochs):
        started = time.perf_counter()
        model.train()
        order = torch.randperm(n, generator=generator)
        loss_sum, correct, seen = 0.0, 0, 0
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"epoch {epoch + 1}/{config.epochs}",
            unit="batch",
            disable=not progress,
            leave=True,
        )
        for step in bar:
            index = order[step * config.batch_size : (step + 1) * config.batch_size]
            if len(index) < 2:  # BatchNorm cannot train on a single sample
                if scheduler is not None:
                    scheduler.step()
                continue
            labels = train_ds.labels[index]
            images, targets = augment_batch(
                train_ds.images[index], labels, config, train_ds.num_classes, generator
            )
            images, targets, labels = images.to(device), targets.to(device), labels.to(device)

            logits = model(images)  # (B, K)
            loss = F.cross_entropy(logits, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()

            loss_sum += float(loss.detach()) * len(index)
            correct += int((logits.argmax(1) == labels).sum())
            seen += len(index)
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.4f}")
        bar.close()

        record: dict[str, float] = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(seen, 1),
            "train_acc": correct / max(seen, 1),
        }
        if val_ds is not None:
            val_logits = predict_logits(model, val_ds.images)
            record["val_loss"] = float(F.cross_entropy(val_logits, val_ds.labels))
            record["val_acc"] = float((val_logits.argmax(1) == val_ds.labels).float().mean())
        record["seconds"] = time.perf_counter() - started
        history.append(record)
        if progress:
            tqdm.write(
                ", ".join(
                    f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in record.items()
                )
            )

    model.eval()
    metrics = {k: v for k, v in history[-1].items() if k != "epoch"}
    metrics["epochs"] = config.epochs
    metrics["train_images"] = n
    metrics["total_seconds"] = sum(h["seconds"] for h in history)
    meta = CheckpointMeta(
        arch=arch,
        arch_kwargs=arch_kwargs,
        classes=list(train_ds.classes),
        in_channels=train_ds.channels,
        image_size=list(train_ds.image_size),
        mean=mean,
        std=std,
        train_augmentations=config.augmentation_records(),
        dataset=train_ds.name,
        seed=config.seed,
        metrics=metrics,
        extra={"train_config": asdict(config)},
    )
    checkpoint_dir = None
    if out_dir is not None:
        checkpoint_dir = save_checkpoint(out_dir, model, meta)
        meta.source = str(checkpoint_dir)
    return TrainResult(model=model, meta=meta, history=history, checkpoint_dir=checkpoint_dir)
