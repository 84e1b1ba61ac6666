"""Checks on what the model returns: a mapping unwrapped to the tensor to merge, NaN/inf found per view
and image (the error names the first bad image and every view bad on it), and every view's output
shape matched to the first's."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .errors import InvalidInputError, ModelOutputError


def _sum_is_finite(x: torch.Tensor) -> bool:
    """Whether the sum of ``x`` is finite, which proves every value is: a NaN or an inf of either
    sign makes any sum NaN or inf (False also when finite values overflow the sum: callers then
    check value by value)."""
    if not x.is_floating_point():
        return True
    if x.numel() <= 64 and x.device.type == "cpu":  # a few class scores: summed in Python, no kernel
        return math.isfinite(sum(x.reshape(-1).tolist()))
    return math.isfinite(float(x.detach().sum()))


def unwrap_output(output: Any, output_key: str | None) -> torch.Tensor:
    """The tensor to merge from a model output that is not a tensor (a mapping), or an error."""
    if isinstance(output, Mapping):
        if output_key is None:
            raise ModelOutputError(
                f"the model returned a mapping with keys {sorted(output)}; name the output to merge "
                "with output_key (output_label_key / output_mask_key / output_keypoints_key in the wrappers)"
            )
        if output_key not in output:
            raise ModelOutputError(f"output_key {output_key!r} is not among the model's outputs {sorted(output)}")
        output = output[output_key]
    elif output_key is not None:
        raise ModelOutputError(
            f"output_key={output_key!r} was given but the model returned {type(output).__name__}, not a mapping"
        )
    if not isinstance(output, torch.Tensor):
        raise ModelOutputError(f"the model must return a tensor (or a mapping of tensors), got {type(output).__name__}")
    return output


def find_non_finite(
    out: torch.Tensor, group: list[int], n: int, rows, bad: dict[int, list[int]], per_image: int = 1, start: int = 0
) -> None:
    """Record in ``bad`` the chunk rows whose output is NaN/inf, per view of the pass ``out``
    (``len(group)`` views of ``n`` images each, ``per_image`` rows per image (tiles, image-major);
    the images are rows ``start..`` of the stage; ``rows`` maps those to the chunk's rows)."""
    finite = torch.isfinite(out).reshape(out.shape[0], -1).all(dim=1).cpu()
    if per_image > 1:
        finite = finite.reshape(-1, per_image).all(dim=1)
    for i, k in enumerate(group):
        found = torch.nonzero(~finite[i * n : (i + 1) * n]).flatten() + start
        if found.numel():
            chunk_rows = found if rows is None else rows.cpu()[found]
            bad.setdefault(k, []).extend(chunk_rows.tolist())


def non_finite_error(
    names: Sequence[str], bad: dict[int, list[int]], offset: int, ids: torch.Tensor | None
) -> ModelOutputError:
    """The error for the NaN/inf outputs in ``bad`` (view -> chunk rows): it names the first bad image
    (by its id, else its row in the call) and every view (of ``names``) bad on it."""
    first = min(min(found) for found in bad.values())
    views = ", ".join(repr(names[k]) for k in sorted(bad) if first in bad[k])
    image = f"the image with id {int(ids[first])}" if ids is not None else f"image {offset + first} of the batch"
    return ModelOutputError(
        f"the model returned NaN/inf for {image} under view(s) {views}; check the model and its input "
        "normalisation (TTA cannot merge non-finite outputs)"
    )


def check_output_shape(shape: tuple[int, ...], index: int, ref: list, names: Sequence[str], class_dim: int) -> None:
    """``shape``: view ``index``'s de-augmented output ``(n, ...)``. The first view's must fit
    ``class_dim`` (it is recorded in ``ref``); every later one must match it per image (whatever the
    plan and checks)."""
    if ref:
        first, expected = ref[0]
        if shape[1:] != expected:
            raise ModelOutputError(
                f"view {names[index]!r} returned outputs of shape {shape[1:]} per image after "
                f"de-augmentation, but view {names[first]!r} returned {expected}; every view must map "
                "back to the same shape"
            )
        return
    ndim = len(shape)
    if not -ndim < class_dim < ndim:
        raise InvalidInputError(
            f"class_dim={class_dim} does not fit the model's output of shape {shape} (one view, batch "
            f"first): expected a dimension in 1..{ndim - 1} (or -{ndim - 1}..-1); pass class_dim=1 for (B, C) scores"
        )
    ref.append((index, shape[1:]))


def check_coverage(
    coverages: Sequence[torch.Tensor | None],
    view_weights: Sequence[float] | None,
    names: Sequence[str],
    policy_name: str,
    crop_sizes: Sequence[tuple[int, int]],
    size: tuple[int, int],
) -> None:
    """Refuse, before any forward pass, a policy whose views leave some pixel of an image of
    ``size = (H, W)`` unseen: ``coverages`` ``(1, 1, H, W)`` per view (None: every pixel),
    weighted by ``view_weights`` (None: 1 each)."""
    total = None
    for k, coverage in enumerate(coverages):
        weight = 1.0 if view_weights is None else float(view_weights[k])
        if weight == 0.0:
            continue
        if coverage is None:
            return  # a view of non-zero weight saw every pixel
        part = coverage.detach().float() * weight
        total = part if total is None else total + part
    h, w = size
    unseen = h * w if total is None else int((total <= 0).sum())
    if unseen:
        crops = ", ".join(f"{ch}x{cw}" for ch, cw in dict.fromkeys(crop_sizes)) or "none"
        raise InvalidInputError(
            f"policy {policy_name!r} leaves {unseen} of {h * w} pixels of a {h}x{w} image unseen by every view "
            f"(views: {', '.join(names)}; crop size {crops}), so its mask there is undefined; add the identity "
            "view, use larger crops or Tiles"
        )
