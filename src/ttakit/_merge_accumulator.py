"""The streaming merge: :class:`MergeAccumulator` folds views in one at a time (or a stacked pass at once), so the engine never holds all K outputs; and the seeded tie-break of ``vote``."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import torch

from ._merge_checks import (
    PROB_FLOOR,
    _at_least_float32,
    _check_non_negative,
    apply_activation,
    check_activation,
    check_merge_mode,
    check_weights,
)
from .errors import InvalidInputError

_VOTE_NUDGE = 1e-6


# Summed vote scores of a row within this fraction of its largest score count as tied: float
# rounding (which differs with the pass plan) must not decide a vote.
_VOTE_SCORE_TOL = 1e-6


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

    Per-pixel coverage (``fresh(coverage=True)``): views that saw only part of the image (crops,
    shifts) are added with a weight map ``(1, 1, H, W)`` (``coverage``; None: the whole image),
    and each pixel is merged over the views that saw it: ``sum_k w_k c_k(x) f(out_k(x)) /
    sum_k w_k c_k(x)`` for mean, gmean and tsharpen, per-pixel votes for vote, the maximum or
    minimum over the covering views for max and min (:data:`COVERAGE_MODES`; ``sum`` is refused).
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
        self.coverage = False  # per-pixel weights: see fresh(coverage=True)
        self._weight_sum: torch.Tensor | float = 0.0  # coverage: sum_k w_k c_k(x) so far
        self._acc: torch.Tensor | None = None
        self._scores: torch.Tensor | None = None  # vote: summed scores for the tie-break
        self._aliased = False  # whether _acc is the caller's own tensor (one view added as it was)
        self._divided = False  # whether _acc is already divided by the total weight (add_stack of every view)

    def fresh(self, coverage: bool = False) -> MergeAccumulator:
        """An empty accumulator with these settings (not checked again); ``coverage=True`` merges
        each pixel over the views that saw it (:meth:`add`'s ``coverage``)."""
        new = object.__new__(MergeAccumulator)
        new.__dict__.update(self._settings)
        new._settings = self._settings
        new._reset()
        if coverage:
            check_coverage_mode(self.mode)
            new.coverage = True
        return new

    def take_rows(self, rows: torch.Tensor) -> MergeAccumulator:
        """An accumulator holding rows ``rows`` (indices along dimension 0) of what was added so
        far; more views are then added for those rows only."""
        new = self.fresh()
        new.count = self.count
        new._acc = None if self._acc is None else self._acc[rows]
        new._scores = None if self._scores is None else self._scores[rows]
        new._divided = self._divided
        new.coverage, new._weight_sum = self.coverage, self._weight_sum
        return new

    def _weight(self, index: int) -> float:
        return self._weight_list[index]

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.n_views:
            raise InvalidInputError(f"view index must lie in [0, {self.n_views - 1}], got {index}")

    def add(self, output: torch.Tensor, index: int | None = None, coverage: torch.Tensor | None = None) -> None:
        """Add the de-augmented output of view ``index`` (default: the next one).

        ``coverage``: accumulators made by ``fresh(coverage=True)`` only: a ``(1, 1, H, W)`` map
        of how much of each pixel the view saw (0: never), or None for every pixel.
        """
        index = self.count if index is None else index
        self._check_index(index)
        if coverage is not None and not self.coverage:
            raise InvalidInputError("coverage maps need an accumulator made by fresh(coverage=True)")
        x = apply_activation(output, self.activation, self.class_dim)
        if self.coverage:
            self._add_covered(x, index, coverage)
            return
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
        if n == 1 or mode == "vote" or self.class_weights or self.coverage:
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

    def _add_covered(self, x: torch.Tensor, index: int, coverage: torch.Tensor | None) -> None:
        """:meth:`add` with per-pixel weights ``w_k * coverage`` (the views' weights alone where
        ``coverage`` is None); pixels a view never saw take no part in its contribution."""
        w = 1.0 if self.class_weights else self._weight_list[index]
        mode = self.mode
        x = _at_least_float32(x)
        if mode in ("gmean", "tsharpen"):
            _check_non_negative(x, mode)
            x = torch.log(x) if mode == "gmean" else torch.sqrt(x)
        weight: torch.Tensor | float = w
        if coverage is not None:
            coverage = coverage.to(device=x.device, dtype=x.dtype)
            seen = coverage > 0
            weight = coverage * w
        if mode in ("max", "min"):
            if coverage is not None:  # an unseen pixel never wins
                x = torch.where(seen, x, torch.full_like(x, -torch.inf if mode == "max" else torch.inf))
            pick = torch.maximum if mode == "max" else torch.minimum
            self._acc = x if self._acc is None else pick(self._acc, x)
        else:
            if coverage is not None:  # outside the view, values are filler (log(0) = -inf included)
                x = torch.where(seen, x, torch.zeros((), dtype=x.dtype, device=x.device))
            if w == 0.0:
                x = torch.zeros_like(x)  # a zero-weight view contributes nothing (log(0) * 0 is NaN)
            if mode == "vote":
                self._add_vote(x, weight)
            elif self.class_weights:
                self._add_class_weighted(x if coverage is None else x * coverage, index)
                self.count -= 1  # counted below
            else:
                part = x * weight if not (isinstance(weight, float) and weight == 1.0) else x
                self._acc = part if self._acc is None else self._acc + part
        self._weight_sum = self._weight_sum + weight
        self._aliased = False
        self.count += 1

    def _add_vote(self, x: torch.Tensor, w: float | torch.Tensor) -> None:
        dim = self.class_dim % x.ndim
        scores = _at_least_float32(x) * w
        one_hot = torch.zeros_like(scores)
        if isinstance(w, torch.Tensor):  # per-pixel weights (coverage)
            one_hot.scatter_(dim, x.argmax(dim=dim, keepdim=True), 1.0)
            one_hot = one_hot * w
        else:
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
        if self.coverage:
            merged = self._acc / self._weight_sum
        else:
            merged = self._acc if self._divided else self._acc / self.total_weight
        if mode == "gmean":
            merged = torch.exp(merged)
            if self.renormalize:
                merged = merged / merged.sum(dim=self.class_dim, keepdim=True).clamp_min(1e-38)
        return merged

    def _vote_result(self, ids: RowIds | None) -> torch.Tensor:
        votes, scores = self._acc, self._scores
        dim = self.class_dim % votes.ndim
        # Under coverage each pixel's votes are over the views that saw it.
        total = self._weight_sum if self.coverage else self.total_weight
        tol = 1e-9 * max(float(total.max()) if isinstance(total, torch.Tensor) else total, 1.0)
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
        fractions = votes / total
        return fractions.scatter_add(dim, winner, torch.full_like(winner, _VOTE_NUDGE, dtype=fractions.dtype))


# Merge modes that can merge views seeing different pixels (crops, shifts): per pixel, over the views that saw it.
COVERAGE_MODES = ("mean", "gmean", "tsharpen", "vote", "max", "min")


def check_coverage_mode(mode: str) -> str:
    """``mode`` if it can merge each pixel over the views that saw it, else a one-line error."""
    if mode not in COVERAGE_MODES:
        raise InvalidInputError(
            f"merge mode {mode!r} cannot merge views that see different pixels (crops, shifts with padding): "
            f"each pixel is merged over the views that saw it; use one of {', '.join(COVERAGE_MODES)}"
        )
    return mode


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
