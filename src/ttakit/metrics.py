"""Classification metrics and paired significance tests for a TTA lift.

Every metric takes probabilities ``probs: (N, C)`` (rows sum to 1) and integer
``labels: (N,)`` as torch tensors and returns plain Python floats, computed in float64.
Calibration follows the torchmetrics pattern of a function and a class that share one
helper: :func:`expected_calibration_error` and :class:`CalibrationError` both reduce the
per-bin sums built by ``_bin_sums``, so the class over batches equals the function on the
concatenated batches (:mod:`ttakit._calibration_metrics`).

Paired tests compare two predictors on the *same* images: ``correct_a: (N,)`` and
``correct_b: (N,)`` are boolean per-image correctness, e.g. without and with TTA (:mod:`ttakit._significance`).

This module is the public face: it holds the point metrics, :func:`summarize`, the uncertainty
and prediction-set metrics, and re-exports the calibration metrics and the paired tests; the
input checks they share live in :mod:`ttakit._metric_checks`.

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

import torch

from ._calibration_metrics import (
    CalibrationError,
    _bin_sums,
    _ece_from_sums,
    expected_calibration_error,
    reliability_bins,
)
from ._metric_checks import (
    _check_correct,
    _check_n_bins,
    _check_probs_labels,
    _check_scores,
    _check_sets,
)
from ._significance import BootstrapResult, McNemarResult, mcnemar_test, mean_std, paired_bootstrap
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


# --------------------------------------------------------------------------- all four at once


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


# --------------------------------------------------------------------------- uncertainty


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
