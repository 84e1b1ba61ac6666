"""The view cache: each candidate view's de-augmented logits over a validation split, computed
once through :class:`ttakit.TTAEngine`, so the search can score any combination of views
without touching the model again.

File format (:meth:`ViewCache.save`): a ``torch.save`` dict read back with
``weights_only=True``: ``format="ttakit-view-cache"``, ``format_version=1``, ``logits``
``(V, N, C)`` float32, ``labels`` ``(N,)`` int64, ``views`` (each view's JSON, as in a policy
file) and ``sources`` (where each candidate came from).
"""

from __future__ import annotations

import contextvars
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from .._io import atomic_write
from ..engine import TTAEngine
from ..errors import DataError, InvalidInputError, UnknownNameError
from ..merge import merge
from ..policy import Policy, View
from ..progress import progress as progress_bar
from ._util import EvalMode, check_images_labels, check_views, dedupe

__all__ = ["ViewCache", "cache_views", "ViewSplit", "split_views", "CACHE_FORMAT", "CACHE_FORMAT_VERSION"]

CACHE_FORMAT = "ttakit-view-cache"
CACHE_FORMAT_VERSION = 1


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
            shape = tuple(self.logits.shape) if isinstance(self.logits, torch.Tensor) else type(self.logits).__name__
            raise InvalidInputError(f"Expected `logits` to be a (V, N, C) tensor, but got {shape}")
        if not isinstance(self.labels, torch.Tensor) or self.labels.ndim != 1 or self.labels.shape[0] != self.logits.shape[1]:
            got = tuple(self.labels.shape) if isinstance(self.labels, torch.Tensor) else type(self.labels).__name__
            raise InvalidInputError(f"Expected `labels` to be a ({self.logits.shape[1]},) tensor, but got {got}")
        self.views = [v if isinstance(v, View) else View(v) for v in self.views]
        if len(self.views) != self.logits.shape[0]:
            raise InvalidInputError(
                f"Expected one view per row of `logits` ({self.logits.shape[0]}), but got {len(self.views)} views"
            )
        names = [v.name for v in self.views]
        if len(set(names)) != len(names):
            dupes = sorted({n for n in names if names.count(n) > 1})
            raise InvalidInputError(f"Expected distinct view names in the cache, but got duplicates {dupes}")
        if self.sources is None:
            self.sources = ["user"] * len(self.views)
        elif len(self.sources) != len(self.views):
            raise InvalidInputError(f"Expected one source per view ({len(self.views)}), but got {len(self.sources)}")
        self.logits = self.logits.float()
        self.labels = self.labels.long()
        n_classes = self.logits.shape[2]
        if self.labels.numel() and (int(self.labels.min()) < 0 or int(self.labels.max()) >= n_classes):
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
            raise UnknownNameError(f"view {name!r} is not in the cache; it holds {self.n_views} views: {shown}")
        return self._index[name]

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def policy_probs(self, policy: Policy) -> torch.Tensor:
        """``(N, C)``: the policy's merge of its views' probabilities, from the cache (no gate,
        no temperature)."""
        rows = [self.index(name) for name in policy.view_names]
        return merge(self.logits[rows], policy.merge_mode, policy.weights, activation="softmax").float()

    def rows(self, index: torch.Tensor) -> ViewCache:
        """The same views over a subset of images."""
        return ViewCache(self.logits[:, index], self.labels[index], list(self.views), list(self.sources or []))

    def select(self, names: Sequence[str]) -> ViewCache:
        """A subset of the views, in the given order."""
        rows = [self.index(n) for n in names]
        return ViewCache(self.logits[rows], self.labels, [self.views[k] for k in rows], [(self.sources or [])[k] for k in rows])

    def save(self, path: str | os.PathLike) -> None:
        """Write the cache atomically (see the module docstring for the format)."""
        data = {
            "format": CACHE_FORMAT,
            "format_version": CACHE_FORMAT_VERSION,
            "logits": self.logits,
            "labels": self.labels,
            "views": [v.to_json() for v in self.views],
            "sources": list(self.sources or []),
        }
        atomic_write(path, lambda tmp: torch.save(data, tmp))

    @classmethod
    def load(cls, path: str | os.PathLike) -> ViewCache:
        """Read a cache written by :meth:`save` (tensors only: nothing is unpickled)."""
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise DataError(f"view cache {os.fspath(path)!r} does not exist") from None
        except Exception as err:  # torch raises many types for a foreign file
            raise DataError(f"{os.fspath(path)!r} is not a ttakit view cache: {err}") from None
        if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or data.get("format_version") != CACHE_FORMAT_VERSION:
            raise DataError(f"{os.fspath(path)!r} is not a ttakit view cache (format version {CACHE_FORMAT_VERSION})")
        return cls(data["logits"], data["labels"], [View.from_json(v) for v in data["views"]], data["sources"])


@dataclass(frozen=True)
class ViewSplit:
    """How several processes share the caching: this one is ``rank`` of ``world`` and runs views
    ``rank, rank + world, ...``; ``gather(value)`` returns every rank's value in rank order (as
    ``torch.distributed.all_gather_object`` does), so each rank ends with the whole cache."""

    rank: int
    world: int
    gather: Callable[[Any], list[Any]]


_SPLIT: contextvars.ContextVar[ViewSplit | None] = contextvars.ContextVar("ttakit_view_split", default=None)


@contextmanager
def split_views(split: ViewSplit | None) -> Iterator[None]:
    """Within the block, every view cache (:func:`cache_views`, the search's halving rungs) runs
    only this rank's share of the views and gathers the rest from the other ranks, which must
    cache the same views over the same images. ``None``, or a world of one, changes nothing.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
        >>> from ttakit.aliases import get_policy
        >>> views = get_policy("hflip").views
        >>> with split_views(ViewSplit(0, 1, lambda value: [value])):
        ...     tuple(run_views(model, torch.rand(3, 1, 4, 4), views).shape)
        (2, 3, 2)
    """
    token = _SPLIT.set(split)
    try:
        yield
    finally:
        _SPLIT.reset(token)


def run_views(
    model: Any, images: torch.Tensor, views: Sequence[View], *, max_batch: int = 256, progress: bool = False, desc: str = ""
) -> torch.Tensor:
    """``(V, N, C)`` de-augmented logits of every view over ``images (N, C, H, W)``: one
    :meth:`TTAEngine.run` call (``activation=None``, ``return_views=True``; the engine chunks the
    images, at most ``max_batch`` per forward pass, and reports each chunk to the progress bar),
    the model in eval mode for the call. Costs ``V x N`` forward passes of one image; inside
    :func:`split_views`, this process runs only its share of the views and gathers the others."""
    split = _SPLIT.get()
    if split is not None and split.world > 1:
        mine = list(range(split.rank, len(views), split.world))
        local = _run_views([views[k] for k in mine], model, images, max_batch, progress, desc) if mine else None
        found = split.gather((mine, local))
        first = next(t for _, t in found if t is not None)
        out = torch.empty((len(views), *first.shape[1:]), dtype=first.dtype)
        for rows, logits in found:
            if rows:
                out[torch.as_tensor(rows, dtype=torch.long)] = logits
        return out
    return _run_views(list(views), model, images, max_batch, progress, desc)


def _run_views(views: list[View], model: Any, images: torch.Tensor, max_batch: int, progress: bool,
               desc: str) -> torch.Tensor:
    """:func:`run_views` in this process, over every view it is given."""
    engine = TTAEngine(model, Policy(list(views)), activation=None, max_batch=max_batch)
    n_views = len(views)
    bar_desc = desc or f"caching {n_views} views"
    with EvalMode(model), progress_bar(total=int(images.shape[0]) * n_views, desc=bar_desc, unit="passes", enabled=progress) as bar:
        out = engine.run(images, return_views=True, progress=lambda done: bar.update(done * n_views))
    return out.views.float().cpu().clone()  # a normal tensor, usable with autograd


def cache_views(
    model: Any,
    images: torch.Tensor,
    labels: torch.Tensor | Sequence[View] | None = None,
    views: Sequence[View] | None = None,
    *,
    max_batch: int = 256,
    progress: bool = True,
    sources: Sequence[str] | None = None,
) -> ViewCache:
    """Run every view once over ``images`` and keep the de-augmented logits.

    Memory: ``V x N x C`` float32 (100 views x 10,000 images x 10 classes = 40 MB).

    Args:
        model: a classifier returning ``(B, C)`` logits.
        images: ``(N, C, H, W)``; an object with ``.images`` and ``.labels`` (a dataset) is
            accepted too, with ``views`` in the third position.
        labels: ``(N,)`` class indices.
        views: the views; duplicate names are dropped.

    Returns:
        :class:`ViewCache` with ``logits`` ``(V, N, C)``.
    """
    if not isinstance(images, torch.Tensor) and hasattr(images, "images") and hasattr(images, "labels"):
        views, labels, images = labels, images.labels, images.images  # (model, dataset, views)
    images, labels = check_images_labels(images, labels, "the images to cache")
    views = check_views(views)
    sources = list(sources) if sources is not None else ["user"] * len(views)
    views, sources = dedupe(views, sources)
    Policy(views).check_targets("label")
    logits = run_views(model, images, views, max_batch=max_batch, progress=progress)
    return ViewCache(logits, labels.clone(), views, sources)
