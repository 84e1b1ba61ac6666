"""Small helpers shared by the search modules: argument checks, the class-major layout and a
single-thread block. Nothing here knows about views or policies beyond their types."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

from ..engine import eval_mode as EvalMode  # noqa: F401  (one implementation, re-exported)
from ..errors import DataError, InvalidInputError
from ..policy import View

SCORE_CHUNK = 16  # candidates scored at once: bounds temporaries to 16 x N x C floats


class SingleThread:
    """Run small tensor ops on one thread for the block (OpenMP threads cost more than they
    save on chunks this size, and stall badly on a shared machine); restores the setting."""

    def __enter__(self) -> None:
        self.saved = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.saved)


def cm(x: torch.Tensor) -> torch.Tensor:
    """``(..., N, C)`` -> class-major ``(..., C, N)``, contiguous float32.

    Reductions over the few classes then run across contiguous images, many times faster on
    CPU than reducing the last dimension of ``(V, N, C)``.
    """
    return x.float().transpose(-1, -2).contiguous()


def gather_cm(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x[v, y[n], n]`` for class-major ``x (V, C, N)`` -> ``(V, N)``."""
    return x.gather(1, y.view(1, 1, -1).expand(x.shape[0], 1, -1)).squeeze(1)


def check_count(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidInputError(f"Expected argument `{name}` to be an integer >= {minimum}, but got {value!r}")
    return value


def check_fraction(name: str, value: object, low_open: bool = True, allow_zero: bool = False) -> float:
    """A number in ``(0, 1]`` (or ``[0, 1]`` with ``allow_zero``)."""
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real)
    if ok:
        ok = (0 <= value <= 1) if allow_zero else (0 < value <= 1)
    if not ok:
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise InvalidInputError(f"Expected argument `{name}` to be a number in {interval}, but got {value!r}")
    return float(value)


def check_non_negative(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0:
        raise InvalidInputError(f"Expected argument `{name}` to be a number >= 0, but got {value!r}")
    return float(value)


def check_labels(labels: torch.Tensor, what: str) -> None:
    """Labels search can score: not empty, at least two classes. ``what`` names them in errors,
    e.g. ``"the validation images"``."""
    if labels.numel() == 0:
        raise DataError(f"{what} are empty; search needs labelled images")
    present = torch.unique(labels)
    if len(present) < 2:
        raise DataError(
            f"{what} hold a single class ({int(present[0])}) in {labels.numel()} images; "
            "search needs at least 2 classes to score predictions"
        )


def check_images_labels(images: object, labels: object, what: str = "the validation images") -> tuple[torch.Tensor, torch.Tensor]:
    """``images (N, C, H, W)`` float and ``labels (N,)`` integer tensors of the same length."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        hint = " (pass dataset.images and dataset.labels)" if hasattr(images, "images") else ""
        raise InvalidInputError(f"Expected argument `images` to be an (N, C, H, W) tensor{hint}, but got {got}")
    if (
        not isinstance(labels, torch.Tensor)
        or labels.ndim != 1
        or labels.shape[0] != images.shape[0]
        or labels.is_floating_point()
    ):
        got = (tuple(labels.shape), str(labels.dtype)) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise InvalidInputError(
            f"Expected argument `labels` to be an ({images.shape[0]},) integer tensor, but got {got}"
        )
    check_labels(labels, what)
    return images, labels.long()


def check_views(views: object, name: str = "views") -> list[View]:
    if isinstance(views, (str, bytes, View)) or not isinstance(views, Sequence) or not views:
        raise InvalidInputError(f"Expected argument `{name}` to be a non-empty list of ttakit.View, but got {views!r}")
    bad = [v for v in views if not isinstance(v, View)]
    if bad:
        raise InvalidInputError(f"Expected argument `{name}` to hold only ttakit.View objects, but got {bad[0]!r}")
    return list(views)


def dedupe(views: Sequence[View], sources: Sequence[str]) -> tuple[list[View], list[str]]:
    """Drop views whose name was seen before (first one wins), keeping sources aligned."""
    seen: set[str] = set()
    out_views, out_sources = [], []
    for view, source in zip(views, sources, strict=True):
        if view.name in seen:
            continue
        seen.add(view.name)
        out_views.append(view)
        out_sources.append(source)
    return out_views, out_sources
