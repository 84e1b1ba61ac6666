"""Merge modes over a stack of de-augmented views.

A merge is a function of a stack ``(K, B, ...)`` of K views, computed by a streaming
:class:`MergeAccumulator` so the engine never holds all K outputs at once. Modes:

============  ===============================================================================
``mean``      (weighted) arithmetic mean
``gmean``     (weighted) geometric mean: ``exp(mean(log x))``; needs non-negative values, so use
              ``activation="softmax"`` on logits (ttach's ``prod ** (1/n)`` returns NaN there).
              With softmax the result is renormalised to sum to 1 over classes.
``sum``       (weighted) sum
``max``       element-wise maximum (no weights)
``min``       element-wise minimum (no weights)
``tsharpen``  mean of square roots (Kim et al.); non-negative values only
``vote``      hard majority vote: the (weighted) fraction of views whose argmax over the class
              dimension is each class. Ties between classes with equal votes go to the class
              with the higher summed score (after ``activation``), and only if those tie too
              to a uniformly random pick from a generator seeded by ``seed`` (the same seed
              and input give the same pick; the engine seeds each chunk alike). The winner
              gets 1e-6 extra so ``argmax`` of the result returns it.
============  ===============================================================================

``activation`` (``None``, ``"softmax"``, ``"sigmoid"``) is applied to each view before merging,
so ``activation="softmax"`` merges probabilities while ``None`` merges raw outputs as ttach does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from .errors import InvalidInputError, unknown_name

__all__ = ["MERGE_MODES", "ACTIVATIONS", "MergeAccumulator", "merge", "apply_activation", "Merger"]

MERGE_MODES = ("mean", "gmean", "sum", "max", "min", "tsharpen", "vote")
ACTIVATIONS = (None, "softmax", "sigmoid")
_TTACH_MODES = ("mean", "gmean", "sum", "max", "min", "tsharpen")
_VOTE_NUDGE = 1e-6

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


class MergeAccumulator:
    """Merge views one at a time; :meth:`result` equals :func:`merge` over the stacked views.

    Args:
        mode: one of :data:`MERGE_MODES`.
        n_views: how many views will be added (the mean divides by it, as ttach's ``Merger``).
        weights: optional non-negative per-view weights ``(n_views,)``; not allowed with max/min.
        activation: applied to each view before merging.
        class_dim: the class dimension of one view's output (``vote``, ``softmax``).
        seed: seeds the random tie-break of ``vote``.
    """

    def __init__(
        self,
        mode: str = "mean",
        n_views: int = 1,
        weights: Sequence[float] | torch.Tensor | None = None,
        activation: str | None = None,
        class_dim: int = 1,
        seed: int = 0,
    ):
        self.mode = check_merge_mode(mode)
        self.activation = check_activation(activation)
        if isinstance(n_views, bool) or not isinstance(n_views, int) or n_views < 1:
            raise InvalidInputError(f"n_views must be a positive integer, got {n_views!r}")
        self.n_views = n_views
        self.weights = _check_weights(weights, n_views, mode)
        self.total_weight = float(self.weights.sum()) if self.weights is not None else float(n_views)
        self.class_dim = class_dim
        self.seed = seed
        self.count = 0
        self._acc: torch.Tensor | None = None
        self._scores: torch.Tensor | None = None  # vote: summed scores for the tie-break

    def _weight(self, index: int) -> float:
        return 1.0 if self.weights is None else float(self.weights[index])

    def add(self, output: torch.Tensor, index: int | None = None) -> None:
        """Add the de-augmented output of view ``index`` (default: the next one)."""
        index = self.count if index is None else index
        if not 0 <= index < self.n_views:
            raise InvalidInputError(f"view index must lie in [0, {self.n_views - 1}], got {index}")
        x = apply_activation(output, self.activation, self.class_dim)
        w = self._weight(index)
        mode = self.mode
        if mode in ("gmean", "tsharpen"):
            _check_non_negative(x, mode)
            x = torch.log(x) if mode == "gmean" else torch.sqrt(x)
        if w == 0.0 and mode != "vote":
            # A zero-weight view contributes nothing (and log(0) * 0 would be NaN).
            x, w = torch.zeros_like(x), 1.0
        if mode == "vote":
            self._add_vote(x, w)
        elif self._acc is None:
            # No copy needed: later updates build new tensors, never write into this one.
            self._acc = x * w if mode not in ("max", "min") and w != 1.0 else x
        elif mode == "max":
            self._acc = torch.maximum(self._acc, x)
        elif mode == "min":
            self._acc = torch.minimum(self._acc, x)
        else:
            self._acc = self._acc + (x * w if w != 1.0 else x)
        self.count += 1

    def _add_vote(self, x: torch.Tensor, w: float) -> None:
        dim = self.class_dim % x.ndim
        scores = _at_least_float32(x) * w
        one_hot = torch.zeros_like(scores)
        one_hot.scatter_(dim, x.argmax(dim=dim, keepdim=True), w)
        self._acc = one_hot if self._acc is None else self._acc + one_hot
        self._scores = scores if self._scores is None else self._scores + scores

    def result(self) -> torch.Tensor:
        """The merged output, with the shape of one view's output."""
        if self._acc is None:
            raise InvalidInputError("no views were added to the merge")
        mode = self.mode
        if mode in ("max", "min", "sum"):
            return self._acc
        if mode == "vote":
            return self._vote_result()
        merged = self._acc / self.total_weight
        if mode == "gmean":
            merged = torch.exp(merged)
            if self.activation == "softmax":
                merged = merged / merged.sum(dim=self.class_dim, keepdim=True).clamp_min(1e-38)
        return merged

    def _vote_result(self) -> torch.Tensor:
        votes, scores = self._acc, self._scores
        dim = self.class_dim % votes.ndim
        tol = 1e-9 * max(self.total_weight, 1.0)
        top = votes >= votes.amax(dim=dim, keepdim=True) - tol
        masked = torch.where(top, scores, torch.full_like(scores, -torch.inf))
        top &= masked >= masked.amax(dim=dim, keepdim=True) - 1e-12 * scores.abs().amax().clamp_min(1.0)
        if bool((top.sum(dim=dim) > 1).any()):
            generator = torch.Generator().manual_seed(self.seed)
            noise = torch.rand(votes.shape, generator=generator).to(votes.device)
            winner = torch.where(top, noise, torch.full_like(noise, -1.0)).argmax(dim=dim, keepdim=True)
        else:  # no tie left: skip drawing noise as large as the output
            winner = top.to(torch.uint8).argmax(dim=dim, keepdim=True)
        fractions = votes / self.total_weight
        return fractions.scatter_add(dim, winner, torch.full_like(winner, _VOTE_NUDGE, dtype=fractions.dtype))


def _check_weights(weights, n_views: int, mode: str) -> torch.Tensor | None:
    if weights is None:
        return None
    if mode in ("max", "min"):
        raise InvalidInputError(f"weights do not apply to merge mode {mode!r}; use mean, gmean, sum, tsharpen or vote")
    w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    if w.numel() != n_views:
        raise InvalidInputError(f"weights must hold one value per view ({n_views}), got {w.numel()}")
    if not torch.isfinite(w).all() or (w < 0).any() or float(w.sum()) <= 0:
        raise InvalidInputError(f"weights must be finite, non-negative and not all zero, got {w.tolist()}")
    return w


def _check_non_negative(x: torch.Tensor, mode: str) -> None:
    low = float(x.detach().min()) if x.numel() else 0.0
    if low < 0:
        raise InvalidInputError(
            f"merge mode {mode!r} needs non-negative values (probabilities), but a view has a minimum of "
            f"{low:.4g}; pass activation='softmax' (or 'sigmoid') to merge probabilities instead of logits"
        )


def merge(
    stack: torch.Tensor,
    mode: str = "mean",
    weights: Sequence[float] | torch.Tensor | None = None,
    activation: str | None = None,
    class_dim: int = 1,
    seed: int = 0,
) -> torch.Tensor:
    """Merge a stack of views.

    Args:
        stack: ``(K, B, ...)`` de-augmented outputs of K views.
        mode, weights, activation, seed: see :class:`MergeAccumulator`.
        class_dim: the class dimension of one view's output ``(B, C, ...)``.

    Returns:
        ``(B, ...)``.

    Example:
        >>> merge(torch.tensor([[[0.2, 0.8]], [[0.6, 0.4]]]), "mean")
        tensor([[0.4000, 0.6000]])
    """
    if not isinstance(stack, torch.Tensor) or stack.ndim < 2:
        raise InvalidInputError(f"stack must be a (K, B, ...) tensor, got {getattr(stack, 'shape', type(stack))}")
    acc = MergeAccumulator(mode, stack.shape[0], weights, activation, class_dim, seed)
    for view in stack:
        acc.add(view)
    return acc.result()


class Merger:
    """ttach's ``Merger``: ``append`` outputs, read ``result``. Same modes as ttach, same results,
    except that ``gmean``/``tsharpen`` on negative values raise instead of returning NaN."""

    def __init__(self, type: str = "mean", n: int = 1):  # noqa: A002 - ttach's argument name
        if type not in _TTACH_MODES:
            raise InvalidInputError(f"Not correct merge type `{type}`; expected one of {', '.join(_TTACH_MODES)}")
        self.type = type
        self.n = n
        self._acc = MergeAccumulator(type, n_views=max(int(n), 1))

    def append(self, x: torch.Tensor) -> None:
        # Unweighted, so the view index is irrelevant; ttach also accepts more than n appends.
        self._acc.add(x, index=0)

    @property
    def result(self) -> torch.Tensor:
        return self._acc.result()
