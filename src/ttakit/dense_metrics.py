"""Metrics for dense predictions: mean IoU for segmentation, COCO mAP for detection.

Tensors in, numbers out. :func:`detection_map` does not re-implement mAP: it builds the ground
truth and the results in memory and runs pycocotools' ``COCOeval`` (the reference every
published detector reports), so its numbers are COCO's. pycocotools is an optional dependency
(``pip install "ttakit[detection]"``), imported only when mAP is asked for.

Example:
    >>> pred = torch.tensor([[0, 1], [1, 1]]); target = torch.tensor([[0, 1], [0, 1]])
    >>> round(mean_iou(pred, target, num_classes=2)["miou"], 4)
    0.5833
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .errors import InvalidInputError

__all__ = ["confusion_matrix", "mean_iou", "detection_map"]

Detections = torch.Tensor | Sequence[torch.Tensor | Mapping[str, torch.Tensor]]


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int | None = None
) -> torch.Tensor:
    """Pixel counts ``(num_classes, num_classes)`` int64: row = true class, column = predicted.

    Args:
        pred: ``(B, H, W)`` (or any shape) class indices, or ``(B, num_classes, H, W)`` scores
            (the arg-max over dim 1 is taken).
        target: class indices of ``pred``'s index shape.
        ignore_index: target value whose pixels are left out.
    """
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise InvalidInputError(f"num_classes must be a positive integer, got {num_classes!r}")
    if not isinstance(pred, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise InvalidInputError("pred and target must be tensors")
    if pred.is_floating_point() and pred.ndim == target.ndim + 1 and pred.shape[1] == num_classes:
        pred = pred.argmax(dim=1)
    if pred.shape != target.shape:
        raise InvalidInputError(
            f"pred must hold class indices of target's shape {tuple(target.shape)} (or scores "
            f"(B, {num_classes}, ...)), got {tuple(pred.shape)}"
        )
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    if ignore_index is not None:
        keep = target != ignore_index
        pred, target = pred[keep], target[keep]
    for name, values in (("pred", pred), ("target", target)):
        if values.numel() and (int(values.min()) < 0 or int(values.max()) >= num_classes):
            raise InvalidInputError(
                f"{name} must hold classes in [0, {num_classes - 1}], got values in "
                f"[{int(values.min())}, {int(values.max())}]"
            )
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).cpu()


def mean_iou(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int | None = None
) -> dict[str, Any]:
    """Intersection over union per class, and their mean over the classes present.

    Args:
        pred: ``(B, H, W)`` class indices, or ``(B, num_classes, H, W)`` scores.
        target: ``(B, H, W)`` class indices.
        num_classes: classes counted (the background included, when it is a class).
        ignore_index: target value whose pixels are left out.

    Returns:
        ``{"miou": float, "iou": [float | None] * num_classes, "pixel_accuracy": float}``:
        a class that is in neither ``pred`` nor ``target`` has IoU None and is left out of the
        mean (its IoU is 0/0); ``miou`` is NaN when no pixel is counted.

    Example:
        >>> t = torch.tensor([[0, 0, 1, 1]])
        >>> r = mean_iou(torch.tensor([[0, 1, 1, 1]]), t, num_classes=3)
        >>> r["iou"], round(r["miou"], 4)
        ([0.5, 0.6666666666666666, None], 0.5833)
    """
    matrix = confusion_matrix(pred, target, num_classes, ignore_index).double()
    hits = matrix.diag()
    union = matrix.sum(0) + matrix.sum(1) - hits
    ious = [float(h / u) if u > 0 else None for h, u in zip(hits.tolist(), union.tolist(), strict=True)]
    present = [v for v in ious if v is not None]
    total = float(matrix.sum())
    return {
        "miou": sum(present) / len(present) if present else math.nan,
        "iou": ious,
        "pixel_accuracy": float(hits.sum()) / total if total else math.nan,
    }


def _image_rows(item: torch.Tensor | Mapping[str, torch.Tensor], index: int, with_scores: bool) -> tuple[list, list, list]:
    """One image's ``(boxes xyxy, scores, labels)`` as lists, from a mapping or an ``(N, 6)`` /
    ``(N, 5)`` tensor (``x1, y1, x2, y2, [score,] label``); padding rows (label < 0, or score
    <= 0 for predictions) are dropped."""
    if isinstance(item, Mapping):
        if "boxes" not in item or "labels" not in item or (with_scores and "scores" not in item):
            keys = '"boxes", "scores", "labels"' if with_scores else '"boxes", "labels"'
            raise InvalidInputError(f"image {index}: a mapping must hold {keys}, got keys {sorted(item)}")
        boxes = torch.as_tensor(item["boxes"], dtype=torch.float64).reshape(-1, 4)
        labels = torch.as_tensor(item["labels"]).reshape(-1).long()
        scores = (
            torch.as_tensor(item["scores"], dtype=torch.float64).reshape(-1)
            if with_scores else torch.ones(len(labels), dtype=torch.float64)
        )
    elif isinstance(item, torch.Tensor):
        width = 6 if with_scores else 5
        if item.ndim != 2 or item.shape[1] != width:
            form = "x1, y1, x2, y2, score, label" if with_scores else "x1, y1, x2, y2, label"
            raise InvalidInputError(f"image {index}: expected a (N, {width}) tensor of {form}, got {tuple(item.shape)}")
        item = item.detach().double().cpu()
        boxes, labels = item[:, :4], item[:, -1].round().long()
        scores = item[:, 4] if with_scores else torch.ones(len(labels), dtype=torch.float64)
    else:
        raise InvalidInputError(f"image {index}: expected a mapping or a tensor, got {type(item).__name__}")
    if not (len(boxes) == len(labels) == len(scores)):
        raise InvalidInputError(
            f"image {index}: boxes, scores and labels differ in length ({len(boxes)}, {len(scores)}, {len(labels)})"
        )
    keep = (labels >= 0) & (scores > 0) if with_scores else labels >= 0
    boxes, scores, labels = boxes.cpu()[keep], scores.cpu()[keep], labels.cpu()[keep]
    if not bool(torch.isfinite(boxes).all()) or not bool(torch.isfinite(scores).all()):
        raise InvalidInputError(f"image {index}: boxes and scores must be finite")
    return boxes.tolist(), scores.tolist(), labels.tolist()


def _per_image(name: str, value: Detections) -> list:
    if isinstance(value, torch.Tensor):
        if value.ndim != 3:
            raise InvalidInputError(f"{name} as one tensor must be (B, N, 6 or 5), got {tuple(value.shape)}")
        return list(value)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise InvalidInputError(f"{name} must be a sequence with one entry per image, got {type(value).__name__}")
    return list(value)


def _coco():
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise InvalidInputError('detection mAP needs pycocotools: pip install "ttakit[detection]"') from None
    return COCO, COCOeval


def detection_map(predictions: Detections, targets: Detections) -> dict[str, float]:
    """COCO mAP@[.5:.95] and mAP@.5 of ``predictions`` against ``targets``, by pycocotools.

    Args:
        predictions: one entry per image: ``{"boxes": (N, 4), "scores": (N,), "labels": (N,)}``
            or an ``(N, 6)`` tensor of ``x1, y1, x2, y2, score, label`` (a detector's padded
            ``(B, N, 6)`` output as is: rows with label < 0 or score <= 0 are padding).
        targets: one entry per image: ``{"boxes": (M, 4), "labels": (M,)}`` or an ``(M, 5)``
            tensor of ``x1, y1, x2, y2, label``. In both, boxes are ``x1, y1, x2, y2`` in
            pixels and labels are class indices.

    Returns:
        ``{"map": mAP@[.5:.95], "map50": mAP@.5, "map75": mAP@.75, "images": n, "detections": d,
        "objects": m}`` (COCO's 101-point interpolated AP, up to 100 detections per image,
        averaged over the classes that have objects). No predictions at all scores 0; no
        objects at all gives NaN (COCO's -1: nothing to find).

    Example:
        >>> t = [{"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([1])}]
        >>> p = [{"boxes": torch.tensor([[0.0, 0, 10, 10]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([1])}]
        >>> round(detection_map(p, t)["map"], 6)
        1.0
    """
    preds, truths = _per_image("predictions", predictions), _per_image("targets", targets)
    if len(preds) != len(truths):
        raise InvalidInputError(f"predictions and targets must cover the same images: {len(preds)} vs {len(truths)}")
    COCO, COCOeval = _coco()
    images, annotations, results, categories = [], [], [], set()
    for i, (pred, truth) in enumerate(zip(preds, truths, strict=True)):
        images.append({"id": i + 1})
        boxes, _, labels = _image_rows(truth, i, with_scores=False)
        for box, label in zip(boxes, labels, strict=True):
            w, h = box[2] - box[0], box[3] - box[1]
            annotations.append({
                "id": len(annotations) + 1, "image_id": i + 1, "category_id": label + 1,
                "bbox": [box[0], box[1], w, h], "area": w * h, "iscrowd": 0,
            })
            categories.add(label + 1)
        boxes, scores, labels = _image_rows(pred, i, with_scores=True)
        for box, score, label in zip(boxes, scores, labels, strict=True):
            results.append({
                "image_id": i + 1, "category_id": label + 1,
                "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "score": score,
            })
            categories.add(label + 1)
    counts = {"images": len(images), "detections": len(results), "objects": len(annotations)}
    if not annotations:
        return {"map": math.nan, "map50": math.nan, "map75": math.nan, **counts}
    if not results:
        return {"map": 0.0, "map50": 0.0, "map75": 0.0, **counts}
    with contextlib.redirect_stdout(io.StringIO()):  # COCOeval prints its progress and table
        truth_api = COCO()
        truth_api.dataset = {
            "images": images, "annotations": annotations,
            "categories": [{"id": c, "name": str(c)} for c in sorted(categories)],
        }
        truth_api.createIndex()
        result_api = truth_api.loadRes(results)
        evaluator = COCOeval(truth_api, result_api, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = evaluator.stats
    return {"map": float(stats[0]), "map50": float(stats[1]), "map75": float(stats[2]), **counts}
