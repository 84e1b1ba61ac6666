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
"""

from __future__ import annotations

import hashlib
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Literal

import torch

from .errors import InvalidInputError, unknown_name

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
    "check_weights",
    "Merger",
]

MERGE_MODES = ("mean", "gmean", "sum", "max", "min", "tsharpen", "vote")
ACTIVATIONS = (None, "softmax", "sigmoid")
_TTACH_MODES = ("mean", "gmean", "sum", "max", "min", "tsharpen")
_VOTE_NUDGE = 1e-6
# Summed vote scores of a row within this fraction of its largest score count as tied: float
# rounding (which differs with the pass plan) must not decide a vote.
_VOTE_SCORE_TOL = 1e-6
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


def check_temperature(temperature: object, name: str = "temperature") -> float | None:
    """``None`` or a positive finite number, as a float."""
    if temperature is None:
        return None
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, numbers.Real)
        or not math.isfinite(temperature)
        or not temperature > 0
    ):
        raise InvalidInputError(
            f"Expected argument `{name}` to be a positive number (or None for no temperature), but got {temperature!r}"
        )
    return float(temperature)


def apply_temperature(probs: torch.Tensor, temperature: float | None, class_dim: int = -1) -> torch.Tensor:
    """Temperature-scale merged probabilities ``probs`` ``(..., C, ...)``: ``softmax(log(p) / T)``
    over ``class_dim`` (default the last dimension).

    A merged output is a probability vector; its log is a logit vector up to a constant, so this
    is ordinary temperature scaling of the merged prediction. ``T > 1`` softens, ``T < 1``
    sharpens, the argmax never changes, and ``temperature=None`` returns ``probs`` unchanged.

    Example:
        >>> apply_temperature(torch.tensor([[0.8, 0.2]]), 2.0)
        tensor([[0.6667, 0.3333]])
    """
    temperature = check_temperature(temperature)
    if temperature is None:
        return probs
    return torch.softmax(torch.log(_at_least_float32(probs).clamp_min(PROB_FLOOR)) / temperature, dim=class_dim)


def check_matrix_scaling(value: object, name: str = "matrix_scaling") -> dict[str, list] | None:
    """``None``, or matrix scaling as plain lists: ``{"weight": C lists of C numbers, "bias": C numbers}``.

    Accepts lists or tensors for either entry; every number must be finite.
    """
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"weight", "bias"}:
        raise InvalidInputError(
            f'Expected argument `{name}` to be {{"weight": C lists of C numbers, "bias": C numbers}} (or None), '
            f"but got {_show(value)}"
        )
    try:
        weight = torch.as_tensor(value["weight"], dtype=torch.float64)
        bias = torch.as_tensor(value["bias"], dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise InvalidInputError(f"Expected `{name}` to hold numbers, but got {_show(value)}") from None
    if weight.ndim != 2 or weight.shape[0] != weight.shape[1] or weight.shape[0] < 2 or bias.shape != weight.shape[:1]:
        raise InvalidInputError(
            f"Expected `{name}` to hold a (C, C) weight and a (C,) bias with C >= 2, but got weight "
            f"{tuple(weight.shape)} and bias {tuple(bias.shape)}"
        )
    if not (torch.isfinite(weight).all() and torch.isfinite(bias).all()):
        raise InvalidInputError(f"Expected `{name}` to hold finite numbers, but it holds NaN/inf")
    return {"weight": weight.tolist(), "bias": bias.tolist()}


def apply_matrix_scaling(
    x: torch.Tensor,
    weight: torch.Tensor | Sequence[Sequence[float]],
    bias: torch.Tensor | Sequence[float],
    class_dim: int = -1,
    *,
    probs: bool = True,
) -> torch.Tensor:
    """Matrix scaling (Guo et al. 2017) of merged scores ``x`` ``(..., C, ...)`` over ``class_dim``.

    Probabilities (``probs=True``): ``softmax(W log(p) + b)``; raw logits: ``W z + b``. ``W = I / T``,
    ``b = 0`` is temperature scaling; a full ``W`` and ``b`` also correct the class biases a model
    shows on held-out data, so unlike a temperature it can change the argmax.

    Args:
        x: merged probabilities or logits, ``C`` classes along ``class_dim``.
        weight: ``(C, C)``; bias: ``(C,)``.

    Example:
        >>> p = torch.tensor([[0.8, 0.2]])
        >>> apply_matrix_scaling(p, torch.eye(2) / 2, torch.zeros(2))  # = apply_temperature(p, 2.0)
        tensor([[0.6667, 0.3333]])
    """
    x = _at_least_float32(x)
    w = torch.as_tensor(weight, dtype=x.dtype, device=x.device)
    b = torch.as_tensor(bias, dtype=x.dtype, device=x.device)
    if x.ndim == 0 or not -x.ndim <= class_dim < x.ndim:
        raise InvalidInputError(f"class_dim={class_dim} does not fit merged scores of shape {tuple(x.shape)}")
    classes = x.shape[class_dim]
    if w.shape != (classes, classes) or b.shape != (classes,):
        raise InvalidInputError(
            f"matrix scaling holds {w.shape[0]}-class weights, but the merged output has {classes} classes along "
            f"dimension {class_dim} (shape {tuple(x.shape)}): it was fitted for another model"
        )
    z = x.clamp_min(PROB_FLOOR).log() if probs else x
    z = z.movedim(class_dim, -1) @ w.T + b
    return (torch.softmax(z, dim=-1) if probs else z).movedim(-1, class_dim)


class MergeAccumulator:
    """Merge views one at a time; :meth:`result` equals :func:`merge` over the stacked views.

    Args:
        mode: one of :data:`MERGE_MODES`.
        n_views: how many views will be added (the mean divides by it, as ttach's ``Merger``).
        weights: optional non-negative per-view weights ``(n_views,)``; not allowed with max/min.
            Or class-by-view weights ``(n_views, C)`` (mode ``mean`` only; non-negative inputs,
            i.e. probabilities): ``p_c ~ sum_k W[k, c] p_kc`` renormalised over ``class_dim``.
        activation: applied to each view before merging.
        class_dim: the class dimension of one view's output (``vote``, ``softmax``).
        seed: seeds the random tie-break of ``vote`` (with each row's id: see :meth:`result`).
        renormalize: make a ``gmean`` sum to 1 over ``class_dim``; default: when ``activation`` is
            softmax. Pass True to merge views that already are probabilities.

    The settings are checked once; :meth:`fresh` returns an empty accumulator with the same
    settings without checking them again (the engine makes one per chunk), and
    :meth:`take_rows` keeps some rows of the views added so far (the engine's gate).
    """

    def __init__(
        self,
        mode: str = "mean",
        n_views: int = 1,
        weights: Sequence[float] | torch.Tensor | None = None,
        activation: str | None = None,
        class_dim: int = 1,
        seed: int = 0,
        renormalize: bool | None = None,
    ):
        self.mode = check_merge_mode(mode)
        self.activation = check_activation(activation)
        if isinstance(n_views, bool) or not isinstance(n_views, int) or n_views < 1:
            raise InvalidInputError(f"n_views must be a positive integer, got {n_views!r}")
        self.n_views = n_views
        self.weights = check_weights(weights, n_views, mode)
        # (K, C) class-by-view weights: p_c ~ sum_k W[k, c] p_kc, renormalised over classes in result().
        self.class_weights = self.weights is not None and self.weights.ndim == 2
        if self.class_weights:
            self.total_weight = 1.0
            self._weight_list = [1.0] * n_views
        else:
            self.total_weight = float(self.weights.sum()) if self.weights is not None else float(n_views)
            # Per-view weights as Python floats: reading a tensor element per view costs a dispatch.
            self._weight_list = [1.0] * n_views if self.weights is None else [float(w) for w in self.weights]
        # Class-by-view weight rows shaped for broadcasting, by (view, dtype, device).
        self._class_rows: dict[tuple, torch.Tensor] = {}
        self.class_dim = class_dim
        self.seed = seed
        self.renormalize = (self.activation == "softmax") if renormalize is None else bool(renormalize)
        # Weight tensors for add_stack, by view indices: shared by every fresh() copy.
        self._stack_weights: dict[tuple[int, ...], torch.Tensor] = {}
        self._settings = dict(self.__dict__)
        self._reset()

    def _reset(self) -> None:
        self.count = 0
        self._acc: torch.Tensor | None = None
        self._scores: torch.Tensor | None = None  # vote: summed scores for the tie-break
        self._aliased = False  # whether _acc is the caller's own tensor (one view added as it was)
        self._divided = False  # whether _acc is already divided by the total weight (add_stack of every view)

    def fresh(self) -> MergeAccumulator:
        """An empty accumulator with these settings (not checked again)."""
        new = object.__new__(MergeAccumulator)
        new.__dict__.update(self._settings)
        new._settings = self._settings
        new._reset()
        return new

    def take_rows(self, rows: torch.Tensor) -> MergeAccumulator:
        """An accumulator holding rows ``rows`` (indices along dimension 0) of what was added so
        far; more views are then added for those rows only."""
        new = self.fresh()
        new.count = self.count
        new._acc = None if self._acc is None else self._acc[rows]
        new._scores = None if self._scores is None else self._scores[rows]
        new._divided = self._divided
        return new

    def _weight(self, index: int) -> float:
        return self._weight_list[index]

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.n_views:
            raise InvalidInputError(f"view index must lie in [0, {self.n_views - 1}], got {index}")

    def add(self, output: torch.Tensor, index: int | None = None) -> None:
        """Add the de-augmented output of view ``index`` (default: the next one)."""
        index = self.count if index is None else index
        self._check_index(index)
        x = apply_activation(output, self.activation, self.class_dim)
        if self.class_weights:
            self._add_class_weighted(x, index)
            return
        w = self._weight_list[index]
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
            self._aliased = self._acc is output
        elif mode == "max":
            self._acc, self._aliased = torch.maximum(self._acc, x), False
        elif mode == "min":
            self._acc, self._aliased = torch.minimum(self._acc, x), False
        else:
            self._acc, self._aliased = self._acc + (x * w if w != 1.0 else x), False
        self.count += 1

    def add_stack(self, outputs: torch.Tensor, indices: Sequence[int]) -> None:
        """Add several views at once: ``outputs`` ``(n, B, ...)`` are views ``indices`` (n of them).

        Equal to :meth:`add` on each view in turn (up to float rounding): one activation and one
        reduction over the stack instead of n of each.
        """
        n = len(indices)
        if outputs.shape[0] != n:
            raise InvalidInputError(f"add_stack got {outputs.shape[0]} outputs for {n} view indices")
        mode = self.mode
        if n == 1 or mode == "vote" or self.class_weights:
            for i, k in enumerate(indices):
                self.add(outputs[i], k)
            return
        if min(indices) < 0 or max(indices) >= self.n_views:
            self._check_index(min(indices) if min(indices) < 0 else max(indices))
        class_dim = self.class_dim if self.class_dim < 0 else self.class_dim + 1
        x = apply_activation(outputs, self.activation, class_dim)
        if mode in ("gmean", "tsharpen"):
            _check_non_negative(x, mode)
            x = torch.log(x) if mode == "gmean" else torch.sqrt(x)
        if mode == "max":
            part = x.amax(dim=0)
            self._acc = part if self._acc is None else torch.maximum(self._acc, part)
        elif mode == "min":
            part = x.amin(dim=0)
            self._acc = part if self._acc is None else torch.minimum(self._acc, part)
        else:
            weights = [self._weight_list[k] for k in indices]
            if all(w == 1.0 for w in weights) and self._acc is None and n == self.n_views and mode != "sum":
                # Every view at once, unweighted: the mean in one step (result() divides no more).
                self._acc, self._divided, self._aliased, self.count = x.mean(dim=0), True, False, n
                return
            if all(w == 1.0 for w in weights):
                part = x.sum(dim=0)
            else:
                key = tuple(indices)
                w = self._stack_weights.get(key)
                if w is None or w.device != x.device or w.dtype != x.dtype:
                    w = torch.tensor(weights, dtype=x.dtype, device=x.device).view(n, *([1] * (x.ndim - 1)))
                    self._stack_weights[key] = w
                if any(v == 0.0 for v in weights):
                    # A zero-weight view contributes nothing (and log(0) * 0 would be NaN).
                    x = torch.where(w == 0, torch.zeros((), dtype=x.dtype, device=x.device), x)
                part = (x * w).sum(dim=0)
            self._acc = part if self._acc is None else self._acc + part
        self._aliased = False  # every branch above built a new tensor
        self.count += n

    def _class_row(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """View ``index``'s ``(C,)`` class weights shaped to broadcast against ``x`` along ``class_dim``."""
        key = (index, x.dtype, x.device, x.ndim)
        row = self._class_rows.get(key)
        if row is None:
            dim = self.class_dim % x.ndim
            n_classes = int(self.weights.shape[1])
            if x.shape[dim] != n_classes:
                raise InvalidInputError(
                    f"class-by-view weights hold {n_classes} classes per view, but the model's output has "
                    f"{x.shape[dim]} along class_dim={self.class_dim} (shape {tuple(x.shape)})"
                )
            shape = [1] * x.ndim
            shape[dim] = n_classes
            row = self.weights[index].to(device=x.device, dtype=x.dtype).view(shape)
            self._class_rows[key] = row
        return row

    def _add_class_weighted(self, x: torch.Tensor, index: int) -> None:
        low = float(x.detach().min()) if x.numel() else 0.0
        if low < 0:
            raise InvalidInputError(
                f"class-by-view weights merge probabilities, but view {index} has a minimum of {low:.4g}; pass "
                "activation='softmax' to merge the probabilities of logits"
            )
        x = _at_least_float32(x)
        x = x * self._class_row(index, x)
        self._acc = x if self._acc is None else self._acc + x
        self._aliased = False
        self.count += 1

    def _add_vote(self, x: torch.Tensor, w: float) -> None:
        dim = self.class_dim % x.ndim
        scores = _at_least_float32(x) * w
        one_hot = torch.zeros_like(scores)
        one_hot.scatter_(dim, x.argmax(dim=dim, keepdim=True), w)
        self._acc = one_hot if self._acc is None else self._acc + one_hot
        self._scores = scores if self._scores is None else self._scores + scores

    def result(self, ids: RowIds | None = None) -> torch.Tensor:
        """The merged output, with the shape of one view's output.

        Args:
            ids: ``vote`` only: each row's identity, which seeds the row's tie-break with
                ``seed``: ``(B,)`` integers (a list or an integer tensor), or a callable that
                maps the indices of the rows that need a tie-break (a 1-D int64 tensor) to their
                ids. Default: a hash of the row's own votes and scores.
        """
        if self._acc is None:
            raise InvalidInputError("no views were added to the merge")
        mode = self.mode
        if mode in ("max", "min", "sum"):
            # A single view's output may be the caller's own tensor: hand back a copy, not an alias.
            return self._acc.clone() if self._aliased else self._acc
        if mode == "vote":
            return self._vote_result(ids)
        if self.class_weights:
            return self._acc / self._acc.sum(dim=self.class_dim, keepdim=True).clamp_min(PROB_FLOOR)
        merged = self._acc if self._divided else self._acc / self.total_weight
        if mode == "gmean":
            merged = torch.exp(merged)
            if self.renormalize:
                merged = merged / merged.sum(dim=self.class_dim, keepdim=True).clamp_min(1e-38)
        return merged

    def _vote_result(self, ids: RowIds | None) -> torch.Tensor:
        votes, scores = self._acc, self._scores
        dim = self.class_dim % votes.ndim
        tol = 1e-9 * max(self.total_weight, 1.0)
        top = votes >= votes.amax(dim=dim, keepdim=True) - tol
        masked = torch.where(top, scores, torch.full_like(scores, -torch.inf))
        # Tolerance per row (its largest score), so that no other row of the batch matters.
        scale = scores.abs().reshape(scores.shape[0], -1).amax(dim=1).view(-1, *([1] * (scores.ndim - 1)))
        top &= masked >= masked.amax(dim=dim, keepdim=True) - _VOTE_SCORE_TOL * scale
        winner = top.to(torch.uint8).argmax(dim=dim, keepdim=True)  # the only top class, where there is one
        tied = torch.nonzero((top.sum(dim=dim) > 1).reshape(votes.shape[0], -1).any(dim=1)).flatten()
        if tied.numel():
            keys = _row_ids(ids, tied, votes, scores)
            for row, key in zip(tied.tolist(), keys, strict=True):
                generator = torch.Generator().manual_seed(_mix(self.seed, key))
                noise = torch.rand(votes.shape[1:], generator=generator).to(votes.device)
                pick = torch.where(top[row], noise, torch.full_like(noise, -1.0)).argmax(dim=dim - 1, keepdim=True)
                winner[row] = pick
        fractions = votes / self.total_weight
        return fractions.scatter_add(dim, winner, torch.full_like(winner, _VOTE_NUDGE, dtype=fractions.dtype))


# A row's identity for the vote's tie-break: (B,) integers, or rows -> their ids.
RowIds = Sequence[int] | torch.Tensor | Callable[[torch.Tensor], Sequence[int] | torch.Tensor]

_MASK64 = (1 << 64) - 1


def _mix(seed: int, key: int) -> int:
    """A 63-bit generator seed from ``(seed, key)`` (splitmix64's finaliser), the same on every
    machine and Python run."""
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(key)) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) >> 1


def content_key(x: torch.Tensor) -> int:
    """A stable 63-bit integer from a tensor's dtype, shape and bytes (a row's own identity when
    the caller gives none)."""
    data = x.detach().contiguous().flatten().view(torch.uint8).cpu().numpy().tobytes()
    digest = hashlib.blake2b(data, digest_size=8, person=str((x.dtype, tuple(x.shape))).encode()[:16])
    return int.from_bytes(digest.digest(), "little") >> 1


def _row_ids(ids: RowIds | None, rows: torch.Tensor, votes: torch.Tensor, scores: torch.Tensor) -> list[int]:
    """The ids of ``rows``: from ``ids`` (a sequence, tensor or callable) or, without ids, a hash
    of each row's votes and scores."""
    if ids is None:
        return [content_key(torch.stack([votes[r], scores[r]])) for r in rows.tolist()]
    if callable(ids):
        picked = ids(rows)
    elif isinstance(ids, torch.Tensor):
        picked = ids[rows.to(ids.device)]
    else:
        picked = [ids[r] for r in rows.tolist()]
    picked = picked.tolist() if isinstance(picked, torch.Tensor) else list(picked)
    if len(picked) != rows.numel():
        raise InvalidInputError(f"ids gave {len(picked)} ids for {rows.numel()} rows; pass one id per row")
    return [int(i) for i in picked]


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
