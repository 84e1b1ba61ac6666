"""Fusing the boxes K views found on one image, and how much the views agree on each fused box.

Views play the part of the "models" of the ``ensemble-boxes`` package, which does the fusion by
IoU (weighted boxes fusion, NMS, soft-NMS, non-maximum weighted) in its normalised ``[0, 1]``
coordinates. Matching by IoS (intersection over the smaller box, SAHI's metric for tiles, where a
box cut by a tile's edge lies inside the whole box) is not in ``ensemble-boxes``: :func:`ios_merge`
is a short greedy merge by IoS, fusing each cluster as WBF does.

Arrays here are NumPy: ``boxes (n, 4)`` xyxy, ``scores (n,)``, ``labels (n,)``, one set per view.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from .errors import InvalidInputError, unknown_name

MERGE_METHODS = ("wbf", "nms", "soft_nms", "nmw")
CONF_TYPES = ("avg", "max", "box_and_model_avg", "absent_model_aware_avg")
MATCH_METRICS = ("iou", "ios")
# Greedy IoS merging fuses clusters (WBF) or keeps their best box (NMS); soft-NMS and NMW are IoU methods.
IOS_METHODS = ("wbf", "nms")

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray]


def check_fusion_args(merge: object, iou_thr: object, skip_box_thr: object, conf_type: object, match: object) -> None:
    """Raise a one-line error for an unknown method, conf_type or match, or a threshold out of range."""
    if merge not in MERGE_METHODS:
        raise unknown_name("merge method", merge, MERGE_METHODS)
    if conf_type not in CONF_TYPES:
        raise unknown_name("conf_type", conf_type, CONF_TYPES)
    if match not in MATCH_METRICS:
        raise unknown_name("match", match, MATCH_METRICS)
    if match == "ios" and merge not in IOS_METHODS:
        raise InvalidInputError(
            f"match='ios' merges greedily by intersection over the smaller box with merge 'wbf' or 'nms', got "
            f"merge={merge!r}; use match='iou' for {merge!r}"
        )
    if not _is_number(iou_thr) or not 0 < iou_thr <= 1:
        raise InvalidInputError(f"iou_thr must be a number in (0, 1], got {iou_thr!r}")
    if not _is_number(skip_box_thr) or not 0 <= skip_box_thr < 1:
        raise InvalidInputError(f"skip_box_thr must be a number in [0, 1), got {skip_box_thr!r}")


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and bool(np.isfinite(x))


def _ensemble_boxes():
    try:
        import ensemble_boxes
    except ImportError:
        raise ImportError(
            'box fusion needs the ensemble-boxes package: pip install "ttakit[detection]"'
        ) from None
    return ensemble_boxes


# --------------------------------------------------------------------------- overlap


def overlap(a: np.ndarray, b: np.ndarray, metric: str) -> np.ndarray:
    """``(n, m)`` IoU or IoS (intersection over the smaller area) of boxes ``a (n, 4)`` and ``b (m, 4)``."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).prod(-1)[:, None]
    area_b = (b[:, 2:] - b[:, :2]).prod(-1)[None, :]
    denom = np.minimum(area_a, area_b) if metric == "ios" else area_a + area_b - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denom > 0, inter / np.where(denom > 0, denom, 1), 0.0)


# --------------------------------------------------------------------------- fusion


def fuse(
    boxes: Sequence[np.ndarray],
    scores: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    *,
    merge: str = "wbf",
    iou_thr: float = 0.55,
    skip_box_thr: float = 0.0,
    conf_type: str = "avg",
    weights: Sequence[float] | None = None,
    match: str = "iou",
    sigma: float = 0.5,
    soft_thr: float = 0.001,
) -> Arrays:
    """Fuse K views' boxes (normalised to ``[0, 1]``, positive area) into one set.

    Returns ``(boxes (M, 4), scores (M,), labels (M,))`` by decreasing score. ``weights`` (K) weigh
    the views as ``ensemble-boxes`` weighs models.
    """
    if sum(len(b) for b in boxes) == 0:
        return np.zeros((0, 4)), np.zeros(0), np.zeros(0)
    if match == "ios":
        return ios_merge(boxes, scores, labels, weights, iou_thr, skip_box_thr, conf_type, merge)
    eb = _ensemble_boxes()
    boxes, scores, labels = list(boxes), list(scores), list(labels)
    weights = None if weights is None else list(weights)
    if merge == "wbf":
        out = eb.weighted_boxes_fusion(
            boxes, scores, labels, weights=weights, iou_thr=iou_thr, skip_box_thr=skip_box_thr, conf_type=conf_type
        )
    elif merge == "nmw":
        out = eb.non_maximum_weighted(boxes, scores, labels, weights=weights, iou_thr=iou_thr, skip_box_thr=skip_box_thr)
    else:
        # ensemble-boxes' NMS has no score threshold: drop the low scores first, as the others do.
        kept = [s >= skip_box_thr for s in scores]
        boxes = [b[k] for b, k in zip(boxes, kept, strict=True)]
        scores = [s[k] for s, k in zip(scores, kept, strict=True)]
        labels = [lab[k] for lab, k in zip(labels, kept, strict=True)]
        if sum(len(b) for b in boxes) == 0:
            return np.zeros((0, 4)), np.zeros(0), np.zeros(0)
        if merge == "nms":
            out = eb.nms(boxes, scores, labels, iou_thr=iou_thr, weights=weights)
        else:
            out = eb.soft_nms(boxes, scores, labels, iou_thr=iou_thr, sigma=sigma, thresh=soft_thr, weights=weights)
    fused_boxes, fused_scores, fused_labels = (np.asarray(x, dtype=np.float64) for x in out)
    order = np.argsort(-fused_scores, kind="stable")
    return fused_boxes.reshape(-1, 4)[order], fused_scores[order], fused_labels[order]


def ios_merge(
    boxes: Sequence[np.ndarray],
    scores: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    weights: Sequence[float] | None,
    thr: float,
    skip_box_thr: float,
    conf_type: str,
    merge: str,
) -> Arrays:
    """Greedy merge by IoS: per label, boxes in decreasing (weighted) score join the cluster whose
    box overlaps them most if that IoS is ``>= thr``, else start one. ``merge="wbf"``: a cluster's
    box is the score-weighted mean of its boxes and its score follows ``conf_type`` as in
    ``ensemble-boxes``' WBF; ``merge="nms"``: the cluster keeps its first (best) box and score."""
    k = len(boxes)
    w = np.ones(k) if weights is None else np.asarray(weights, dtype=np.float64)
    all_boxes = np.concatenate([np.asarray(b, np.float64).reshape(-1, 4) for b in boxes])
    all_scores = np.concatenate([np.asarray(s, np.float64) * w[v] for v, s in enumerate(scores)])
    all_labels = np.concatenate([np.asarray(lab, np.float64) for lab in labels])
    view = np.concatenate([np.full(len(s), v) for v, s in enumerate(scores)])
    raw = np.concatenate([np.asarray(s, np.float64) for s in scores])
    keep = raw >= skip_box_thr
    out_boxes, out_scores, out_labels = [], [], []
    for label in np.unique(all_labels[keep]):
        idx = np.nonzero(keep & (all_labels == label))[0]
        idx = idx[np.argsort(-all_scores[idx], kind="stable")]
        members: list[list[int]] = []
        fused = np.zeros((0, 4))
        for i in idx:
            if len(members):
                ios = overlap(all_boxes[i : i + 1], fused, "ios")[0]
                best = int(np.argmax(ios))
                if ios[best] >= thr:
                    members[best].append(i)
                    if merge == "wbf":
                        m = members[best]
                        fused[best] = (all_scores[m, None] * all_boxes[m]).sum(0) / all_scores[m].sum()
                    continue
            members.append([i])
            fused = np.vstack([fused, all_boxes[i]])
        for box, m in zip(fused, members, strict=True):
            out_boxes.append(box)
            out_scores.append(all_scores[m[0]] if merge == "nms" else _wbf_conf(all_scores[m], view[m], w, conf_type))
            out_labels.append(label)
    if not out_boxes:
        return np.zeros((0, 4)), np.zeros(0), np.zeros(0)
    scores_arr = np.asarray(out_scores)
    order = np.argsort(-scores_arr, kind="stable")
    return np.asarray(out_boxes)[order], scores_arr[order], np.asarray(out_labels)[order]


def _wbf_conf(scores: np.ndarray, views: np.ndarray, weights: np.ndarray, conf_type: str) -> float:
    """A cluster's confidence as ``ensemble-boxes``' WBF computes it from its weighted ``scores``."""
    n = len(scores)
    if conf_type == "max":
        return float(scores.max() / weights.max())
    if conf_type == "box_and_model_avg":
        unique = np.unique(views)
        return float(scores.sum() / weights[views].sum() * weights[unique].sum() / weights.sum())
    if conf_type == "absent_model_aware_avg":
        absent = np.setdiff1d(np.arange(len(weights)), views)
        return float(scores.sum() / (weights[views].sum() + weights[absent].sum()))
    return float(scores.mean() * min(len(weights), n) / weights.sum())


# --------------------------------------------------------------------------- agreement


def view_agreement(
    fused_boxes: np.ndarray,
    fused_labels: np.ndarray,
    boxes: Sequence[np.ndarray],
    scores: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    thr: float,
    metric: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """How the K views agree on each fused box.

    Each view's best match to a fused box is its box of the same label that overlaps it most
    (``metric`` IoU or IoS) if that overlap is ``>= thr``. Returns ``n_views (M,)`` (views with a
    match), ``box_std (M, 4)`` and ``score_std (M,)``: the population standard deviation (ddof 0,
    so 0 for a box one view found) of the matched boxes' coordinates and scores, in the units given.
    """
    m = len(fused_boxes)
    matched_boxes = np.full((len(boxes), m, 4), np.nan)
    matched_scores = np.full((len(boxes), m), np.nan)
    for v, (b, s, lab) in enumerate(zip(boxes, scores, labels, strict=True)):
        if m == 0 or len(b) == 0:
            continue
        o = overlap(fused_boxes, b, metric)
        o[fused_labels[:, None] != lab[None, :]] = -1.0
        best = o.argmax(1)
        hit = o[np.arange(m), best] >= thr
        matched_boxes[v, hit] = b[best[hit]]
        matched_scores[v, hit] = s[best[hit]]
    found = ~np.isnan(matched_scores)
    n_views = found.sum(0)
    with warnings.catch_warnings():  # "Degrees of freedom <= 0" for fused boxes no view matches
        warnings.simplefilter("ignore", RuntimeWarning)
        box_std = np.nan_to_num(np.nanstd(matched_boxes, axis=0))
        score_std = np.nan_to_num(np.nanstd(matched_scores, axis=0))
    return n_views, box_std.reshape(m, 4), score_std

