"""The learning-rate finder (Smith 2015, as popularised by fastai): train a fresh model for a
few hundred steps while the rate grows exponentially, watch the smoothed loss, and stop once
it diverges. The loss-against-rate curve says which rates learn fast and which blow up.

Two suggestions come out of one sweep:

- ``steepest``: the rate where the smoothed loss falls fastest (the most negative slope
  against log rate), searched before the minimum;
- ``min10``: the rate at the minimum of the smoothed loss, divided by 10 (the minimum itself
  is already too high to train at).

``train --lr auto`` trains at ``min10``, the steadier of the two: the steepest point moves
with the noise of a short sweep, the minimum much less.

Example:
    >>> from ttakit.data import ImageDataset
    >>> ds = ImageDataset(torch.rand(256, 1, 8, 8), torch.arange(256) % 2, ["a", "b"])
    >>> result = lr_find(ds, arch="resnet20", num_steps=20, config=TrainConfig(batch_size=32), progress=False)
    >>> result.suggestion == result.min10
    True"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..data.core import ImageDataset
from ..errors import InvalidInputError
from ..progress import progress as progress_bar
from .augment import augment_batch
from .build import autocast, build_model
from .config import TrainConfig
from .schedules import _make_optimizer

__all__ = ["LRFindResult", "centred_average", "lr_find", "suggest_rates"]


@dataclass
class LRFindResult:
    """One sweep: the rate and loss of every step, the smoothed loss, the two suggestions.

    Attributes:
        lrs, losses, smoothed: per step (equal lengths).
        steepest: rate of the steepest descent of the smoothed loss (before its minimum).
        min10: rate at the minimum of the smoothed loss, divided by 10.
        stopped: why the sweep ended: ``"diverged"`` or ``"end of range"``.
        arch, optimizer, batch_size: what was swept.
    """

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    steepest: float
    min10: float
    stopped: str
    arch: str = ""
    optimizer: str = "adam"
    batch_size: int = 128

    @property
    def suggestion(self) -> float:
        """The rate ``train --lr auto`` uses: ``min10``."""
        return self.min10

    def summary(self) -> str:
        return (
            f"suggested rate: steepest descent {self.steepest:.2e}, minimum/10 {self.min10:.2e} "
            f"({len(self.lrs)} steps, {self.lrs[0]:.0e} to {self.lrs[-1]:.2e}, stopped: {self.stopped})"
        )

    def to_json(self, curve: bool = True) -> dict[str, Any]:
        data: dict[str, Any] = {
            "steepest": self.steepest,
            "min10": self.min10,
            "suggestion": self.suggestion,
            "stopped": self.stopped,
            "steps": len(self.lrs),
            "arch": self.arch,
            "optimizer": self.optimizer,
            "batch_size": self.batch_size,
        }
        if curve:
            data.update(lrs=self.lrs, losses=self.losses, smoothed=self.smoothed)
        return data


def centred_average(values: list[float], window: int) -> list[float]:
    """Mean over ``window`` neighbours centred on each point (fewer at the ends); non-finite
    values stay non-finite.

    Example:
        >>> centred_average([1.0, 2.0, 3.0, 4.0], 3)
        [1.5, 2.0, 3.0, 3.5]
    """
    values_np = np.asarray(values, float)
    half = max(int(window), 1) // 2
    out = []
    for i in range(len(values_np)):
        out.append(float(values_np[max(0, i - half) : i + half + 1].mean()))
    return out


def suggest_rates(lrs: np.ndarray, smoothed: np.ndarray, skip_start: int = 5) -> tuple[float, float]:
    """``(steepest, min10)`` from a sweep: see the module docstring.

    ``skip_start`` early points are ignored (the smoothing has not settled there).

    Example:
        >>> lrs = np.logspace(-5, 0, 51)
        >>> loss = 1 / (1 + np.exp(4 * (np.log10(lrs) + 3))) + np.where(lrs > 0.1, 10 * (lrs - 0.1), 0)
        >>> steepest, min10 = suggest_rates(lrs, loss)
        >>> round(float(np.log10(steepest)), 1)
        -3.0
    """
    lrs, smoothed = np.asarray(lrs, float), np.asarray(smoothed, float)
    if len(lrs) == 0:
        raise InvalidInputError("the sweep produced no finite loss; lower start_lr")
    if len(lrs) < 3:
        return float(lrs[0]), float(lrs[0]) / 10
    start = min(skip_start, len(lrs) - 3)
    best = start + int(np.nanargmin(smoothed[start:]))
    min10 = float(lrs[best]) / 10
    stop = max(best, start + 2)
    slope = np.gradient(smoothed[start : stop + 1], np.log10(lrs[start : stop + 1]))
    steepest = float(lrs[start + int(np.nanargmin(slope))])
    return steepest, min10


def lr_find(
    dataset: ImageDataset,
    *,
    arch: str = "seed-cnn",
    arch_kwargs: dict[str, Any] | None = None,
    config: TrainConfig | None = None,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_steps: int = 100,
    smoothing: float = 0.9,
    diverge: float = 4.0,
    window: int | None = None,
    progress: bool = True,
) -> LRFindResult:
    """Sweep the learning rate exponentially from ``start_lr`` to ``end_lr`` over ``num_steps``
    training steps on a fresh model (built as :func:`ttakit.training.train_model` would build it,
    ``config.init`` weights included, with its optimizer and augmentations).

    The sweep stops early once an exponential moving average of the loss (``smoothing``,
    bias-corrected) exceeds ``diverge`` times its minimum or turns non-finite. The curve the
    suggestions come from is a centred moving average over ``window`` steps (default a tenth
    of the sweep): a causal average lags behind the rate and would shift every suggestion to
    the right. Batches cycle through the shuffled data set.

    Raises:
        InvalidInputError: a data set smaller than one batch, or bad sweep settings.
    """
    config, dataset = _check_sweep(dataset, config, start_lr, end_lr, num_steps, smoothing, diverge)
    sweep_config = replace(config, lr=start_lr, freeze_epochs=0, lr_slice=None, progressive=None)
    model, _ = build_model(dataset, sweep_config, arch, arch_kwargs)
    device = torch.device(config.device)
    optimizer = _make_optimizer(sweep_config, [{"params": list(model.parameters()), "lr": start_lr}])
    gamma = (end_lr / start_lr) ** (1.0 / (num_steps - 1))
    generator = torch.Generator().manual_seed(config.seed)
    n, batch = len(dataset), config.batch_size
    order = torch.randperm(n, generator=generator)
    position = 0

    lrs: list[float] = []
    losses: list[float] = []
    average, best, stopped = 0.0, math.inf, "end of range"
    model.train()
    bar = progress_bar(range(num_steps), desc=f"lr-find {arch}", unit="step", enabled=progress)
    for step in bar:
        lr = start_lr * gamma**step
        for group in optimizer.param_groups:
            group["lr"] = lr
        if position + batch > n:
            order, position = torch.randperm(n, generator=generator), 0
        index = order[position : position + batch]
        position += batch
        labels = dataset.labels[index]
        images, targets = augment_batch(dataset.images[index], labels, config, dataset.num_classes, generator)
        with autocast(config):  # --amp
            logits = model(images.to(device)).float()
        loss = F.cross_entropy(logits, targets.to(device), label_smoothing=config.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        value = float(loss.detach())
        average = smoothing * average + (1 - smoothing) * value
        debiased = average / (1 - smoothing ** (step + 1))
        lrs.append(lr)
        losses.append(value)
        bar.set_postfix(lr=f"{lr:.1e}", loss=f"{debiased:.3f}")
        if not math.isfinite(debiased) or (step > 5 and debiased > diverge * best):
            stopped = "diverged"
            break
        best = min(best, debiased)
    bar.close()
    return _result(lrs, losses, window, num_steps, stopped, arch, config)


def _check_sweep(dataset: ImageDataset, config: TrainConfig | None, start_lr: float, end_lr: float, num_steps: int,
                 smoothing: float, diverge: float) -> tuple[TrainConfig, ImageDataset]:
    """The config (default: ``TrainConfig()``), the images swept on (``config.limit`` of them)
    and the sweep settings, checked before any model is built."""
    config = config if config is not None else TrainConfig()
    if not isinstance(config, TrainConfig):
        raise InvalidInputError(f"config must be a TrainConfig, got {type(config).__name__}")
    if not isinstance(dataset, ImageDataset):
        raise InvalidInputError(f"dataset must be an ImageDataset, got {type(dataset).__name__}")
    dataset = dataset.head(config.limit)
    if len(dataset) < config.batch_size:
        raise InvalidInputError(
            f"lr-find needs at least one full batch: the data set has {len(dataset)} images but "
            f"batch_size is {config.batch_size}; lower --batch-size or use more data"
        )
    for name, value in (("start_lr", start_lr), ("end_lr", end_lr)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise InvalidInputError(f"{name} must be a finite number > 0, got {value!r}")
    if end_lr <= start_lr:
        raise InvalidInputError(f"end_lr must exceed start_lr, got start_lr={start_lr:g}, end_lr={end_lr:g}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 5:
        raise InvalidInputError(f"num_steps must be an integer >= 5, got {num_steps!r}")
    if not 0 <= smoothing < 1:
        raise InvalidInputError(f"smoothing must be a number in [0, 1), got {smoothing!r}")
    if not diverge > 1:
        raise InvalidInputError(f"diverge must be a number > 1, got {diverge!r}")
    return config, dataset


def _result(lrs: list[float], losses: list[float], window: int | None, num_steps: int, stopped: str, arch: str,
            config: TrainConfig) -> LRFindResult:
    """The swept curve, smoothed by a centred moving average, and the rates it suggests."""
    width = window if window is not None else max(3, (num_steps // 10) | 1)
    smoothed = centred_average(losses, width)
    finite = [i for i, v in enumerate(smoothed) if math.isfinite(v)]
    steepest, min10 = suggest_rates(
        np.asarray([lrs[i] for i in finite]), np.asarray([smoothed[i] for i in finite]), skip_start=width // 2
    )
    return LRFindResult(
        lrs=lrs,
        losses=losses,
        smoothed=smoothed,
        steepest=steepest,
        min10=min10,
        stopped=stopped,
        arch=arch,
        optimizer=config.optimizer,
        batch_size=config.batch_size,
    )
