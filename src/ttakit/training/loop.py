"""The training loop (:func:`train_model`): one readable loop, an eval function, a checkpoint."""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.core import ImageDataset
from ..errors import InvalidInputError
from ..models import (
    CheckpointMeta,
    Normalize,
    layer_groups,
    save_checkpoint,
)
from ..progress import note
from ..progress import progress as progress_bar
from .augment import augment_batch
from .build import autocast, build_model
from .config import TrainConfig
from .lr_find import lr_find
from .resize import _check_progressive, _stage_sizes, resize_images
from .schedules import _make_optimizer, schedule_factor, slice_rates
from .transfer import (
    InitReport,
    _freeze_batchnorm_stats,
    _set_frozen,
)


def predict_logits(model: nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Plain inference (the identity policy through :class:`~ttakit.engine.TTAEngine`, in eval mode,
    under ``torch.inference_mode``): ``(N, C, H, W) -> (N, K)`` raw logits, float32 on CPU.

    At most ``batch_size`` images per forward pass (the engine's pass size: 64 on CPU). The
    model's train/eval mode is restored afterwards.
    Non-finite logits are returned as they are (a diverging run is the trainer's to report).
    """
    from ..engine import TTAEngine, eval_mode  # the engine imports nothing from training
    from ..policy import Policy

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidInputError(f"batch_size must be a positive integer, got {batch_size!r}")
    if images.shape[0] == 0:
        return torch.empty(0, 0)
    engine = TTAEngine(
        model, Policy.identity(), activation=None, max_batch=batch_size, check_outputs=False
    )
    with eval_mode(model):
        return engine.run(images).merged.float().cpu()


def accuracy_of(model: nn.Module, dataset: ImageDataset, batch_size: int = 512) -> float:
    """Top-1 accuracy of plain (no TTA) predictions on ``dataset`` (:func:`predict_logits`)."""
    if len(dataset) == 0:
        raise InvalidInputError("cannot compute accuracy on an empty data set")
    logits = predict_logits(model, dataset.images, batch_size)
    return float((logits.argmax(1) == dataset.labels).float().mean())


# ----------------------------------------------------------------------------- the trainer


@dataclass
class TrainResult:
    """What :func:`train_model` returns: the model (eval mode), its checkpoint metadata and
    per-epoch history (``train_loss``, ``train_acc``, ``val_loss``/``val_acc`` when validated,
    ``image_size``, ``frozen``, ``lr``, ``seconds``), the head group's rate at every optimizer
    step (``lr_history``), what ``--init`` loaded and the learning-rate sweep of ``lr="auto"``."""

    model: nn.Module
    meta: CheckpointMeta
    history: list[dict[str, float]] = field(default_factory=list)
    checkpoint_dir: Path | None = None
    lr_history: list[float] = field(default_factory=list)
    init_report: InitReport | None = None
    lr_find: Any = None
    size_note: str | None = None


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
    config, train_ds = _check_inputs(train_ds, config, val_ds)
    arch_kwargs = dict(arch_kwargs or {})
    device = torch.device(config.device)
    _check_progressive(config, arch, train_ds)  # before any work
    lr, found = _resolve_lr(train_ds, config, arch, arch_kwargs, progress)
    model, init_report = build_model(train_ds, config, arch, arch_kwargs)
    norm = next(m for m in model.modules() if isinstance(m, Normalize))
    mean, std = norm.mean.flatten().tolist(), norm.std.flatten().tolist()  # loaded by --init, or ours
    generator = torch.Generator().manual_seed(config.seed)  # shuffling and augmentation

    n = len(train_ds)
    steps_per_epoch = math.ceil(n / config.batch_size)
    sizes = _stage_sizes(config, train_ds.image_size[0])
    stage_images: dict[int, torch.Tensor] = {}
    optimizer: torch.optim.Optimizer | None = None
    scheduler = None
    lr_history: list[float] = []
    history: list[dict[str, float]] = []
    for epoch in range(config.epochs):
        started = time.perf_counter()
        frozen = epoch < config.freeze_epochs
        if epoch == 0 or epoch == config.freeze_epochs:
            phase_epochs = config.freeze_epochs if frozen else config.epochs - config.freeze_epochs
            optimizer, scheduler = _start_phase(model, config, lr, frozen, phase_epochs * steps_per_epoch,
                                                steps_per_epoch)
            if progress and epoch > 0:
                note(f"unfrozen: training every layer from epoch {epoch + 1}")
        assert optimizer is not None and scheduler is not None
        size = sizes[epoch]
        if size not in stage_images:
            stage_images.clear()  # one resized copy at a time
            stage_images[size] = resize_images(train_ds.images, size)
        images_now = stage_images[size]
        model.train()
        if frozen:
            _freeze_batchnorm_stats(model)
        order = torch.randperm(n, generator=generator)
        loss_sum, correct, seen = 0.0, 0, 0
        bar = progress_bar(  # a bar on a terminal; in a log only the epoch line below
            range(steps_per_epoch),
            desc=f"epoch {epoch + 1}/{config.epochs}",
            unit="batch",
            enabled=progress,
            log=False,
            leave=True,
        )
        for step in bar:
            index = order[step * config.batch_size : (step + 1) * config.batch_size]
            if len(index) < 2:  # BatchNorm cannot train on a single sample
                scheduler.step()
                continue
            labels = train_ds.labels[index]
            images, targets = augment_batch(
                images_now[index], labels, config, train_ds.num_classes, generator
            )
            images, targets, labels = images.to(device), targets.to(device), labels.to(device)

            with autocast(config):
                logits = model(images).float()  # (B, K)
            loss = F.cross_entropy(logits, targets, label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            lr_history.append(float(optimizer.param_groups[-1]["lr"]))
            optimizer.step()
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
            "image_size": size,
            "frozen": int(frozen),
            "lr": lr_history[-1] if lr_history else float(optimizer.param_groups[-1]["lr"]),  # the last step's head rate
        }
        if val_ds is not None:
            record.update(_validate(model, val_ds))
        record["seconds"] = time.perf_counter() - started
        history.append(record)
        if progress:
            note(", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))

    model.eval()
    meta = _checkpoint_meta(train_ds, config, arch, arch_kwargs, history, lr, mean, std, init_report, found)
    checkpoint_dir = None
    if out_dir is not None:
        checkpoint_dir = save_checkpoint(out_dir, model, meta)
        meta.source = str(checkpoint_dir)
    _set_frozen(model, False)
    return TrainResult(
        model=model,
        meta=meta,
        history=history,
        checkpoint_dir=checkpoint_dir,
        lr_history=lr_history,
        init_report=init_report,
        lr_find=found,
    )


def _check_inputs(train_ds: ImageDataset, config: TrainConfig | None,
                  val_ds: ImageDataset | None) -> tuple[TrainConfig, ImageDataset]:
    """The config (default: ``TrainConfig()``) and the training images (``config.limit`` of them), checked."""
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
    return config, train_ds


def _resolve_lr(train_ds: ImageDataset, config: TrainConfig, arch: str, arch_kwargs: dict[str, Any],
                progress: bool) -> tuple[float, Any]:
    """``(lr, sweep)``: ``config.lr``, or with ``lr="auto"`` the suggestion of a learning-rate sweep."""
    found = None
    lr = config.lr
    if lr == "auto":
        found = lr_find(train_ds, arch=arch, arch_kwargs=arch_kwargs, config=config, progress=progress)
        lr = found.suggestion
        if progress:
            note(f"lr auto: {found.summary()}; training at {lr:.3g}")
    return lr, found


def _start_phase(model: nn.Module, config: TrainConfig, lr: float, frozen: bool, total_steps: int,
                 steps_per_epoch: int) -> tuple[torch.optim.Optimizer, Any]:
    """A new optimizer and schedule: the head alone while frozen, else every layer group
    (at the --lr-slice rates when given)."""
    _set_frozen(model, frozen)
    groups = layer_groups(model)
    if frozen:
        param_groups = [{"params": groups[-1], "lr": float(lr)}]
    elif config.lr_slice is not None:
        rates = slice_rates(*config.lr_slice, len(groups))
        param_groups = [{"params": g, "lr": r} for g, r in zip(groups, rates, strict=True)]
    else:
        param_groups = [{"params": [p for g in groups for p in g], "lr": float(lr)}]
    optimizer = _make_optimizer(config, param_groups)
    schedule, cycle = config.schedule or "constant", config.cycle_epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: schedule_factor(schedule, step, total_steps, cycle)
    )
    return optimizer, scheduler


def _validate(model: nn.Module, val_ds: ImageDataset) -> dict[str, float]:
    """``val_loss`` and ``val_acc`` of plain predictions (:func:`predict_logits`, in eval mode)."""
    val_logits = predict_logits(model, val_ds.images)
    return {
        "val_loss": float(F.cross_entropy(val_logits, val_ds.labels)),
        "val_acc": float((val_logits.argmax(1) == val_ds.labels).float().mean()),
    }


def _checkpoint_meta(train_ds: ImageDataset, config: TrainConfig, arch: str, arch_kwargs: dict[str, Any],
                     history: list[dict[str, float]], lr: float, mean: list[float], std: list[float],
                     init_report: InitReport | None, found: Any) -> CheckpointMeta:
    """What the checkpoint says about itself: the last epoch's metrics, the config, the data and
    the normalization built into the model, what --init loaded and the lr-find sweep."""
    metrics = {k: v for k, v in history[-1].items() if k != "epoch"}
    metrics["epochs"] = config.epochs
    metrics["train_images"] = len(train_ds)
    metrics["total_seconds"] = sum(h["seconds"] for h in history)
    metrics["lr"] = float(lr)
    extra: dict[str, Any] = {"train_config": asdict(config)}
    if init_report is not None:
        extra["init"] = init_report.to_json()
    if found is not None:
        extra["lr_find"] = found.to_json(curve=False)
    return CheckpointMeta(
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
        extra=extra,
    )
