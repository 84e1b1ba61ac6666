"""Calibration metrics: the expected calibration error, its reliability bins and the streaming :class:`CalibrationError`, which share one helper (per-bin sums)."""

from __future__ import annotations

import torch

from ._metric_checks import _check_n_bins, _check_probs_labels
from .errors import InvalidInputError


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
