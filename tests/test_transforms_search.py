"""Property tests for the search's size-keeping views (Translate, Rotate, Zoom): each inverts the
targets it declares exactly, the keypoint map agrees with where the image content actually
moves, and policies holding them round-trip through JSON."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ttakit import functional as F
from ttakit import transforms as T
from ttakit.errors import InvalidInputError, NotInvertibleError
from ttakit.policy import Compose, Policy, Step, View

FAST = settings(max_examples=25, deadline=None)
sizes = st.tuples(st.integers(8, 33), st.integers(8, 33))
shifts = st.tuples(st.floats(-3, 3, allow_nan=False), st.floats(-3, 3, allow_nan=False))
angles = st.floats(-20, 20, allow_nan=False)
zooms = st.floats(0.8, 1.25, allow_nan=False)


def make(kind: str, value) -> View:
    transform = {"translate": lambda: T.Translate([value]), "rotate": lambda: T.Rotate([value]), "zoom": lambda: T.Zoom([value])}[kind]()
    return View([Step(transform, transform.params[-1])])


def view_strategy():
    return st.one_of(
        shifts.map(lambda s: ("translate", s)), angles.map(lambda a: ("rotate", a)), zooms.map(lambda z: ("zoom", z))
    )


@FAST
@given(size=sizes, spec=view_strategy(), batch=st.integers(1, 3))
def test_label_maps_back_unchanged_and_size_is_kept(size, spec, batch) -> None:
    view = make(*spec)
    transformer = view.transformer()
    image = torch.rand(batch, 2, *size)
    assert transformer.augment_image(image).shape == image.shape
    logits = torch.randn(batch, 7)
    assert torch.equal(transformer.deaugment_label(logits), logits)


@FAST
@given(size=sizes, spec=view_strategy(), data=st.data())
def test_keypoints_round_trip_exactly(size, spec, data) -> None:
    kind, value = spec
    view = make(kind, value)
    transform, param = view.steps[0].transform, view.steps[0].param
    angle, scale, dx, dy = transform._affine(param)
    points = torch.tensor(data.draw(st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), min_size=1, max_size=5)))[None]
    moved = F.keypoints_affine(points, angle, scale, dx, dy, size)
    transformer = view.transformer()
    transformer.augment_image(torch.rand(1, 1, *size))  # records the input size
    back = transformer.deaugment_keypoints(moved)
    assert torch.allclose(back, points, atol=1e-5)


@FAST
@given(spec=view_strategy(), data=st.data())
def test_keypoint_map_follows_the_image(spec, data) -> None:
    """A small bright blob moves where keypoints_affine says (centroid within 0.35 px)."""
    kind, value = spec
    h = w = 32
    cy = data.draw(st.floats(11, 21))
    cx = data.draw(st.floats(11, 21))
    yy, xx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    blob = torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 1.2**2))[None, None]
    view = make(kind, value)
    moved = view.transformer().augment_image(blob)[0, 0]
    mass = moved.sum()
    got = torch.stack([(moved * xx).sum() / mass, (moved * yy).sum() / mass])
    transform, param = view.steps[0].transform, view.steps[0].param
    expected = F.keypoints_affine(torch.tensor([[[cx / w, cy / h]]]), *transform._affine(param), (h, w))[0, 0] * w
    assert torch.allclose(got, expected, atol=0.35), (got, expected)


@FAST
@given(size=sizes, shift=shifts, zoom=zooms)
def test_boxes_round_trip_for_translate_and_zoom(size, shift, zoom) -> None:
    boxes = torch.tensor([[[0.1, 0.2, 0.5, 0.7], [0.3, 0.3, 0.9, 0.4]]])
    for kind, value, (angle, scale, dx, dy) in (("translate", shift, (0.0, 1.0, *shift)), ("zoom", zoom, (0.0, zoom, 0.0, 0.0))):
        view = make(kind, value)
        corners = F.keypoints_affine(boxes.reshape(1, 4, 2), angle, scale, dx, dy, size).reshape(1, 2, 4)
        transformer = view.transformer()
        transformer.augment_image(torch.rand(1, 1, *size))
        assert torch.allclose(transformer.deaugment_boxes(corners), boxes, atol=1e-5)


def test_declared_targets_and_refusals() -> None:
    assert T.Translate.targets == T.Zoom.targets == frozenset({"image", "label", "keypoints", "boxes"})
    assert T.Rotate.targets == frozenset({"image", "label", "keypoints"})
    rotate = Policy([make("rotate", 5.0)])
    with pytest.raises(NotInvertibleError, match="Rotate cannot invert the 'boxes' target"):
        rotate.check_targets("boxes")
    with pytest.raises(NotInvertibleError, match="cannot invert the 'mask' target"):
        Policy([make("zoom", 1.1)]).check_targets("mask")


def test_exact_cases() -> None:
    square = torch.rand(2, 3, 9, 9)
    assert torch.allclose(F.affine(square, 90.0), F.rot90(square), atol=1e-5)
    assert torch.allclose(F.affine(square, 0.0, 1.0, 2.0, -1.0), F.shift(square, 2, -1), atol=1e-5)
    assert F.affine(square) is square
    half = T.Translate([(0.5, 0.0)]).apply_aug_image(square, shift=(0.5, 0.0))
    # a half-pixel shift is the mean of the image and its one-pixel shift (bilinear)
    assert torch.allclose(half, (square + F.shift(square, 1, 0)) / 2, atol=1e-5)


def test_names_json_and_registry() -> None:
    policy = Compose([T.Translate([(0.5, -0.5)]), T.Rotate([-8]), T.Zoom([0.9])]).to_policy("p")
    assert "tshift(+0.5,-0.5)+rotate-8+zoom0.9" in policy.view_names
    back = Policy.from_json(json.loads(json.dumps(policy.to_json())))
    assert back.view_names == policy.view_names
    x = torch.rand(2, 1, 16, 16)
    for a, b in zip(policy.views, back.views, strict=True):
        assert torch.equal(a.transformer().augment_image(x), b.transformer().augment_image(x))


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: T.Translate([(1, "a")]), "shifts must hold"),
        (lambda: T.Translate("ab"), "shifts must be a non-empty list"),
        (lambda: T.Rotate([float("nan")]), "angles must be finite numbers"),
        (lambda: T.Zoom([0.0]), "scales must be positive finite numbers"),
        (lambda: T.Zoom([]), "scales must be a non-empty list"),
    ],
)
def test_bad_arguments(build, match) -> None:
    with pytest.raises(InvalidInputError, match=match):
        build()
