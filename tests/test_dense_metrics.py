"""Dense metrics: mean IoU on constructed masks, COCO mAP through pycocotools on constructed boxes."""

from __future__ import annotations

import math

import pytest
import torch

from ttakit.dense_metrics import confusion_matrix, detection_map, mean_iou
from ttakit.errors import InvalidInputError

# ----------------------------------------------------------------------------- mean IoU


def test_mean_iou_by_hand():
    target = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 2]]])
    pred = torch.tensor([[[0, 1, 1, 1], [0, 0, 1, 1], [2, 2, 0, 2]]])
    result = mean_iou(pred, target, num_classes=4)
    # class 0: 3 hits, 4 true + 4 predicted - 3 = 5; class 1: 4 / 5; class 2: 3 / 4; class 3 absent
    assert result["iou"] == pytest.approx([3 / 5, 4 / 5, 3 / 4, None])
    assert result["iou"][3] is None
    assert result["miou"] == pytest.approx((3 / 5 + 4 / 5 + 3 / 4) / 3)
    assert result["pixel_accuracy"] == pytest.approx(10 / 12)


def test_mean_iou_perfect_and_disjoint():
    target = torch.randint(0, 5, (2, 8, 8), generator=torch.Generator().manual_seed(0))
    assert mean_iou(target, target, 5)["miou"] == 1.0
    assert mean_iou((target + 1) % 5, target, 5)["miou"] == 0.0


def test_mean_iou_takes_scores_and_ignores_pixels():
    target = torch.tensor([[[0, 1], [1, 255]]])
    scores = torch.zeros(1, 2, 2, 2)
    scores[0, 1] = torch.tensor([[0.0, 1.0], [1.0, 1.0]])  # class 1 everywhere but the corner
    result = mean_iou(scores, target, num_classes=2, ignore_index=255)
    assert result["miou"] == 1.0
    matrix = confusion_matrix(scores, target, 2, ignore_index=255)
    assert matrix.tolist() == [[1, 0], [0, 2]]


def test_mean_iou_refuses_out_of_range_classes_and_shapes():
    with pytest.raises(InvalidInputError, match=r"target must hold classes in \[0, 1\]"):
        mean_iou(torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), 3), num_classes=2)
    with pytest.raises(InvalidInputError, match="pred must hold class indices"):
        mean_iou(torch.zeros(1, 3, 3, dtype=torch.long), torch.zeros(1, 2, 2, dtype=torch.long), num_classes=2)


# ----------------------------------------------------------------------------- mAP


def _truth(*rows):
    return {"boxes": torch.tensor([r[:4] for r in rows], dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor([r[4] for r in rows], dtype=torch.long)}


def _pred(*rows):
    return {"boxes": torch.tensor([r[:4] for r in rows], dtype=torch.float32).reshape(-1, 4),
            "scores": torch.tensor([r[4] for r in rows], dtype=torch.float32),
            "labels": torch.tensor([r[5] for r in rows], dtype=torch.long)}


def test_perfect_predictions_score_one():
    targets = [_truth((10, 10, 30, 40, 0), (50, 50, 70, 60, 3)), _truth((5, 5, 25, 25, 3))]
    preds = [
        _pred((10, 10, 30, 40, 0.9, 0), (50, 50, 70, 60, 0.8, 3)),
        _pred((5, 5, 25, 25, 0.7, 3)),
    ]
    result = detection_map(preds, targets)
    assert result["map"] == pytest.approx(1.0) and result["map50"] == pytest.approx(1.0)
    assert (result["images"], result["objects"], result["detections"]) == (2, 3, 3)


def test_known_value_iou_thresholds():
    """One object, one detection of IoU 0.62: it matches at the thresholds .50, .55, .60 only,
    so mAP@[.5:.95] = 3/10 and mAP@.5 = 1."""
    # boxes [0, 0, 20, 20] and [x, 0, 20 + x, 20]: IoU = (20 - x) / (20 + x) = 0.62 at x = 7.6 / 1.62
    shift = 7.6 / 1.62
    result = detection_map([_pred((shift, 0, 20 + shift, 20, 0.9, 1))], [_truth((0, 0, 20, 20, 1))])
    assert result["map"] == pytest.approx(0.3) and result["map50"] == pytest.approx(1.0)


def test_known_value_false_positive_ranked_first():
    """Two objects; a false positive outscores the one true positive. Precision at recall 0.5
    is 1/2, so COCO's 101-point AP is 51 * 0.5 / 101 (the recall points 0, .01, ..., .50)."""
    targets = [_truth((0, 0, 10, 10, 2), (40, 40, 60, 60, 2))]
    preds = [_pred((80, 80, 90, 90, 0.9, 2), (0, 0, 10, 10, 0.8, 2))]
    result = detection_map(preds, targets)
    assert result["map"] == pytest.approx(51 * 0.5 / 101) and result["map50"] == pytest.approx(51 * 0.5 / 101)


def test_wrong_class_does_not_match():
    result = detection_map([_pred((0, 0, 10, 10, 0.9, 1))], [_truth((0, 0, 10, 10, 0))])
    assert result["map"] == 0.0


def test_empty_predictions_score_zero_and_no_objects_nan():
    targets = [_truth((0, 0, 10, 10, 0)), _truth()]
    empty = [_pred(), _pred()]
    assert detection_map(empty, targets)["map"] == 0.0
    assert math.isnan(detection_map([_pred((0, 0, 5, 5, 0.5, 0))], [_truth()])["map"])


def test_padded_detector_output_is_read_as_is():
    """A (B, N, 6) tensor with padding rows (score 0, label -1) scores as its real rows."""
    padded = torch.tensor([[[10.0, 10, 30, 40, 0.9, 0], [0, 0, 0, 0, 0, -1]], [[5.0, 5, 25, 25, 0.7, 3], [0, 0, 0, 0, 0, -1]]])
    targets = [_truth((10, 10, 30, 40, 0)), torch.tensor([[5.0, 5, 25, 25, 3]])]
    result = detection_map(padded, targets)
    assert result["map"] == pytest.approx(1.0) and result["detections"] == 2


def test_map_refuses_mismatched_inputs():
    with pytest.raises(InvalidInputError, match="same images"):
        detection_map([_pred()], [])
    with pytest.raises(InvalidInputError, match=r"\(N, 6\)"):
        detection_map([torch.zeros(2, 4)], [_truth()])
    with pytest.raises(InvalidInputError, match="must hold"):
        detection_map([{"boxes": torch.zeros(0, 4)}], [_truth()])
