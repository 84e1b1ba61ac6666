"""Policy search on held-out data from cached per-view outputs.

Run every candidate view once over a validation split (:func:`cache_views`, a ``(V, N, C)``
tensor of de-augmented logits), then search without touching the model again:

* :func:`greedy_search` is Greedy Policy Search (Lyzhov et al., 2020): start from the identity
  view and repeatedly add the candidate that most improves the objective (validation NLL after
  temperature scaling by default, or accuracy), up to ``budget`` views, stopping early when no
  candidate helps. Merging is the mean of the selected views' softmax probabilities; a view is
  selected at most once (re-selecting would cost forward passes for what a weight can do, and
  learned aggregation provides the weights). A candidate is admissible only if the policy it
  produces is not worse than the identity alone on the *other* metric either (accuracy when
  optimising NLL, NLL when optimising accuracy), and the result is never worse than the
  identity alone on the validation data: in the worst case it *is* the identity.
* :func:`fit_view_weights`: learned aggregation (Shanmugam et al., 2021): non-negative per-view
  weights summing to 1, maximising the validation likelihood of the weighted mixture (MAP-EM,
  a mild Dirichlet prior pulling toward uniform). They are kept only if they beat the plain mean
  out of sample (2-fold cross-validated NLL after temperature scaling) without losing accuracy.
* :func:`fit_temperature`: temperature scaling of the merged output, stored in the policy and
  applied as ``softmax(log(p) / T)`` (:func:`apply_temperature`).
* Gated TTA (:mod:`ttakit.gating`): the cheapest confidence threshold that keeps ``keep`` of the
  policy's accuracy lift, stored as ``policy.gate_threshold``.
* Random-copy TTA as users know it: :func:`random_copy_views` / :func:`random_copy_policy`
  (Keras ``ImageDataGenerator`` style: the mean of n random draws of the training augmentations)
  and :func:`fastai_policy` (fastai ``Learner.tta``: ``lerp(aug_mean, plain, beta)`` or
  ``use_max``). The draws are also search candidates.

:func:`search_policy` does it all for a model and a validation split; :func:`write_search_report`
writes ``policy.json``, ``search.json``, ``search.md`` and PNG plots.

Example:
    >>> logits = torch.randn(3, 200, 4)                      # (V, N, C): 3 views, 200 images
    >>> labels = logits[0].argmax(1)                         # identity is right everywhere
    >>> views = [View.identity(), *Compose([T.HorizontalFlip(), T.VerticalFlip()]).views[1:3]]
    >>> result = greedy_search(ViewCache(logits, labels, views), budget=2)
    >>> result.policy.view_names[0]
    'identity'
"""

from __future__ import annotations

import math
import numbers
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from . import transforms as T
from ._io import atomic_write_json, atomic_write_text
from .calibration import PROB_FLOOR, apply_temperature
from .data.core import ImageDataset
from .engine import TTAEngine
from .errors import DataError, InvalidInputError, UnknownNameError, unknown_name
from .gating import GateTuning, _EvalMode, tune_gate_threshold
from .merge import merge
from .policy import Compose, Policy, Step, View
from .report import markdown_table, plot_candidate_lifts, plot_views_curve

__all__ = [
    "OBJECTIVES",
    "ViewCache",
    "SearchResult",
    "default_pool",
    "random_copy_views",
    "random_copy_policy",
    "fastai_policy",
    "fastai_merge",
    "cache_views",
    "fit_temperature",
    "apply_temperature",
    "fit_view_weights",
    "greedy_search",
    "search_policy",
    "write_search_report",
]

OBJECTIVES = ("nll", "accuracy")
TRAIN_AUGMENTATIONS = ("flip", "shift", "crop", "mixup")  # what ttakit.train records
Objective = Literal["nll", "accuracy"]

_PROB_FLOOR = PROB_FLOOR  # log of merged probabilities never sees 0
# Per-image NLL is capped where ttakit.metrics.nll clamps probabilities (eps=1e-12), so the
# search optimises the number the reports show, and a few confident mistakes cannot dominate.
_NLL_CAP = -math.log(1e-12)
_BETA_RANGE = (1e-2, 1e2)  # inverse temperatures searched: T in [0.01, 100]
_SCORE_CHUNK = 16  # candidates scored at once: bounds temporaries to 16 x N x C floats


# =========================================================================== augmentations


def _parse_augmentations(train_augmentations: object) -> list[dict[str, Any]]:
    """Normalise checkpoint ``train_augmentations`` (dicts with ``name`` or bare names)."""
    if isinstance(train_augmentations, (str, bytes)) or not isinstance(
        train_augmentations, Sequence
    ):
        raise InvalidInputError(
            "Expected argument `train_augmentations` to be a list of dicts like {'name': 'flip', 'p': 0.5} "
            f"(a checkpoint's train_augmentations), but got {train_augmentations!r}"
        )
    out = []
    for aug in train_augmentations:
        record = {"name": aug} if isinstance(aug, str) else aug
        if not isinstance(record, Mapping) or not isinstance(record.get("name"), str):
            raise InvalidInputError(
                f"Expected each training augmentation to be a dict with a 'name' or a name, but got {aug!r}"
            )
        if record["name"] not in TRAIN_AUGMENTATIONS:
            raise unknown_name("training augmentation", record["name"], TRAIN_AUGMENTATIONS)
        out.append(dict(record))
    return out


def _aug_setting(record: Mapping[str, Any], key: str, default: float, kind: str) -> float:
    value = record.get(key, default)
    if kind == "p":
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value <= 1:
            raise InvalidInputError(
                f"training augmentation {dict(record)!r}: {key} must be a number in [0, 1], got {value!r}"
            )
        return float(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInputError(
            f"training augmentation {dict(record)!r}: {key} must be an integer >= 0, got {value!r}"
        )
    return int(value)


def _geometry(augmentations: list[dict[str, Any]]) -> tuple[float, int]:
    """(flip probability, largest shift in pixels) of parsed training augmentations."""
    flip_p, max_shift = 0.0, 0
    for record in augmentations:
        if record["name"] == "flip":
            flip_p = _aug_setting(record, "p", 0.5, "p")
        elif record["name"] == "shift":
            max_shift += _aug_setting(record, "max_pixels", 2, "int")
        elif record["name"] == "crop":
            max_shift += _aug_setting(
                record, "max_pixels", _aug_setting(record, "padding", 2, "int"), "int"
            )
    return flip_p, int(max_shift)


def _make_view(flip: bool, dx: int = 0, dy: int = 0, padding_mode: str = "constant") -> View:
    # Flip first, then shift: the order ttakit.train applies them, so names match the draws.
    steps: list[Step] = []
    if flip:
        steps.append(Step(T.HorizontalFlip(), True))
    if (dx, dy) != (0, 0):
        steps.append(Step(T.Shift([(dx, dy)], padding_mode), (dx, dy)))
    return View(steps)


def _check_count(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidInputError(
            f"Expected argument `{name}` to be an integer >= {minimum}, but got {value!r}"
        )
    return value


def random_copy_views(
    train_augmentations: Sequence[dict | str], n: int = 8, seed: int = 0
) -> list[View]:
    """``n`` seeded random draws of the training augmentations, each a concrete :class:`View`.

    Each draw flips horizontally with the recorded probability ``p`` and shifts by a random
    integer ``(dx, dy)`` in ``[-max_pixels, max_pixels]^2`` (``crop`` with zero padding is a shift;
    ``shift`` and ``crop`` together add up), zero fill, as :mod:`ttakit.train` does. ``mixup``
    changes no geometry. Unlike Keras/fastai, which redraw per image, one draw applies to the
    whole batch, so a copy is an invertible, nameable view; the expectation is the same.
    Draws are prefix-stable: the first k of ``n`` draws equal ``random_copy_views(..., k, seed)``.
    Draws may repeat each other or be the identity.

    Example:
        >>> [v.name for v in random_copy_views([{"name": "flip", "p": 0.5}, {"name": "shift", "max_pixels": 2}], 3)]
        ['shift(+0,-1)', 'hflip+shift(-2,-2)', 'shift(+1,+2)']
    """
    n = _check_count("n", n)
    flip_p, max_shift = _geometry(_parse_augmentations(train_augmentations))
    rng = np.random.default_rng(seed)
    views = []
    for _ in range(n):
        flip = bool(rng.random() < flip_p)
        dx, dy = (int(v) for v in rng.integers(-max_shift, max_shift + 1, size=2))
        views.append(_make_view(flip, dx, dy))
    return views


def random_copy_policy(
    train_augmentations: Sequence[dict | str], n: int = 8, seed: int = 0
) -> Policy:
    """Keras-style random-copy TTA: the mean of ``n`` random augmented copies (no plain pass)."""
    views = random_copy_views(train_augmentations, n, seed)
    return Policy(
        views,
        name=f"random-copy-{n}",
        merge_mode="mean",
        meta={"kind": "random-copy", "n": n, "seed": seed},
    )


def fastai_policy(
    train_augmentations: Sequence[dict | str],
    n: int = 4,
    beta: float = 0.25,
    use_max: bool = False,
    seed: int = 0,
) -> Policy:
    """fastai ``Learner.tta``: plain prediction plus ``n`` augmented passes.

    With ``use_max=False`` the result is ``torch.lerp(aug_mean, plain, beta)``, i.e. a weighted
    mean with weight ``beta`` on the identity view and ``(1 - beta) / n`` on each draw (merged as
    probabilities). With ``use_max=True`` it is the element-wise maximum over the plain and
    augmented probabilities (merge mode ``max``), as fastai does.

    Example:
        >>> fastai_policy(["flip"], n=4).weights
        [0.25, 0.1875, 0.1875, 0.1875, 0.1875]
    """
    n = _check_count("n", n)
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not 0 <= beta <= 1:
        raise InvalidInputError(
            f"Expected argument `beta` to be a number in [0, 1], but got {beta!r}"
        )
    views = [View.identity(), *random_copy_views(train_augmentations, n, seed)]
    meta = {"kind": "fastai", "n": n, "beta": float(beta), "use_max": bool(use_max), "seed": seed}
    if use_max:
        return Policy(views, name=f"fastai-max-{n}", merge_mode="max", meta=meta)
    weights = [float(beta)] + [(1.0 - float(beta)) / n] * n
    return Policy(views, name=f"fastai-{n}", merge_mode="mean", weights=weights, meta=meta)


def fastai_merge(
    plain: torch.Tensor, augmented: torch.Tensor, beta: float = 0.25, use_max: bool = False
) -> torch.Tensor:
    """fastai's merge verbatim: ``plain (N, C)`` and ``augmented (n, N, C)`` probabilities -> ``(N, C)``."""
    if use_max:
        return torch.stack([plain, augmented.max(0).values]).max(0).values
    return torch.lerp(augmented.mean(0), plain, beta)


# =========================================================================== candidate pool


def _dedupe(views: Sequence[View], sources: Sequence[str]) -> tuple[list[View], list[str]]:
    seen: dict[str, int] = {}
    out_views, out_sources = [], []
    for view, source in zip(views, sources):
        if view.name in seen:
            continue
        seen[view.name] = len(out_views)
        out_views.append(view)
        out_sources.append(source)
    return out_views, out_sources


def _pool_with_sources(
    image_size: tuple[int, int],
    train_augmentations: Sequence[dict | str] = (),
    *,
    fixed_size: bool = True,
    shifts: Sequence[int] = (1, 2, 3),
    scales: Sequence[float] = (0.9, 1.1),
    crop_fraction: float = 0.9,
    brightness: Sequence[float] = (-0.1, 0.1),
    contrast: Sequence[float] = (0.8, 1.2),
    n_random: int = 8,
    seed: int = 0,
) -> tuple[list[View], list[str]]:
    if (
        not isinstance(image_size, Sequence)
        or len(image_size) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 4 for v in image_size)
    ):
        raise InvalidInputError(
            f"Expected argument `image_size` to be a (height, width) pair of integers >= 4, but got {image_size!r}"
        )
    height, width = int(image_size[0]), int(image_size[1])
    augs = _parse_augmentations(train_augmentations)
    flip_p, max_shift = _geometry(augs)
    n_random = _check_count("n_random", n_random, minimum=0)
    views: list[View] = []
    sources: list[str] = []

    def add(new: Sequence[View], source: str) -> None:
        views.extend(new)
        sources.extend([source] * len(new))

    add([View.identity()], "identity")
    add(Compose([T.HorizontalFlip()]).views[1:] + Compose([T.VerticalFlip()]).views[1:], "flip")
    add(Compose([T.Rotate90([90, 180, 270])]).views[1:], "rot90")
    distances = sorted({int(d) for d in shifts} | set(range(1, min(max_shift, 3) + 1)))
    distances = [d for d in distances if 0 < d < min(height, width)]
    if distances:
        add(Compose([T.Shift.around(distances, directions=8)]).views[1:], "shift")
    if flip_p > 0 and max_shift > 0:
        # The combinations the model saw in training: a flip and a small shift.
        near = [d for d in distances if d <= min(max_shift, 2)]
        add(Compose([T.HorizontalFlip(), T.Shift.around(near, directions=8)]).views, "train-aug")
    elif flip_p > 0:
        add([_make_view(True)], "train-aug")
    crop_h, crop_w = max(1, round(height * crop_fraction)), max(1, round(width * crop_fraction))
    if fixed_size:
        # The model takes one input size: crop, then resize back (a zoom by ~1/crop_fraction,
        # the centre crop being the "scale 1.1" view). Zooming out would need padding, which no
        # size-keeping transform offers yet, so scales < 1 are left out.
        resize = T.Resize([(height, width)], interpolation="bilinear")
        crops = T.FiveCrops(crop_h, crop_w)
        add(
            [View([Step(crops, pos), Step(resize, (height, width))]) for pos in crops.params],
            "crop",
        )
    else:
        add(Compose([T.Scale(list(scales), interpolation="bilinear")]).views[1:], "scale")
        add(Compose([T.FiveCrops(crop_h, crop_w)]).views, "crop")
    if brightness:
        add(Compose([T.Brightness(list(brightness))]).views[1:], "photometric")
    if contrast:
        add(Compose([T.Contrast(list(contrast))]).views[1:], "photometric")
    if n_random and (flip_p > 0 or max_shift > 0):
        add(random_copy_views(augs, n_random, seed), "random-copy")
    return _dedupe(views, sources)


def default_pool(
    image_size: tuple[int, int],
    train_augmentations: Sequence[dict | str] = (),
    *,
    fixed_size: bool = True,
    shifts: Sequence[int] = (1, 2, 3),
    scales: Sequence[float] = (0.9, 1.1),
    crop_fraction: float = 0.9,
    brightness: Sequence[float] = (-0.1, 0.1),
    contrast: Sequence[float] = (0.8, 1.2),
    n_random: int = 8,
    seed: int = 0,
) -> list[View]:
    """The default candidate views, identity first, deduplicated by name.

    Identity; horizontal and vertical flips; rotations by 90, 180, 270 degrees; shifts by
    ``shifts`` pixels (and up to the trained shift, at most 3) in 8 directions, zero fill; with a
    trained flip and shift, flip+shift combinations of up to 2 pixels; crops; brightness and
    contrast changes; and ``n_random`` seeded random draws of the training augmentations
    (:func:`random_copy_views`).

    Crops and scales depend on ``fixed_size``: a classifier with a fixed input size (a dense head,
    like the seed CNN) gets five crops of ``crop_fraction`` of the image each resized back to the
    full size (bilinear), i.e. zoom-in views; a model that accepts any size gets ``Scale`` views at
    ``scales`` and plain five crops.

    Args:
        image_size: ``(H, W)`` of the model's input.
        train_augmentations: a checkpoint's ``train_augmentations``.

    Example:
        >>> len(default_pool((28, 28)))
        39
    """
    return _pool_with_sources(
        image_size,
        train_augmentations,
        fixed_size=fixed_size,
        shifts=shifts,
        scales=scales,
        crop_fraction=crop_fraction,
        brightness=brightness,
        contrast=contrast,
        n_random=n_random,
        seed=seed,
    )[0]


# =========================================================================== the cache


@dataclass
class ViewCache:
    """Per-view de-augmented logits of a validation split.

    Attributes:
        logits: ``(V, N, C)`` float32 raw outputs, one row per view.
        labels: ``(N,)`` int64 class indices.
        views: the V views, in row order (names must be distinct).
        sources: optional ``(V,)`` tags saying where each candidate came from.
    """

    logits: torch.Tensor
    labels: torch.Tensor
    views: list[View]
    sources: list[str] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.logits, torch.Tensor) or self.logits.ndim != 3:
            shape = (
                tuple(self.logits.shape)
                if isinstance(self.logits, torch.Tensor)
                else type(self.logits).__name__
            )
            raise InvalidInputError(f"Expected `logits` to be a (V, N, C) tensor, but got {shape}")
        if (
            not isinstance(self.labels, torch.Tensor)
            or self.labels.ndim != 1
            or self.labels.shape[0] != self.logits.shape[1]
        ):
            got = (
                tuple(self.labels.shape)
                if isinstance(self.labels, torch.Tensor)
                else type(self.labels).__name__
            )
            raise InvalidInputError(
                f"Expected `labels` to be a ({self.logits.shape[1]},) tensor, but got {got}"
            )
        self.views = [v if isinstance(v, View) else View(v) for v in self.views]
        if len(self.views) != self.logits.shape[0]:
            raise InvalidInputError(
                f"Expected one view per row of `logits` ({self.logits.shape[0]}), but got {len(self.views)} views"
            )
        names = [v.name for v in self.views]
        if len(set(names)) != len(names):
            dupes = sorted({n for n in names if names.count(n) > 1})
            raise InvalidInputError(
                f"Expected distinct view names in the cache, but got duplicates {dupes}"
            )
        if self.sources is None:
            self.sources = ["user"] * len(self.views)
        elif len(self.sources) != len(self.views):
            raise InvalidInputError(
                f"Expected one source per view ({len(self.views)}), but got {len(self.sources)}"
            )
        self.logits = self.logits.float()
        self.labels = self.labels.long()
        n_classes = self.logits.shape[2]
        if self.labels.numel() and (
            int(self.labels.min()) < 0 or int(self.labels.max()) >= n_classes
        ):
            raise InvalidInputError(
                f"Expected `labels` in [0, {n_classes - 1}] for {n_classes} classes, but got range "
                f"[{int(self.labels.min())}, {int(self.labels.max())}]"
            )
        if not torch.isfinite(self.logits).all():
            raise InvalidInputError("Expected finite `logits`, but the cache holds NaN/inf")
        self._index = {name: k for k, name in enumerate(names)}
        self._probs: torch.Tensor | None = None

    @property
    def names(self) -> list[str]:
        return [v.name for v in self.views]

    @property
    def n_views(self) -> int:
        return int(self.logits.shape[0])

    @property
    def n_images(self) -> int:
        return int(self.logits.shape[1])

    @property
    def n_classes(self) -> int:
        return int(self.logits.shape[2])

    @property
    def probs(self) -> torch.Tensor:
        """``(V, N, C)`` softmax probabilities (computed once)."""
        if self._probs is None:
            self._probs = torch.softmax(self.logits, dim=2)
        return self._probs

    def index(self, name: str) -> int:
        """The row of the view called ``name``."""
        if name not in self._index:
            shown = ", ".join(self.names[:12]) + (", ..." if self.n_views > 12 else "")
            raise UnknownNameError(
                f"view {name!r} is not in the cache; it holds {self.n_views} views: {shown}"
            )
        return self._index[name]

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def policy_probs(self, policy: Policy) -> torch.Tensor:
        """``(N, C)``: the policy's merge of its views' probabilities, from the cache."""
        rows = [self.index(name) for name in policy.view_names]
        return merge(
            self.logits[rows], policy.merge_mode, policy.weights, activation="softmax"
        ).float()

    def rows(self, index: torch.Tensor) -> ViewCache:
        """The same views over a subset of images."""
        return ViewCache(
            self.logits[:, index], self.labels[index], list(self.views), list(self.sources or [])
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write the cache (``torch.save`` of tensors and the views' JSON)."""
        data = {
            "format": "ttakit-view-cache",
            "format_version": 1,
            "logits": self.logits,
            "labels": self.labels,
            "views": [v.to_json() for v in self.views],
            "sources": list(self.sources or []),
        }
        from ._io import atomic_write

        atomic_write(path, lambda tmp: torch.save(data, tmp))

    @classmethod
    def load(cls, path: str | os.PathLike) -> ViewCache:
        """Read a cache written by :meth:`save`."""
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise DataError(f"view cache {os.fspath(path)!r} does not exist") from None
        except Exception as err:  # torch raises many types for a foreign file
            raise DataError(f"{os.fspath(path)!r} is not a ttakit view cache: {err}") from None
        if (
            not isinstance(data, dict)
            or data.get("format") != "ttakit-view-cache"
            or data.get("format_version") != 1
        ):
            raise DataError(f"{os.fspath(path)!r} is not a ttakit view cache (format version 1)")
        return cls(
            data["logits"],
            data["labels"],
            [View.from_json(v) for v in data["views"]],
            data["sources"],
        )


def _check_dataset(dataset: object, name: str = "val_dataset") -> ImageDataset:
    if not isinstance(dataset, ImageDataset):
        raise InvalidInputError(
            f"Expected argument `{name}` to be an ImageDataset, but got {type(dataset).__name__}"
        )
    if len(dataset) == 0:
        raise DataError(
            f"the validation split {dataset.name or name!r} is empty; search needs labelled images"
        )
    _check_labels(dataset.labels, dataset.name or name)
    return dataset


def _check_labels(labels: torch.Tensor, what: str) -> None:
    if labels.numel() == 0:
        raise DataError(f"the validation split {what!r} is empty; search needs labelled images")
    present = torch.unique(labels)
    if len(present) < 2:
        raise DataError(
            f"the validation split {what!r} holds a single class ({int(present[0])}) in {labels.numel()} images; "
            "search needs at least 2 classes to score predictions"
        )


def _check_views(views: object, name: str = "views") -> list[View]:
    if isinstance(views, (str, bytes, View)) or not isinstance(views, Sequence) or not views:
        raise InvalidInputError(
            f"Expected argument `{name}` to be a non-empty list of ttakit.View, but got {views!r}"
        )
    bad = [v for v in views if not isinstance(v, View)]
    if bad:
        raise InvalidInputError(
            f"Expected argument `{name}` to hold only ttakit.View objects, but got {bad[0]!r}"
        )
    return list(views)


def cache_views(
    model: Any,
    dataset: ImageDataset,
    views: Sequence[View],
    *,
    max_batch: int = 256,
    progress: bool = True,
    sources: Sequence[str] | None = None,
) -> ViewCache:
    """Run every view once over ``dataset`` and keep the de-augmented logits.

    Runs :class:`TTAEngine` (``activation=None``, ``return_views=True``) over chunks of
    ``max_batch`` images with a progress bar; the model is put in eval mode for the call.
    Memory: ``V x N x C`` float32 (100 views x 10,000 images x 10 classes = 40 MB).

    Returns:
        :class:`ViewCache` with ``logits`` ``(V, N, C)``. Duplicate view names are dropped.
    """
    dataset = _check_dataset(dataset, "dataset")
    views = _check_views(views)
    sources = list(sources) if sources is not None else ["user"] * len(views)
    views, sources = _dedupe(views, sources)
    Policy(views).check_targets("label")
    engine = TTAEngine(model, Policy(views), activation=None, max_batch=max_batch)
    n = len(dataset)
    parts = []
    with (
        _EvalMode(model),
        tqdm(total=n, desc=f"caching {len(views)} views", unit="img", disable=not progress) as bar,
    ):
        for start in range(0, n, max_batch):
            out = engine.run(dataset.images[start : start + max_batch], return_views=True)
            parts.append(out.views.float().cpu())
            bar.update(min(max_batch, n - start))
    logits = torch.cat(parts, dim=1).clone()  # a normal tensor, usable with autograd
    return ViewCache(logits, dataset.labels.clone(), views, sources)


# =========================================================================== temperature
#
# Internally, probabilities are held class-major, ``(V, C, N)``: reductions over the few classes
# then run across contiguous images, which is many times faster on CPU than reducing the last
# dimension of ``(V, N, C)``. Work is chunked over views to bound temporaries.


class _SingleThread:
    """Run small tensor ops on one thread for the block (OpenMP threads cost more than they
    save on chunks this size, and stall badly on a shared machine); restores the setting."""

    def __enter__(self) -> None:
        self.saved = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.saved)


def _cm(x: torch.Tensor) -> torch.Tensor:
    """``(..., N, C)`` -> class-major ``(..., C, N)``, contiguous float32."""
    return x.float().transpose(-1, -2).contiguous()


def _gather_cm(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x[v, y[n], n]`` for class-major ``x (V, C, N)`` -> ``(V, N)``."""
    return x.gather(1, y.view(1, 1, -1).expand(x.shape[0], 1, -1)).squeeze(1)


def _shifted_log(probs_cm: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``d = log(p / max_c p)`` (``<= 0``, ``(V, C, N)``) and ``d[y]`` ``(V, N)`` of probabilities."""
    top = probs_cm.amax(1, keepdim=True).clamp_min(_PROB_FLOOR)
    d = (probs_cm / top).clamp_min_(_PROB_FLOOR).log_()
    return d, _gather_cm(d, y)


def _shifted_logits(logits_cm: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same for logits: ``d = z - max_c z``."""
    d = logits_cm - logits_cm.amax(1, keepdim=True)
    return d, _gather_cm(d, y)


def _moments(d: torch.Tensor, dy: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """NLL of ``softmax(beta * d)`` over classes and its first two derivatives in beta, per row.

    ``d``: ``(V, C, N)`` log-probabilities shifted so the top class is 0; ``dy``: ``(V, N)``;
    ``beta``: ``(V,)``. Each image's loss is capped at ``-log(1e-12)`` as in
    :func:`ttakit.metrics.nll` (a capped image has zero derivatives). Returns three ``(V,)``
    float64 tensors.
    """
    b = beta.float()
    e = torch.exp(d * b[:, None, None])
    s = e.sum(1)  # (V, N)
    e.mul_(d)
    ed = e.sum(1)
    ed2 = e.mul_(d).sum(1)
    mean_d = ed / s
    var = (ed2 / s - mean_d * mean_d).clamp_min_(0)
    loss = s.log_().sub_(b[:, None] * dy)
    capped = loss > _NLL_CAP
    zero = torch.zeros((), dtype=loss.dtype)
    grad = torch.where(capped, zero, mean_d - dy)
    hess = torch.where(capped, zero, var)
    nll = loss.clamp_max_(_NLL_CAP).double().mean(1)
    return nll, grad.double().mean(1), hess.double().mean(1)


def _fit_beta_cm(
    d: torch.Tensor,
    dy: torch.Tensor,
    beta0: torch.Tensor | float | None = None,
    iters: int = 40,
    rtol: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse temperatures minimising the NLL of ``softmax(beta * d[v])``, for every row v at once.

    The uncapped NLL is convex in beta (capping only flattens a few confident mistakes), so a
    safeguarded Newton iteration (bisection inside a bracket kept by the sign of the gradient)
    converges from any start. Returns ``(beta, nll)``, ``(V,)``
    float64, beta in ``[0.01, 100]``.
    """
    rows = d.shape[0]
    lo = torch.full((rows,), _BETA_RANGE[0], dtype=torch.float64)
    hi = torch.full((rows,), _BETA_RANGE[1], dtype=torch.float64)
    if beta0 is None:
        beta = torch.ones(rows, dtype=torch.float64)
    else:
        beta = torch.as_tensor(beta0, dtype=torch.float64).expand(rows).clone()
    beta = beta.clamp(_BETA_RANGE[0] * 1.001, _BETA_RANGE[1] * 0.999)
    for _ in range(iters):
        nll, grad, hess = _moments(d, dy, beta)
        rising = grad > 0
        hi = torch.where(rising, beta, hi)
        lo = torch.where(rising, lo, beta)
        newton = beta - grad / hess.clamp_min(1e-12)
        bad = (hess <= 1e-12) | ~torch.isfinite(newton) | (newton <= lo) | (newton >= hi)
        new = torch.where(bad, torch.sqrt(lo * hi), newton)
        if bool(((new - beta).abs() <= rtol * beta).all()):
            return beta, nll  # converged: the beta the NLL was evaluated at
        beta = new
    return beta, _moments(d, dy, beta)[0]


def _fit_chunked(
    make: Any, rows: int, beta0: float | None = None, rtol: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_fit_beta_cm` over ``rows`` rows, ``make(start, stop) -> (d, dy)`` built per chunk."""
    betas, nlls = [], []
    for start in range(0, rows, _SCORE_CHUNK):
        d, dy = make(start, min(start + _SCORE_CHUNK, rows))
        beta, nll = _fit_beta_cm(d, dy, beta0, rtol=rtol)
        betas.append(beta)
        nlls.append(nll)
    return torch.cat(betas), torch.cat(nlls)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature ``T`` minimising the NLL of ``softmax(logits / T)``.

    The NLL is :func:`ttakit.metrics.nll`'s (probabilities floored at 1e-12). For merged
    probabilities pass ``log(probs)``. Safeguarded Newton on ``1 / T`` (the uncapped NLL is
    convex in it); the result lies in ``[0.01, 100]``.

    Args:
        logits: ``(N, C)``.
        labels: ``(N,)`` class indices.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> z = torch.randn(4000, 5) * 3
        >>> y = torch.distributions.Categorical(logits=z / 2).sample()
        >>> round(fit_temperature(z, y), 1)
        2.0
    """
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] == 0:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise InvalidInputError(
            f"Expected argument `logits` to be a non-empty (N, C) tensor, but got {shape}"
        )
    if not isinstance(labels, torch.Tensor) or labels.shape != logits.shape[:1]:
        got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise InvalidInputError(
            f"Expected argument `labels` to be a ({logits.shape[0]},) tensor, but got {got}"
        )
    if not torch.isfinite(logits).all():
        raise InvalidInputError("Expected argument `logits` to be finite, but it holds NaN/inf")
    with _SingleThread():
        beta, _ = _fit_beta_cm(*_shifted_logits(_cm(logits.detach())[None], labels.long()))
    return float(1.0 / beta[0])



def _scores(probs: torch.Tensor, y: torch.Tensor, beta0: float | None = None) -> dict[str, float]:
    """accuracy, raw NLL and temperature-scaled NLL of merged probabilities ``(N, C)``.

    Probabilities are renormalised first (a ``max`` merge does not sum to 1).
    """
    p = probs.float()
    p = p / p.sum(1, keepdim=True).clamp_min(_PROB_FLOOR)
    beta, nll_ts = _fit_beta_cm(*_shifted_log(_cm(p)[None], y), beta0)
    picked = p.gather(1, y[:, None]).squeeze(1)
    return {
        "accuracy": float((p.argmax(1) == y).double().mean()),
        "nll": float(-picked.clamp_min(1e-12).log().double().mean()),
        "nll_ts": float(nll_ts[0]),
        "temperature": float(1.0 / beta[0]),
    }


# =========================================================================== learned aggregation


def _merge_weighted(probs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_k w_k probs[k]`` over the first dimension (weights normalised to sum to 1)."""
    w = weights.to(probs.dtype)
    return torch.tensordot(w / w.sum(), probs, dims=1)


def _fit_weights(probs: torch.Tensor, y: torch.Tensor, prior: float, max_iter: int) -> torch.Tensor:
    """Mixture weights maximising the likelihood of ``sum_k w_k probs[k]`` (MAP-EM).

    ``probs``: ``(K, N, C)``. A symmetric Dirichlet prior worth ``prior * N`` pseudo-observations
    pulls the weights toward uniform. The log-likelihood is concave in the weights, and EM
    increases it monotonically, so the result does not depend on a learning rate.
    """
    k, n = probs.shape[0], probs.shape[1]
    py = (
        probs.gather(2, y.view(1, -1, 1).expand(k, -1, 1)).squeeze(2).double().clamp_min(1e-12)
    )  # (K, N)
    w = torch.full((k,), 1.0 / k, dtype=torch.float64)
    pseudo = prior * n / k
    for _ in range(max_iter):
        mix = (w[:, None] * py).sum(0)  # (N,)
        resp = (w[:, None] * py / mix).sum(1)  # (K,) expected counts
        new = (resp + pseudo) / (n + prior * n)
        converged = float((new - w).abs().max()) < 1e-7
        w = new
        if converged:
            break
    return w.float()


def fit_view_weights(
    cache: ViewCache,
    selected: Sequence[str | int],
    *,
    prior: float = 0.01,
    max_iter: int = 500,
) -> list[float]:
    """Non-negative per-view weights (summing to 1) fitted on the cache's validation NLL.

    Maximises the likelihood of the mixture ``sum_k w_k p_k`` of the selected views'
    probabilities by EM, with a symmetric Dirichlet prior worth ``prior * N`` pseudo-images
    pulling the weights toward the plain mean (``prior=0``: no pull). Temperature scaling is
    fitted afterwards on the weighted merge.

    Args:
        cache: per-view logits.
        selected: the views to weight, by name or row.
    """
    rows = _rows_of(cache, selected)
    if isinstance(prior, bool) or not isinstance(prior, numbers.Real) or prior < 0:
        raise InvalidInputError(f"Expected argument `prior` to be a number >= 0, but got {prior!r}")
    max_iter = _check_count("max_iter", max_iter)
    with _SingleThread():
        weights = _fit_weights(cache.probs[rows], cache.labels, float(prior), max_iter)
    return [float(w) for w in weights]


def _rows_of(cache: ViewCache, selected: Sequence[str | int]) -> list[int]:
    if isinstance(selected, (str, bytes)) or not isinstance(selected, Sequence) or not selected:
        raise InvalidInputError(
            f"Expected argument `selected` to be a non-empty list of view names, but got {selected!r}"
        )
    rows = []
    for item in selected:
        if isinstance(item, str):
            rows.append(cache.index(item))
        elif isinstance(item, int) and not isinstance(item, bool) and 0 <= item < cache.n_views:
            rows.append(item)
        else:
            raise InvalidInputError(
                f"Expected `selected` to hold view names or rows in [0, {cache.n_views - 1}], but got {item!r}"
            )
    return rows


# =========================================================================== greedy search


@dataclass
class SearchResult:
    """What :func:`greedy_search` / :func:`search_policy` return.

    Attributes:
        policy: the searched :class:`Policy`: the selected views in selection order, merge
            ``"mean"`` of probabilities, ``weights`` when learned aggregation won out of sample
            (else None), ``temperature`` fitted on validation, ``gate_threshold`` (None without
            gating), and ``meta`` with the objective, validation scores, pool size and timings.
        objective: ``"nll"`` or ``"accuracy"``.
        budget: the most views allowed.
        path: one dict per step: ``step``, ``added``, ``n_views``, ``accuracy``, ``nll``,
            ``nll_ts`` (after temperature scaling), ``temperature``.
        candidates: one dict per pool view: its own scores and lifts over the identity, alone
            and as ``identity + view``.
        comparison: validation rows for the report (none, baselines, searched, gated).
        aggregation: learned weights vs plain mean (cross-validated NLL), or None.
        gate: the :class:`~ttakit.gating.GateTuning`, or None.
        stop_reason: why the selection stopped.
        copies_curve: validation scores of the mean of the first k random copies, if any.
    """

    policy: Policy
    objective: str
    budget: int
    path: list[dict[str, Any]]
    candidates: list[dict[str, Any]]
    comparison: list[dict[str, Any]]
    aggregation: dict[str, Any] | None
    gate: GateTuning | None
    stop_reason: str
    n_images: int
    pool_size: int
    search_seconds: float
    cache_seconds: float | None = None
    copies_curve: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    cache: ViewCache | None = field(default=None, repr=False)

    def rows(self) -> list[dict[str, Any]]:
        """The report's main table: one row per policy on the validation split."""
        return [dict(r) for r in self.comparison]

    def to_json(self) -> dict[str, Any]:
        return {
            "objective": self.objective,
            "budget": self.budget,
            "selected": self.policy.view_names,
            "weights": self.policy.weights,
            "temperature": self.policy.temperature,
            "gate_threshold": self.policy.gate_threshold,
            "stop_reason": self.stop_reason,
            "n_images": self.n_images,
            "pool_size": self.pool_size,
            "search_seconds": self.search_seconds,
            "cache_seconds": self.cache_seconds,
            "comparison": self.comparison,
            "path": self.path,
            "candidates": self.candidates,
            "aggregation": self.aggregation,
            "gate": self.gate.to_json() if self.gate is not None else None,
            "copies_curve": self.copies_curve,
            "notes": self.notes,
            "policy": self.policy.to_json(),
        }


def _check_objective(objective: object) -> str:
    if objective not in OBJECTIVES:
        raise unknown_name("objective", objective, OBJECTIVES)
    return str(objective)


def _check_budget(budget: object) -> int:
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise InvalidInputError(
            f"Expected argument `budget` to be an integer >= 1 (views per image), but got {budget!r}"
        )
    return budget


def _score_candidates(
    running_cm: torch.Tensor, probs_cm: torch.Tensor, y: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accuracy and NLL at inverse temperature ``beta`` of the merge ``running + probs[v]``, every v.

    ``running_cm``: ``(C, N)`` sum of the selected views' probabilities; ``probs_cm``:
    ``(V, C, N)``. The mean's normalisation cancels in both. Accuracy counts a tie for the top
    class as correct (exact accuracies are recomputed for the chosen views). Returns two
    ``(V,)`` float64 tensors.
    """
    accs, nlls = [], []
    for start in range(0, probs_cm.shape[0], _SCORE_CHUNK):
        merged = probs_cm[start : start + _SCORE_CHUNK] + running_cm  # (v, C, N)
        top = merged.amax(1, keepdim=True)  # (v, 1, N)
        at_label = _gather_cm(merged, y)  # (v, N)
        accs.append((at_label >= top.squeeze(1)).double().mean(1))
        ratio = merged.div_(top)  # in (0, 1], top class 1
        total = (ratio if beta == 1.0 else ratio.pow_(beta)).sum(1)  # (v, N)
        log_label = (at_label / top.squeeze(1)).clamp_min_(_PROB_FLOOR).log_()
        loss = total.log_().sub_(beta * log_label).clamp_max_(_NLL_CAP)
        nlls.append(loss.double().mean(1))
    return torch.cat(accs), torch.cat(nlls)


def _merged_scores(
    probs_cm: torch.Tensor, y: torch.Tensor, beta0: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact accuracy, temperature-scaled NLL and fitted beta of merged probabilities ``(V, C, N)``."""
    acc = (probs_cm.argmax(1) == y).double().mean(1)
    beta, nll = _fit_beta_cm(*_shifted_log(probs_cm, y), beta0)
    return acc, nll, beta


def _candidate_scores(
    probs: torch.Tensor,
    cache_cm: torch.Tensor,
    logits_cm: torch.Tensor,
    ident: int,
    y: torch.Tensor,
    beta0: float,
) -> tuple[torch.Tensor, ...]:
    """Each view alone and averaged with the identity: accuracy and temperature-scaled NLL, ``(V,)`` each."""
    rows = cache_cm.shape[0]
    plain = cache_cm[ident]
    # arg-max over the last dimension of (V, N, C) is the fast layout for it
    alone_acc = (probs.argmax(2) == y).double().mean(1)
    pair_acc = torch.cat(
        [
            ((probs[s : s + _SCORE_CHUNK] + probs[ident]).argmax(2) == y).double().mean(1)
            for s in range(0, rows, _SCORE_CHUNK)
        ]
    )
    # Lifts are for the report: a looser tolerance on the temperature is plenty.
    _, alone_nll = _fit_chunked(
        lambda a, b: _shifted_logits(logits_cm[a:b], y), rows, beta0, rtol=1e-4
    )
    _, pair_nll = _fit_chunked(
        lambda a, b: _shifted_log(cache_cm[a:b] + plain, y), rows, beta0, rtol=1e-4
    )
    return alone_acc, alone_nll, pair_acc, pair_nll


def _evaluate_row(
    name: str, probs: torch.Tensor, y: torch.Tensor, passes: float, **extra: Any
) -> dict[str, Any]:
    return {"policy": name, "views": float(passes), **_scores(probs, y), **extra}


def _copies_curve(cache: ViewCache, copies: Sequence[str] | None) -> list[dict[str, Any]]:
    if not copies or len(copies) < 2 or not all(name in cache for name in copies):
        return []
    rows = [cache.index(name) for name in copies]
    curve, running = [], torch.zeros_like(cache.probs[0])
    for k, row in enumerate(rows, start=1):
        running = running + cache.probs[row]
        scores = _scores(running / k, cache.labels)
        curve.append({"copies": k, "accuracy": scores["accuracy"], "nll_ts": scores["nll_ts"]})
    return curve


def greedy_search(
    cache: ViewCache,
    budget: int = 8,
    objective: Objective = "nll",
    *,
    learn_weights: bool = True,
    gate: bool = True,
    keep: float = 0.95,
    gate_confidence: float = 0.9,
    gate_max_cost: float | None = 0.3,
    min_gain: float | None = None,
    refit_top: int = 4,
    baselines: Mapping[str, Policy] | None = None,
    random_copies: Sequence[str] | None = None,
    prior: float = 0.01,
    seed: int = 0,
    name: str = "searched",
) -> SearchResult:
    """Greedy forward selection of views on cached validation outputs (GPS, Lyzhov et al. 2020).

    Starts from the identity view; each step scores every unselected candidate at once
    (vectorised over ``(V, N, C)``), adds the best, and refits the temperature. With
    ``objective="nll"`` candidates are ranked by NLL at the current temperature and the
    ``refit_top`` best are rescored with their own fitted temperature; with ``"accuracy"`` ties
    are broken by NLL. A step must gain more than ``min_gain`` (default 1e-4 nats for NLL,
    0 for accuracy, i.e. at least one more correct image) and keep the other metric no worse
    than the identity's; otherwise the search stops. Then, optionally, learned weights
    (kept only if they win under 2-fold cross-validation) and the gate threshold.

    Args:
        cache: per-view logits; must hold the ``identity`` view.
        budget: the most views in the policy (identity included), ``>= 1``.
        objective: ``"nll"`` (after temperature scaling) or ``"accuracy"``.
        learn_weights: try learned aggregation.
        gate: tune a gate threshold keeping ``keep`` of the accuracy lift, on the data and on
            ``gate_confidence`` of bootstrap resamples (:func:`ttakit.gating.tune_gate_threshold`),
            within ``gate_max_cost`` of the full policy's forward passes when possible (default
            30%; None for no budget).
        baselines: named policies whose views are in the cache, scored in the comparison table.
        random_copies: names of random-copy draws in draw order (repeats allowed), for the
            "how many copies" curve of the mean of the first k draws.

    Returns:
        :class:`SearchResult`; ``result.policy`` is never worse than the identity alone on the
        cached data (accuracy and temperature-scaled NLL).
    """
    started = time.perf_counter()
    if not isinstance(cache, ViewCache):
        raise InvalidInputError(
            f"Expected argument `cache` to be a ViewCache, but got {type(cache).__name__}"
        )
    budget = _check_budget(budget)
    objective = _check_objective(objective)
    _check_labels(cache.labels, "cache")
    if "identity" not in cache:
        raise InvalidInputError(
            "Expected the cache to hold the 'identity' view (the search starts from it), but it holds only "
            f"{cache.names[:8]}"
        )
    if min_gain is None:
        min_gain = 1e-4 if objective == "nll" else 0.0
    if isinstance(min_gain, bool) or not isinstance(min_gain, numbers.Real) or min_gain < 0:
        raise InvalidInputError(
            f"Expected argument `min_gain` to be a number >= 0, but got {min_gain!r}"
        )
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real) or not 0 < keep <= 1:
        raise InvalidInputError(
            f"Expected argument `keep` to be a number in (0, 1], but got {keep!r}"
        )
    if isinstance(prior, bool) or not isinstance(prior, numbers.Real) or prior < 0:
        raise InvalidInputError(f"Expected argument `prior` to be a number >= 0, but got {prior!r}")
    if (
        isinstance(gate_confidence, bool)
        or not isinstance(gate_confidence, numbers.Real)
        or not 0 <= gate_confidence <= 1
    ):
        raise InvalidInputError(
            f"Expected argument `gate_confidence` to be a number in [0, 1], but got {gate_confidence!r}"
        )
    refit_top = _check_count("refit_top", refit_top)
    with _SingleThread():
        result = _greedy(
            cache,
            budget=budget,
            objective=objective,
            learn_weights=learn_weights,
            gate=gate,
            keep=float(keep),
            gate_confidence=float(gate_confidence),
            gate_max_cost=gate_max_cost,
            min_gain=float(min_gain),
            refit_top=refit_top,
            baselines=baselines,
            random_copies=random_copies,
            prior=float(prior),
            seed=seed,
            name=name,
        )
    result.search_seconds = time.perf_counter() - started
    result.policy.meta["search_seconds"] = result.search_seconds
    return result


def _greedy(
    cache: ViewCache,
    *,
    budget: int,
    objective: str,
    learn_weights: bool,
    gate: bool,
    keep: float,
    gate_confidence: float,
    gate_max_cost: float | None,
    min_gain: float,
    refit_top: int,
    baselines: Mapping[str, Policy] | None,
    random_copies: Sequence[str] | None,
    prior: float,
    seed: int,
    name: str,
) -> SearchResult:
    y, probs = cache.labels, cache.probs
    probs_cm = _cm(probs)  # (V, C, N)
    n_views = cache.n_views
    ident = cache.index("identity")

    # -- each candidate alone and paired with the identity
    base = _scores(probs[ident], y)
    beta_id = 1.0 / base["temperature"]
    alone_acc, alone_nll, pair_acc, pair_nll = _candidate_scores(
        probs, probs_cm, _cm(cache.logits), ident, y, beta_id
    )
    sources = cache.sources or [""] * n_views
    candidates = [
        {
            "view": view.name,
            "source": sources[k],
            "accuracy": float(alone_acc[k]),
            "nll_ts": float(alone_nll[k]),
            "accuracy_lift": float(alone_acc[k]) - base["accuracy"],
            "nll_lift": base["nll_ts"] - float(alone_nll[k]),
            "pair_accuracy_lift": float(pair_acc[k]) - base["accuracy"],
            "pair_nll_lift": base["nll_ts"] - float(pair_nll[k]),
        }
        for k, view in enumerate(cache.views)
    ]

    # -- greedy forward selection
    selected = [ident]
    running = probs_cm[ident].clone()  # (C, N) sum of the selected views' probabilities
    beta = beta_id
    current = {"accuracy": base["accuracy"], "nll_ts": base["nll_ts"]}
    path = [{"step": 0, "added": "identity", "n_views": 1, **base}]
    stop_reason = "budget reached" if budget > 1 else "budget of 1 view"
    while len(selected) < budget:
        if len(selected) == n_views:
            stop_reason = "pool exhausted"
            break
        acc, nll_approx = _score_candidates(running, probs_cm, y, beta)
        free = torch.ones(n_views, dtype=torch.bool)
        free[selected] = False
        if objective == "nll":  # never trade accuracy below the identity's for NLL
            admissible = free & (acc >= base["accuracy"] - 1e-12)
        else:  # nor NLL above the identity's for accuracy (the NLL here is an upper bound)
            admissible = free & (nll_approx <= base["nll_ts"] + 1e-9)
        if not bool(admissible.any()):
            stop_reason = "no admissible candidate"
            break
        inf = torch.full_like(nll_approx, math.inf)
        if objective == "nll":
            top = torch.argsort(torch.where(admissible, nll_approx, inf))[
                : min(refit_top, int(admissible.sum()))
            ]
        else:
            tied = admissible & (acc >= acc[admissible].max() - 1e-12)
            top = torch.argsort(torch.where(tied, nll_approx, inf))[:refit_top]
        m = len(selected)
        top_acc, top_nll, top_beta = _merged_scores((probs_cm[top] + running) / (m + 1), y, beta)
        if objective == "nll":
            ok_nll = torch.where(top_acc >= base["accuracy"] - 1e-12, top_nll, math.inf)
            pick = int(torch.argmin(ok_nll))
            gain = current["nll_ts"] - float(ok_nll[pick])
        else:
            pick = int(torch.argmax(top_acc - 1e-9 * top_nll))
            gain = float(top_acc[pick]) - current["accuracy"]
        if not gain > min_gain:
            stop_reason = "no candidate improves the objective"
            break
        chosen = int(top[pick])
        selected.append(chosen)
        running += probs_cm[chosen]
        beta = float(top_beta[pick])
        current = {"accuracy": float(top_acc[pick]), "nll_ts": float(top_nll[pick])}
        mean_y = _gather_cm(running[None], y)[0] / len(selected)
        path.append(
            {
                "step": len(path),
                "added": cache.views[chosen].name,
                "n_views": len(selected),
                "accuracy": current["accuracy"],
                "nll": float(-mean_y.clamp_min(1e-12).log().double().mean()),
                "nll_ts": current["nll_ts"],
                "temperature": 1.0 / beta,
            }
        )

    # -- learned aggregation
    sel_probs = probs[selected]  # (K, N, C)
    mean_probs = sel_probs.mean(0)
    weights: list[float] | None = None
    aggregation = None
    final_probs = mean_probs
    if learn_weights and len(selected) >= 2:
        aggregation = _compare_aggregation(
            sel_probs, y, prior, seed, base["accuracy"], current["accuracy"], objective
        )
        if aggregation["used"]:
            weights = aggregation["weights"]
            final_probs = _merge_weighted(sel_probs, torch.tensor(weights))
    final = _scores(final_probs, y, beta)

    # -- never worse than the identity alone
    notes: list[str] = []
    if final["accuracy"] < base["accuracy"] - 1e-12 or final["nll_ts"] > base["nll_ts"] + 1e-9:
        notes.append(
            "the selected policy was worse than the identity on validation; returning the identity"
        )
        selected, weights, final_probs, final = [ident], None, probs[ident], base

    # -- gate
    tuning = None
    if gate and len(selected) >= 2:
        tuning = tune_gate_threshold(
            probs[ident],
            final_probs,
            y,
            keep=keep,
            n_views=len(selected),
            confidence=gate_confidence,
            max_cost=gate_max_cost,
            seed=seed,
        )

    policy = Policy(
        [cache.views[k] for k in selected],
        name=name,
        merge_mode="mean",
        weights=weights,
        temperature=final["temperature"],
        gate_threshold=tuning.threshold if tuning is not None else None,
        meta={
            "kind": "greedy-search",
            "objective": objective,
            "budget": budget,
            "pool_size": n_views,
            "n_images": cache.n_images,
            "validation": {
                "identity": {k: base[k] for k in ("accuracy", "nll", "nll_ts")},
                "policy": {k: final[k] for k in ("accuracy", "nll", "nll_ts")},
                "gated": None
                if tuning is None
                else {
                    "accuracy": tuning.gated_accuracy,
                    "forward_passes_per_image": tuning.forward_passes_per_image,
                },
            },
            "stop_reason": stop_reason,
        },
    )

    # -- comparison table (validation)
    comparison = [{"policy": "none", "views": 1.0, **base}]
    skipped = []
    for label, baseline in (baselines or {}).items():
        if all(n in cache for n in baseline.view_names):
            comparison.append(_evaluate_row(label, cache.policy_probs(baseline), y, len(baseline)))
        else:
            skipped.append(label)
    if skipped:
        notes.append(f"baselines not scored (views missing from the pool): {', '.join(skipped)}")
    if weights is not None:
        comparison.append(_evaluate_row(f"{name} (mean)", mean_probs, y, len(selected)))
    label = name + (" (weighted)" if weights is not None else "")
    comparison.append({"policy": label, "views": float(len(selected)), **final})
    if tuning is not None:
        conf = probs[ident].max(1).values
        gated_probs = torch.where((conf < tuning.threshold)[:, None], final_probs, probs[ident])
        comparison.append(
            _evaluate_row(f"{name} (gated)", gated_probs, y, tuning.forward_passes_per_image)
        )

    return SearchResult(
        policy=policy,
        objective=objective,
        budget=budget,
        path=path,
        candidates=candidates,
        comparison=comparison,
        aggregation=aggregation,
        gate=tuning,
        stop_reason=stop_reason,
        n_images=cache.n_images,
        pool_size=n_views,
        search_seconds=0.0,
        copies_curve=_copies_curve(cache, random_copies),
        notes=notes,
        cache=cache,
    )


def _cv_nll(probs: torch.Tensor, y: torch.Tensor, fit: torch.Tensor, held: torch.Tensor) -> float:
    """NLL on ``held`` of ``probs (N, C)`` temperature-scaled with a temperature fitted on ``fit``."""
    beta, _ = _fit_beta_cm(*_shifted_log(_cm(probs[fit])[None], y[fit]))
    d, dy = _shifted_log(_cm(probs[held])[None], y[held])
    return float(_moments(d, dy, beta)[0][0])


def _compare_aggregation(
    sel_probs: torch.Tensor,
    y: torch.Tensor,
    prior: float,
    seed: int,
    identity_acc: float,
    mean_acc: float,
    objective: str,
) -> dict[str, Any]:
    """Learned weights vs the plain mean, by 2-fold cross-validated (temperature-scaled) NLL."""
    n = y.shape[0]
    cv = n >= 4
    cv_weighted = cv_mean = 0.0
    if cv:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        folds = [perm[: n // 2], perm[n // 2 :]]
        mean_probs = sel_probs.mean(0)
        for fit, held in ((folds[0], folds[1]), (folds[1], folds[0])):
            w = _fit_weights(sel_probs[:, fit], y[fit], prior, 500)
            cv_weighted += _cv_nll(_merge_weighted(sel_probs, w), y, fit, held) / 2
            cv_mean += _cv_nll(mean_probs, y, fit, held) / 2
    weights = _fit_weights(sel_probs, y, prior, 500)
    weighted_acc = float((_merge_weighted(sel_probs, weights).argmax(1) == y).double().mean())
    floor = mean_acc if objective == "accuracy" else identity_acc
    used = cv and cv_weighted < cv_mean - 1e-4 and weighted_acc >= floor - 1e-12
    return {
        "weights": [float(w) for w in weights],
        "cv_nll_weighted": cv_weighted if cv else None,
        "cv_nll_mean": cv_mean if cv else None,
        "accuracy_weighted": weighted_acc,
        "accuracy_mean": mean_acc,
        "used": bool(used),
    }


# =========================================================================== end to end


def _accepts_other_sizes(model: Any, images: torch.Tensor) -> bool:
    """Whether ``model`` runs on images 10% smaller than ``images`` (a fully convolutional net)."""
    height, width = images.shape[-2:]
    small = torch.nn.functional.interpolate(
        images[:2], size=(max(1, int(height * 0.9)), max(1, int(width * 0.9)))
    )
    try:
        with torch.inference_mode(), _EvalMode(model):
            out = model(small)
    except Exception:  # any failure means: feed this model its own size only
        return False
    return isinstance(out, torch.Tensor) and out.ndim == 2 and out.shape[0] == small.shape[0]


def _baseline_policies(augs: list[dict[str, Any]], n_random: int, seed: int) -> dict[str, Policy]:
    out = {"hflip": Compose([T.HorizontalFlip()]).to_policy("hflip")}
    flip_p, max_shift = _geometry(augs)
    if flip_p > 0 or max_shift > 0:
        if n_random >= 1:
            out[f"random-copy-{n_random}"] = random_copy_policy(augs, n_random, seed)
        n_fastai = min(4, n_random)
        if n_fastai >= 1:
            out[f"fastai-{n_fastai}"] = fastai_policy(augs, n_fastai, 0.25, seed=seed)
            out[f"fastai-max-{n_fastai}"] = fastai_policy(augs, n_fastai, use_max=True, seed=seed)
    return out


def search_policy(
    model: Any,
    val_dataset: ImageDataset,
    *,
    pool: Sequence[View] | None = None,
    train_augmentations: Sequence[dict | str] = (),
    budget: int = 8,
    objective: Objective = "nll",
    learn_weights: bool = True,
    gate: bool = True,
    keep: float = 0.95,
    gate_confidence: float = 0.9,
    gate_max_cost: float | None = 0.3,
    n_random: int = 8,
    fixed_size: bool | None = None,
    max_batch: int = 256,
    progress: bool = True,
    seed: int = 0,
) -> SearchResult:
    """Search a TTA policy for ``model`` on ``val_dataset``: cache the pool, then :func:`greedy_search`.

    Args:
        model: a classifier returning ``(B, C)`` logits for raw images in ``[0, 1]``.
        val_dataset: the labelled validation split (never the test split).
        pool: candidate views; default :func:`default_pool` (with ``n_random`` random draws of
            ``train_augmentations``). The identity is added if missing.
        train_augmentations: a checkpoint's ``meta.train_augmentations``.
        budget, objective, learn_weights, gate, keep, gate_confidence: see :func:`greedy_search`.
        fixed_size: whether the model only takes its training size (crops are resized back);
            None probes the model with a smaller image.
        max_batch: most images per forward pass while caching.

    Example:
        >>> from ttakit.data import ImageDataset
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))
        >>> ds = ImageDataset(torch.rand(40, 1, 8, 8), torch.arange(40) % 2, ["a", "b"])
        >>> result = search_policy(model, ds, budget=3, progress=False)
        >>> result.policy.view_names[0], len(result.policy) <= 3
        ('identity', True)
    """
    val_dataset = _check_dataset(val_dataset)
    budget = _check_budget(budget)
    objective = _check_objective(objective)
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real) or not 0 < keep <= 1:
        raise InvalidInputError(
            f"Expected argument `keep` to be a number in (0, 1], but got {keep!r}"
        )
    augs = _parse_augmentations(train_augmentations)
    if pool is None:
        if fixed_size is None:
            fixed_size = not _accepts_other_sizes(model, val_dataset.images[:2])
        views, sources = _pool_with_sources(
            val_dataset.image_size, augs, fixed_size=fixed_size, n_random=n_random, seed=seed
        )
    else:
        views = _check_views(pool, "pool")
        sources = ["user"] * len(views)
        if not any(v.is_identity for v in views):
            views, sources = [View.identity(), *views], ["identity", *sources]
        views, sources = _dedupe(views, sources)
    Policy(views).check_targets("label")  # NotInvertibleError naming the view, before any work
    flip_p, max_shift = _geometry(augs)
    copies = None
    if n_random >= 2 and (flip_p > 0 or max_shift > 0):
        copies = [v.name for v in random_copy_views(augs, n_random, seed)]
    started = time.perf_counter()
    cache = cache_views(
        model, val_dataset, views, max_batch=max_batch, progress=progress, sources=sources
    )
    cache_seconds = time.perf_counter() - started
    result = greedy_search(
        cache,
        budget,
        objective,
        learn_weights=learn_weights,
        gate=gate,
        keep=keep,
        gate_confidence=gate_confidence,
        gate_max_cost=gate_max_cost,
        baselines=_baseline_policies(augs, n_random, seed),
        random_copies=copies,
        seed=seed,
    )
    result.cache_seconds = cache_seconds
    result.policy.meta.update(
        {
            "cache_seconds": cache_seconds,
            "dataset": val_dataset.name,
            "train_augmentations": augs,
            "fixed_size": fixed_size,
        }
    )
    return result


# =========================================================================== report


def _fmt(value: Any, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def search_markdown(result: SearchResult) -> str:
    """The Markdown report of a search."""
    policy = result.policy
    lines = [
        "# TTA policy search",
        "",
        f"- objective: **{result.objective}**{' (after temperature scaling)' if result.objective == 'nll' else ''}, "
        f"budget {result.budget} views, pool of {result.pool_size} candidates, {result.n_images} validation images",
        f"- selected ({len(policy)} views): {', '.join(f'`{n}`' for n in policy.view_names)}",
        f"- stopped: {result.stop_reason}",
        f"- merge: mean of probabilities{', learned weights ' + str([round(w, 3) for w in policy.weights]) if policy.weights else ''}; "
        f"temperature {_fmt(policy.temperature, 3)}",
        f"- search time (after caching): {result.search_seconds:.2f} s"
        + (f"; caching: {result.cache_seconds:.1f} s" if result.cache_seconds is not None else ""),
    ]
    if result.gate is not None:
        g = result.gate
        lines.append(
            f"- gate: extra views on images with plain confidence < {g.threshold:.4f} ({g.fraction_gated:.1%} of images); "
            f"forward passes per image: plain 1, full {g.n_views}, gated {g.forward_passes_per_image:.2f}; "
            f"keeps {g.kept_lift:.1%} of the accuracy lift"
        )
    lines += [f"- note: {n}" for n in result.notes]
    lines += ["", "## Validation comparison", "", markdown_table(result.rows(), floatfmt=".4f")]
    lines += ["", "## Selection path", "", markdown_table(result.path, floatfmt=".4f")]
    if result.aggregation is not None:
        a = result.aggregation
        lines += [
            "",
            "## Learned aggregation vs plain mean",
            "",
            f"2-fold cross-validated NLL: weighted {_fmt(a['cv_nll_weighted'])}, mean {_fmt(a['cv_nll_mean'])}; "
            f"accuracy weighted {a['accuracy_weighted']:.4f}, mean {a['accuracy_mean']:.4f}; "
            f"weights {[round(w, 3) for w in a['weights']]} -> {'used' if a['used'] else 'not used (plain mean kept)'}",
        ]
    if result.copies_curve:
        lines += [
            "",
            "## Random copies (mean of the first k draws)",
            "",
            markdown_table(result.copies_curve, floatfmt=".4f"),
        ]
    ranked = sorted(
        result.candidates,
        key=lambda r: -r["pair_nll_lift" if result.objective == "nll" else "pair_accuracy_lift"],
    )
    lines += [
        "",
        "## Candidates",
        "",
        "Lifts over the identity alone: `accuracy_lift`/`nll_lift` for the view alone, `pair_*` for identity + view "
        "(NLL lifts are reductions after temperature scaling; positive is better).",
        "",
        markdown_table(ranked, floatfmt=".4f"),
    ]
    return "\n".join(lines) + "\n"


def write_search_report(result: SearchResult, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``policy.json``, ``search.json``, ``search.md``, ``views_curve.png`` and
    ``candidate_lifts.png`` (and ``copies_curve.png`` when random copies were candidates) into
    ``out_dir``, each atomically. Returns name -> path."""
    if not isinstance(result, SearchResult):
        raise InvalidInputError(
            f"Expected argument `result` to be a SearchResult, but got {type(result).__name__}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    result.policy.save(out / "policy.json")
    paths["policy"] = out / "policy.json"
    paths["json"] = atomic_write_json(out / "search.json", _finite(result.to_json()))
    paths["markdown"] = atomic_write_text(out / "search.md", search_markdown(result))
    n_views = [row["n_views"] for row in result.path]
    paths["views_curve"] = plot_views_curve(
        n_views,
        {
            "accuracy": [r["accuracy"] for r in result.path],
            "NLL (temperature-scaled)": [r["nll_ts"] for r in result.path],
        },
        out / "views_curve.png",
        title="Validation metrics along the greedy selection path",
    )
    key, label = (
        (
            "pair_nll_lift",
            "NLL reduction of identity + view over identity (nats, temperature-scaled)",
        )
        if result.objective == "nll"
        else ("pair_accuracy_lift", "accuracy lift of identity + view over identity")
    )
    paths["candidate_lifts"] = plot_candidate_lifts(
        [r["view"] for r in result.candidates],
        [r[key] for r in result.candidates],
        out / "candidate_lifts.png",
        xlabel=label,
    )
    if result.copies_curve:
        paths["copies_curve"] = plot_views_curve(
            [r["copies"] for r in result.copies_curve],
            {
                "accuracy": [r["accuracy"] for r in result.copies_curve],
                "NLL (temperature-scaled)": [r["nll_ts"] for r in result.copies_curve],
            },
            out / "copies_curve.png",
            title="Validation metrics vs number of random copies",
        )
    return paths


def _finite(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf become None."""
    if isinstance(obj, Mapping):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
