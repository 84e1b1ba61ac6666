"""Views in and out of the model: the de-augment hooks by target, bound augmentations, grouping views
into forward passes, cutting extra model arguments along with the images, the vote's row ids, and
each view's geometry (rows per image, pixels seen) probed before any forward pass."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import InvalidInputError, ModelOutputError
from .merge import (
    content_key,
)
from .policy import Transformer, View
from .transforms import BaseTransform

# (transformer, output of the model on the view, spatial size of the view) -> output in the input's frame
DeaugmentHook = Callable[[Transformer, torch.Tensor, tuple[int, int]], torch.Tensor]


def _deaugment_label(transformer: Transformer, output: torch.Tensor, view_size) -> torch.Tensor:
    return transformer.deaugment_label(output)


def _deaugment_mask(transformer: Transformer, output: torch.Tensor, view_size) -> torch.Tensor:
    if output.ndim != 4:
        raise ModelOutputError(
            f"a segmentation model must return masks of shape (B, C, H, W), got shape {tuple(output.shape)}"
        )
    if tuple(output.shape[-2:]) != tuple(view_size):
        raise ModelOutputError(
            f"a segmentation model must return masks of its input's spatial size {view_size[0]}x{view_size[1]} "
            f"(B, C, H, W), got shape {tuple(output.shape)}"
        )
    return transformer.deaugment_mask(output)


@dataclass(frozen=True)
class ViewGeometry:
    """What a view does to one image of a given size, known before any forward pass.

    Attributes:
        rows: images the view makes of one image (T for tiles, else 1).
        coverage: ``(1, 1, H, W)`` how much of each input pixel the view saw (0: never), or None
            when it saw every pixel (mask targets only; None otherwise).
    """

    rows: int
    coverage: torch.Tensor | None


def view_geometry(view: View, image_shape: tuple[int, ...], device, dtype, mask: bool) -> ViewGeometry:
    """Probe ``view`` with one blank image of ``image_shape = (C, H, W)``: its rows per image and,
    for masks, its coverage (a 1-channel blank mask sent back through the view's inverse)."""
    transformer = view.transformer()
    augmented = transformer.augment_image(torch.zeros(1, *image_shape, device=device, dtype=dtype))
    coverage = None
    if mask:
        _, coverage = transformer.deaugment_mask_weighted(torch.zeros_like(augmented[:, :1]))
    return ViewGeometry(int(augmented.shape[0]), coverage)


def multiplies_batch(view: View) -> bool:
    """Whether some step of ``view`` cuts an image into several (``multiplies_batch``, e.g. Tiles)."""
    return any(getattr(s.transform, "multiplies_batch", False) for s in view.steps)


def loses_pixels(view: View) -> bool:
    """Whether some step of ``view`` sees only part of the image (``loses_pixels``: crops, shifts)."""
    return any(getattr(s.transform, "loses_pixels", False) for s in view.steps)


_DEFAULT_HOOKS: dict[str, DeaugmentHook] = {"label": _deaugment_label, "mask": _deaugment_mask}


def _label_passes_through(transformer: Transformer) -> bool:
    """Whether de-augmenting class scores returns them untouched (true of every ttakit transform),
    probed once so the engine can skip the call and merge a stacked pass in one go."""
    probe = torch.zeros(1, 2)
    try:
        return transformer.deaugment_label(probe) is probe
    except Exception:  # a foreign transform: call it every time and let it raise there
        return False


def _check_deaugment(deaugment: object, target: str) -> DeaugmentHook:
    """The hook given, or the default hook of ``target``."""
    if deaugment is None:
        if target not in _DEFAULT_HOOKS:
            raise InvalidInputError(f"target {target!r} needs a deaugment hook; use its TTA wrapper")
        return _DEFAULT_HOOKS[target]
    if not callable(deaugment):
        raise InvalidInputError(f"deaugment must be a callable hook, got {type(deaugment).__name__}")
    return deaugment


class _RowIds:
    """The vote's tie-break ids of the accumulator's rows (computed only for rows that tie): the
    caller's ``ids``, else a hash of the image itself; ``rows`` maps accumulator rows to the chunk."""

    def __init__(self, chunk: torch.Tensor, ids: torch.Tensor | None, rows: torch.Tensor | None):
        self.chunk, self.ids, self.rows = chunk, ids, rows

    def __call__(self, tied: torch.Tensor) -> list[int]:
        rows = tied if self.rows is None else self.rows[tied.to(self.rows.device)]
        if self.ids is not None:
            return self.ids[rows.cpu()].tolist()
        return [content_key(self.chunk[r]) for r in rows.tolist()]


def _bound_augment(view: View) -> Callable[[torch.Tensor], torch.Tensor]:
    """A view's augmentation with its steps bound once (ttakit's identity steps skipped), for views
    whose class scores need no de-augmentation (so no recorded input size)."""
    steps = tuple(
        (s.transform.apply_aug_image, {s.transform.pname: s.param})
        for s in view.steps
        if not (isinstance(s.transform, BaseTransform) and s.transform.is_identity(s.param))
    )

    def augment(image: torch.Tensor) -> torch.Tensor:
        for apply, kwargs in steps:
            image = apply(image, **kwargs)
        return image

    return augment


def _cat(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def _slice_args(args: tuple, total: int, start: int, stop: int) -> tuple:
    """Per-sample tensor arguments (first dimension ``total``) cut to ``[start, stop)``."""
    return tuple(
        a[start:stop] if isinstance(a, torch.Tensor) and a.ndim > 0 and a.shape[0] == total else a for a in args
    )


def _index_args(args: tuple, total: int, rows: torch.Tensor) -> tuple:
    """Per-sample tensor arguments (first dimension ``total``) at ``rows``."""
    return tuple(
        a[rows.to(a.device)] if isinstance(a, torch.Tensor) and a.ndim > 0 and a.shape[0] == total else a
        for a in args
    )


def _group_by_shape(augmented: dict[int, torch.Tensor]) -> list[list[int]]:
    # Views that change the image size (Scale, Resize, crops) cannot share a batch with others.
    images = iter(augmented.values())
    shape = next(images).shape
    if all(image.shape == shape for image in images):
        return [list(augmented)]
    groups: dict[tuple[int, ...], list[int]] = {}
    for k, image in augmented.items():
        groups.setdefault(tuple(image.shape), []).append(k)
    return list(groups.values())
