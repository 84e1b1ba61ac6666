"""Greedy selection of views on cached validation outputs (Greedy Policy Search, Lyzhov et al. 2020).

Start from the identity view and repeatedly add the candidate that most improves the objective
(validation NLL after temperature scaling by default, or accuracy), up to ``budget`` views,
stopping early when no candidate helps. Merging is the mean of the selected views' softmax
probabilities; a view is selected at most once (a weight does what re-selection would, without
the forward passes). A candidate is admissible only if the policy it produces is not worse than
the identity alone on the *other* metric either. Then learned weights, per view or per view and
class (:mod:`~ttakit.search.weights`, kept only if they win under cross-validation), a confidence gate (:mod:`~ttakit.search.gate`) and the
temperature (:mod:`~ttakit.search.calibration`); and last, the policy *as saved* (gate and
temperature included) is checked against the identity alone: it is never worse on the data it
saw, in the worst case it *is* the identity.

Example:
    >>> from ttakit import transforms as T
    >>> from ttakit.policy import Compose, View
    >>> from ttakit.search import ViewCache
    >>> logits = torch.randn(3, 200, 4)                      # (V, N, C): 3 views, 200 images
    >>> views = [View.identity(), *Compose([T.HorizontalFlip(), T.VerticalFlip()]).views[1:3]]
    >>> result = greedy_search(ViewCache(logits, logits[0].argmax(1), views), budget=2)
    >>> result.policy.view_names[0]
    'identity'
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch

from ..errors import InvalidInputError, unknown_name
from ..policy import Policy
from ._util import SCORE_CHUNK, SingleThread, check_count, check_labels, cm, gather_cm
from .cache import ViewCache
from .calibration import (
    NLL_CAP,
    PROB_FLOOR,
    fit_beta_cm,
    fit_chunked,
    scores,
    shifted_log,
    shifted_logits,
)
from .finish import (
    _comparison,
    _gated_candidate,
    _learned_aggregation,
    _nlls,
    _with_matrix_scaling,
    cache_output,
    describe,
    never_worse,
)
from .result import SearchResult

__all__ = ["OBJECTIVES", "SearchResult", "greedy_search", "never_worse"]

OBJECTIVES = ("nll", "accuracy")
Objective = Literal["nll", "accuracy"]


def _check_objective(objective: object) -> str:
    if objective not in OBJECTIVES:
        raise unknown_name("objective", objective, OBJECTIVES)
    return str(objective)


def _check_budget(budget: object) -> int:
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise InvalidInputError(
            f"Expected argument `budget` to be an integer >= 1 (views per image), but got {budget!r}"
        )
    return budget


def _check_cache(cache: object) -> None:
    if not isinstance(cache, ViewCache):
        raise InvalidInputError(
            f"Expected argument `cache` to be a ViewCache, but got {type(cache).__name__}"
        )


def _check_cache_views(cache: ViewCache) -> None:
    check_labels(cache.labels, "the cached images")
    if "identity" not in cache:
        raise InvalidInputError(
            "Expected the cache to hold the 'identity' view (the search starts from it), but it holds only "
            f"{cache.names[:8]}"
        )


def _check_min_gain(min_gain: object, objective: str) -> float:
    """``min_gain``, by default 1e-4 nats for NLL and 0 (one more correct image) for accuracy."""
    if min_gain is None:
        min_gain = 1e-4 if objective == "nll" else 0.0
    if isinstance(min_gain, bool) or not isinstance(min_gain, numbers.Real) or min_gain < 0:
        raise InvalidInputError(
            f"Expected argument `min_gain` to be a number >= 0, but got {min_gain!r}"
        )
    return min_gain


def _check_numbers(*, keep: object, prior: object, gate_confidence: object) -> None:
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real) or not 0 < keep <= 1:
        raise InvalidInputError(
            f"Expected argument `keep` to be a number in (0, 1], but got {keep!r}"
        )
    if isinstance(prior, bool) or not isinstance(prior, numbers.Real) or prior < 0:
        raise InvalidInputError(f"Expected argument `prior` to be a number >= 0, but got {prior!r}")
    if (
        isinstance(gate_confidence, bool)
        or not isinstance(gate_confidence, numbers.Real)
        or not 0 <= gate_confidence <= 1
    ):
        raise InvalidInputError(
            f"Expected argument `gate_confidence` to be a number in [0, 1], but got {gate_confidence!r}"
        )


def _score_candidates(
    running_cm: torch.Tensor, probs_cm: torch.Tensor, y: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accuracy and NLL at inverse temperature ``beta`` of the merge ``running + probs[v]``, every v.

    ``running_cm``: ``(C, N)`` sum of the selected views' probabilities; ``probs_cm``:
    ``(V, C, N)``. The mean's normalisation cancels in both. Accuracy counts a tie for the top
    class as correct (exact accuracies are recomputed for the chosen views). Returns two
    ``(V,)`` float64 tensors.
    """
    accs, nlls = [], []
    for start in range(0, probs_cm.shape[0], SCORE_CHUNK):
        merged = probs_cm[start : start + SCORE_CHUNK] + running_cm  # (v, C, N)
        top = merged.amax(1, keepdim=True)  # (v, 1, N)
        at_label = gather_cm(merged, y)  # (v, N)
        accs.append((at_label >= top.squeeze(1)).double().mean(1))
        ratio = merged.div_(top)  # in (0, 1], top class 1
        total = (ratio if beta == 1.0 else ratio.pow_(beta)).sum(1)  # (v, N)
        log_label = (at_label / top.squeeze(1)).clamp_min_(PROB_FLOOR).log_()
        loss = total.log_().sub_(beta * log_label).clamp_max_(NLL_CAP)
        nlls.append(loss.double().mean(1))
    return torch.cat(accs), torch.cat(nlls)


def _merged_scores(
    probs_cm: torch.Tensor, y: torch.Tensor, beta0: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact accuracy, temperature-scaled NLL and fitted beta of merged probabilities ``(V, C, N)``."""
    acc = (probs_cm.argmax(1) == y).double().mean(1)
    beta, nll = fit_beta_cm(*shifted_log(probs_cm, y), beta0)
    return acc, nll, beta


def _candidate_scores(
    probs: torch.Tensor,
    cache_cm: torch.Tensor,
    logits_cm: torch.Tensor,
    ident: int,
    y: torch.Tensor,
    beta0: float,
) -> tuple[torch.Tensor, ...]:
    """Each view alone and averaged with the identity: accuracy and temperature-scaled NLL, ``(V,)`` each."""
    rows = cache_cm.shape[0]
    plain = cache_cm[ident]
    # arg-max over the last dimension of (V, N, C) is the fast layout for it
    alone_acc = (probs.argmax(2) == y).double().mean(1)
    pair_acc = torch.cat(
        [
            ((probs[s : s + SCORE_CHUNK] + probs[ident]).argmax(2) == y).double().mean(1)
            for s in range(0, rows, SCORE_CHUNK)
        ]
    )
    # Lifts are for the report: a looser tolerance on the temperature is plenty.
    _, alone_nll = fit_chunked(
        lambda a, b: shifted_logits(logits_cm[a:b], y), rows, beta0, rtol=1e-4
    )
    _, pair_nll = fit_chunked(
        lambda a, b: shifted_log(cache_cm[a:b] + plain, y), rows, beta0, rtol=1e-4
    )
    return alone_acc, alone_nll, pair_acc, pair_nll


def _copies_curve(cache: ViewCache, copies: Sequence[str] | None) -> list[dict[str, Any]]:
    if not copies or len(copies) < 2 or not all(name in cache for name in copies):
        return []
    rows = [cache.index(name) for name in copies]
    curve, running = [], torch.zeros_like(cache.probs[0])
    for k, row in enumerate(rows, start=1):
        running = running + cache.probs[row]
        got = scores(running / k, cache.labels)
        curve.append({"copies": k, "accuracy": got["accuracy"], "nll_ts": got["nll_ts"]})
    return curve


def greedy_search(
    cache: ViewCache,
    budget: int = 8,
    objective: Objective = "nll",
    *,
    learn_weights: bool = True,
    gate: bool = True,
    keep: float = 0.95,
    gate_confidence: float = 0.9,
    gate_max_cost: float | None = 0.3,
    min_gain: float | None = None,
    refit_top: int = 4,
    baselines: Mapping[str, Policy] | None = None,
    random_copies: Sequence[str] | None = None,
    prior: float = 0.01,
    class_weights: bool = True,
    matrix_scaling: bool = True,
    seed: int = 0,
    name: str = "searched",
) -> SearchResult:
    """Greedy forward selection of views on cached validation outputs (GPS, Lyzhov et al. 2020).

    Starts from the identity view; each step scores every unselected candidate at once
    (vectorised over ``(V, N, C)``), adds the best, and refits the temperature. With
    ``objective="nll"`` candidates are ranked by NLL at the current temperature and the
    ``refit_top`` best are rescored with their own fitted temperature; with ``"accuracy"`` ties
    are broken by NLL. A step must gain more than ``min_gain`` (default 1e-4 nats for NLL,
    0 for accuracy, i.e. at least one more correct image) and keep the other metric no worse
    than the identity's; otherwise the search stops. Then, optionally, learned weights
    (kept only if they win under 2-fold cross-validation), the gate threshold and matrix
    scaling after the temperature (kept only on at least 20 rows per fitted number and if it
    wins under 2-fold cross-validation).

    Args:
        cache: per-view logits; must hold the ``identity`` view.
        budget: the most views in the policy (identity included), ``>= 1``.
        objective: ``"nll"`` (after temperature scaling) or ``"accuracy"``.
        learn_weights: try learned aggregation (per-view weights, kept only if they win under
            2-fold cross-validation).
        class_weights: also try class-by-view weights (ClassTTA) under cross-validation; the
            policy stores them (``K`` lists of ``C`` numbers) when they beat both the plain mean
            and the per-view weights out of sample.
        matrix_scaling: also try matrix scaling after the temperature
            (:func:`~ttakit.search.calibration.compare_matrix_scaling`), for the policy and for the
            identity it falls back to; the comparison gains a ``none (matrix-scaled)`` row, the
            same calibration without TTA, so the views' own share of a lift stays visible.
        gate: tune a gate threshold keeping ``keep`` of the accuracy lift (and of the NLL
            reduction, on the data), on the data and on
            ``gate_confidence`` of bootstrap resamples (:func:`ttakit.gating.tune_gate_threshold`),
            within ``gate_max_cost`` of the full policy's forward passes when possible (default
            30%; None for no budget).
        baselines: named policies whose views are in the cache, scored in the comparison table.
        random_copies: names of random-copy draws in draw order (repeats allowed), for the
            "how many copies" curve of the mean of the first k draws.

    Returns:
        :class:`SearchResult`; ``result.policy`` is never worse than the identity alone on the
        cached data (accuracy and temperature-scaled NLL).
    """
    started = time.perf_counter()
    _check_cache(cache)
    budget = _check_budget(budget)
    objective = _check_objective(objective)
    _check_cache_views(cache)
    min_gain = _check_min_gain(min_gain, objective)
    _check_numbers(keep=keep, prior=prior, gate_confidence=gate_confidence)
    refit_top = check_count("refit_top", refit_top)
    with SingleThread():
        result = _greedy(
            cache,
            budget=budget,
            objective=objective,
            learn_weights=learn_weights,
            gate=gate,
            keep=float(keep),
            gate_confidence=float(gate_confidence),
            gate_max_cost=gate_max_cost,
            min_gain=float(min_gain),
            refit_top=refit_top,
            baselines=baselines,
            random_copies=random_copies,
            prior=float(prior),
            class_weights=bool(class_weights),
            matrix_scaling=bool(matrix_scaling),
            seed=seed,
            name=name,
        )
    result.search_seconds = time.perf_counter() - started
    result.policy.meta["search_seconds"] = result.search_seconds
    return result


def _greedy(
    cache: ViewCache,
    *,
    budget: int,
    objective: str,
    learn_weights: bool,
    gate: bool,
    keep: float,
    gate_confidence: float,
    gate_max_cost: float | None,
    min_gain: float,
    refit_top: int,
    baselines: Mapping[str, Policy] | None,
    random_copies: Sequence[str] | None,
    prior: float,
    class_weights: bool,
    matrix_scaling: bool,
    seed: int,
    name: str,
) -> SearchResult:
    y, probs = cache.labels, cache.probs
    probs_cm = cm(probs)  # (V, C, N)
    n_views = cache.n_views
    ident = cache.index("identity")
    base = scores(probs[ident], y)
    candidates = _candidate_table(cache, probs_cm, ident, base)
    selected, path, current, beta, stop_reason = _select_views(
        cache, probs_cm, ident, base, budget=budget, objective=objective, min_gain=min_gain, refit_top=refit_top
    )

    sel_probs = probs[selected]  # (K, N, C)
    mean_probs = sel_probs.mean(0)
    weights, aggregation, final_probs = None, None, mean_probs
    if learn_weights and len(selected) >= 2:
        floor = current["accuracy"] if objective == "accuracy" else base["accuracy"]
        weights, aggregation, final_probs = _learned_aggregation(
            sel_probs, y, prior=prior, seed=seed, floor=floor, class_weights=class_weights
        )
    final = scores(final_probs, y, beta)

    full = Policy([cache.views[k] for k in selected], name=name, merge_mode="mean", weights=weights,
                  temperature=final["temperature"])
    candidates_saved = [full]
    tuning = None
    if gate and len(selected) >= 2:
        tuning, gated_policy = _gated_candidate(
            full, probs[ident], final_probs, y, beta, keep=keep, confidence=gate_confidence,
            max_cost=gate_max_cost, seed=seed,
        )
        candidates_saved.insert(0, gated_policy)
    identity = Policy([cache.views[ident]], name=name, temperature=base["temperature"])
    if len(selected) < 2:
        candidates_saved = []
    scaling_info: dict[str, dict[str, Any]] = {}
    identity_scaled = None
    if matrix_scaling:
        candidates_saved, identity, scaling_info, identity_scaled = _with_matrix_scaling(
            cache, candidates_saved, identity, final_probs, base, seed
        )

    # -- the policy as saved, gate and temperature included, is never worse than the identity
    policy, saved, notes = never_worse(candidates_saved, identity, base, lambda p: cache_output(cache, p), y)
    if policy is identity and len(selected) >= 2:
        selected, weights = [ident], None
    if policy.gate_threshold is None:
        tuning = None
    policy.meta = {
        "kind": "greedy-search",
        "objective": objective,
        "budget": budget,
        "pool_size": n_views,
        "n_images": cache.n_images,
        "validation": {"identity": _nlls(base), "policy": _nlls(final), "saved": saved},
        "stop_reason": stop_reason,
    }
    if scaling_info:
        policy.meta["matrix_scaling"] = scaling_info.get(
            "identity" if len(policy) == 1 else describe(policy), {"used": False}
        )
    comparison = _comparison(
        cache, base, identity_scaled, baselines, notes, name=name, weights=weights, mean_probs=mean_probs,
        n_selected=len(selected), full=full, final=final, saved=saved, policy=policy,
    )
    return SearchResult(
        policy=policy, objective=objective, budget=budget, path=path, candidates=candidates,
        comparison=comparison, aggregation=aggregation, gate=tuning, stop_reason=stop_reason,
        n_images=cache.n_images, pool_size=n_views, search_seconds=0.0,
        copies_curve=_copies_curve(cache, random_copies), notes=notes, cache=cache, fallback=identity,
    )


def _candidate_table(
    cache: ViewCache, probs_cm: torch.Tensor, ident: int, base: Mapping[str, float]
) -> list[dict[str, Any]]:
    """One row per pool view: its own scores and lifts over the identity, alone and as
    ``identity + view``."""
    y = cache.labels
    alone_acc, alone_nll, pair_acc, pair_nll = _candidate_scores(
        cache.probs, probs_cm, cm(cache.logits), ident, y, 1.0 / base["temperature"]
    )
    sources = cache.sources or [""] * cache.n_views
    return [
        {
            "view": view.name,
            "source": sources[k],
            "accuracy": float(alone_acc[k]),
            "nll_ts": float(alone_nll[k]),
            "accuracy_lift": float(alone_acc[k]) - base["accuracy"],
            "nll_lift": base["nll_ts"] - float(alone_nll[k]),
            "pair_accuracy_lift": float(pair_acc[k]) - base["accuracy"],
            "pair_nll_lift": base["nll_ts"] - float(pair_nll[k]),
        }
        for k, view in enumerate(cache.views)
    ]


def _select_views(
    cache: ViewCache,
    probs_cm: torch.Tensor,
    ident: int,
    base: Mapping[str, float],
    *,
    budget: int,
    objective: str,
    min_gain: float,
    refit_top: int,
) -> tuple[list[int], list[dict[str, Any]], dict[str, float], float, str]:
    """Greedy forward selection from the identity: ``(selected rows, path, current scores, the
    fitted inverse temperature, stop reason)``."""
    y, n_views = cache.labels, cache.n_views
    selected = [ident]
    running = probs_cm[ident].clone()  # (C, N) sum of the selected views' probabilities
    beta = 1.0 / base["temperature"]
    current = {"accuracy": base["accuracy"], "nll_ts": base["nll_ts"]}
    path = [{"step": 0, "added": "identity", "n_views": 1, **base}]
    stop_reason = "budget reached" if budget > 1 else "budget of 1 view"
    while len(selected) < budget:
        if len(selected) == n_views:
            stop_reason = "pool exhausted"
            break
        acc, nll_approx = _score_candidates(running, probs_cm, y, beta)
        top = _shortlist(acc, nll_approx, selected, base, objective, refit_top)
        if top is None:
            stop_reason = "no admissible candidate"
            break
        m = len(selected)
        top_acc, top_nll, top_beta = _merged_scores((probs_cm[top] + running) / (m + 1), y, beta)
        if objective == "nll":
            ok_nll = torch.where(top_acc >= base["accuracy"] - 1e-12, top_nll, math.inf)
            pick = int(torch.argmin(ok_nll))
            gain = current["nll_ts"] - float(ok_nll[pick])
        else:
            pick = int(torch.argmax(top_acc - 1e-9 * top_nll))
            gain = float(top_acc[pick]) - current["accuracy"]
        if not gain > min_gain:
            stop_reason = "no candidate improves the objective"
            break
        chosen = int(top[pick])
        selected.append(chosen)
        running += probs_cm[chosen]
        beta = float(top_beta[pick])
        current = {"accuracy": float(top_acc[pick]), "nll_ts": float(top_nll[pick])}
        mean_y = gather_cm(running[None], y)[0] / len(selected)
        path.append(
            {
                "step": len(path),
                "added": cache.views[chosen].name,
                "n_views": len(selected),
                "accuracy": current["accuracy"],
                "nll": float(-mean_y.clamp_min(1e-12).log().double().mean()),
                "nll_ts": current["nll_ts"],
                "temperature": 1.0 / beta,
            }
        )
    return selected, path, current, beta, stop_reason


def _shortlist(
    acc: torch.Tensor,
    nll_approx: torch.Tensor,
    selected: list[int],
    base: Mapping[str, float],
    objective: str,
    refit_top: int,
) -> torch.Tensor | None:
    """The candidates rescored with their own temperature: the ``refit_top`` admissible ones
    with the lowest approximate NLL (for accuracy: among those tied for the best accuracy);
    None when no candidate is admissible."""
    free = torch.ones(acc.shape[0], dtype=torch.bool)
    free[selected] = False
    if objective == "nll":  # never trade accuracy below the identity's for NLL
        admissible = free & (acc >= base["accuracy"] - 1e-12)
    else:  # nor NLL above the identity's for accuracy (the NLL here is an upper bound)
        admissible = free & (nll_approx <= base["nll_ts"] + 1e-9)
    if not bool(admissible.any()):
        return None
    inf = torch.full_like(nll_approx, math.inf)
    if objective == "nll":
        return torch.argsort(torch.where(admissible, nll_approx, inf))[: min(refit_top, int(admissible.sum()))]
    tied = admissible & (acc >= acc[admissible].max() - 1e-12)
    return torch.argsort(torch.where(tied, nll_approx, inf))[:refit_top]


