"""Conformal sets and uncertainty in a job: the calibration rows of a checkpoint, the extras tables."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..conformal import (
    ConformalCalibration,
    _check_method,
    calibrate,
    check_alpha,
    conformal_report,
    min_calibration_size,
    row_ids,
)
from ..errors import InvalidInputError


def conformal_split(
    meta: Any,
    data: str | None,
    data_dir: str | None,
    alpha: float | None,
    *,
    policies: Sequence[Any] = (),
    split: str | None = None,
    val: Any = None,
) -> Any:
    """The calibration data for ``--conformal ALPHA``: the rows of the checkpoint's validation split
    (or of ``val``, the validation rows given for a model that records no split) that nothing in
    ``policies`` was fitted on, checked up front (``alpha`` in ``(0, 1)``, enough
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
    from ..data.splits import dataset_sha256
    from ..policy import unused_validation_rows
    from ._eval_data import load_eval_data

    if val is None:
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

    ``evaluations``: the :class:`ttakit.jobs.evaluate.PolicyEvaluation` results of the run that
    scored these policies on ``dataset`` (``evaluate_policies(..., return_uncertainty=True)``);
    their probabilities and uncertainty are used as they are, so the test images go through
    the model once per view in all. Policies not among them are run here.

    Returns:
        ``{"uncertainty": rows, "conformal": rows, "table": str, "markdown": str}``.
    """
    from ..engine import TTAEngine
    from ..metrics import selective_report
    from ..report.tables import format_table, markdown_table

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
    from ..engine import TTAEngine

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
