"""Whether one predictor beats another on the same samples (McNemar's exact test, a paired bootstrap of the accuracy lift) and the mean and spread of repeated runs."""

from __future__ import annotations

import math
import numbers
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch

from ._metric_checks import _check_pair
from .errors import InvalidInputError

# McNemar switches from the exact binomial test to the chi-square approximation at this
# many discordant pairs.
_EXACT_BELOW = 50


@dataclass(frozen=True)
class McNemarResult:
    """McNemar's test on paired correctness.

    Attributes:
        n01: samples ``a`` got right and ``b`` got wrong.
        n10: samples ``a`` got wrong and ``b`` got right.
        statistic: ``min(n01, n10)`` for the exact test; the continuity-corrected
            chi-square ``(|n01 - n10| - 1)**2 / (n01 + n10)`` otherwise.
        p_value: two-sided p-value.
        method: ``"exact"`` (binomial, fewer than 50 discordant pairs) or ``"chi2"``.
    """

    n01: int
    n10: int
    statistic: float
    p_value: float
    method: Literal["exact", "chi2"]


def _log_binom_pmf(k: int, n: int) -> float:
    """``log(C(n, k) / 2**n)``."""
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) - n * math.log(2.0)


def mcnemar_test(correct_a: torch.Tensor, correct_b: torch.Tensor) -> McNemarResult:
    """McNemar's test of whether ``a`` and ``b`` differ in accuracy on the same samples.

    Only discordant pairs count. With fewer than 50 of them the exact two-sided binomial
    test is used (``p = 2 * P[Binomial(n01 + n10, 1/2) <= min(n01, n10)]``, capped at 1);
    otherwise the chi-square test with continuity correction on one degree of freedom.

    Args:
        correct_a: ``(N,)`` bool, whether predictor ``a`` was right on each sample.
        correct_b: ``(N,)`` bool, the same for predictor ``b`` on the same samples.

    Example:
        >>> a = torch.tensor([False] * 6 + [True] * 4)
        >>> round(mcnemar_test(a, torch.ones(10, dtype=torch.bool)).p_value, 6)
        0.03125
    """
    a, b = _check_pair(correct_a, correct_b)
    n01 = int((a & ~b).sum())
    n10 = int((~a & b).sum())
    n = n01 + n10
    if n < _EXACT_BELOW:
        k = min(n01, n10)
        terms = [_log_binom_pmf(i, n) for i in range(k + 1)]
        top = max(terms)
        log_tail = top + math.log(sum(math.exp(t - top) for t in terms))
        p = min(1.0, 2.0 * math.exp(log_tail))
        return McNemarResult(n01, n10, float(k), p, "exact")
    stat = (abs(n01 - n10) - 1) ** 2 / n
    return McNemarResult(n01, n10, float(stat), min(1.0, math.erfc(math.sqrt(stat / 2))), "chi2")


@dataclass(frozen=True)
class BootstrapResult:
    """Paired bootstrap of the accuracy difference ``b - a``.

    Attributes:
        difference: observed ``mean(correct_b) - mean(correct_a)``.
        ci_low, ci_high: percentile confidence interval of the difference.
        p_value: two-sided p-value for "no difference" (see :func:`paired_bootstrap`).
        n_resamples: bootstrap resamples drawn.
        confidence: level of the interval, e.g. 0.95.
    """

    difference: float
    ci_low: float
    ci_high: float
    p_value: float
    n_resamples: int
    confidence: float


def paired_bootstrap(
    correct_a: torch.Tensor,
    correct_b: torch.Tensor,
    n_resamples: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> BootstrapResult:
    """Paired bootstrap of the accuracy lift ``b - a`` on the same samples.

    Resamples the ``N`` pairs with replacement. The mean of ``d = b - a`` over a resample
    depends only on how many ``+1`` and ``-1`` pairs it holds, which are multinomial, so
    those two counts are drawn directly (two binomials per resample): the same
    distribution as resampling indices, at ``O(n_resamples)`` cost for any ``N``.
    The interval is the percentile interval; the p-value is the fraction of resamples
    whose deviation from the observed difference is at least as large as the observed
    difference itself (the bootstrap distribution shifted to the null), with add-one
    smoothing so it is never 0.

    Args:
        correct_a: ``(N,)`` bool, whether predictor ``a`` was right on each sample.
        correct_b: ``(N,)`` bool, the same for predictor ``b`` on the same samples.
        n_resamples: number of bootstrap resamples, at least 1.
        seed: seed of a private ``torch.Generator``; global RNG state is untouched.
        confidence: interval level in ``(0, 1)``.

    Example:
        >>> a = torch.tensor([True, False, True, False] * 25)
        >>> b = torch.tensor([True, True, True, False] * 25)
        >>> r = paired_bootstrap(a, b, seed=0)
        >>> r.difference, r.ci_low <= 0.25 <= r.ci_high
        (0.25, True)
    """
    a, b = _check_pair(correct_a, correct_b)
    _check_bootstrap_args(n_resamples, seed, confidence)
    n = a.shape[0]
    n_up = int((~a & b).sum())  # d = +1: b right, a wrong
    n_down = int((a & ~b).sum())  # d = -1
    observed = (n_up - n_down) / n

    r = int(n_resamples)
    diffs = _resampled_differences(n, n_up, n_down, r, int(seed))  # (R,)

    alpha = 1.0 - float(confidence)
    qs = torch.quantile(diffs, torch.tensor([alpha / 2, 1 - alpha / 2], dtype=torch.float64))
    # Tolerance so that float rounding in (up - down) / n does not flip ties.
    extreme = int(((diffs - observed).abs() >= abs(observed) - 1e-12).sum())
    p_value = min(1.0, (extreme + 1) / (r + 1))
    return BootstrapResult(
        difference=float(observed),
        ci_low=float(qs[0]),
        ci_high=float(qs[1]),
        p_value=float(p_value),
        n_resamples=r,
        confidence=float(confidence),
    )


def _check_bootstrap_args(n_resamples: object, seed: object, confidence: object) -> None:
    if (
        isinstance(n_resamples, bool)
        or not isinstance(n_resamples, numbers.Integral)
        or n_resamples < 1
    ):
        raise InvalidInputError(
            f"Expected argument `n_resamples` to be an integer larger than 0, but got {n_resamples!r}"
        )
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise InvalidInputError(f"Expected argument `seed` to be an integer, but got {seed!r}")
    if (
        isinstance(confidence, bool)
        or not isinstance(confidence, numbers.Real)
        or not 0 < confidence < 1
    ):
        raise InvalidInputError(
            f"Expected argument `confidence` to be a float in (0, 1), but got {confidence!r}"
        )


def _resampled_differences(n: int, n_up: int, n_down: int, r: int, seed: int) -> torch.Tensor:
    """``(r,)`` float64: the mean of ``d = b - a`` over ``r`` resamples of the ``n`` pairs, of which
    ``n_up`` have ``d = +1`` and ``n_down`` have ``d = -1``: the two counts of a resample are
    multinomial, drawn as two binomials (the second conditioned on the first)."""
    gen = torch.Generator().manual_seed(seed)
    up = torch.binomial(
        torch.full((r,), float(n), dtype=torch.float64),
        torch.full((r,), n_up / n, dtype=torch.float64),
        generator=gen,
    )
    rest = n - n_up
    q_down = n_down / rest if rest > 0 else 0.0
    down = torch.binomial(n - up, torch.full((r,), q_down, dtype=torch.float64), generator=gen)
    return (up - down) / n


def mean_std(values: Iterable[float] | torch.Tensor) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``) of repeated-run results.

    Args:
        values: one or more numbers (a sequence, or a tensor of any shape, flattened).

    Returns:
        ``(mean, std)``; ``std`` is 0.0 for a single value.

    Example:
        >>> mean_std([0.90, 0.92])
        (0.91, 0.014142135623730963)
    """
    if isinstance(values, torch.Tensor):
        data = [float(v) for v in values.detach().cpu().reshape(-1).tolist()]
    else:
        try:
            data = [float(v) for v in values]
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(
                f"Expected argument `values` to be a sequence of numbers, but got {values!r}"
            ) from exc
    if not data:
        raise InvalidInputError(
            "Expected argument `values` to hold at least one number, but it is empty"
        )
    mean = statistics.fmean(data)
    std = statistics.stdev(data) if len(data) > 1 else 0.0
    return float(mean), float(std)
