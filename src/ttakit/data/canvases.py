"""Dense data from real pixels: Fashion-MNIST items pasted on noisy canvases.

No detection or segmentation data set can be downloaded everywhere ttakit is tested, so
:func:`make_canvases` builds one: each canvas is a ``size x size`` image of background noise
holding 1 to 4 Fashion-MNIST items, each resized to a random side (20-44 px by default) and
pasted at a random position. An item's pixels brighter than ``threshold`` are its mask: they
are pasted (later items over earlier ones) and labelled ``class + 1`` in the canvas's mask
(0 is background); its box is the extent of the pixels of it that stay visible.

:func:`load_fashion_canvases` draws the items of each split from disjoint source images:
``"train"`` from the first ``50,000`` Fashion-MNIST training images, ``"val"`` from the last
``10,000`` (held out from training), ``"test"`` from the 10,000 test images. Given the seed,
the canvases are the same on every machine (NumPy's PCG64 and PyTorch's bilinear resize).

Example:
    >>> import torch
    >>> items = torch.rand(5, 1, 28, 28)
    >>> c = make_canvases(items, torch.arange(5), n=2, seed=0)
    >>> c.images.shape, c.masks.shape
    (torch.Size([2, 1, 96, 96]), torch.Size([2, 96, 96]))
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InvalidInputError
from .fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist

__all__ = ["Canvases", "CANVAS_SPLITS", "VAL_SOURCE_ROWS", "make_canvases", "load_fashion_canvases"]

VAL_SOURCE_ROWS = 10_000  # the last rows of Fashion-MNIST's training split feed the "val" canvases
CANVAS_SPLITS = ("train", "val", "test")
PLACEMENT_TRIES = 20  # positions tried per item before accepting more overlap


@dataclass
class Canvases:
    """Canvases with their segmentation masks and detection boxes.

    Attributes:
        images: ``(n, 1, S, S)`` float32 in ``[0, 1]``.
        masks: ``(n, S, S)`` int64: 0 background, ``class + 1`` on an item's visible pixels.
        instances: ``(n, S, S)`` int64: 0 background, ``j + 1`` on the visible pixels of the
            canvas's ``j``-th pasted item (the order of ``boxes``, ``labels`` and ``sources``).
        boxes: one ``(m_i, 4)`` float32 tensor per canvas: ``x1, y1, x2, y2`` in pixels of the
            canvas, the extent of each item's visible pixels (``x2``/``y2`` exclusive: a box of
            pixel columns 3..7 is ``x1=3, x2=8``).
        labels: one ``(m_i,)`` int64 tensor per canvas: class indices into ``classes``.
        sources: one ``(m_i,)`` int64 tensor per canvas: the row of the source image of each item.
        classes: the item classes (the mask's class ``k + 1`` is ``classes[k]``).
        name: where the canvases came from, e.g. ``"fashion-canvases/test"``.
    """

    images: torch.Tensor
    masks: torch.Tensor
    instances: torch.Tensor
    boxes: list[torch.Tensor]
    labels: list[torch.Tensor]
    sources: list[torch.Tensor]
    classes: list[str] = field(default_factory=lambda: list(FASHION_MNIST_CLASSES))
    name: str = ""

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def mask_classes(self) -> list[str]:
        """The segmentation classes: ``"background"`` then ``classes``."""
        return ["background", *self.classes]

    def targets(self) -> list[dict[str, torch.Tensor]]:
        """Detection targets, one ``{"boxes": (m, 4), "labels": (m,)}`` per canvas."""
        return [{"boxes": b, "labels": lab} for b, lab in zip(self.boxes, self.labels, strict=True)]

    def subset(self, rows: Sequence[int] | slice) -> Canvases:
        """The canvases at ``rows`` (a slice or a list of indices)."""
        index = list(range(len(self)))[rows] if isinstance(rows, slice) else [int(r) for r in rows]
        return Canvases(
            self.images[index], self.masks[index], self.instances[index],
            [self.boxes[i] for i in index], [self.labels[i] for i in index],
            [self.sources[i] for i in index], list(self.classes), self.name,
        )


def _check_range(name: str, value: object, low: int, high: int) -> tuple[int, int]:
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        or not low <= value[0] <= value[1] <= high
    ):
        raise InvalidInputError(f"{name} must be (min, max) integers with {low} <= min <= max <= {high}, got {value!r}")
    return int(value[0]), int(value[1])


def _as_items(images: torch.Tensor) -> torch.Tensor:
    """``images``: ``(N, 1, h, w)`` or ``(N, h, w)``, uint8 or float in [0, 1] -> ``(N, 1, h, w)`` float32."""
    if not isinstance(images, torch.Tensor) or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[1] != 1):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise InvalidInputError(f"images must be a (N, 1, h, w) or (N, h, w) tensor of gray items, got {shape}")
    if images.shape[0] == 0:
        raise InvalidInputError("images must hold at least one item, got 0")
    items = images.unsqueeze(1) if images.ndim == 3 else images
    return items.float() / 255.0 if images.dtype == torch.uint8 else items.float()


def _resized(item: torch.Tensor, side: int) -> torch.Tensor:
    """``item``: ``(1, h, w)`` -> ``(side, side)`` bilinear, clamped to [0, 1]."""
    out = F.interpolate(item[None], size=(side, side), mode="bilinear", align_corners=False, antialias=side < item.shape[-1])
    return out[0, 0].clamp_(0.0, 1.0)


def _place(
    rng: np.random.Generator, item_mask: torch.Tensor, taken: torch.Tensor, size: int, max_overlap: float
) -> tuple[int, int]:
    """A top-left corner for ``item_mask`` ``(s, s)`` bool whose pixels overlap ``taken``
    ``(size, size)`` bool by at most ``max_overlap`` of the item's area (the least overlapping
    of :data:`PLACEMENT_TRIES` tries when none does)."""
    side = item_mask.shape[0]
    area = max(int(item_mask.sum()), 1)
    best, best_overlap = (0, 0), float("inf")
    for _ in range(PLACEMENT_TRIES):
        top, left = (int(v) for v in rng.integers(0, size - side + 1, size=2))
        overlap = int((taken[top : top + side, left : left + side] & item_mask).sum()) / area
        if overlap < best_overlap:
            best, best_overlap = (top, left), overlap
        if overlap <= max_overlap:
            break
    return best


def make_canvases(
    images: torch.Tensor,
    labels: torch.Tensor,
    n: int,
    *,
    size: int = 96,
    items: tuple[int, int] = (1, 4),
    scales: tuple[int, int] = (20, 44),
    threshold: float = 0.2,
    noise: float = 0.08,
    max_overlap: float = 0.3,
    rows: Sequence[int] | torch.Tensor | None = None,
    seed: int = 0,
    classes: Sequence[str] | None = None,
    name: str = "",
) -> Canvases:
    """Paste items from ``images`` onto ``n`` noisy ``size x size`` canvases.

    Args:
        images: ``(N, 1, h, w)`` or ``(N, h, w)`` gray items, uint8 or float in ``[0, 1]``.
        labels: ``(N,)`` class index of each item.
        n: how many canvases.
        size: the canvas side in pixels.
        items: (min, max) items per canvas, drawn uniformly.
        scales: (min, max) side in pixels of a pasted item, drawn uniformly (items are square).
        threshold: an item's pixels above this value form its mask; only those are pasted.
        noise: standard deviation of the Gaussian noise added to the whole canvas, over a
            background level drawn per canvas from ``[0, 0.15]``.
        max_overlap: the largest share of a new item's mask that may fall on earlier items'
            pixels (positions are redrawn up to 20 times; then the least overlapping wins).
        rows: the rows of ``images`` items may be drawn from (default: all); the record
            ``sources`` holds the row of every pasted item.
        seed: the canvases depend on it alone (and on the inputs).
        classes: item class names (default: Fashion-MNIST's).

    Returns:
        :class:`Canvases`. An item hidden entirely by later ones keeps no box.

    Example:
        >>> c = make_canvases(torch.rand(3, 28, 28), torch.tensor([0, 1, 2]), n=1, seed=1)
        >>> int(c.masks.max()) <= 3 and len(c.boxes[0]) == len(c.labels[0])
        True
    """
    pool = _as_items(images)
    labels = torch.as_tensor(labels).long().flatten()
    if labels.shape[0] != pool.shape[0]:
        raise InvalidInputError(f"labels must hold one class per image: {labels.shape[0]} labels for {pool.shape[0]} images")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise InvalidInputError(f"n must be a non-negative integer number of canvases, got {n!r}")
    if not isinstance(size, int) or isinstance(size, bool) or size < 8:
        raise InvalidInputError(f"size must be an integer of at least 8 pixels, got {size!r}")
    lo_items, hi_items = _check_range("items", items, 1, 64)
    lo_side, hi_side = _check_range("scales", scales, 2, size)
    if not 0.0 <= float(threshold) < 1.0:
        raise InvalidInputError(f"threshold must lie in [0, 1), got {threshold!r}")
    allowed = (
        np.arange(pool.shape[0]) if rows is None else np.asarray(torch.as_tensor(rows).long().flatten().tolist(), dtype=np.int64)
    )
    if allowed.size == 0 or allowed.min() < 0 or allowed.max() >= pool.shape[0]:
        raise InvalidInputError(f"rows must be a non-empty list of rows in [0, {pool.shape[0] - 1}]")
    rng = np.random.default_rng(seed)
    canvas_images = torch.empty(n, 1, size, size)
    masks = torch.zeros(n, size, size, dtype=torch.int64)
    instances = torch.zeros(n, size, size, dtype=torch.int64)
    all_boxes, all_labels, all_sources = [], [], []
    for i in range(n):
        level = float(rng.uniform(0.0, 0.15))
        canvas = torch.full((size, size), level)
        count = int(rng.integers(lo_items, hi_items + 1))
        picked = rng.choice(allowed, size=count)
        for j, row in enumerate(picked):
            side = int(rng.integers(lo_side, hi_side + 1))
            item = _resized(pool[int(row)], side)
            item_mask = item > threshold
            top, left = _place(rng, item_mask, instances[i] > 0, size, max_overlap)
            window = (slice(top, top + side), slice(left, left + side))
            canvas[window] = torch.where(item_mask, item, canvas[window])
            masks[i][window][item_mask] = int(labels[int(row)]) + 1
            instances[i][window][item_mask] = j + 1
        noise_field = torch.from_numpy(rng.normal(0.0, noise, size=(size, size)).astype(np.float32))
        canvas_images[i, 0] = (canvas + noise_field).clamp_(0.0, 1.0)
        boxes, kept = [], []
        for j in range(count):
            ys, xs = torch.nonzero(instances[i] == j + 1, as_tuple=True)
            if ys.numel() == 0:
                continue  # hidden by later items
            boxes.append([float(xs.min()), float(ys.min()), float(xs.max()) + 1, float(ys.max()) + 1])
            kept.append(j)
        if len(kept) < count:  # renumber the instances that stay visible: 1..len(kept)
            renumber = torch.zeros(count + 1, dtype=torch.int64)
            renumber[torch.tensor(kept) + 1] = torch.arange(1, len(kept) + 1)
            instances[i] = renumber[instances[i]]
        all_boxes.append(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        all_labels.append(labels[torch.as_tensor(picked[kept], dtype=torch.int64)].reshape(-1))
        all_sources.append(torch.as_tensor(picked[kept], dtype=torch.int64).reshape(-1))
    names = list(classes) if classes is not None else list(FASHION_MNIST_CLASSES)
    return Canvases(canvas_images, masks, instances, all_boxes, all_labels, all_sources, names, name)


def _split_rows(split: str, n_source: int) -> np.ndarray | None:
    """The source rows of ``split``'s items (None: every row of the test images)."""
    if split == "test":
        return None
    cut = n_source - VAL_SOURCE_ROWS
    if cut <= 0:
        raise InvalidInputError(f"the training images hold {n_source} rows, too few to hold out {VAL_SOURCE_ROWS} for 'val'")
    return np.arange(cut) if split == "train" else np.arange(cut, n_source)


def load_fashion_canvases(
    split: Literal["train", "val", "test"], n: int, *, seed: int = 0, size: int = 96,
    data_dir: str | os.PathLike | None = None, **options,
) -> Canvases:
    """``n`` canvases of Fashion-MNIST items for ``split`` (never downloads).

    ``"train"`` canvases take their items from training rows ``0..49,999``, ``"val"`` from rows
    ``50,000..59,999`` and ``"test"`` from the test images, so no source image is shared between
    splits. Each split draws from its own stream (``seed`` and the split's name), so the
    canvases of one split do not change when another split's ``n`` does.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.
        n: how many canvases.
        seed: the draw's seed.
        options: passed to :func:`make_canvases` (``items``, ``scales``, ``threshold``, ``noise``).

    Example:
        >>> test = load_fashion_canvases("test", 100)  # doctest: +SKIP
    """
    if split not in CANVAS_SPLITS:
        raise InvalidInputError(f"split must be one of {', '.join(CANVAS_SPLITS)}, got {split!r}")
    ds = load_fashion_mnist("test" if split == "test" else "train", data_dir=data_dir)
    rows = _split_rows(split, ds.images.shape[0])
    stream = [int(seed), CANVAS_SPLITS.index(split)]
    return make_canvases(
        ds.images, ds.labels, n, size=size, rows=rows, seed=np.random.SeedSequence(stream).generate_state(1)[0].item(),
        classes=ds.classes, name=f"fashion-canvases/{split}", **options,
    )
