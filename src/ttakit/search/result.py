"""What a search returns: :class:`SearchResult` (the policy, its path, candidates, comparison
table, aggregation, gate, cost and notes), for :func:`~ttakit.search.greedy_search` and
:func:`~ttakit.search.search_policy`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..policy import Policy
from .cache import ViewCache
from .gate import GateTuning

__all__ = ["SearchResult"]


@dataclass
class SearchResult:
    """What :func:`greedy_search` / :func:`search_policy` return.

    Attributes:
        policy: the searched :class:`Policy`: the selected views in selection order, merge
            ``"mean"`` of probabilities, ``weights`` when learned aggregation won out of sample
            (``K`` numbers, or ``K`` lists of ``C`` for class-by-view weights; else None),
            ``temperature`` fitted on validation, ``matrix_scaling`` when it won under
            cross-validation, ``gate_threshold`` (None without gating), and ``meta`` with the
            objective, validation scores, pool size and timings.
        objective: ``"nll"`` or ``"accuracy"``.
        budget: the most views allowed.
        path: one dict per step: ``step``, ``added``, ``n_views``, ``accuracy``, ``nll``,
            ``nll_ts`` (after temperature scaling), ``temperature``.
        candidates: one dict per pool view: its own scores and lifts over the identity, alone
            and as ``identity + view``.
        comparison: validation rows for the report (none, baselines, searched, gated).
        aggregation: learned weights vs plain mean (cross-validated NLL), or None.
        gate: the :class:`~ttakit.gating.GateTuning`, or None.
        stop_reason: why the selection stopped.
        copies_curve: validation scores of the mean of the first k random copies, if any.
        cost: forward passes spent and saved by successive halving (``ttakit.search.halving``),
            or None when every candidate was cached in full.
        fallback: the identity alone, calibrated as the search would save it (the policy
            returned when no candidate is at least as good).
    """

    policy: Policy
    objective: str
    budget: int
    path: list[dict[str, Any]]
    candidates: list[dict[str, Any]]
    comparison: list[dict[str, Any]]
    aggregation: dict[str, Any] | None
    gate: GateTuning | None
    stop_reason: str
    n_images: int
    pool_size: int
    search_seconds: float
    cache_seconds: float | None = None
    copies_curve: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    cache: ViewCache | None = field(default=None, repr=False)
    cost: dict[str, Any] | None = None
    fallback: Policy | None = field(default=None, repr=False)

    def rows(self) -> list[dict[str, Any]]:
        """The report's main table: one row per policy on the validation split."""
        return [dict(r) for r in self.comparison]

    def to_json(self) -> dict[str, Any]:
        return {
            "objective": self.objective,
            "budget": self.budget,
            "selected": self.policy.view_names,
            "weights": self.policy.weights,
            "temperature": self.policy.temperature,
            "matrix_scaling": self.policy.matrix_scaling is not None,
            "gate_threshold": self.policy.gate_threshold,
            "stop_reason": self.stop_reason,
            "n_images": self.n_images,
            "pool_size": self.pool_size,
            "search_seconds": self.search_seconds,
            "cache_seconds": self.cache_seconds,
            "comparison": self.comparison,
            "path": self.path,
            "candidates": self.candidates,
            "aggregation": self.aggregation,
            "gate": self.gate.to_json() if self.gate is not None else None,
            "copies_curve": self.copies_curve,
            "notes": self.notes,
            "cost": self.cost,
            "policy": self.policy.to_json(),
        }
