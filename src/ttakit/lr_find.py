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
    True
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ._io import atomic_write
from .data.core import ImageDataset
from .data.splits import DEFAULT_TEST_FRACTION
from .errors import InvalidInputError
from .progress import progress as progress_bar
from .train import (
    TrainConfig,
    _make_optimizer,
    augment_batch,
    autocast,
    build_model,
    fit_image_size,
)

__all__ = ["LRFindResult", "centred_average", "lr_find", "plot_lr_find", "run_lr_find", "suggest_rates"]


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
    training steps on a fresh model (built as :func:`ttakit.train.train_model` would build it,
    ``config.init`` weights included, with its optimizer and augmentations).

    The sweep stops early once an exponential moving average of the loss (``smoothing``,
    bias-corrected) exceeds ``diverge`` times its minimum or turns non-finite. The curve the
    suggestions come from is a centred moving average over ``window`` steps (default a tenth
    of the sweep): a causal average lags behind the rate and would shift every suggestion to
    the right. Batches cycle through the shuffled data set.

    Raises:
        InvalidInputError: a data set smaller than one batch, or bad sweep settings.
    """
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
        batch_size=batch,
    )


def plot_lr_find(result: LRFindResult, path: str | os.PathLike, title: str | None = None) -> Path:
    """Loss against rate (log scale): raw loss faint, smoothed loss bold, both suggestions marked.

    The y range is clipped to the useful part (up to a little above the starting loss), so the
    divergent tail does not flatten the curve.
    """
    try:  # matplotlib is the optional extra ttakit[plots]
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        from .predictors import MissingExtraError

        raise MissingExtraError(
            f"drawing the lr-find plot needs matplotlib: pip install 'ttakit[plots]' ({exc.name or exc} is not installed)"
        ) from exc

    if not isinstance(result, LRFindResult):
        raise InvalidInputError(f"result must be an LRFindResult, got {type(result).__name__}")
    path = Path(path)
    fig = Figure(figsize=(6.4, 4.2), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    lrs = np.asarray(result.lrs)
    ax.plot(lrs, result.losses, color="0.75", linewidth=0.8, label="loss per step")
    ax.plot(lrs, result.smoothed, color="C0", linewidth=2.0, label="smoothed loss")
    ax.set_xscale("log")
    finite = [v for v in result.smoothed if math.isfinite(v)]
    raw = [v for v in result.losses if math.isfinite(v)]
    if finite:
        low = min(min(finite), min(raw[: int(np.argmin(finite)) + 1] or finite))
        top = max(finite[: max(3, len(finite) // 10)])  # the loss where the sweep started
        span = max(top - low, 1e-3)
        ax.set_ylim(low - 0.1 * span, top + 0.35 * span)
    for rate, color, name in ((result.steepest, "C2", "steepest descent"), (result.min10, "C3", "minimum/10")):
        y = float(np.interp(np.log10(rate), np.log10(lrs), result.smoothed))
        ax.axvline(rate, color=color, linestyle="--", linewidth=1.0)
        ax.plot([rate], [y], marker="o", color=color, markersize=7, label=f"{name}: {rate:.1e}")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss")
    default = f"lr-find: {result.arch} ({result.optimizer}, batch {result.batch_size}, {result.stopped})"
    ax.set_title(title or default, wrap=True)  # wrapped at the figure's edges, not clipped
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(loc="lower left", fontsize=9)
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        fig.clear()


def run_lr_find(
    data: str = "fashion-mnist",
    *,
    arch: str = "seed-cnn",
    config: TrainConfig | None = None,
    data_dir: str | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    plot: str | os.PathLike | None = "lr_find.png",
    progress: bool = True,
    image_size: int | tuple[int, int] | None = None,
    **sweep: Any,
) -> dict[str, Any]:
    """``ttakit lr-find``: sweep on exactly the rows ``ttakit train`` trains on.

    The rows come from :func:`ttakit.data.make_splits`, the split function ``train`` uses, with
    the same seed, ``val_fraction`` and ``test_fraction``: the validation split and the test
    split (the data's own, or the one carved from an ``.npz`` or a flat folder) are never swept
    on. ``image_size`` (``--image-size``) resizes them as ``train`` does. Writes the plot and returns
    ``{"result": LRFindResult, "plot": path or None, "size_note": which image size and why,
    **result.to_json(curve=False)}``."""
    from .data import make_splits
    from .data.splits import SPLIT_SEED

    splits = make_splits(data, data_dir, val_fraction=val_fraction, test_fraction=test_fraction, seed=SPLIT_SEED)
    splits, size_note = fit_image_size(splits, image_size, data)
    result = lr_find(splits.train, arch=arch, config=config, progress=progress, **sweep)
    shown = Path(str(data)).name or str(data)  # a file or folder by its name: a long path would crowd the title
    written = plot_lr_find(result, plot, title=f"lr-find: {arch} on {shown}") if plot is not None else None
    return {"result": result, "plot": str(written) if written else None, "size_note": size_note,
            **result.to_json(curve=False)}
