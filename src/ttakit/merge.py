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
              with the higher summed score (after ``activation``; within 1e-6 of the row's
              largest score counts as equal), and only if those tie too to a random pick
              seeded by ``(seed, id)``, where ``id`` is the row's identity (``ids``; without
              ids, a hash of the row's own votes and scores). A row's pick is a function of
              that row alone, never of the other rows of its batch. The winner gets 1e-6
              extra so ``argmax`` of the result returns it.
============  ===============================================================================

Views that saw only part of the image (crops, shifts with padding) are merged per pixel over the
views that saw it (:class:`MergeAccumulator` with coverage maps): ``mean``, ``gmean``,
``tsharpen``, ``vote``, ``max`` and ``min`` (``COVERAGE_MODES``); ``sum`` is refused.

Weights are per view ``(K,)``, or per view and class ``(K, C)`` (ClassTTA, Shanmugam et al. 2021):
then only ``mean`` of probabilities is defined, ``p_c ~ sum_k W[k, c] p_kc`` renormalised over
classes (:func:`ttakit.search.weights.merge_class_weighted`); other modes refuse them.

``activation`` (``None``, ``"softmax"``, ``"sigmoid"``) is applied to each view before merging,
so ``activation="softmax"`` merges probabilities while ``None`` merges raw outputs as ttach does.
Views that are already probabilities (a model declaring ``outputs = "probs"``) are merged with
``activation=None, renormalize=True``: the same numbers as softmax of their logits would give.

:func:`apply_temperature` temperature-scales merged probabilities (``softmax(log(p) / T)``), and
:func:`apply_matrix_scaling` recalibrates them with a class-by-class matrix (``softmax(W log(p) + b)``,
matrix scaling, Guo et al. 2017); the engine applies both to a policy's merged output.

This module is the public face and holds :func:`merge` and ttach's :class:`Merger`; the code lives
by job in private modules: :mod:`ttakit._merge_checks` (modes, activations, weights),
:mod:`ttakit._merge_accumulator` (the streaming merge and the vote's tie-break) and
:mod:`ttakit._calibrate` (temperature and matrix scaling).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

# Names not in ``__all__`` (marked F401) stay importable from here: the engine, policies and search use them.
from ._calibrate import (
    apply_matrix_scaling,
    apply_temperature,
    calibrate,
    check_matrix_scaling,
    check_temperature,  # noqa: F401
)
from ._merge_accumulator import (
    COVERAGE_MODES,  # noqa: F401
    MergeAccumulator,
    RowIds,
    check_coverage_mode,  # noqa: F401
    content_key,  # noqa: F401
)
from ._merge_checks import (
    _TTACH_MODES,
    ACTIVATIONS,
    MERGE_MODES,
    PROB_FLOOR,
    Activation,  # noqa: F401
    MergeMode,  # noqa: F401
    _at_least_float32,  # noqa: F401
    apply_activation,
    check_activation,  # noqa: F401
    check_merge_mode,  # noqa: F401
    check_weights,
)
from .errors import InvalidInputError

__all__ = [
    "MERGE_MODES",
    "ACTIVATIONS",
    "PROB_FLOOR",
    "MergeAccumulator",
    "merge",
    "apply_activation",
    "apply_temperature",
    "apply_matrix_scaling",
    "check_matrix_scaling",
    "calibrate",
    "check_weights",
    "Merger",
]


def merge(
    stack: torch.Tensor,
    mode: str = "mean",
    weights: Sequence[float] | torch.Tensor | None = None,
    activation: str | None = None,
    class_dim: int = 1,
    seed: int = 0,
    ids: RowIds | None = None,
) -> torch.Tensor:
    """Merge a stack of views.

    Args:
        stack: ``(K, B, ...)`` de-augmented outputs of K views.
        mode, weights, activation, seed: see :class:`MergeAccumulator`.
        class_dim: the class dimension of one view's output ``(B, C, ...)``.
        ids: ``vote``: each row's identity for its tie-break (see :meth:`MergeAccumulator.result`).

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
    return acc.result(ids)


class Merger:
    """ttach's ``Merger``: ``append`` outputs, read ``result``. Same modes as ttach, same results,
    except that ``gmean``/``tsharpen`` on negative values raise instead of returning NaN."""

    def __init__(self, type: str = "mean", n: int = 1):  # noqa: A002 - ttach's argument name
        if type not in _TTACH_MODES:
            raise InvalidInputError(f"Not correct merge type `{type}`; expected one of {', '.join(_TTACH_MODES)}")
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise InvalidInputError(
                f"Merger's `n` must be a positive integer, the number of outputs to merge, got {n!r}"
            )
        self.type = type
        self.n = n
        self._acc = MergeAccumulator(type, n_views=int(n))

    def append(self, x: torch.Tensor) -> None:
        # Unweighted, so the view index is irrelevant; ttach also accepts more than n appends.
        self._acc.add(x, index=0)

    @property
    def result(self) -> torch.Tensor:
        return self._acc.result()
