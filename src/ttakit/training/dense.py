"""Training for dense tasks on canvases: a segmentation U-Net and a CenterNet-style detector.

Two straight-line loops (:func:`train_segmentation`, :func:`train_detection`): Adam under a
one-cycle schedule, random horizontal flips (image with its mask or boxes), seeded shuffling,
one line per epoch. Each returns the model in eval mode and a :class:`~ttakit.models.CheckpointMeta`
recording the task, classes, normalization, augmentations and metrics, ready for
:func:`~ttakit.models.save_checkpoint`.

Example:
    >>> from ttakit.data.canvases import load_fashion_canvases
    >>> train = load_fashion_canvases("train", 4000)  # doctest: +SKIP
    >>> result = train_segmentation(train, DenseTrainConfig(epochs=6))  # doctest: +SKIP
    >>> save_checkpoint("runs/unet", result.model, result.meta)  # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.canvases import Canvases
from ..data.core import normalization_stats
from ..dense_metrics import detection_map, mean_iou
from ..errors import InvalidInputError
from ..models.centernet import centernet_loss, centernet_targets
from ..models.checkpoint import CheckpointMeta
from ..models.registry import create_model, model_task
from ..progress import note
from ..progress import progress as progress_bar

__all__ = ["DenseTrainConfig", "DenseTrainResult", "train_segmentation", "train_detection", "predict_dense"]


@dataclass
class DenseTrainConfig:
    """Hyper-parameters of a dense training run, validated on construction.

    ``lr`` is the one-cycle peak (Adam); ``flip_p`` the probability of a horizontal flip per
    canvas; ``seed`` fixes the initial weights, the shuffling and the flips.
    """

    epochs: int = 6
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-4
    flip_p: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")
        if not self.lr > 0:
            raise InvalidInputError(f"lr must be positive, got {self.lr!r}")
        if not self.weight_decay >= 0:
            raise InvalidInputError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not 0.0 <= self.flip_p <= 1.0:
            raise InvalidInputError(f"flip_p must lie in [0, 1], got {self.flip_p!r}")


@dataclass
class DenseTrainResult:
    """A trained model (eval mode), its checkpoint metadata and one record per epoch."""

    model: nn.Module
    meta: CheckpointMeta
    history: list[dict[str, Any]] = field(default_factory=list)


def _flip_boxes(boxes: torch.Tensor, width: int) -> torch.Tensor:
    """``(m, 4)`` xyxy pixels -> their mirror images in a frame ``width`` pixels wide."""
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)


def _setup(
    train: Canvases, arch: str, task: str, num_classes: int, config: DenseTrainConfig, arch_kwargs: dict[str, Any]
) -> tuple[nn.Module, CheckpointMeta, torch.Generator]:
    if model_task(arch) != task:
        raise InvalidInputError(f"arch must be a {task} architecture, got {arch!r} (a {model_task(arch)} model)")
    if len(train) == 0:
        raise InvalidInputError("train must hold at least one canvas, got 0")
    torch.manual_seed(config.seed)  # the initial weights
    mean, std = normalization_stats(train.images)
    size = [int(train.images.shape[-2]), int(train.images.shape[-1])]
    model = create_model(
        arch, in_channels=int(train.images.shape[1]), num_classes=num_classes, image_size=tuple(size),
        mean=mean, std=std, **arch_kwargs,
    )
    classes = train.mask_classes if task == "segmentation" else list(train.classes)
    augmentations = [{"name": "flip", "p": config.flip_p}] if config.flip_p > 0 else []
    meta = CheckpointMeta(
        arch=arch, arch_kwargs=dict(arch_kwargs), task=task, classes=classes, in_channels=int(train.images.shape[1]),
        image_size=size, mean=mean, std=std, train_augmentations=augmentations, dataset=train.name,
        seed=config.seed, extra={"train_config": asdict(config), "train_canvases": len(train)},
    )
    return model, meta, torch.Generator().manual_seed(config.seed)


def _fit(
    model: nn.Module, n: int, config: DenseTrainConfig, generator: torch.Generator,
    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], desc: str, progress: bool,
    evaluate: Callable[[], dict[str, float]] | None,
) -> list[dict[str, Any]]:
    """The shared loop: ``step(rows, flips)`` returns the batch loss to minimise."""
    steps_per_epoch = -(-n // config.batch_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch, pct_start=0.3
    )
    history = []
    for epoch in range(config.epochs):
        started = time.perf_counter()
        model.train()
        order = torch.randperm(n, generator=generator)
        flips = torch.rand(n, generator=generator) < config.flip_p
        total, seen = 0.0, 0
        bar = progress_bar(total=n, desc=f"{desc} epoch {epoch + 1}/{config.epochs}", unit="img", enabled=progress, log=False)
        with bar:
            for rows in order.split(config.batch_size):
                loss = step(rows, flips[rows])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                total += float(loss.detach()) * len(rows)
                seen += len(rows)
                bar.update(len(rows))
                bar.set_postfix(loss=f"{total / seen:.4f}")
        record: dict[str, Any] = {"epoch": epoch + 1, "loss": total / seen}
        if evaluate is not None:
            model.eval()
            record.update(evaluate())
        record["seconds"] = round(time.perf_counter() - started, 1)
        history.append(record)
        if progress:
            note(f"{desc} " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
    model.eval()
    return history


@torch.inference_mode()
def predict_dense(model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """``model`` over ``images`` ``(N, C, H, W)`` in batches; the outputs concatenated on dim 0."""
    model.eval()
    return torch.cat([model(batch) for batch in images.split(batch_size)])


def train_segmentation(
    train: Canvases, config: DenseTrainConfig | None = None, *, val: Canvases | None = None,
    arch: str = "unet-small", arch_kwargs: dict[str, Any] | None = None, progress: bool = True,
) -> DenseTrainResult:
    """Train a segmentation model on ``train`` canvases: cross-entropy over the
    ``1 + len(classes)`` mask classes (0 = background).

    With ``val``, each epoch also reports the validation mIoU (over every mask class).
    """
    config = config or DenseTrainConfig()
    num_classes = len(train.mask_classes)
    model, meta, generator = _setup(train, arch, "segmentation", num_classes, config, arch_kwargs or {})

    def step(rows: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        images, masks = train.images[rows], train.masks[rows]
        images = torch.where(flips[:, None, None, None], images.flip(-1), images)
        masks = torch.where(flips[:, None, None], masks.flip(-1), masks)
        return F.cross_entropy(model(images), masks)

    def evaluate(val: Canvases) -> dict[str, float]:
        pred = predict_dense(model, val.images).argmax(1)
        return {"val_miou": mean_iou(pred, val.masks, num_classes)["miou"]}

    scorer = (lambda: evaluate(val)) if val is not None else None
    history = _fit(model, len(train), config, generator, step, "unet", progress, scorer)
    meta.extra["history"] = history
    meta.metrics = {k: v for k, v in history[-1].items() if k.startswith("val_")}
    return DenseTrainResult(model, meta, history)


def train_detection(
    train: Canvases, config: DenseTrainConfig | None = None, *, val: Canvases | None = None,
    arch: str = "centernet-small", arch_kwargs: dict[str, Any] | None = None, progress: bool = True,
) -> DenseTrainResult:
    """Train a CenterNet-style detector on ``train`` canvases (focal loss on the class heatmap,
    L1 on box size and centre offset).

    With ``val``, the last epoch also reports COCO mAP and mAP@.5 on it (pycocotools).
    """
    config = config or DenseTrainConfig()
    model, meta, generator = _setup(train, arch, "detection", len(train.classes), config, arch_kwargs or {})
    size = (int(train.images.shape[-2]), int(train.images.shape[-1]))
    epochs_done = [0]

    def step(rows: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        images = train.images[rows]
        images = torch.where(flips[:, None, None, None], images.flip(-1), images)
        boxes = [
            _flip_boxes(train.boxes[int(r)], size[1]) if bool(f) else train.boxes[int(r)]
            for r, f in zip(rows, flips, strict=True)
        ]
        targets = centernet_targets(boxes, [train.labels[int(r)] for r in rows], len(train.classes), size)
        loss, _ = centernet_loss(model.heads(images), targets)
        return loss

    def evaluate(val: Canvases) -> dict[str, float]:
        epochs_done[0] += 1
        if epochs_done[0] < config.epochs:  # mAP only once, after the last epoch
            return {}
        scores = detection_map(predict_dense(model, val.images), val.targets())
        return {"val_map": scores["map"], "val_map50": scores["map50"]}

    scorer = (lambda: evaluate(val)) if val is not None else None
    history = _fit(model, len(train), config, generator, step, "centernet", progress, scorer)
    meta.extra["history"] = history
    meta.metrics = {k: v for k, v in history[-1].items() if k.startswith("val_")}
    return DenseTrainResult(model, meta, history)
