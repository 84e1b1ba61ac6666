"""What follows the greedy selection of views (:mod:`~ttakit.search.greedy`): learned weights,
the gate and its temperature, matrix scaling, the comparison table, and the last word: the
policy *as saved* (gate and calibration included) is kept only if it is not worse than the
identity alone (:func:`never_worse`), computed from the cache as the engine would
(:func:`cache_output`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch

from ..policy import Policy
from .cache import ViewCache
from .calibration import (
    MATRIX_CONTROL,
    apply_calibration,
    apply_temperature,
    compare_matrix_scaling,
    scores,
)
from .gate import GateTuning, evaluate_gated_on_cache, tune_gate_threshold
from .weights import compare_aggregation, merge_class_weighted, merge_weighted

__all__ = ["cache_output", "describe", "never_worse"]


def _evaluate_row(
    name: str, probs: torch.Tensor, y: torch.Tensor, passes: float, **extra: Any
) -> dict[str, Any]:
    return {"policy": name, "views": float(passes), **scores(probs, y), **extra}


def _nlls(got: Mapping[str, float]) -> dict[str, float]:
    return {k: got[k] for k in ("accuracy", "nll", "nll_ts")}


def _learned_aggregation(
    sel_probs: torch.Tensor, y: torch.Tensor, *, prior: float, seed: int, floor: float, class_weights: bool
) -> tuple[list | None, dict[str, Any], torch.Tensor]:
    """Learned weights (per view, or per view and class) where they win under cross-validation:
    ``(weights or None, the comparison, the merged probabilities)``."""
    aggregation = compare_aggregation(
        sel_probs, y, prior=prior, seed=seed, accuracy_floor=floor, class_weights=class_weights
    )
    if aggregation["class_used"]:  # class-by-view weights won under cross-validation
        weights = aggregation["class_weights"]
        return weights, aggregation, merge_class_weighted(sel_probs, torch.tensor(weights))
    if aggregation["used"]:
        weights = aggregation["weights"]
        return weights, aggregation, merge_weighted(sel_probs, torch.tensor(weights))
    return None, aggregation, sel_probs.mean(0)


def _gated_candidate(
    full: Policy,
    plain: torch.Tensor,
    final_probs: torch.Tensor,
    y: torch.Tensor,
    beta: float,
    *,
    keep: float,
    confidence: float,
    max_cost: float | None,
    seed: int,
) -> tuple[GateTuning, Policy]:
    """The gate's tuning and ``full`` with its threshold, and a temperature for the rows the gate
    sends through the policy (the engine calibrates those only; confident rows keep the plain
    softmax)."""
    tuning = tune_gate_threshold(
        plain,
        final_probs,
        y,
        keep=keep,
        n_views=len(full),
        confidence=confidence,
        max_cost=max_cost,
        seed=seed,
        keep_nll=keep,
        full_calibrated=apply_temperature(final_probs, full.temperature),
    )
    gated = plain.max(1).values < tuning.threshold
    temperature = full.temperature
    if int(gated.sum()) >= 20:
        temperature = scores(final_probs[gated], y[gated], beta)["temperature"]
    return tuning, replace(full, gate_threshold=tuning.threshold, temperature=temperature)


def _with_matrix_scaling(
    cache: ViewCache,
    candidates: list[Policy],
    identity: Policy,
    final_probs: torch.Tensor,
    base: Mapping[str, float],
    seed: int,
) -> tuple[list[Policy], Policy, dict[str, dict[str, Any]], dict[str, float] | None]:
    """Matrix scaling after the temperature, fitted on the rows each candidate calibrates (under
    a gate: the gated rows), kept only where it wins under cross-validation; the same for the
    identity. Returns ``(candidates, identity, what the report shows, the matrix-scaled
    identity's scores or None)``."""
    y, plain = cache.labels, cache.probs[cache.index("identity")]
    candidates = list(candidates)
    scaling_info: dict[str, dict[str, Any]] = {}
    for k, candidate in enumerate(candidates):
        rows = torch.ones_like(y, dtype=torch.bool)
        if candidate.gate_threshold is not None:
            rows = plain.max(1).values < candidate.gate_threshold
        merged_rows = final_probs[rows]
        info = compare_matrix_scaling(
            merged_rows, y[rows], candidate.temperature, seed=seed,
            accuracy_floor=float((merged_rows.argmax(1) == y[rows]).double().mean()),
        )
        scaling_info[describe(candidate)] = _scaling_summary(info)
        if info["used"]:
            candidates[k] = replace(candidate, matrix_scaling=info["matrix_scaling"])
    info = compare_matrix_scaling(plain, y, base["temperature"], seed=seed, accuracy_floor=base["accuracy"])
    scaling_info["identity"] = _scaling_summary(info)
    identity.meta = {"matrix_scaling": scaling_info["identity"]}  # what the fallback's report says
    identity_scaled = None
    if info["used"]:
        identity = replace(identity, matrix_scaling=info["matrix_scaling"])
        identity_scaled = _output_scores(cache_output(cache, identity)[0], y)
    return candidates, identity, scaling_info, identity_scaled


def _comparison(
    cache: ViewCache,
    base: Mapping[str, float],
    identity_scaled: dict[str, float] | None,
    baselines: Mapping[str, Policy] | None,
    notes: list[str],
    *,
    name: str,
    weights: list | None,
    mean_probs: torch.Tensor,
    n_selected: int,
    full: Policy,
    final: Mapping[str, float],
    saved: Mapping[str, float],
    policy: Policy,
) -> list[dict[str, Any]]:
    """The report's comparison table on validation (a note for baselines it cannot score)."""
    y = cache.labels
    comparison = [{"policy": "none", "views": 1.0, **base}]
    if identity_scaled is not None:  # the same calibration without TTA: what the views add is the rest
        comparison.append({"policy": MATRIX_CONTROL, "views": 1.0, **identity_scaled, "nll_ts": None,
                           "temperature": base["temperature"]})
    skipped = []
    for label, baseline in (baselines or {}).items():
        if all(n in cache for n in baseline.view_names):
            comparison.append(_evaluate_row(label, cache.policy_probs(baseline), y, len(baseline)))
        else:
            skipped.append(label)
    if skipped:
        notes.append(f"baselines not scored (views missing from the pool): {', '.join(skipped)}")
    if weights is not None:
        comparison.append(_evaluate_row(f"{name} (mean)", mean_probs, y, n_selected))
    kind = "" if weights is None else " (class-weighted)" if isinstance(weights[0], list) else " (weighted)"
    comparison.append({"policy": name + kind, "views": float(len(full)), **final})
    comparison.append(
        {
            "policy": f"{name} (as saved)",
            "views": saved["passes_per_image"],
            "accuracy": saved["accuracy"],
            "nll": saved["nll"],
            "nll_ts": None,
            "temperature": policy.temperature,
        }
    )
    return comparison


def cache_output(cache: ViewCache, policy: Policy) -> tuple[torch.Tensor, float]:
    """``(N, C)`` probabilities :class:`ttakit.TTAEngine` returns for ``policy`` on the cached
    images, computed from the cache (the merge, the gate: plain softmax for confident rows, and
    the temperature and matrix scaling on the merged rows), and the forward passes per image it costs."""
    if policy.gate_threshold is not None and len(policy) > 1:
        out = evaluate_gated_on_cache(cache, policy, calibrate=True)
        return out.probs, out.forward_passes_per_image
    return apply_calibration(cache.policy_probs(policy), policy), float(len(policy))


def _output_scores(probs: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    picked = probs.float().gather(1, y[:, None]).squeeze(1)
    return {
        "accuracy": float((probs.argmax(1) == y).double().mean()),
        "nll": float(-picked.clamp_min(1e-12).log().double().mean()),
    }


def _scaling_summary(info: Mapping[str, Any]) -> dict[str, Any]:
    """What the report shows of :func:`compare_matrix_scaling` (without the matrix itself)."""
    return {k: info.get(k) for k in ("used", "cv_nll_temperature", "cv_nll_matrix", "not_used_because")}


def describe(policy: Policy) -> str:
    gate = f", gate {policy.gate_threshold:.4g}" if policy.gate_threshold is not None else ""
    return f"{len(policy)} views{gate}"


def never_worse(
    candidates: Sequence[Policy],
    fallback: Policy,
    base: Mapping[str, float],
    output: Callable[[Policy], tuple[torch.Tensor, float]],
    labels: torch.Tensor,
) -> tuple[Policy, dict[str, float], list[str]]:
    """The first candidate whose output *as saved* is not worse than the identity alone.

    ``output(policy)`` returns the policy's ``(N, C)`` probabilities exactly as inference
    produces them (gate and temperature included) and the forward passes per image it spent. A candidate passes when its accuracy is at least ``base["accuracy"]`` and
    its NLL at most ``base["nll_ts"]`` (the identity with its own fitted temperature, which
    ``fallback`` holds). Returns ``(policy, scores, notes)``; ``fallback`` when none passes.
    """
    notes: list[str] = []

    def measure(policy: Policy) -> dict[str, float]:
        probs, passes = output(policy)
        return {**_output_scores(probs, labels), "passes_per_image": float(passes)}

    for policy in candidates:
        got = measure(policy)
        if got["accuracy"] >= base["accuracy"] - 1e-12 and got["nll"] <= base["nll_ts"] + 1e-9:
            return policy, got, notes
        notes.append(
            f"the policy as saved ({describe(policy)}) scored accuracy {got['accuracy']:.4f}, NLL {got['nll']:.4f} "
            f"on validation, worse than the identity's {base['accuracy']:.4f}, {base['nll_ts']:.4f}: dropped"
        )
    if candidates:
        scaled = " and matrix scaling" if fallback.matrix_scaling is not None else ""
        notes.append(f"returning the identity view with a fitted temperature{scaled}")
    return fallback, measure(fallback), notes
