"""ttakit.detection: TTA for any detector. A toy detector finds the bright rectangle of each image it
is given, so every view, mapped back and fused, must return the rectangle itself: in each output
form, with each fusion method, through flips, quarter turns of a non-square image, Scale, Shift,
crops and tiles; plus the views' agreement, empty views, chains of transforms (property tests)
and every bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ttakit import transforms as T
from ttakit.detection import Detections, DetectionTTAOutput, DetectionTTAWrapper
from ttakit.errors import InvalidInputError, ModelOutputError, NotInvertibleError, UnknownNameError
from ttakit.policy import Compose, Policy, Step, Transformer, View

from ._fixtures import chain_examples

pytestmark = pytest.mark.usefixtures("single_thread")

FORMS = ["dicts", "rows", "padded", "tuples", "custom"]
LABEL = 3
SCORE = 0.9


def rectangle_box(image: torch.Tensor) -> list[float] | None:
    """``image: (C, H, W)`` -> the pixel box ``[x1, y1, x2, y2]`` of the pixels of channel 0 above
    the middle of its range (None for a flat image)."""
    channel = image[0]
    low, high = float(channel.min()), float(channel.max())
    if high - low < 0.1:
        return None
    rows, cols = torch.nonzero(channel > (low + high) / 2, as_tuple=True)
    return [float(cols.min()), float(rows.min()), float(cols.max()) + 1, float(rows.max()) + 1]


class RectangleDetector:
    """Returns the bright rectangle of each image it is given, in pixels of that image, in one of
    the detector output forms. ``left_only``: it finds the rectangle only when its centre lies in
    the left half of the image (so mirrored views see nothing)."""

    def __init__(self, form: str = "dicts", left_only: bool = False):
        self.form, self.left_only = form, left_only
        self.calls, self.largest = 0, 0  # forward passes, most images in one

    def boxes(self, images: torch.Tensor) -> list[list[list[float]]]:
        found = []
        for image in images:
            box = rectangle_box(image)
            if box is not None and self.left_only and (box[0] + box[2]) / 2 > image.shape[-1] / 2:
                box = None
            found.append([] if box is None else [box])
        return found

    def __call__(self, images: torch.Tensor):
        self.calls, self.largest = self.calls + 1, max(self.largest, len(images))
        found = self.boxes(images)
        triples = [
            (torch.tensor(b, dtype=torch.float32).reshape(-1, 4), torch.full((len(b),), SCORE),
             torch.full((len(b),), LABEL, dtype=torch.int64))
            for b in found
        ]
        if self.form == "dicts":
            return [{"boxes": b, "scores": s, "labels": lab} for b, s, lab in triples]
        if self.form == "rows":
            return [torch.cat([b, s[:, None], lab[:, None].float()], 1) for b, s, lab in triples]
        if self.form == "padded":  # two rows per image: the second (at least) is padding
            out = torch.zeros(len(found), 2, 6)
            out[:, :, 5] = -1
            for i, (b, s, lab) in enumerate(triples):
                out[i, : len(b)] = torch.cat([b, s[:, None], lab[:, None].float()], 1)
            return out
        if self.form == "tuples":
            return triples
        return {"per_image": triples}  # "custom": read by output_format


def custom_format(raw):
    return raw["per_image"]


def wrap(form: str, policy, **options) -> DetectionTTAWrapper:
    fmt = custom_format if form == "custom" else None
    return DetectionTTAWrapper(RectangleDetector(form, options.pop("left_only", False)), policy, output_format=fmt, **options)


def as_triples(form: str, outputs) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The wrapper's outputs (in ``form``) as per-image (boxes, scores, labels)."""
    if form == "dicts":
        return [(o["boxes"], o["scores"], o["labels"]) for o in outputs]
    if form == "rows":
        return [(o[:, :4], o[:, 4], o[:, 5]) for o in outputs]
    if form == "padded":
        return [(o[o[:, 4] > 0][:, :4], o[o[:, 4] > 0][:, 4], o[o[:, 4] > 0][:, 5]) for o in outputs]
    return list(outputs)


# A non-square image (20 x 30) with a rectangle inside every crop below and, for the tiles, either
# wholly inside a tile or outside it (a tile cutting it would see a smaller box).
HEIGHT, WIDTH = 20, 30
TRUTH = [16.0, 4.0, 24.0, 14.0]


def rectangle_images() -> torch.Tensor:
    x = torch.zeros(2, 3, HEIGHT, WIDTH)
    x[0, :, 4:14, 16:24] = 1.0
    return x  # image 1 is blank: no detection in any view


POLICIES = {
    "hflip": lambda: Compose([T.HorizontalFlip()]),
    "vflip": lambda: Compose([T.VerticalFlip()]),
    "rot90": lambda: Compose([T.Rotate90([90, 180, 270])]),
    "scale": lambda: Compose([T.Scale([0.5, 2])]),
    "shift": lambda: Compose([T.Shift([(2, 1), (-1, -2)])]),
    "five_crops": lambda: Compose([T.FiveCrops(16, 24)]),
    "tiles+hflip": lambda: Compose([T.Tiles(16, 0.5), T.HorizontalFlip()]),
    "tiles_full": lambda: Compose([T.Tiles(16, 0.5, full_image=True)]),
}
MERGES = [("wbf", "iou"), ("nms", "iou"), ("soft_nms", "iou"), ("nmw", "iou"), ("wbf", "ios"), ("nms", "ios")]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("policy", list(POLICIES))
def test_fused_box_is_the_rectangle(form, policy):
    x = rectangle_images()
    for merge, match in MERGES:
        wrapped = wrap(form, POLICIES[policy](), merge=merge, match=match, iou_thr=0.5)
        out = wrapped.run(x)
        k = len(wrapped.view_names)
        (boxes, scores, labels), (empty_boxes, empty_scores, _) = as_triples(form, out.outputs)
        assert len(boxes) >= 1, (policy, merge, match)
        if merge != "soft_nms":  # soft-NMS keeps the other views' boxes with lowered scores
            assert len(boxes) == 1, (policy, merge, match)
        assert torch.allclose(boxes, torch.tensor([TRUTH]).expand_as(boxes), atol=1.0), (policy, merge, boxes)
        assert labels.long().tolist() == [LABEL] * len(boxes)
        assert float(scores[0]) == pytest.approx(SCORE, abs=1e-5) or merge == "nms"
        assert empty_boxes.shape == (0, 4) and empty_scores.shape == (0,)
        top = out.detections[0]
        assert int(top.n_views[0]) == k and float(top.box_std[0].abs().max()) <= 1.0
        assert len(out.detections[1]) == 0


@pytest.mark.parametrize("form", FORMS)
def test_outputs_keep_the_detectors_form(form):
    x = rectangle_images()
    outputs = wrap(form, POLICIES["hflip"]())(x)
    if form == "dicts":
        assert isinstance(outputs, list) and len(outputs) == 2
        assert set(outputs[0]) == {"boxes", "scores", "labels", "n_views", "box_std", "score_std"}
        assert outputs[0]["labels"].dtype == torch.int64 and outputs[0]["boxes"].dtype == torch.float32
        assert outputs[1]["boxes"].shape == (0, 4) and outputs[1]["box_std"].shape == (0, 4)
    elif form == "rows":
        assert [tuple(o.shape) for o in outputs] == [(1, 6), (0, 6)]
    elif form == "padded":
        assert isinstance(outputs, torch.Tensor) and outputs.shape == (2, 1, 6)
        assert outputs[1, 0, 4] == 0 and outputs[1, 0, 5] == -1  # the blank image's padding row
    else:
        assert all(isinstance(o, tuple) and len(o) == 3 for o in outputs)
        assert outputs[0][2].dtype == torch.int64


def test_no_detections_in_some_views():
    x = torch.zeros(1, 1, HEIGHT, WIDTH)
    x[0, 0, 4:14, 3:10] = 1.0  # on the left: the mirrored view finds nothing
    for merge in ("wbf", "nms", "soft_nms", "nmw"):
        out = wrap("dicts", POLICIES["hflip"](), merge=merge, left_only=True).run(x, return_views=True)
        det = out.detections[0]
        assert det.boxes.tolist() == [pytest.approx([3.0, 4.0, 10.0, 14.0], abs=1e-4)], merge
        assert det.n_views.tolist() == [1] and det.box_std.tolist() == [[0.0] * 4] and det.score_std.tolist() == [0.0]
        assert out.views.shape[:2] == (2, 1) and float(out.views[1, 0, :, 4].max()) == 0.0  # hflip: no box
    # WBF's "avg" scores a box one view of two found at half its score, as ensemble-boxes does.
    assert wrap("dicts", POLICIES["hflip"](), left_only=True)(x)[0]["scores"].tolist() == pytest.approx([SCORE / 2])


@pytest.mark.parametrize("form", FORMS)
def test_no_detections_in_any_view(form):
    out = wrap(form, Compose([T.HorizontalFlip(), T.Rotate90([90])])).run(torch.zeros(3, 1, 7, 9))
    assert all(len(d) == 0 for d in out.detections)
    for boxes, scores, labels in as_triples(form, out.outputs):
        assert boxes.shape == (0, 4) and scores.shape == (0,) and labels.shape == (0,)
    assert out.to_json()[0] == {"boxes": [], "scores": [], "labels": [], "n_views": [], "box_std": [], "score_std": []}


def test_view_agreement_on_a_constructed_case():
    # A detector that always answers the box [4, 4, 10, 10] with score 0.9 * the image's mean: the
    # view shifted 2 px right (zero padding) scores 0.9 * 28 / 30 and maps back to [2, 4, 8, 10].
    def fixed(images):
        return [{"boxes": torch.tensor([[4.0, 4.0, 10.0, 10.0]]), "scores": (0.9 * img.mean()).reshape(1),
                 "labels": torch.tensor([1])} for img in images]

    x = torch.ones(1, 1, 16, 30)
    out = DetectionTTAWrapper(fixed, Compose([T.Shift([(2, 0)])]), iou_thr=0.4).run(x)  # IoU 0.5
    det = out.detections[0]
    s0, s1 = 0.9, 0.9 * 28 / 30
    assert det.n_views.tolist() == [2]
    assert det.box_std.tolist() == [pytest.approx([1.0, 0.0, 1.0, 0.0], abs=1e-5)]
    assert det.score_std.tolist() == pytest.approx([abs(s0 - s1) / 2], abs=1e-6)
    x1 = (s0 * 4 + s1 * 2) / (s0 + s1)  # WBF: score-weighted corners
    assert det.boxes.tolist() == [pytest.approx([x1, 4.0, x1 + 6, 10.0], abs=1e-4)]
    assert det.scores.tolist() == pytest.approx([(s0 + s1) / 2], abs=1e-6)
    # With a threshold above their IoU the two views' boxes stay apart, each found by one view.
    apart = DetectionTTAWrapper(fixed, Compose([T.Shift([(2, 0)])]), iou_thr=0.6).run(x).detections[0]
    assert apart.n_views.tolist() == [1, 1] and apart.box_std.abs().max() == 0


def test_run_result_serialises_and_weights_come_from_the_policy():
    x = torch.zeros(1, 1, HEIGHT, WIDTH)
    x[0, 0, 4:14, 3:10] = 1.0  # on the left: only the identity view (weight 3) finds it
    policy = Compose([T.HorizontalFlip()]).to_policy("hflip", weights=[3.0, 1.0])
    wrapped = wrap("dicts", policy, left_only=True)
    assert wrapped.weights == [3.0, 1.0]
    out = wrapped.run(x)
    assert isinstance(out, DetectionTTAOutput) and isinstance(out.detections[0], Detections)
    assert out.view_names == ["identity", "hflip"]
    text = json.dumps(out.to_json())
    assert json.loads(text)[0]["n_views"] == [1]
    # ensemble-boxes' WBF: the weighted score 3 * 0.9, rescaled by min(2 views, 1 box) / (3 + 1)
    assert out.detections[0].scores.tolist() == pytest.approx([3 * SCORE / 4])


def test_max_detections_keeps_the_top_scores_and_chunks_agree():
    def many(images):
        n = 5
        boxes = torch.tensor([[float(i), 0.0, i + 1.0, 1.0] for i in range(n)])
        return [{"boxes": boxes * 2, "scores": torch.linspace(0.1, 0.9, n), "labels": torch.zeros(n, dtype=torch.long)}
                for _ in images]

    x = torch.rand(5, 1, 8, 12)
    wrapped = DetectionTTAWrapper(many, Policy([View.identity()]), max_detections=3, merge="nms")
    out = wrapped(x)
    assert out[0]["scores"].tolist() == pytest.approx([0.9, 0.7, 0.5])
    small = DetectionTTAWrapper(many, Policy([View.identity()]), max_detections=3, merge="nms", pass_size=2)(x)
    assert all(torch.equal(a["boxes"], b["boxes"]) for a, b in zip(out, small, strict=True))


def test_tiles_split_into_passes_of_max_batch():
    detector = RectangleDetector()
    x = rectangle_images()
    out = DetectionTTAWrapper(detector, POLICIES["tiles+hflip"](), max_batch=4, match="ios").run(x)
    assert torch.allclose(out.detections[0].boxes, torch.tensor([TRUTH]), atol=1.0)
    # 2 images x 6 tiles x 2 views = 24 tiles, at most 4 per forward pass
    assert detector.largest <= 4 and detector.calls >= 6


# --------------------------------------------------------------------------- chains of transforms (properties)

# One example per registered transform that declares boxes, for an image of (H, W) with the
# rectangle in its central half: every crop holds it, shifts keep it in view, zoom keeps it inside.
BOX_EXAMPLES = {n: f for n, f in chain_examples().items() if "boxes" in T.get_transform_class(n).targets}


def box_transforms() -> list[str]:
    return [n for n in T.list_transforms() if "boxes" in T.get_transform_class(n).targets]


def test_every_registered_box_transform_has_an_example():
    assert set(box_transforms()) <= set(BOX_EXAMPLES), set(box_transforms()) - set(BOX_EXAMPLES)


@settings(max_examples=60, deadline=None)
@given(
    size=st.tuples(st.integers(14, 24), st.integers(14, 24)),
    names=st.lists(st.sampled_from(sorted(BOX_EXAMPLES)), min_size=1, max_size=2),
    data=st.data(),
)
def test_boxes_map_back_through_chains_on_non_square_images(size, names, data):
    """A chain of up to two box transforms at random parameters: the rectangle found on each image
    of the view (each tile) and mapped back is the rectangle, within 1 px."""
    h, w = size
    names = [n for n in names if n in box_transforms()]
    if not names:
        return
    steps, current = [], torch.zeros(1, 1, h, w)
    for name in names:  # each example sized for the image it receives (rotated, scaled, a tile)
        transform = BOX_EXAMPLES[name](*current.shape[-2:])
        steps.append(Step(transform, data.draw(st.sampled_from(list(transform.params)))))
        current = Transformer(steps[-1:]).augment_image(current)
    # Inside the central half, 2 px clear of it: off every crop's edge.
    r0, r1 = sorted(data.draw(st.lists(st.integers(h // 4 + 2, 3 * h // 4 - 2), min_size=2, max_size=2)))
    c0, c1 = sorted(data.draw(st.lists(st.integers(w // 4 + 2, 3 * w // 4 - 2), min_size=2, max_size=2)))
    image = torch.zeros(1, 1, h, w)
    image[0, 0, r0 : r1 + 1, c0 : c1 + 1] = 1.0
    truth = torch.tensor([c0, r0, c1 + 1, r1 + 1], dtype=torch.float32)
    t = Transformer(steps)
    view = t.augment_image(image)
    vh, vw = view.shape[-2:]
    observed, whole = [], []
    for tile in view:
        box = rectangle_box(tile)
        # A box touching the view's edge may be cut by it (a crop or a tile): not the whole rectangle.
        inside = box is not None and box[0] > 0 and box[1] > 0 and box[2] < vw and box[3] < vh
        observed.append([box[0] / vw, box[1] / vh, box[2] / vw, box[3] / vh] if inside else [0.0] * 4)
        whole.append(inside)
    back = t.deaugment_boxes(torch.tensor(observed).reshape(view.shape[0], 1, 4)).reshape(-1, 4)
    back = back * torch.tensor([w, h, w, h])
    for i, inside in enumerate(whole):
        if inside:
            assert torch.allclose(back[i], truth, atol=1.0 + 1e-4), (names, [s.param for s in steps], back[i], truth)
    if len(steps) == 1 and names != ["Tiles"]:  # (a second step may push it over a crop's edge)
        assert any(whole), (names, [s.param for s in steps])  # the rectangle is whole in the view


# --------------------------------------------------------------------------- bad input


def detector_returning(value):
    return lambda images: value


@pytest.mark.parametrize(
    "value, pattern",
    [
        ([{"boxes": torch.zeros(1, 5), "scores": torch.ones(1), "labels": torch.ones(1)}],
         r"boxes of image 0 must have shape \(N, 4\).*got shape \(1, 5\)"),
        ([{"boxes": torch.tensor([[0.0, 0.0, 40.0, 10.0]]), "scores": torch.ones(1), "labels": torch.ones(1)}],
         r"box \[0, 0, 40, 10\] of image 0 lies outside the 30x20 \(W x H\) image .* more than 1 px"),
        ([{"boxes": torch.tensor([[0.0, -2.0, 4.0, 10.0]]), "scores": torch.ones(1), "labels": torch.ones(1)}],
         r"box \[0, -2, 4, 10\] of image 0 lies outside the 30x20"),
        ([{"boxes": torch.tensor([[5.0, 0.0, 4.0, 10.0]]), "scores": torch.ones(1), "labels": torch.ones(1)}],
         r"box \[5, 0, 4, 10\] of image 0 has x2 < x1 or y2 < y1"),
        ([{"boxes": torch.zeros(2, 4), "scores": torch.ones(3), "labels": torch.ones(2)}],
         r"scores of image 0 must have shape \(2,\), one per box, got shape \(3,\)"),
        ([{"boxes": torch.zeros(1, 4), "scores": torch.ones(1)}], r"missing \['labels'\]"),
        ([torch.zeros(2, 5)], r"detections of image 0 must be an \(N, 6\) tensor.*got shape \(2, 5\)"),
        (torch.zeros(1, 3, 5), r"\(B, N, 6\) .* for B = 1 images, got shape \(1, 3, 5\)"),
        ("boxes", r"unknown detector output format for 1 images: got str; expected a list of B dicts"),
        ([{"boxes": torch.zeros(0, 4)}, {"boxes": torch.zeros(0, 4)}],
         r"unknown detector output format for 1 images: got a list of 2"),
        ([[1, 2]], r"unknown detector output format .* got a list of 1 of a list of 2"),
    ],
)
def test_bad_detector_outputs(value, pattern):
    wrapped = DetectionTTAWrapper(detector_returning(value), Policy([View.identity()]))
    with pytest.raises(ModelOutputError, match=pattern):
        wrapped(torch.rand(1, 1, HEIGHT, WIDTH))


def test_boxes_within_the_tolerance_are_clipped():
    value = [{"boxes": torch.tensor([[-0.5, 0.0, 30.8, 20.0]]), "scores": torch.ones(1), "labels": torch.ones(1)}]
    out = DetectionTTAWrapper(detector_returning(value), Policy([View.identity()]))(torch.rand(1, 1, HEIGHT, WIDTH))
    assert out[0]["boxes"].tolist() == [pytest.approx([0.0, 0.0, 30.0, 20.0])]
    wider = DetectionTTAWrapper(detector_returning(value), Policy([View.identity()]), box_tolerance=0.1)
    with pytest.raises(ModelOutputError, match="more than 0.1 px"):
        wider(torch.rand(1, 1, HEIGHT, WIDTH))


def test_output_format_must_return_one_triple_per_image():
    wrapped = DetectionTTAWrapper(lambda x: None, Policy([View.identity()]), output_format=lambda raw: [])
    with pytest.raises(ModelOutputError, match=r"output_format must return a list of 2 \(boxes, scores, labels\).*got a list of 0"):
        wrapped(torch.rand(2, 1, 5, 5))


@pytest.mark.parametrize(
    "options, error, pattern",
    [
        ({"merge": "mean"}, UnknownNameError, r"unknown merge method 'mean'; expected one of: nms, nmw, soft_nms, wbf"),
        ({"conf_type": "median"}, UnknownNameError, r"unknown conf_type 'median'"),
        ({"match": "giou"}, UnknownNameError, r"unknown match 'giou'; expected one of: ios, iou"),
        ({"iou_thr": 0}, InvalidInputError, r"iou_thr must be a number in \(0, 1\], got 0"),
        ({"iou_thr": 1.01}, InvalidInputError, r"iou_thr must be a number in \(0, 1\], got 1.01"),
        ({"weights": [1.0]}, InvalidInputError, r"weights must be 2 non-negative numbers, one per view.*got \[1.0\]"),
        ({"weights": [0, 0]}, InvalidInputError, r"weights must be 2 .*not all zero"),
        ({"max_detections": 0}, InvalidInputError, r"max_detections must be a positive integer, got 0"),
        ({"output_format": "xyxy"}, InvalidInputError, r"output_format must be a callable.*got str"),
        ({"box_tolerance": -1}, InvalidInputError, r"box_tolerance must be a non-negative number of pixels, got -1"),
    ],
)
def test_bad_wrapper_arguments(options, error, pattern):
    with pytest.raises(error, match=pattern):
        DetectionTTAWrapper(RectangleDetector(), Compose([T.HorizontalFlip()]), **options)


def test_views_that_cannot_invert_boxes_are_refused_when_built():
    with pytest.raises(NotInvertibleError, match="Rotate cannot invert the 'boxes' target"):
        DetectionTTAWrapper(RectangleDetector(), Compose([T.Rotate([10])]))


def test_non_finite_boxes_are_reported_by_view():
    value = [{"boxes": torch.tensor([[0.0, 0.0, float("nan"), 4.0]]), "scores": torch.ones(1), "labels": torch.ones(1)}]
    with pytest.raises(ModelOutputError, match="NaN/inf"):
        DetectionTTAWrapper(detector_returning(value), Policy([View.identity()]))(torch.rand(1, 1, 8, 8))


def test_labels_and_scores_keep_their_meaning_through_numpy():
    # Large label ids and float labels survive the round trip through the fusion.
    value = [{"boxes": torch.tensor([[1.0, 1.0, 5.0, 5.0]]), "scores": torch.tensor([0.25]),
              "labels": torch.tensor([70001])}]
    out = DetectionTTAWrapper(detector_returning(value), Policy([View.identity()]))(torch.rand(1, 1, 8, 8))
    assert out[0]["labels"].tolist() == [70001] and out[0]["scores"].tolist() == pytest.approx([0.25])
    assert np.isclose(out[0]["box_std"].sum().item(), 0.0)
