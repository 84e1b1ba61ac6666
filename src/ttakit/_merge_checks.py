"""Merge settings and their checks: the modes, the activations, per-view and class-by-view weights."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Literal

import torch

from .errors import InvalidInputError, unknown_name

MERGE_MODES = ("mean", "gmean", "sum", "max", "min", "tsharpen", "vote")


ACTIVATIONS = (None, "softmax", "sigmoid")


_TTACH_MODES = ("mean", "gmean", "sum", "max", "min", "tsharpen")


# log(0) would be -inf; probabilities this small carry no information a float32 softmax can use.
PROB_FLOOR = 1e-30


MergeMode = Literal["mean", "gmean", "sum", "max", "min", "tsharpen", "vote"]


Activation = Literal["softmax", "sigmoid"] | None


def check_merge_mode(mode: str) -> str:
    if mode not in MERGE_MODES:
        raise unknown_name("merge mode", mode, MERGE_MODES)
    return mode


def check_activation(activation: str | None) -> str | None:
    if activation in ("identity", "none"):
        return None
    if activation not in ACTIVATIONS:
        raise InvalidInputError(f"activation must be None, 'softmax' or 'sigmoid', got {activation!r}")
    return activation


def apply_activation(x: torch.Tensor, activation: str | None, class_dim: int = 1) -> torch.Tensor:
    """``softmax`` over ``class_dim``, element-wise ``sigmoid``, or ``x`` itself for ``None``."""
    if activation == "softmax":
        return torch.softmax(_at_least_float32(x), dim=class_dim)
    if activation == "sigmoid":
        return torch.sigmoid(_at_least_float32(x))
    return x


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    # Half precision (AMP outputs) is merged in float32; float64 stays float64.
    return x if x.dtype == torch.float64 else x.float()


def check_weights(weights: object, n_views: int, mode: str) -> torch.Tensor | None:
    """Validate merge weights and return them as float64: ``None``; ``n_views`` finite,
    non-negative numbers, not all zero (per-view weights, a list, tuple or 1-D tensor); or
    ``n_views`` lists of ``C`` such numbers (class-by-view weights, a ``(K, C)`` nested list or
    2-D tensor), no class's column all zero.

    Class-by-view weights (ClassTTA) merge probabilities only, by ``mode="mean"``:
    ``p_c ~ sum_k W[k, c] p_kc`` renormalised over classes. Every other mode refuses them.
    """
    if weights is None:
        return None
    if mode in ("max", "min"):
        raise InvalidInputError(
            f"weights do not apply to merge mode {mode!r} (got weights={_show(weights)}); "
            "use mean, gmean, sum, tsharpen or vote, or pass weights=None"
        )
    if isinstance(weights, torch.Tensor):
        if weights.ndim > 2 or weights.is_complex() or weights.dtype == torch.bool:
            raise InvalidInputError(
                f"weights must be {n_views} numbers (one per view) or {n_views} lists of C numbers (one per view "
                f"and class), got a tensor of shape {tuple(weights.shape)} and dtype {weights.dtype}"
            )
        w = weights.detach().to("cpu", torch.float64)
        if w.ndim == 0:
            w = w.flatten()
    else:
        if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
            raise InvalidInputError(
                f"weights must be a list of {n_views} numbers (one per view), got {type(weights).__name__} "
                f"{_show(weights)}"
            )
        nested = [isinstance(v, (Sequence, torch.Tensor)) and not isinstance(v, (str, bytes)) for v in weights]
        if any(nested):
            w = _class_weights_tensor(weights, n_views)
        else:
            bad = [v for v in weights if isinstance(v, bool) or not isinstance(v, numbers.Real)]
            if bad:
                raise InvalidInputError(
                    f"weights must be a list of {n_views} numbers (one per view), got {_show(weights)} "
                    f"(not a number: {bad[0]!r})"
                )
            w = torch.tensor([float(v) for v in weights], dtype=torch.float64)
    if w.ndim == 2:
        return _check_class_weights(w, n_views, mode, weights)
    if w.numel() != n_views:
        raise InvalidInputError(
            f"weights must hold one value per view ({n_views}), got {w.numel()}: {_show(weights)}"
        )
    if not torch.isfinite(w).all() or (w < 0).any() or float(w.sum()) <= 0:
        raise InvalidInputError(f"weights must be finite, non-negative and not all zero, got {w.tolist()}")
    return w


def _class_weights_tensor(weights: Sequence, n_views: int) -> torch.Tensor:
    """A nested list ``K x C`` as a ``(K, C)`` float64 tensor, or an error naming the bad row."""
    rows = []
    for k, row in enumerate(weights):
        if isinstance(row, torch.Tensor):
            row = row.detach().cpu().flatten().tolist() if row.ndim <= 1 else row
        if (
            isinstance(row, (str, bytes, torch.Tensor))
            or not isinstance(row, Sequence)
            or not row
            or any(isinstance(v, bool) or not isinstance(v, numbers.Real) for v in row)
        ):
            raise InvalidInputError(
                f"class-by-view weights must be {n_views} lists of C numbers (one list per view, one number per "
                f"class), but row {k} is {_show(row)}"
            )
        rows.append([float(v) for v in row])
    widths = sorted({len(r) for r in rows})
    if len(widths) > 1:
        raise InvalidInputError(
            f"class-by-view weights must be {n_views} lists of the same length C (one number per class), "
            f"got rows of lengths {[len(r) for r in rows]}"
        )
    return torch.tensor(rows, dtype=torch.float64)


def _check_class_weights(w: torch.Tensor, n_views: int, mode: str, given: object) -> torch.Tensor:
    if mode != "mean":
        raise InvalidInputError(
            f"class-by-view weights (shape {tuple(w.shape)}) apply to merge mode 'mean' of probabilities only, "
            f"got merge mode {mode!r}; use merge_mode='mean' or per-view weights ({n_views} numbers)"
        )
    if w.shape[0] != n_views or w.shape[1] < 1:
        raise InvalidInputError(
            f"class-by-view weights must have shape ({n_views}, C): one list of C numbers per view, got shape "
            f"{tuple(w.shape)}: {_show(given)}"
        )
    if not torch.isfinite(w).all() or (w < 0).any():
        raise InvalidInputError(f"class-by-view weights must be finite and non-negative, got {_show(w)}")
    empty = [c for c in range(w.shape[1]) if float(w[:, c].sum()) <= 0]
    if empty:
        raise InvalidInputError(
            f"class-by-view weights give class {empty[0]} a weight of 0 in every view (column {empty[0]} is all "
            f"zero), so it could never be predicted; got {_show(w)}"
        )
    return w


def _show(value: object, limit: int = 80) -> str:
    text = repr(value.tolist() if isinstance(value, torch.Tensor) else value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_non_negative(x: torch.Tensor, mode: str) -> None:
    low = float(x.detach().min()) if x.numel() else 0.0
    if low < 0:
        raise InvalidInputError(
            f"merge mode {mode!r} needs non-negative values (probabilities), but a view has a minimum of "
            f"{low:.4g}; pass activation='softmax' (or 'sigmoid') to merge probabilities instead of logits"
        )
