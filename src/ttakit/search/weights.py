"""Learned aggregation: per-view weights (a mixture of the views' probabilities) and class-by-view
weights (ClassTTA, Shanmugam et al. 2021), each kept only if it beats the plain mean out of sample.

* :func:`fit_view_weights`: non-negative per-view weights summing to 1 maximising the likelihood of
  ``sum_k w_k p_k`` (MAP-EM with a mild Dirichlet prior pulling toward uniform).
* :func:`fit_class_view_weights`: a ``(K, C)`` weight per view and class, ``p_c ~ sum_k W_kc p_kc``
  renormalised over classes, fitted by L-BFGS with an L2 pull toward uniform.
* :func:`compare_aggregation`: 2-fold cross-validated NLL (temperature fitted on the other fold)
  of the plain mean, per-view weights and class-by-view weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..errors import InvalidInputError
from ._util import SingleThread, check_count, check_non_negative
from .cache import ViewCache
from .calibration import PROB_FLOOR, held_out_nll

__all__ = ["fit_view_weights", "fit_class_view_weights", "merge_class_weighted", "compare_aggregation"]


def merge_weighted(probs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_k w_k probs[k]`` over the first dimension (weights normalised to sum to 1)."""
    w = weights.to(probs.dtype)
    return torch.tensordot(w / w.sum(), probs, dims=1)


def merge_class_weighted(probs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``p_c ~ sum_k W[k, c] probs[k, :, c]`` renormalised over classes. ``probs (K, N, C)``,
    ``weights (K, C)`` -> ``(N, C)``."""
    mixed = (probs * weights.to(probs.dtype)[:, None, :]).sum(0)
    return mixed / mixed.sum(1, keepdim=True).clamp_min(PROB_FLOOR)


def _fit_weights(probs: torch.Tensor, y: torch.Tensor, prior: float, max_iter: int) -> torch.Tensor:
    """Mixture weights maximising the likelihood of ``sum_k w_k probs[k]`` (MAP-EM).

    ``probs``: ``(K, N, C)``. A symmetric Dirichlet prior worth ``prior * N`` pseudo-observations
    pulls the weights toward uniform. The log-likelihood is concave in the weights, and EM
    increases it monotonically, so the result does not depend on a learning rate.
    """
    k, n = probs.shape[0], probs.shape[1]
    py = probs.gather(2, y.view(1, -1, 1).expand(k, -1, 1)).squeeze(2).double().clamp_min(1e-12)  # (K, N)
    w = torch.full((k,), 1.0 / k, dtype=torch.float64)
    pseudo = prior * n / k
    for _ in range(max_iter):
        mix = (w[:, None] * py).sum(0)  # (N,)
        resp = (w[:, None] * py / mix).sum(1)  # (K,) expected counts
        new = (resp + pseudo) / (n + prior * n)
        converged = float((new - w).abs().max()) < 1e-7
        w = new
        if converged:
            break
    return w.float()


def _fit_class_weights(probs: torch.Tensor, y: torch.Tensor, l2: float, max_iter: int) -> torch.Tensor:
    """``(K, C)`` class-by-view weights ``W = softmax over views of A`` (each class's weights sum
    to 1 over views) maximising the likelihood of :func:`merge_class_weighted`, with
    ``l2 * |A|^2`` pulling toward the uniform mean."""
    k, _, c = probs.shape
    p = probs.double()
    a = torch.zeros(k, c, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([a], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        w = torch.softmax(a, 0)
        mixed = (p * w[:, None, :]).sum(0)  # (N, C)
        loss = -(mixed.gather(1, y[:, None]).squeeze(1).clamp_min(1e-12).log() - mixed.sum(1).log()).mean()
        loss = loss + l2 * (a * a).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return torch.softmax(a.detach(), 0).float()


def _rows_of(cache: ViewCache, selected: Sequence[str | int]) -> list[int]:
    if isinstance(selected, (str, bytes)) or not isinstance(selected, Sequence) or not selected:
        raise InvalidInputError(f"Expected argument `selected` to be a non-empty list of view names, but got {selected!r}")
    rows = []
    for item in selected:
        if isinstance(item, str):
            rows.append(cache.index(item))
        elif isinstance(item, int) and not isinstance(item, bool) and 0 <= item < cache.n_views:
            rows.append(item)
        else:
            raise InvalidInputError(
                f"Expected `selected` to hold view names or rows in [0, {cache.n_views - 1}], but got {item!r}"
            )
    return rows


def fit_view_weights(
    cache: ViewCache, selected: Sequence[str | int], *, prior: float = 0.01, max_iter: int = 500
) -> list[float]:
    """Non-negative per-view weights (summing to 1) fitted on the cache's validation NLL.

    Maximises the likelihood of the mixture ``sum_k w_k p_k`` of the selected views'
    probabilities by EM, with a symmetric Dirichlet prior worth ``prior * N`` pseudo-images
    pulling the weights toward the plain mean (``prior=0``: no pull). Temperature scaling is
    fitted afterwards on the weighted merge.

    Args:
        cache: per-view logits.
        selected: the views to weight, by name or row.
    """
    rows = _rows_of(cache, selected)
    prior = check_non_negative("prior", prior)
    max_iter = check_count("max_iter", max_iter)
    with SingleThread():
        weights = _fit_weights(cache.probs[rows], cache.labels, prior, max_iter)
    return [float(w) for w in weights]


def fit_class_view_weights(
    cache: ViewCache, selected: Sequence[str | int], *, l2: float = 1e-3, max_iter: int = 100
) -> list[list[float]]:
    """Class-by-view weights (ClassTTA): ``W[k][c] >= 0``, each class's weights summing to 1 over
    the selected views; the merge is ``p_c ~ sum_k W[k][c] p_kc`` renormalised over classes.

    Returns:
        ``K`` lists of ``C`` floats.
    """
    rows = _rows_of(cache, selected)
    l2 = check_non_negative("l2", l2)
    max_iter = check_count("max_iter", max_iter)
    with SingleThread():
        weights = _fit_class_weights(cache.probs[rows], cache.labels, l2, max_iter)
    return weights.tolist()


def compare_aggregation(
    sel_probs: torch.Tensor,
    y: torch.Tensor,
    *,
    prior: float,
    seed: int,
    accuracy_floor: float,
    class_weights: bool = True,
) -> dict[str, Any]:
    """Plain mean vs per-view weights (vs class-by-view weights), by 2-fold cross-validated NLL
    after temperature scaling fitted on the other fold. ``sel_probs (K, N, C)``.

    A learned merge is ``used`` only if it beats the plain mean's cross-validated NLL by more
    than 1e-4 and keeps full-data accuracy at least ``accuracy_floor``. ``class_used`` says the
    same of class-by-view weights, which must also beat the per-view weights when those are used;
    ``class_weights`` holds them (``K`` lists of ``C``, fitted on all the data), ready for
    :attr:`ttakit.Policy.weights`.
    """
    n = y.shape[0]
    cv = n >= 4
    totals = {"mean": 0.0, "weighted": 0.0, "class": 0.0}
    mean_probs = sel_probs.mean(0)
    if cv:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        folds = [perm[: n // 2], perm[n // 2 :]]
        for fit, held in ((folds[0], folds[1]), (folds[1], folds[0])):
            w = _fit_weights(sel_probs[:, fit], y[fit], prior, 500)
            totals["weighted"] += held_out_nll(merge_weighted(sel_probs, w), y, fit, held) / 2
            totals["mean"] += held_out_nll(mean_probs, y, fit, held) / 2
            if class_weights:
                wc = _fit_class_weights(sel_probs[:, fit], y[fit], 1e-3, 100)
                totals["class"] += held_out_nll(merge_class_weighted(sel_probs, wc), y, fit, held) / 2
    weights = _fit_weights(sel_probs, y, prior, 500)
    weighted_acc = float((merge_weighted(sel_probs, weights).argmax(1) == y).double().mean())
    mean_acc = float((mean_probs.argmax(1) == y).double().mean())
    used = cv and totals["weighted"] < totals["mean"] - 1e-4 and weighted_acc >= accuracy_floor - 1e-12
    out: dict[str, Any] = {
        "weights": [float(w) for w in weights],
        "cv_nll_weighted": totals["weighted"] if cv else None,
        "cv_nll_mean": totals["mean"] if cv else None,
        "accuracy_weighted": weighted_acc,
        "accuracy_mean": mean_acc,
        "used": bool(used),
        "cv_nll_class": None,
        "class_used": False,
    }
    if class_weights and cv:
        wc = _fit_class_weights(sel_probs, y, 1e-3, 100)
        class_acc = float((merge_class_weighted(sel_probs, wc).argmax(1) == y).double().mean())
        best_other = min(totals["mean"], totals["weighted"] if used else totals["mean"])
        out.update(
            {
                "cv_nll_class": totals["class"],
                "class_weights": wc.tolist(),
                "accuracy_class": class_acc,
                "class_used": bool(totals["class"] < best_other - 1e-4 and class_acc >= accuracy_floor - 1e-12),
            }
        )
    return out
