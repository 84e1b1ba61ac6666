"""Input checks shared by the metrics: probabilities and labels, correctness vectors, scores, prediction sets, bin counts. Errors name the argument, the expectation and the value."""

from __future__ import annotations

import numbers

import torch

from .errors import InvalidInputError


def _check_n_bins(n_bins: object) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, numbers.Integral) or n_bins < 1:
        raise InvalidInputError(
            f"Expected argument `n_bins` to be an integer larger than 0, but got {n_bins!r}"
        )
    return int(n_bins)


def _check_probs_labels(probs: object, labels: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate ``probs: (N, C)`` and ``labels: (N,)``; return them as float64 / int64."""
    if not isinstance(probs, torch.Tensor):
        raise InvalidInputError(
            f"Expected argument `probs` to be a torch.Tensor of shape (N, C), "
            f"but got {type(probs).__name__}"
        )
    if not isinstance(labels, torch.Tensor):
        raise InvalidInputError(
            f"Expected argument `labels` to be a torch.Tensor of shape (N,), "
            f"but got {type(labels).__name__}"
        )
    if probs.ndim != 2:
        raise InvalidInputError(
            f"Expected argument `probs` to have shape (N, C), but got shape {tuple(probs.shape)}"
        )
    if not probs.is_floating_point():
        raise InvalidInputError(
            f"Expected argument `probs` to be a floating-point tensor of probabilities, "
            f"but got dtype {probs.dtype}"
        )
    n, c = probs.shape
    if n == 0 or c == 0:
        raise InvalidInputError(
            f"Expected argument `probs` to have at least one sample and one class, "
            f"but got shape {tuple(probs.shape)}"
        )
    if labels.ndim != 1:
        raise InvalidInputError(
            f"Expected argument `labels` to have shape (N,), but got shape {tuple(labels.shape)}"
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise InvalidInputError(
            f"Expected argument `labels` to be an integer tensor of class indices, "
            f"but got dtype {labels.dtype}"
        )
    if labels.shape[0] != n:
        raise InvalidInputError(
            f"Expected argument `labels` to have the same length as `probs` ({n}), "
            f"but got length {labels.shape[0]}"
        )
    p = probs.detach().to(device="cpu", dtype=torch.float64)
    y = labels.detach().to(device="cpu", dtype=torch.int64)
    if not torch.isfinite(p).all():
        raise InvalidInputError(
            "Expected argument `probs` to be finite, but it contains NaN or inf"
        )
    lo, hi = float(p.min()), float(p.max())
    tol = max(1e-3, 10 * torch.finfo(probs.dtype).eps)
    if lo < -tol or hi > 1 + tol:
        raise InvalidInputError(
            f"Expected argument `probs` to hold probabilities in [0, 1], but got values in "
            f"[{lo:.4g}, {hi:.4g}]; apply softmax to logits first"
        )
    row_err = float((p.sum(dim=1) - 1).abs().max())
    if row_err > tol:
        raise InvalidInputError(
            f"Expected the rows of argument `probs` to sum to 1, but a row is off by "
            f"{row_err:.4g}; apply softmax to logits first"
        )
    ymin, ymax = int(y.min()), int(y.max())
    if ymin < 0 or ymax >= c:
        bad = ymin if ymin < 0 else ymax
        raise InvalidInputError(
            f"Expected argument `labels` to hold class indices in [0, {c - 1}], but got {bad}"
        )
    return p, y


def _check_correct(correct: object, name: str) -> torch.Tensor:
    """Validate a per-sample correctness vector ``(N,)`` of bools (or 0/1 integers)."""
    if not isinstance(correct, torch.Tensor):
        raise InvalidInputError(
            f"Expected argument `{name}` to be a bool torch.Tensor of shape (N,), "
            f"but got {type(correct).__name__}"
        )
    if correct.ndim != 1:
        raise InvalidInputError(
            f"Expected argument `{name}` to have shape (N,), but got shape {tuple(correct.shape)}"
        )
    if correct.shape[0] == 0:
        raise InvalidInputError(
            f"Expected argument `{name}` to have at least one sample, but it is empty"
        )
    if correct.dtype != torch.bool:
        if correct.is_floating_point() or correct.is_complex():
            raise InvalidInputError(
                f"Expected argument `{name}` to be a bool tensor, but got dtype {correct.dtype}"
            )
        if not ((correct == 0) | (correct == 1)).all():
            raise InvalidInputError(
                f"Expected argument `{name}` to be a bool tensor or hold only 0 and 1, "
                f"but got values {sorted(set(correct.unique().tolist()))[:5]}"
            )
        correct = correct != 0
    return correct.detach().cpu()


def _check_pair(correct_a: object, correct_b: object) -> tuple[torch.Tensor, torch.Tensor]:
    a = _check_correct(correct_a, "correct_a")
    b = _check_correct(correct_b, "correct_b")
    if a.shape[0] != b.shape[0]:
        raise InvalidInputError(
            f"Expected arguments `correct_a` and `correct_b` to have the same length (paired "
            f"samples), but got {a.shape[0]} and {b.shape[0]}"
        )
    return a, b


def _check_scores(scores: object, name: str = "scores") -> torch.Tensor:
    """Validate per-sample scores ``(N,)`` (higher = less sure); return them as float64."""
    if not isinstance(scores, torch.Tensor):
        raise InvalidInputError(
            f"Expected argument `{name}` to be a torch.Tensor of shape (N,), "
            f"but got {type(scores).__name__}"
        )
    if scores.ndim != 1 or scores.shape[0] == 0:
        raise InvalidInputError(
            f"Expected argument `{name}` to have shape (N,) with N >= 1, "
            f"but got shape {tuple(scores.shape)}"
        )
    s = scores.detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(s).all():
        raise InvalidInputError(f"Expected argument `{name}` to be finite, but it contains NaN or inf")
    return s


def _check_sets(sets: object) -> torch.Tensor:
    if not isinstance(sets, torch.Tensor) or sets.ndim != 2 or sets.dtype != torch.bool:
        shape = tuple(sets.shape) if isinstance(sets, torch.Tensor) else type(sets).__name__
        raise InvalidInputError(
            f"Expected argument `sets` to be a bool torch.Tensor of shape (N, C) (True = in the set), "
            f"but got {shape}"
        )
    if sets.shape[0] == 0:
        raise InvalidInputError("Expected argument `sets` to hold at least one sample, but it is empty")
    return sets.detach().cpu()
