"""Split-conformal prediction sets over class probabilities (plain or TTA).

A calibration split held out from training (ttakit's validation split) gives each image a
nonconformity score for its true label; the ``ceil((n + 1)(1 - alpha)) / n`` empirical
quantile of those scores, ``qhat``, turns any later prediction into a set of classes that
holds the true label with probability at least ``1 - alpha`` (Vovk et al. 2005; Angelopoulos &
Bates 2021, "A gentle introduction to conformal prediction"), provided calibration and test
images are exchangeable. Two scores:

* ``"lac"`` (least ambiguous set-valued classifier, Sadinle et al. 2019): ``1 - p[y]``; the set
  is every class with ``p >= 1 - qhat``. Smallest sets on average.
* ``"aps"`` (adaptive prediction sets, Romano et al. 2020): the probability mass of the classes
  ranked at or above ``y``; the set grows with the image's own uncertainty. Randomized by a
  seeded uniform draw by default (exact coverage, not over-coverage).

Sets are ``(N, C)`` bool masks; :func:`ttakit.metrics.set_coverage` and
:func:`ttakit.metrics.set_size` score them.

Example:
    >>> g = torch.Generator().manual_seed(0)
    >>> probs = torch.softmax(3 * torch.randn(200, 4, generator=g), 1)
    >>> labels = probs.argmax(1)
    >>> cal = calibrate(probs[:100], labels[:100], alpha=0.1)
    >>> cal.predict_sets(probs[100:]).shape
    torch.Size([100, 4])"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

from .errors import InvalidInputError, unknown_name
from .metrics import _check_probs_labels, set_coverage, set_size

__all__ = [
    "ConformalCalibration",
    "METHODS",
    "calibrate",
    "check_alpha",
    "conformal_quantile",
    "conformal_report",
    "format_set",
    "min_calibration_size",
    "nonconformity_scores",
    "row_ids",
]

METHODS = ("lac", "aps")
Method = Literal["lac", "aps"]


def check_alpha(alpha: object) -> float:
    """``alpha`` as a float in ``(0, 1)``, or :class:`InvalidInputError` naming it."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 < float(alpha) < 1:
        raise InvalidInputError(
            f"Expected argument `alpha` (the miscoverage rate, sets cover 1 - alpha) to be a number "
            f"strictly between 0 and 1, such as 0.1, but got {alpha!r}"
        )
    return float(alpha)


def _check_method(method: object) -> str:
    if not isinstance(method, str) or method.lower() not in METHODS:
        raise unknown_name("conformal method", method, METHODS)
    return method.lower()


def min_calibration_size(alpha: float) -> int:
    """The fewest calibration images for which the conformal quantile at ``alpha`` exists:
    ``ceil(1 / alpha - 1)`` (so that ``ceil((n + 1)(1 - alpha)) <= n``)."""
    alpha = check_alpha(alpha)
    return max(1, math.ceil(1.0 / alpha - 1.0 - 1e-9))


def _quantile_rank(n: int, alpha: float) -> int:
    # ceil((n + 1)(1 - alpha)) with a tolerance, so 0.9 * 10 is 9 and not 9.000000000000002 -> 10.
    return math.ceil((n + 1) * (1.0 - alpha) - 1e-9)


def conformal_quantile(scores: torch.Tensor, alpha: float) -> float:
    """The finite-sample conformal quantile of calibration ``scores`` ``(n,)``: the
    ``k``-th smallest score with ``k = ceil((n + 1)(1 - alpha))``.

    Raises:
        InvalidInputError: ``alpha`` outside ``(0, 1)``, or ``n`` too small for it
            (``k > n``: the quantile is undefined and no finite threshold guarantees coverage).

    Example:
        >>> conformal_quantile(torch.arange(1.0, 20.0), 0.1)  # n = 19, k = 18
        18.0
    """
    alpha = check_alpha(alpha)
    if not isinstance(scores, torch.Tensor) or scores.ndim != 1:
        raise InvalidInputError(
            f"Expected argument `scores` to be a (n,) tensor, but got "
            f"{tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__}"
        )
    n = int(scores.shape[0])
    k = _quantile_rank(n, alpha)
    if k > n:
        raise InvalidInputError(
            f"the calibration (validation) split has {n} images, too few for alpha={alpha:g}: "
            f"split conformal needs at least {min_calibration_size(alpha)} (n >= 1/alpha - 1); "
            "use a larger --val-fraction when training, or a larger alpha"
        )
    return float(torch.sort(scores.double()).values[k - 1])


def _uniform(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float64)


_MASK64 = (1 << 64) - 1


def _uniform_ids(ids: torch.Tensor, seed: int) -> torch.Tensor:
    """One uniform draw in ``[0, 1)`` per image identity ``ids`` ``(N,)`` (int64): SplitMix64 of
    ``(seed, id)``, so an image's draw depends on the image alone, never on its batch or order."""
    import numpy as np

    x = ids.detach().cpu().long().numpy().astype(np.int64).view(np.uint64)
    with np.errstate(over="ignore"):
        z = x ^ np.uint64((int(seed) * 0x9E3779B97F4A7C15) & _MASK64)
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return torch.from_numpy((z >> np.uint64(11)).astype(np.float64) / float(1 << 53))


def _check_ids(ids: object, n: int) -> torch.Tensor:
    if ids is None:
        return torch.arange(n, dtype=torch.long)
    if isinstance(ids, torch.Tensor):
        tensor = ids
    else:
        try:
            tensor = torch.as_tensor(list(ids))  # type: ignore[call-overload]
        except (TypeError, ValueError, RuntimeError):
            tensor = None
    if tensor is None or tensor.ndim != 1 or tensor.shape[0] != n or tensor.is_floating_point() or tensor.dtype == torch.bool:
        got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(ids).__name__
        raise InvalidInputError(
            f"Expected argument `ids` to be ({n},) integers, one identity per image (its row in the data set, "
            f"or a hash of its path), but got {got}"
        )
    return tensor.long()


def row_ids(dataset: Any) -> torch.Tensor:
    """Each row's identity ``(N,)`` for per-image random draws: a CRC-32 of its file name when the
    data set records files, else its row index in the split."""
    import zlib

    files = getattr(dataset, "files", None)
    if files is not None:
        return torch.tensor([zlib.crc32(str(f).encode("utf-8")) for f in files], dtype=torch.long)
    return torch.arange(len(dataset), dtype=torch.long)


def _aps_cumulative(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and class, the mass of the classes ranked at or above it: ``(N, C)``, and the
    class order used (descending probability, ties by index)."""
    order = torch.argsort(-p, dim=1, stable=True)
    cum_sorted = torch.cumsum(p.gather(1, order), dim=1)
    cum = torch.empty_like(p).scatter_(1, order, cum_sorted)
    return cum, order


def nonconformity_scores(
    probs: torch.Tensor,
    labels: torch.Tensor,
    method: Method = "lac",
    *,
    randomized: bool = True,
    seed: int = 0,
) -> torch.Tensor:
    """The score of each image's true label: ``(N,)`` float64, higher = less conforming.

    Args:
        probs: ``(N, C)`` class probabilities.
        labels: ``(N,)`` true class indices.
        method: ``"lac"`` (``1 - p[y]``) or ``"aps"`` (mass ranked at or above ``y``, minus
            ``u * p[y]`` with ``u ~ U(0, 1)`` seeded when ``randomized``).
    """
    method = _check_method(method)
    p, y = _check_probs_labels(probs, labels)
    if method == "lac":
        return 1.0 - p.gather(1, y[:, None]).squeeze(1)
    cum, _ = _aps_cumulative(p)
    score = cum.gather(1, y[:, None]).squeeze(1)
    if randomized:
        score = score - _uniform(p.shape[0], seed) * p.gather(1, y[:, None]).squeeze(1)
    return score


@dataclass(frozen=True)
class ConformalCalibration:
    """A calibrated split-conformal set predictor.

    Attributes:
        method: ``"lac"`` or ``"aps"``.
        alpha: target miscoverage; sets hold the label with probability >= ``1 - alpha``.
        qhat: the calibrated score threshold.
        n_calibration: images it was calibrated on.
        randomized: APS only: whether sets use the seeded uniform tie-breaking draw.
        seed: seed of that draw (calibration: a seeded stream over its rows; a predicted image:
            a draw from ``(seed + 1, its identity)``, see :meth:`predict_sets`).
    """

    method: str
    alpha: float
    qhat: float
    n_calibration: int
    randomized: bool = True
    seed: int = 0

    def predict_sets(self, probs: torch.Tensor, ids: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
        """Prediction sets ``(N, C)`` bool for probabilities ``probs`` ``(N, C)``.

        LAC: ``{c : 1 - p[c] <= qhat}``. APS: ``{c : mass ranked at or above c - u * p[c] <= qhat}``
        (``u = 0`` unless randomized). A set may be empty when ``qhat`` is small (the image
        is unlike anything in calibration at this ``alpha``); that counts as a miss.

        ``ids`` ``(N,)`` integers: each image's identity (its row in the data set, or a hash of its
        path). Randomized APS draws ``u`` from ``(seed + 1, id)``, so an image gets the same set in
        any batch, order, resume or shard. Default: the rows' positions in ``probs`` (right for one
        call over the whole data set; pass ``ids`` when predicting in batches).
        """
        if not isinstance(probs, torch.Tensor) or probs.ndim != 2:
            raise InvalidInputError(
                f"Expected argument `probs` to be a (N, C) tensor, but got "
                f"{tuple(probs.shape) if isinstance(probs, torch.Tensor) else type(probs).__name__}"
            )
        dummy = torch.zeros(probs.shape[0], dtype=torch.long)
        p, _ = _check_probs_labels(probs, dummy)
        image_ids = _check_ids(ids, p.shape[0])
        # A float tolerance keeps a calibration image's own score inside its set.
        q = self.qhat + 1e-12
        if self.method == "lac":
            return (1.0 - p) <= q
        cum, _ = _aps_cumulative(p)
        if self.randomized:
            cum = cum - _uniform_ids(image_ids, self.seed + 1)[:, None].to(p.dtype) * p
        return cum <= q

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def calibrate(
    probs: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    method: Method = "lac",
    *,
    randomized: bool = True,
    seed: int = 0,
) -> ConformalCalibration:
    """Calibrate split-conformal sets on held-out ``probs`` ``(n, C)`` and ``labels`` ``(n,)``.

    Raises:
        InvalidInputError: ``alpha`` outside ``(0, 1)``; fewer than ``1/alpha - 1`` images;
            an unknown ``method`` (``lac``, ``aps``); malformed probabilities or labels.
    """
    alpha = check_alpha(alpha)
    method = _check_method(method)
    scores = nonconformity_scores(probs, labels, method, randomized=randomized, seed=seed)
    qhat = conformal_quantile(scores, alpha)
    return ConformalCalibration(method, alpha, qhat, int(scores.shape[0]), bool(randomized), int(seed))


def conformal_report(
    cal: dict[str, tuple[torch.Tensor, torch.Tensor]],
    test: dict[str, tuple[torch.Tensor, torch.Tensor]],
    alpha: float,
    method: Method = "lac",
    *,
    seed: int = 0,
    ids: torch.Tensor | None = None,
) -> list[dict[str, Any]]:
    """Calibrate each predictor on its calibration probabilities and score its sets on test.

    Args:
        cal: name -> ``(probs (n, C), labels (n,))`` on the calibration (validation) split,
            e.g. ``{"none": plain, "hflip": tta}``.
        test: the same names -> ``(probs (N, C), labels (N,))`` on the test split.
        alpha: target miscoverage.
        method: ``"lac"`` or ``"aps"``.
        ids: ``(N,)`` the test images' identities (see :meth:`ConformalCalibration.predict_sets`).

    Returns:
        One row per name: ``policy``, ``method``, ``alpha``, ``target_coverage``, ``coverage``
        (empirical, on test), ``mean_set_size``, ``singletons`` (share of sets of size 1),
        ``empty`` (share of empty sets), ``qhat``, ``n_calibration``, ``n_test``.
    """
    alpha = check_alpha(alpha)
    method = _check_method(method)
    missing = [name for name in cal if name not in test]
    if missing:
        raise InvalidInputError(f"conformal_report: no test probabilities for {missing}")
    rows = []
    for name, (cal_probs, cal_labels) in cal.items():
        calibration = calibrate(cal_probs, cal_labels, alpha, method, seed=seed)
        test_probs, test_labels = test[name]
        sets = calibration.predict_sets(test_probs, ids)
        sizes = sets.sum(dim=1)
        rows.append(
            {
                "policy": name,
                "method": method,
                "alpha": alpha,
                "target_coverage": 1.0 - alpha,
                "coverage": set_coverage(sets, test_labels),
                "mean_set_size": set_size(sets),
                "singletons": float((sizes == 1).double().mean()),
                "empty": float((sizes == 0).double().mean()),
                "qhat": calibration.qhat,
                "n_calibration": calibration.n_calibration,
                "n_test": int(sets.shape[0]),
            }
        )
    return rows


# --------------------------------------------------------------------------- in `ttakit evaluate`


def format_set(mask: torch.Tensor, classes: Sequence[str]) -> str:
    """One image's set ``mask: (C,)`` bool as class names joined by ``|`` (empty set: ``""``)."""
    return "|".join(classes[c] for c in torch.nonzero(mask).flatten().tolist())
