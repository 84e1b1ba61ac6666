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
    torch.Size([100, 4])
"""

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
    "calibrate_predictor",
    "check_alpha",
    "conformal_quantile",
    "conformal_report",
    "conformal_split",
    "evaluate_extras",
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


def conformal_split(
    meta: Any,
    data: str | None,
    data_dir: str | None,
    alpha: float | None,
    *,
    policies: Sequence[Any] = (),
    split: str | None = None,
) -> Any:
    """The calibration data for ``--conformal ALPHA``: the rows of the checkpoint's validation split
    that nothing in ``policies`` was fitted on, checked up front (``alpha`` in ``(0, 1)``, enough
    images for it). None when ``alpha`` is None.

    A policy fitted on validation rows (by ``ttakit search``: views, weights, gate, temperature,
    matrix) leaves only the rows its search never saw (``meta["validation_rows"]``; see
    :func:`ttakit.policy.unused_validation_rows`); policies with nothing fitted (``none``,
    ``hflip``) leave every row. With several policies the rows none of them saw calibrate all, so
    their sets compare on the same images. ``split``: the split the sets are scored on; ``"val"``
    is refused (calibrating and scoring the same rows proves nothing).

    Raises:
        InvalidInputError: ``split="val"``; no validation split; a policy fitted on labelled rows
            that records none left unseen; too few rows left for ``alpha``; each with the way out.
    """
    if alpha is None:
        return None
    alpha = check_alpha(alpha)
    if split == "val":
        raise InvalidInputError(
            f"--conformal {alpha:g} calibrates on the validation split, so it cannot score sets on it too "
            "(--split val); score them on the held-out test split (--split test, the default)"
        )
    from .data.splits import dataset_sha256
    from .experiment import load_eval_data
    from .policy import unused_validation_rows

    try:
        val = load_eval_data(meta, data, "val", data_dir)
    except InvalidInputError as err:
        raise InvalidInputError(
            f"--conformal {alpha:g} calibrates on the validation split held out at training time: {err}"
        ) from None
    n_val = len(val)
    rows: set[int] | None = None
    why = []
    digest = None
    for policy in policies:
        if digest is None and (policy.meta or {}).get("validation_rows"):
            digest = dataset_sha256(val)
        try:
            unused = unused_validation_rows(policy, n_val, digest)
        except InvalidInputError as err:
            raise InvalidInputError(f"--conformal {alpha:g}: {err}") from None
        if unused is not None:
            rows = set(unused) if rows is None else rows & set(unused)
            why.append(policy.name)
    if rows is not None:
        if not rows:
            raise InvalidInputError(
                f"--conformal {alpha:g}: policies {', '.join(repr(n) for n in why)} were fitted on different validation "
                "rows and leave no row that none of them saw; calibrate them in separate runs"
            )
        val = val.subset(sorted(rows), f"{val.name} (the {len(rows)} of {n_val} validation rows no policy was fitted on)")
    need = min_calibration_size(alpha)
    if len(val) < need:
        left = f"the {len(val)} of {n_val} validation rows the search did not use" if rows is not None else \
            f"the validation split has {len(val)} images"
        raise InvalidInputError(
            f"--conformal {alpha:g}: {left}, too few for alpha={alpha:g} (split conformal needs at least {need}: "
            "n >= 1/alpha - 1); use a larger alpha, retrain with a larger --val-fraction"
            + (", or search with a larger --conformal-holdout" if rows is not None else "")
        )
    return val


def _uncertainty_scores(merged: torch.Tensor, u: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """Per-image scores (higher = less sure) from merged probabilities ``(N, C)`` and the engine's
    uncertainty dict (:attr:`ttakit.engine.TTAOutput.uncertainty`)."""
    u = u or {}
    merged = merged.float().cpu()
    top = merged.argmax(1)
    scores = {"softmax 1 - max p": 1 - merged.max(1).values}
    names = {
        "predictive_entropy": "predictive entropy",
        "expected_entropy": "expected entropy",
        "mutual_information": "mutual information",
        "disagreement": "view disagreement",
    }
    for key, label in names.items():
        if key in u:
            scores[label] = u[key].float().cpu()
    if "std" in u:
        scores["std of top class"] = u["std"].float().cpu().gather(1, top[:, None]).squeeze(1)
    return scores


def evaluate_extras(
    model: Any,
    dataset: Any,
    policies: Sequence[Any],
    *,
    val: Any = None,
    alpha: float | None = None,
    method: str = "lac",
    uncertainty: bool = True,
    coverage: float = 0.9,
    max_batch: int = 256,
    progress: bool = True,
    evaluations: Sequence[Any] | None = None,
) -> dict[str, Any]:
    """Uncertainty and conformal reporting for ``ttakit evaluate``.

    For each policy, one engine run over ``dataset`` with ``return_uncertainty=True`` gives its
    predictions and per-image scores; :func:`ttakit.metrics.selective_report` rates each score
    as an error detector (AUROC against error, accuracy at ``coverage``), the plain softmax
    confidence first as the baseline. With ``alpha``, each policy's split-conformal sets are
    calibrated on ``val`` (from :func:`conformal_split`: rows no policy was fitted on) and scored on
    ``dataset``; randomized APS draws per test image from its identity (:func:`row_ids`).

    ``evaluations``: the :class:`ttakit.evaluate.PolicyEvaluation` results of the run that
    scored these policies on ``dataset`` (``evaluate_policies(..., return_uncertainty=True)``);
    their probabilities and uncertainty are used as they are, so the test images go through
    the model once per view in all. Policies not among them are run here.

    Returns:
        ``{"uncertainty": rows, "conformal": rows, "table": str, "markdown": str}``.
    """
    from .engine import TTAEngine
    from .metrics import selective_report
    from .report import format_table, markdown_table

    if alpha is not None:
        alpha = check_alpha(alpha)
        method = _check_method(method)
    labels = dataset.labels
    unc_rows: list[dict[str, Any]] = []
    test_probs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    done = {e.name: e for e in (evaluations or []) if e.probs is not None}
    for policy in policies:
        evaluated = done.get(policy.name)
        want_uncertainty = uncertainty and len(policy) > 1
        if evaluated is not None and (evaluated.uncertainty is not None or not want_uncertainty):
            probs, unc = evaluated.probs.float().cpu(), evaluated.uncertainty
        else:
            engine = TTAEngine(model, policy, max_batch=max_batch)
            out = engine.run(dataset.images, return_uncertainty=want_uncertainty)
            probs, unc = out.merged.float().cpu(), out.uncertainty
        test_probs[policy.name] = (probs, labels)
        if not uncertainty:
            continue
        correct = probs.argmax(1) == labels
        scores = _uncertainty_scores(probs, unc)
        if len(policy) == 1:  # plain inference: only the softmax confidence (the baseline)
            scores = {"softmax 1 - max p (baseline)": scores["softmax 1 - max p"]}
        for row in selective_report(scores, correct, coverage):
            unc_rows.append({"policy": policy.name, **row})
    cp_rows: list[dict[str, Any]] = []
    if alpha is not None:
        if val is None:
            raise InvalidInputError("conformal reporting needs the validation split (see conformal_split)")
        cal = {}
        for policy in policies:
            probs = TTAEngine(model, policy, max_batch=max_batch).run(val.images).merged.float().cpu()
            cal[policy.name] = (probs, val.labels)
        cp_rows = conformal_report(cal, test_probs, alpha, method, ids=row_ids(dataset))
        plain = next((r for r in cp_rows if r["policy"] == "none"), None)
        for row in cp_rows:
            if plain is not None and row is not plain and plain["mean_set_size"] > 0:
                row["size_vs_plain"] = row["mean_set_size"] / plain["mean_set_size"]

    unc_show = [
        {
            "policy": r["policy"],
            "score (higher = less sure)": r["score"],
            "AUROC vs error": "-" if r["auroc"] != r["auroc"] else f"{r['auroc']:.3f}",
            f"accuracy at {coverage:.0%} coverage %": f"{100 * r['accuracy_at_coverage']:.2f}",
        }
        for r in unc_rows
    ]
    cp_show = [
        {
            "policy": r["policy"],
            "method": r["method"].upper(),
            "target %": f"{100 * r['target_coverage']:.1f}",
            "coverage %": f"{100 * r['coverage']:.2f}",
            "mean set size": f"{r['mean_set_size']:.3f}",
            "vs plain": f"{r['size_vs_plain']:.3f}" if "size_vs_plain" in r else "",
            "singletons %": f"{100 * r['singletons']:.1f}",
        }
        for r in cp_rows
    ]
    tables, markdown = [], []
    if unc_show:
        title = "uncertainty: how well each score flags errors (AUROC; accuracy when abstaining on the least sure)"
        tables.append(format_table(unc_show, title=title))
        markdown += ["## Uncertainty", "", title + ".", "", markdown_table(unc_show), ""]
    if cp_show:
        unseen = " (rows no policy was fitted on)" if "no policy was fitted on" in (val.name or "") else ""
        title = (f"conformal sets ({method.upper()}, alpha={alpha:g}), calibrated on {len(val)} validation images{unseen}, "
                 f"scored on {len(dataset)}")
        tables.append(format_table(cp_show, title=title))
        markdown += ["## Conformal prediction sets", "", title + ".", "", markdown_table(cp_show), ""]
    return {"uncertainty": unc_rows, "conformal": cp_rows, "table": "\n\n".join(tables), "markdown": "\n".join(markdown)}


def calibrate_predictor(
    predictor: Any,
    policy: Any,
    alpha: float,
    method: str = "lac",
    *,
    data: str | None = None,
    data_dir: str | None = None,
    max_batch: int = 256,
    device: Any = None,
    amp: bool = False,
) -> ConformalCalibration:
    """``predict --conformal ALPHA``: calibrate sets for ``predictor`` under ``policy`` on the
    validation split its checkpoint held out (``predictor.meta``, a ttakit checkpoint): the rows
    ``policy`` was not fitted on (:func:`conformal_split`).

    Raises:
        InvalidInputError: ``alpha`` outside ``(0, 1)``; a model that is not a ttakit checkpoint
            (it records no validation split); a validation split too small for ``alpha``; a
            policy fitted on validation rows that leaves none unseen.
    """
    from .engine import TTAEngine

    alpha = check_alpha(alpha)
    method = _check_method(method)
    meta = getattr(predictor, "meta", None)
    if meta is None:
        raise InvalidInputError(
            f"--conformal {alpha:g} calibrates on the validation split a ttakit checkpoint records, but "
            f"{getattr(predictor, 'source', 'this model')} is not a ttakit checkpoint"
        )
    val = conformal_split(meta, data, data_dir, alpha, policies=[policy])
    engine = TTAEngine(predictor, policy, max_batch=max_batch, device=device, amp=amp)
    probs = engine.run(val.images).merged.float().cpu()
    return calibrate(probs, val.labels, alpha, method)


def format_set(mask: torch.Tensor, classes: Sequence[str]) -> str:
    """One image's set ``mask: (C,)`` bool as class names joined by ``|`` (empty set: ``""``)."""
    return "|".join(classes[c] for c in torch.nonzero(mask).flatten().tolist())
