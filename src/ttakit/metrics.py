"""Classification metrics and paired significance tests for a TTA lift.

Every metric takes probabilities ``probs: (N, C)`` (rows sum to 1) and integer
``labels: (N,)`` as torch tensors and returns plain Python floats, computed in float64.
Calibration follows the torchmetrics pattern of a function and a class that share one
helper: :func:`expected_calibration_error` and :class:`CalibrationError` both reduce the
per-bin sums built by ``_bin_sums``, so the class over batches equals the function on the
concatenated batches.

Paired tests compare two predictors on the *same* images: ``correct_a: (N,)`` and
``correct_b: (N,)`` are boolean per-image correctness, e.g. without and with TTA.

Example:
    >>> import torch
    >>> probs = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    >>> labels = torch.tensor([0, 0])
    >>> accuracy(probs, labels)
    0.5
    >>> round(brier_score(probs, labels), 4)
    0.65
"""

from __future__ import annotations

import math
import numbers
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch

from .errors import InvalidInputError

__all__ = [
    "BootstrapResult",
    "CalibrationError",
    "McNemarResult",
    "accuracy",
    "accuracy_at_coverage",
    "brier_score",
    "expected_calibration_error",
    "mcnemar_test",
    "mean_std",
    "nll",
    "paired_bootstrap",
    "reliability_bins",
    "selective_report",
    "set_coverage",
    "set_size",
    "summarize",
    "uncertainty_auroc",
]

# McNemar switches from the exact binomial test to the chi-square approximation at this
# many discordant pairs.
_EXACT_BELOW = 50


# --------------------------------------------------------------------------- validation


def _check_n_bins(n_bins: object) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, numbers.Integral) or n_bins < 1:
        raise InvalidInputError(
            f"Expected argument `n_bins` to be an integer larger than 0, but got {n_bins!r}"
        )
    return int(n_bins)


def _check_probs_labels(probs: object, labels: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate ``probs: (N, C)`` and ``labels: (N,)``; return them as float64 / int64."""
    if not isinstance(probs, torch.Tensor):
        raise InvalidInputError(
            f"Expected argument `probs` to be a torch.Tensor of shape (N, C), "
            f"but got {type(probs).__name__}"
        )
    if not isinstance(labels, torch.Tensor):
        raise InvalidInputError(
            f"Expected argument `labels` to be a torch.Tensor of shape (N,), "
            f"but got {type(labels).__name__}"
        )
    if probs.ndim != 2:
        raise InvalidInputError(
            f"Expected argument `probs` to have shape (N, C), but got shape {tuple(probs.shape)}"
        )
    if not probs.is_floating_point():
        raise InvalidInputError(
            f"Expected argument `probs` to be a floating-point tensor of probabilities, "
            f"but got dtype {probs.dtype}"
        )
    n, c = probs.shape
    if n == 0 or c == 0:
        raise InvalidInputError(
            f"Expected argument `probs` to have at least one sample and one class, "
            f"but got shape {tuple(probs.shape)}"
        )
    if labels.ndim != 1:
        raise InvalidInputError(
            f"Expected argument `labels` to have shape (N,), but got shape {tuple(labels.shape)}"
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise InvalidInputError(
            f"Expected argument `labels` to be an integer tensor of class indices, "
            f"but got dtype {labels.dtype}"
        )
    if labels.shape[0] != n:
        raise InvalidInputError(
            f"Expected argument `labels` to have the same length as `probs` ({n}), "
            f"but got length {labels.shape[0]}"
        )
    p = probs.detach().to(device="cpu", dtype=torch.float64)
    y = labels.detach().to(device="cpu", dtype=torch.int64)
    if not torch.isfinite(p).all():
        raise InvalidInputError(
            "Expected argument `probs` to be finite, but it contains NaN or inf"
        )
    lo, hi = float(p.min()), float(p.max())
    tol = max(1e-3, 10 * torch.finfo(probs.dtype).eps)
    if lo < -tol or hi > 1 + tol:
        raise InvalidInputError(
            f"Expected argument `probs` to hold probabilities in [0, 1], but got values in "
            f"[{lo:.4g}, {hi:.4g}]; apply softmax to logits first"
        )
    row_err = float((p.sum(dim=1) - 1).abs().max())
    if row_err > tol:
        raise InvalidInputError(
            f"Expected the rows of argument `probs` to sum to 1, but a row is off by "
            f"{row_err:.4g}; apply softmax to logits first"
        )
    ymin, ymax = int(y.min()), int(y.max())
    if ymin < 0 or ymax >= c:
        bad = ymin if ymin < 0 else ymax
        raise InvalidInputError(
            f"Expected argument `labels` to hold class indices in [0, {c - 1}], but got {bad}"
        )
    return p, y


def _check_correct(correct: object, name: str) -> torch.Tensor:
    """Validate a per-sample correctness vector ``(N,)`` of bools (or 0/1 integers)."""
    if not isinstance(correct, torch.Tensor):
        raise InvalidInputError(
            f"Expected argument `{name}` to be a bool torch.Tensor of shape (N,), "
            f"but got {type(correct).__name__}"
        )
    if correct.ndim != 1:
        raise InvalidInputError(
            f"Expected argument `{name}` to have shape (N,), but got shape {tuple(correct.shape)}"
        )
    if correct.shape[0] == 0:
        raise InvalidInputError(
            f"Expected argument `{name}` to have at least one sample, but it is empty"
        )
    if correct.dtype != torch.bool:
        if correct.is_floating_point() or correct.is_complex():
            raise InvalidInputError(
                f"Expected argument `{name}` to be a bool tensor, but got dtype {correct.dtype}"
            )
        if not ((correct == 0) | (correct == 1)).all():
            raise InvalidInputError(
                f"Expected argument `{name}` to be a bool tensor or hold only 0 and 1, "
                f"but got values {sorted(set(correct.unique().tolist()))[:5]}"
            )
        correct = correct != 0
    return correct.detach().cpu()


def _check_pair(correct_a: object, correct_b: object) -> tuple[torch.Tensor, torch.Tensor]:
    a = _check_correct(correct_a, "correct_a")
    b = _check_correct(correct_b, "correct_b")
    if a.shape[0] != b.shape[0]:
        raise InvalidInputError(
            f"Expected arguments `correct_a` and `correct_b` to have the same length (paired "
            f"samples), but got {a.shape[0]} and {b.shape[0]}"
        )
    return a, b


# --------------------------------------------------------------------------- point metrics


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy: the fraction of samples whose arg-max class is the label.

    Args:
        probs: ``(N, C)`` probabilities. Ties go to the lowest class index.
        labels: ``(N,)`` integer class indices in ``[0, C)``.

    Example:
        >>> accuracy(torch.tensor([[0.7, 0.3], [0.4, 0.6]]), torch.tensor([0, 0]))
        0.5
    """
    p, y = _check_probs_labels(probs, labels)
    return _accuracy(p, y)


def _accuracy(p: torch.Tensor, y: torch.Tensor) -> float:
    return float((p.argmax(dim=1) == y).double().mean())


def nll(probs: torch.Tensor, labels: torch.Tensor, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood ``-mean(log p[i, labels[i]])`` (natural log).

    Args:
        probs: ``(N, C)`` probabilities.
        labels: ``(N,)`` integer class indices in ``[0, C)``.
        eps: probabilities are clamped to at least ``eps`` so a confident mistake costs
            ``-log(eps)`` instead of infinity; must be in ``(0, 1)``.

    Example:
        >>> round(nll(torch.tensor([[0.5, 0.5]]), torch.tensor([1])), 4)
        0.6931
    """
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0 < eps < 1:
        raise InvalidInputError(f"Expected argument `eps` to be a float in (0, 1), but got {eps!r}")
    p, y = _check_probs_labels(probs, labels)
    return _nll(p, y, float(eps))


def _nll(p: torch.Tensor, y: torch.Tensor, eps: float) -> float:
    picked = p.gather(1, y[:, None]).squeeze(1)
    return float(-picked.clamp(min=eps).log().mean())


def brier_score(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Multi-class Brier score: mean over samples of ``sum_c (p[i, c] - onehot[i, c])**2``.

    Ranges from 0 (perfect, confident) to 2 (confidently wrong).

    Args:
        probs: ``(N, C)`` probabilities.
        labels: ``(N,)`` integer class indices in ``[0, C)``.
    """
    p, y = _check_probs_labels(probs, labels)
    return _brier(p, y)


def _brier(p: torch.Tensor, y: torch.Tensor) -> float:
    onehot = torch.nn.functional.one_hot(y, p.shape[1]).to(p.dtype)
    return float(((p - onehot) ** 2).sum(dim=1).mean())


# --------------------------------------------------------------------------- calibration


def _bin_sums(p: torch.Tensor, y: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Per-bin sums for top-label calibration; the helper shared by function and class.

    Bins are equal-width over ``[0, 1]``; bin ``m`` holds confidences in
    ``(m / n_bins, (m + 1) / n_bins]`` (bin 0 also holds exactly 0), as in Guo et al. 2017.

    Args:
        p: ``(N, C)`` validated float64 probabilities.
        y: ``(N,)`` validated int64 labels.

    Returns:
        ``(3, n_bins)`` float64: sum of confidences, number correct, number of samples.
    """
    conf, pred = p.max(dim=1)
    correct = (pred == y).to(torch.float64)
    inner = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64)[1:-1]
    idx = torch.bucketize(conf, inner, right=False)  # (lo, hi] intervals
    sums = torch.zeros(3, n_bins, dtype=torch.float64)
    sums[0].index_add_(0, idx, conf)
    sums[1].index_add_(0, idx, correct)
    sums[2].index_add_(0, idx, torch.ones_like(conf))
    return sums


def _bins_from_sums(sums: torch.Tensor) -> dict:
    n_bins = sums.shape[1]
    conf_sum, correct_sum, count = sums
    safe = count.clamp(min=1)
    return {
        "edges": torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64).tolist(),
        "confidence": (conf_sum / safe).tolist(),
        "accuracy": (correct_sum / safe).tolist(),
        "count": [int(c) for c in count.tolist()],
    }


def _ece_from_sums(sums: torch.Tensor) -> float:
    conf_sum, correct_sum, count = sums
    return float((correct_sum - conf_sum).abs().sum() / count.sum())


def reliability_bins(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> dict:
    """Top-label reliability statistics in ``n_bins`` equal-width confidence bins.

    The confidence of a sample is its largest probability; it is correct when that class
    is the label. Bin ``m`` holds confidences in ``(edges[m], edges[m + 1]]``.

    Args:
        probs: ``(N, C)`` probabilities.
        labels: ``(N,)`` integer class indices in ``[0, C)``.
        n_bins: number of bins, at least 1.

    Returns:
        A dict of plain lists: ``edges`` (``n_bins + 1`` floats from 0 to 1),
        ``confidence`` (mean confidence per bin), ``accuracy`` (fraction correct per bin)
        and ``count`` (samples per bin, ints). Empty bins report 0.0 for the means.

    Example:
        >>> bins = reliability_bins(torch.tensor([[0.9, 0.1]]), torch.tensor([0]), n_bins=2)
        >>> bins["count"], bins["accuracy"]
        ([0, 1], [0.0, 1.0])
    """
    n_bins = _check_n_bins(n_bins)
    p, y = _check_probs_labels(probs, labels)
    return _bins_from_sums(_bin_sums(p, y, n_bins))


def expected_calibration_error(
    probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15
) -> float:
    """Top-label expected calibration error with equal-width bins (L1, as Guo et al. 2017).

    ``ECE = sum_m (count_m / N) * |accuracy_m - confidence_m|`` over the bins of
    :func:`reliability_bins`.

    Args:
        probs: ``(N, C)`` probabilities.
        labels: ``(N,)`` integer class indices in ``[0, C)``.
        n_bins: number of bins, at least 1.
    """
    n_bins = _check_n_bins(n_bins)
    p, y = _check_probs_labels(probs, labels)
    return _ece_from_sums(_bin_sums(p, y, n_bins))


class CalibrationError:
    """Expected calibration error accumulated over batches.

    ``update`` adds a batch's per-bin sums; ``compute`` equals
    :func:`expected_calibration_error` on the concatenation of every batch since the last
    ``reset``.

    Example:
        >>> metric = CalibrationError(n_bins=10)
        >>> metric.update(torch.tensor([[0.8, 0.2]]), torch.tensor([0]))
        >>> metric.update(torch.tensor([[0.3, 0.7]]), torch.tensor([0]))
        >>> round(metric.compute(), 4)
        0.45
    """

    def __init__(self, n_bins: int = 15) -> None:
        self.n_bins = _check_n_bins(n_bins)
        self.reset()

    def reset(self) -> None:
        """Forget every batch seen so far."""
        self._sums = torch.zeros(3, self.n_bins, dtype=torch.float64)
        self._n_classes: int | None = None

    def update(self, probs: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch: ``probs: (B, C)``, ``labels: (B,)``; ``C`` must match earlier batches."""
        p, y = _check_probs_labels(probs, labels)
        if self._n_classes is not None and p.shape[1] != self._n_classes:
            raise InvalidInputError(
                f"Expected argument `probs` to have {self._n_classes} classes like the earlier "
                f"batches, but got shape {tuple(p.shape)}"
            )
        self._n_classes = p.shape[1]
        self._sums += _bin_sums(p, y, self.n_bins)

    @property
    def count(self) -> int:
        """Number of samples accumulated since the last reset."""
        return int(self._sums[2].sum())

    def compute(self) -> float:
        """The ECE over every accumulated sample."""
        if self.count == 0:
            raise InvalidInputError("CalibrationError.compute() called before any update()")
        return _ece_from_sums(self._sums)

    def bins(self) -> dict:
        """The accumulated reliability statistics, in the format of :func:`reliability_bins`."""
        return _bins_from_sums(self._sums)

    def __repr__(self) -> str:
        return f"CalibrationError(n_bins={self.n_bins}, count={self.count})"


def summarize(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> dict[str, float]:
    """Accuracy, NLL, ECE and Brier score in one pass of validation.

    Args:
        probs: ``(N, C)`` probabilities.
        labels: ``(N,)`` integer class indices in ``[0, C)``.
        n_bins: ECE bins.

    Returns:
        ``{"accuracy": ..., "nll": ..., "ece": ..., "brier": ...}`` as floats.
    """
    n_bins = _check_n_bins(n_bins)
    p, y = _check_probs_labels(probs, labels)
    return {
        "accuracy": _accuracy(p, y),
        "nll": _nll(p, y, 1e-12),
        "ece": _ece_from_sums(_bin_sums(p, y, n_bins)),
        "brier": _brier(p, y),
    }


# --------------------------------------------------------------------------- paired tests


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
    n = a.shape[0]
    n_up = int((~a & b).sum())  # d = +1: b right, a wrong
    n_down = int((a & ~b).sum())  # d = -1
    observed = (n_up - n_down) / n

    gen = torch.Generator().manual_seed(int(seed))
    r = int(n_resamples)
    up = torch.binomial(
        torch.full((r,), float(n), dtype=torch.float64),
        torch.full((r,), n_up / n, dtype=torch.float64),
        generator=gen,
    )
    rest = n - n_up
    q_down = n_down / rest if rest > 0 else 0.0
    down = torch.binomial(n - up, torch.full((r,), q_down, dtype=torch.float64), generator=gen)
    diffs = (up - down) / n  # (R,)

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


# --------------------------------------------------------------------------- repeats


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


# --------------------------------------------------------------------------- uncertainty


def _check_scores(scores: object, name: str = "scores") -> torch.Tensor:
    """Validate per-sample scores ``(N,)`` (higher = less sure); return them as float64."""
    if not isinstance(scores, torch.Tensor):
        raise InvalidInputError(
            f"Expected argument `{name}` to be a torch.Tensor of shape (N,), "
            f"but got {type(scores).__name__}"
        )
    if scores.ndim != 1 or scores.shape[0] == 0:
        raise InvalidInputError(
            f"Expected argument `{name}` to have shape (N,) with N >= 1, "
            f"but got shape {tuple(scores.shape)}"
        )
    s = scores.detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(s).all():
        raise InvalidInputError(f"Expected argument `{name}` to be finite, but it contains NaN or inf")
    return s


def _average_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks of ``values`` ``(N,)`` with ties given their average rank (float64)."""
    order = torch.argsort(values, stable=True)
    sorted_vals = values[order]
    n = values.shape[0]
    # Boundaries of runs of equal values in sorted order.
    new_run = torch.ones(n, dtype=torch.bool)
    new_run[1:] = sorted_vals[1:] != sorted_vals[:-1]
    run_id = torch.cumsum(new_run.long(), 0) - 1  # (N,) run index of each sorted position
    positions = torch.arange(1, n + 1, dtype=torch.float64)
    n_runs = int(run_id[-1]) + 1
    run_sum = torch.zeros(n_runs, dtype=torch.float64).index_add_(0, run_id, positions)
    run_len = torch.zeros(n_runs, dtype=torch.float64).index_add_(0, run_id, torch.ones(n, dtype=torch.float64))
    ranks = torch.empty(n, dtype=torch.float64)
    ranks[order] = (run_sum / run_len)[run_id]
    return ranks


def uncertainty_auroc(scores: torch.Tensor, errors: torch.Tensor) -> float:
    """AUROC of an uncertainty score as a detector of errors.

    The probability that a wrongly classified image scores higher (less sure) than a correctly
    classified one, ties counting one half: the Mann-Whitney U statistic over
    ``n_errors * n_correct``, equal to ``sklearn.metrics.roc_auc_score(errors, scores)``.
    0.5 is a score that knows nothing; 1.0 ranks every error above every correct image.

    Args:
        scores: ``(N,)`` uncertainty per image, higher meaning less sure (e.g. ``1 - max p``,
            predictive entropy, mutual information).
        errors: ``(N,)`` bool, True where the prediction was wrong.

    Returns:
        The AUROC, or NaN when every image is wrong or every image is right (undefined).

    Example:
        >>> uncertainty_auroc(torch.tensor([0.1, 0.9, 0.4, 0.2]), torch.tensor([False, True, True, False]))
        1.0
    """
    s = _check_scores(scores)
    e = _check_correct(errors, "errors")
    if e.shape[0] != s.shape[0]:
        raise InvalidInputError(
            f"Expected arguments `scores` and `errors` to have the same length, "
            f"but got {s.shape[0]} and {e.shape[0]}"
        )
    n_pos = int(e.sum())
    n_neg = int(e.shape[0]) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(s)
    u = float(ranks[e].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def accuracy_at_coverage(scores: torch.Tensor, correct: torch.Tensor, coverage: float = 0.9) -> float:
    """Accuracy on the ``coverage`` share of images a score is surest of (selective prediction).

    The ``ceil(coverage * N)`` images with the lowest ``scores`` are kept (ties broken by
    position, so the result is deterministic); the rest are abstained on.

    Args:
        scores: ``(N,)`` uncertainty per image, higher meaning less sure.
        correct: ``(N,)`` bool, True where the prediction was right.
        coverage: share of images answered, in ``(0, 1]``.

    Example:
        >>> accuracy_at_coverage(torch.tensor([0.1, 0.9, 0.2, 0.3]), torch.tensor([True, False, True, False]), 0.5)
        1.0
    """
    if isinstance(coverage, bool) or not isinstance(coverage, numbers.Real) or not 0 < coverage <= 1:
        raise InvalidInputError(f"Expected argument `coverage` to be a float in (0, 1], but got {coverage!r}")
    s = _check_scores(scores)
    c = _check_correct(correct, "correct")
    if c.shape[0] != s.shape[0]:
        raise InvalidInputError(
            f"Expected arguments `scores` and `correct` to have the same length, "
            f"but got {s.shape[0]} and {c.shape[0]}"
        )
    keep = max(1, math.ceil(float(coverage) * s.shape[0] - 1e-9))
    order = torch.argsort(s, stable=True)[:keep]
    return float(c[order].double().mean())


def selective_report(
    scores: dict[str, torch.Tensor], correct: torch.Tensor, coverage: float = 0.9
) -> list[dict[str, float | str]]:
    """One row per score: its AUROC against error and the accuracy at ``coverage``.

    Args:
        scores: name -> ``(N,)`` uncertainty (higher = less sure), in display order; put the
            plain softmax confidence first as the baseline.
        correct: ``(N,)`` bool per-image correctness of the prediction the scores describe.
        coverage: share of images answered for the selective accuracy.

    Returns:
        ``[{"score": name, "auroc": float, "accuracy_at_coverage": float, "coverage": float}, ...]``
    """
    if not isinstance(scores, dict) or not scores:
        raise InvalidInputError(
            f"Expected argument `scores` to be a non-empty dict of name -> (N,) tensor, but got {scores!r}"
        )
    c = _check_correct(correct, "correct")
    rows: list[dict[str, float | str]] = []
    for name, score in scores.items():
        rows.append(
            {
                "score": str(name),
                "auroc": uncertainty_auroc(score, ~c),
                "accuracy_at_coverage": accuracy_at_coverage(score, c, coverage),
                "coverage": float(coverage),
            }
        )
    return rows


# --------------------------------------------------------------------------- prediction sets


def _check_sets(sets: object) -> torch.Tensor:
    if not isinstance(sets, torch.Tensor) or sets.ndim != 2 or sets.dtype != torch.bool:
        shape = tuple(sets.shape) if isinstance(sets, torch.Tensor) else type(sets).__name__
        raise InvalidInputError(
            f"Expected argument `sets` to be a bool torch.Tensor of shape (N, C) (True = in the set), "
            f"but got {shape}"
        )
    if sets.shape[0] == 0:
        raise InvalidInputError("Expected argument `sets` to hold at least one sample, but it is empty")
    return sets.detach().cpu()


def set_coverage(sets: torch.Tensor, labels: torch.Tensor) -> float:
    """Empirical coverage of prediction sets: the share of images whose label is in their set.

    Args:
        sets: ``(N, C)`` bool, True where class ``c`` is in image ``i``'s set.
        labels: ``(N,)`` integer class indices.

    Example:
        >>> set_coverage(torch.tensor([[True, False], [True, True]]), torch.tensor([1, 1]))
        0.5
    """
    m = _check_sets(sets)
    if not isinstance(labels, torch.Tensor) or labels.ndim != 1 or labels.shape[0] != m.shape[0]:
        raise InvalidInputError(
            f"Expected argument `labels` to be a (N,) tensor with N = {m.shape[0]}, but got "
            f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}"
        )
    y = labels.detach().cpu().long()
    if int(y.min()) < 0 or int(y.max()) >= m.shape[1]:
        raise InvalidInputError(
            f"Expected argument `labels` to hold class indices in [0, {m.shape[1] - 1}], "
            f"but got values in [{int(y.min())}, {int(y.max())}]"
        )
    return float(m.gather(1, y[:, None]).double().mean())


def set_size(sets: torch.Tensor) -> float:
    """Mean number of classes per prediction set ``sets: (N, C)`` bool.

    Example:
        >>> set_size(torch.tensor([[True, False], [True, True]]))
        1.5
    """
    return float(_check_sets(sets).sum(dim=1).double().mean())
