"""ttakit._box_fusion: overlap metrics, fusion through ensemble-boxes, the greedy IoS merge, and how
views agree on fused boxes (n_views, spreads), each checked by hand or against ensemble-boxes."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from ensemble_boxes import weighted_boxes_fusion
from hypothesis import given, settings
from hypothesis import strategies as st

from ttakit._box_fusion import (
    CONF_TYPES,
    check_fusion_args,
    fuse,
    ios_merge,
    overlap,
    view_agreement,
)
from ttakit.errors import InvalidInputError, UnknownNameError


def arr(*rows):
    return np.asarray(rows, dtype=np.float64)


def test_overlap_by_hand():
    a = arr([0.0, 0.0, 0.4, 0.4])
    b = arr([0.2, 0.2, 0.4, 0.4], [0.5, 0.5, 0.6, 0.6], [0.0, 0.0, 0.4, 0.4])
    # intersection 0.04; areas 0.16 and 0.04: IoU 0.04 / 0.16, IoS 0.04 / 0.04
    assert overlap(a, b, "iou")[0].tolist() == pytest.approx([0.25, 0.0, 1.0])
    assert overlap(a, b, "ios")[0].tolist() == pytest.approx([1.0, 0.0, 1.0])
    assert overlap(np.zeros((0, 4)), b, "iou").shape == (0, 3)


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.tuples(st.floats(0, 0.5), st.floats(0, 0.5), st.floats(0.05, 0.5), st.floats(0.05, 0.5)), min_size=1, max_size=6)
)
def test_ios_is_at_least_iou_and_symmetric(raw):
    boxes = np.asarray([[x, y, x + w, y + h] for x, y, w, h in raw])
    iou, ios = overlap(boxes, boxes, "iou"), overlap(boxes, boxes, "ios")
    assert np.all(ios >= iou - 1e-12)
    assert np.allclose(iou, iou.T) and np.allclose(ios, ios.T)
    assert np.allclose(np.diag(iou), 1.0) and np.allclose(np.diag(ios), 1.0)


def three_views():
    boxes = [arr([0.1, 0.1, 0.3, 0.3], [0.6, 0.6, 0.9, 0.8]), arr([0.12, 0.1, 0.32, 0.3]), arr([0.6, 0.62, 0.9, 0.8])]
    scores = [np.array([0.9, 0.5]), np.array([0.7]), np.array([0.6])]
    labels = [np.array([1.0, 2.0]), np.array([1.0]), np.array([2.0])]
    return boxes, scores, labels


@pytest.mark.parametrize("conf_type", CONF_TYPES)
def test_wbf_is_ensemble_boxes(conf_type):
    boxes, scores, labels = three_views()
    ours = fuse(boxes, scores, labels, merge="wbf", iou_thr=0.5, conf_type=conf_type, weights=[2, 1, 1])
    theirs = weighted_boxes_fusion(boxes, scores, labels, weights=[2, 1, 1], iou_thr=0.5, conf_type=conf_type)
    order = np.argsort(-theirs[1], kind="stable")
    for mine, ref in zip(ours, theirs, strict=True):
        assert np.allclose(mine, np.asarray(ref)[order], atol=1e-6)


@pytest.mark.parametrize("merge", ["wbf", "nms", "soft_nms", "nmw"])
def test_every_method_keeps_one_box_per_object_and_sorts_by_score(merge):
    boxes, scores, labels = three_views()
    out_boxes, out_scores, out_labels = fuse(boxes, scores, labels, merge=merge, iou_thr=0.5)
    assert np.all(np.diff(out_scores) <= 0)
    if merge != "soft_nms":  # soft-NMS lowers the scores of overlapping boxes instead of dropping them
        assert sorted(out_labels.tolist()) == [1.0, 2.0]
    assert out_boxes.shape == (len(out_scores), 4)


def test_skip_box_thr_drops_low_scores_for_nms_too():
    boxes, scores, labels = three_views()
    for merge in ("wbf", "nms", "soft_nms", "nmw"):
        _, out_scores, out_labels = fuse(boxes, scores, labels, merge=merge, iou_thr=0.5, skip_box_thr=0.65)
        assert 2.0 not in out_labels.tolist(), merge  # both label-2 boxes score below 0.65


def test_no_boxes_in_any_view():
    empty = [np.zeros((0, 4))] * 3
    for merge in ("wbf", "nms", "soft_nms", "nmw"):
        boxes, scores, labels = fuse(empty, [np.zeros(0)] * 3, [np.zeros(0)] * 3, merge=merge)
        assert boxes.shape == (0, 4) and scores.shape == (0,) and labels.shape == (0,)


def test_ios_merge_joins_a_cut_box_to_the_whole_one():
    whole, cut = arr([0.2, 0.2, 0.6, 0.6]), arr([0.2, 0.2, 0.3, 0.6])  # the cut box lies inside the whole
    boxes, scores, labels = [whole, cut], [np.array([0.8]), np.array([0.4])], [np.array([0.0]), np.array([0.0])]
    assert len(fuse(boxes, scores, labels, merge="wbf", iou_thr=0.5)[0]) == 2  # IoU 0.25: two objects
    fused, fused_scores, _ = fuse(boxes, scores, labels, merge="wbf", iou_thr=0.5, match="ios")
    # one cluster, score-weighted corners: x2 = (0.8 * 0.6 + 0.4 * 0.3) / 1.2; conf avg of 2 of 2 views
    assert fused.tolist() == [pytest.approx([0.2, 0.2, (0.8 * 0.6 + 0.4 * 0.3) / 1.2, 0.6])]
    assert fused_scores.tolist() == pytest.approx([0.6])
    kept, kept_scores, _ = fuse(boxes, scores, labels, merge="nms", iou_thr=0.5, match="ios")
    assert kept.tolist() == [pytest.approx(whole[0].tolist())] and kept_scores.tolist() == pytest.approx([0.8])


def test_ios_merge_keeps_labels_apart_and_respects_the_threshold():
    a, b = arr([0.1, 0.1, 0.5, 0.5]), arr([0.3, 0.1, 0.7, 0.5])  # IoS 0.5
    scores = [np.array([0.9]), np.array([0.8])]
    same, other = [np.array([1.0]), np.array([1.0])], [np.array([1.0]), np.array([2.0])]
    assert len(ios_merge([a, b], scores, same, None, 0.5, 0.0, "avg", "wbf")[0]) == 1  # >= thr joins
    assert len(ios_merge([a, b], scores, same, None, 0.51, 0.0, "avg", "wbf")[0]) == 2
    assert len(ios_merge([a, b], scores, other, None, 0.1, 0.0, "avg", "wbf")[0]) == 2


@pytest.mark.parametrize("conf_type", CONF_TYPES)
def test_ios_scores_follow_wbf_when_the_clusters_agree(conf_type):
    # Identical boxes cluster the same way by IoU and IoS: the scores must equal ensemble-boxes' WBF.
    box = arr([0.2, 0.3, 0.5, 0.6])
    boxes = [box, box, np.zeros((0, 4)), box]
    scores = [np.array([0.9]), np.array([0.6]), np.zeros(0), np.array([0.3])]
    labels = [np.array([4.0]), np.array([4.0]), np.zeros(0), np.array([4.0])]
    weights = [1.0, 2.0, 1.0, 0.5]
    ours = ios_merge(boxes, scores, labels, weights, 0.5, 0.0, conf_type, "wbf")
    theirs = weighted_boxes_fusion(boxes, scores, labels, weights=weights, iou_thr=0.5, conf_type=conf_type)
    assert np.allclose(ours[0], theirs[0], atol=1e-6) and np.allclose(ours[1], theirs[1], atol=1e-6)


def test_view_agreement_on_a_constructed_case():
    fused = arr([10.0, 10.0, 20.0, 20.0], [50.0, 50.0, 60.0, 60.0])
    fused_labels = np.array([1.0, 1.0])
    boxes = [
        arr([10.0, 10.0, 20.0, 20.0], [50.0, 50.0, 60.0, 60.0]),
        arr([12.0, 10.0, 22.0, 20.0]),  # matches the first only
        arr([10.0, 10.0, 20.0, 20.0]),  # label 2: matches nothing
        arr([8.0, 10.0, 18.0, 20.0], [30.0, 30.0, 31.0, 31.0]),  # the second box overlaps nothing
    ]
    scores = [np.array([0.9, 0.5]), np.array([0.6]), np.array([0.99]), np.array([0.3, 0.8])]
    labels = [np.array([1.0, 1.0]), np.array([1.0]), np.array([2.0]), np.array([1.0, 1.0])]
    n_views, box_std, score_std = view_agreement(fused, fused_labels, boxes, scores, labels, 0.5, "iou")
    assert n_views.tolist() == [3, 1]
    assert box_std[0].tolist() == pytest.approx([np.std([10, 12, 8]), 0.0, np.std([20, 22, 18]), 0.0])
    assert score_std.tolist() == pytest.approx([np.std([0.9, 0.6, 0.3]), 0.0])
    assert box_std[1].tolist() == [0.0] * 4


def test_view_agreement_with_no_fused_boxes_or_empty_views():
    n_views, box_std, score_std = view_agreement(np.zeros((0, 4)), np.zeros(0), [np.zeros((0, 4))], [np.zeros(0)],
                                                 [np.zeros(0)], 0.5, "iou")
    assert n_views.shape == (0,) and box_std.shape == (0, 4) and score_std.shape == (0,)


@pytest.mark.parametrize(
    "args, error, pattern",
    [
        (("vote", 0.5, 0.0, "avg", "iou"), UnknownNameError, r"unknown merge method 'vote'; expected one of: nms, nmw"),
        (("wbf", 0.5, 0.0, "mean", "iou"), UnknownNameError, r"unknown conf_type 'mean'; expected one of: "),
        (("wbf", 0.5, 0.0, "avg", "giou"), UnknownNameError, r"unknown match 'giou'; expected one of: ios, iou"),
        (("soft_nms", 0.5, 0.0, "avg", "ios"), InvalidInputError, r"match='ios'.*'wbf' or 'nms', got merge='soft_nms'"),
        (("wbf", 0.0, 0.0, "avg", "iou"), InvalidInputError, r"iou_thr must be a number in \(0, 1\], got 0.0"),
        (("wbf", 1.5, 0.0, "avg", "iou"), InvalidInputError, r"iou_thr must be a number in \(0, 1\], got 1.5"),
        (("wbf", True, 0.0, "avg", "iou"), InvalidInputError, r"iou_thr .* got True"),
        (("wbf", 0.5, -0.1, "avg", "iou"), InvalidInputError, r"skip_box_thr must be a number in \[0, 1\), got -0.1"),
    ],
)
def test_bad_fusion_arguments(args, error, pattern):
    with pytest.raises(error, match=pattern):
        check_fusion_args(*args)
    check_fusion_args("wbf", 1.0, 0.0, "avg", "ios")  # the bounds themselves are fine


def test_missing_ensemble_boxes_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ensemble_boxes", None)  # import now fails
    boxes, scores, labels = three_views()
    with pytest.raises(ImportError, match=r'^box fusion needs the ensemble-boxes package: pip install "ttakit\[detection\]"$'):
        fuse(boxes, scores, labels)
    assert len(fuse(boxes, scores, labels, match="ios")[0]) == 2  # the IoS merge needs no package
