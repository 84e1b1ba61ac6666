"""Refit a policy's fitted parameters for another model, keeping its views.

A searched policy holds views and what was fitted to one model's outputs on validation rows:
weights (per view or class by view), a confidence gate, a temperature and matrix scaling.
Another model (e.g. the same recipe retrained with another seed in ``evaluate --repeats``)
needs its own: :func:`refit_policy` caches the policy's views over that model's validation
images and fits again what the policy holds, the same way the search fits it
(:mod:`~ttakit.search.weights`, :mod:`~ttakit.search.gate`, :mod:`~ttakit.search.calibration`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from ..errors import InvalidInputError
from ..policy import Policy, fitted_parameters
from ._util import check_images_labels
from .cache import cache_views
from .calibration import apply_temperature, compare_matrix_scaling, scores
from .gate import tune_gate_threshold
from .weights import fit_class_view_weights, fit_view_weights, merge_class_weighted, merge_weighted

__all__ = ["refit_policy"]


def _refit_weights(policy: Policy, cache: Any) -> tuple[list | None, torch.Tensor, str | None]:
    """Weights of the kind ``policy`` holds, fitted on ``cache``: ``(weights, merged
    probabilities, "class by view" / "per view" / None)``."""
    probs = cache.probs  # (K, N, C)
    if policy.weights is not None and len(policy) > 1:
        if policy.class_weights:
            weights = fit_class_view_weights(cache, cache.names)
            return weights, merge_class_weighted(probs, torch.tensor(weights)), "class by view"
        weights = fit_view_weights(cache, cache.names)
        return weights, merge_weighted(probs, torch.tensor(weights)), "per view"
    plain = replace(policy, weights=None, temperature=None, gate_threshold=None, matrix_scaling=None)
    return None, cache.policy_probs(plain), None


def _refit_matrix(
    merged: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, temperature: float | None, seed: int
) -> tuple[dict | None, str]:
    """Matrix scaling after the temperature on ``rows``, under the search's rule: ``(matrix or
    None, "refit" or "dropped: <reason>")``."""
    merged_rows = merged[rows]
    compared = compare_matrix_scaling(
        merged_rows, y[rows], temperature, seed=seed,
        accuracy_floor=float((merged_rows.argmax(1) == y[rows]).double().mean()),
    )
    matrix = compared["matrix_scaling"] if compared["used"] else None
    said = "refit" if matrix is not None else (
        f"dropped: {compared.get('not_used_because') or f'too few rows ({int(rows.sum())})'}"
    )
    return matrix, said


def refit_policy(
    model: Any,
    images: torch.Tensor,
    labels: torch.Tensor,
    policy: Policy,
    *,
    seed: int = 0,
    keep: float = 0.95,
    gate_confidence: float = 0.9,
    gate_max_cost: float | None = 0.3,
    max_batch: int = 256,
) -> tuple[Policy, dict[str, Any]]:
    """``policy``'s views with its fitted parameters fitted again for ``model`` on ``images``
    ``(N, C, H, W)`` and ``labels`` ``(N,)`` (validation rows of that model).

    Refits exactly the kinds of parameter ``policy`` holds: per-view or class-by-view weights,
    then the gate (:func:`~ttakit.search.tune_gate_threshold`, the search's defaults), then the
    temperature (on the gated rows under a gate, when there are at least 20), then matrix scaling,
    kept only under the search's rule (:func:`~ttakit.search.compare_matrix_scaling`: enough rows
    and a cross-validated win), else dropped and the reason recorded. A views-only policy is
    returned as it is.

    Returns:
        ``(policy, info)``: the refitted policy (same name and views) and what was done, as JSON:
        ``views``, ``refit`` (the parameters refitted), ``n_rows``, ``weights``, ``gate_threshold``,
        ``temperature``, ``matrix_scaling`` (``"refit"``, ``"dropped: <reason>"`` or None).

    Example:
        >>> from ttakit.policy import View
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
        >>> x, y = torch.rand(30, 1, 4, 4), torch.arange(30) % 2
        >>> refitted, info = refit_policy(model, x, y, Policy([View.identity()], temperature=2.0))
        >>> info["refit"], refitted.temperature != 2.0
        (['temperature'], True)
    """
    if not isinstance(policy, Policy):
        raise InvalidInputError(f"Expected argument `policy` to be a Policy, but got {type(policy).__name__}")
    images, labels = check_images_labels(images, labels, "the rows to refit on")
    fitted = fitted_parameters(policy)
    info: dict[str, Any] = {"views": policy.view_names, "refit": fitted, "n_rows": int(labels.shape[0])}
    if not fitted:
        return policy, info
    cache = cache_views(model, images, labels, policy.views, max_batch=max_batch, progress=False)
    y = cache.labels
    probs = cache.probs  # (K, N, C)
    weights, merged, info["weights"] = _refit_weights(policy, cache)
    full_temperature = scores(merged, y)["temperature"]

    # -- gate: plain prediction first, the other views where the plain confidence is low
    gate_threshold = None
    rows = torch.ones_like(y, dtype=torch.bool)
    if policy.gate_threshold is not None and len(policy) > 1 and "identity" in cache:
        plain = probs[cache.index("identity")]
        tuning = tune_gate_threshold(
            plain, merged, y, keep=keep, n_views=len(policy), confidence=gate_confidence, max_cost=gate_max_cost,
            seed=seed, keep_nll=keep, full_calibrated=apply_temperature(merged, full_temperature),
        )
        gate_threshold = float(tuning.threshold)
        rows = plain.max(1).values < gate_threshold
    info["gate_threshold"] = gate_threshold

    # -- temperature on the rows the engine calibrates (under a gate: the gated ones)
    temperature = None
    if policy.temperature is not None or policy.matrix_scaling is not None:
        temperature = full_temperature
        if gate_threshold is not None and int(rows.sum()) >= 20:
            temperature = scores(merged[rows], y[rows])["temperature"]
    info["temperature"] = temperature

    # -- matrix scaling after the temperature, under the search's rule
    matrix = None
    info["matrix_scaling"] = None
    if policy.matrix_scaling is not None:
        matrix, info["matrix_scaling"] = _refit_matrix(merged, y, rows, temperature, seed)
    refitted = replace(
        policy,
        weights=weights,
        temperature=temperature,
        gate_threshold=gate_threshold,
        matrix_scaling=matrix,
        meta={**{k: v for k, v in (policy.meta or {}).items() if k not in ("weights_sha256", "checkpoint")},
              "kind": "refit", "refit": info},
    )
    return refitted, info
