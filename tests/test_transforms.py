"""ttakit.transforms: ttach's names and defaults, declared targets, errors, and round-trip
properties for every registered transform (a newly registered transform must add an example
below, or ``test_every_registered_transform_has_examples`` fails)."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import pytest
import torch
import ttach
from hypothesis import given, settings
from hypothesis import strategies as st

import ttakit
from ttakit import functional as F
from ttakit import transforms as T
from ttakit.errors import InvalidInputError, NotInvertibleError
from ttakit.policy import Step, Transformer

pytestmark = pytest.mark.usefixtures("single_thread")
FAST = settings(max_examples=25, deadline=None)

# name -> factories of example instances for an image of (H, W). Integer up-scaling keeps mask
# round trips exact; crops of at least half the image cover it, so every pixel is in some crop.
EXAMPLES: dict[str, list[Callable[[int, int], T.BaseTransform]]] = {
    "HorizontalFlip": [lambda h, w: T.HorizontalFlip()],
    "VerticalFlip": [lambda h, w: T.VerticalFlip()],
    "Rotate90": [lambda h, w: T.Rotate90([90, 180, 270]), lambda h, w: T.Rotate90([-90, 450])],
    "Scale": [lambda h, w: T.Scale([2, 3]), lambda h, w: T.Scale([2], interpolation="nearest-exact")],
    "Resize": [
        lambda h, w: T.Resize([(2 * h, 3 * w), (h, 2 * w)], original_size=(h, w)),
        lambda h, w: T.Resize([(3 * h, w)]),
    ],
    "Add": [lambda h, w: T.Add([0.5, -0.25])],
    "Multiply": [lambda h, w: T.Multiply([0.5, 2.0])],
    "Brightness": [lambda h, w: T.Brightness([0.2, -0.1]), lambda h, w: T.Brightness([0.3], clip=False)],
    "Contrast": [lambda h, w: T.Contrast([1.5, 0.5])],
    "FiveCrops": [lambda h, w: T.FiveCrops((h + 1) // 2, (w + 1) // 2), lambda h, w: T.FiveCrops(h, w - 1)],
    "TenCrops": [lambda h, w: T.TenCrops((h + 1) // 2, (w + 1) // 2)],
    "Shift": [lambda h, w, m=m: T.Shift([(1, 0), (-2, 1), (0, -1), (2, 2)], m) for m in F.PADDING_MODES],
    "Tiles": [
        lambda h, w: T.Tiles((max(1, h // 2), max(1, w - 1)), 0.25),
        lambda h, w: T.Tiles((h, (w + 2) // 3), 0.5, "gaussian", full_image=True),
    ],
    # Helper B's search views (bilinear resampling): whole-pixel and quarter-turn examples keep
    # the dot and rectangle images below exact.
    "Translate": [lambda h, w: T.Translate([(1, 0), (0, -1)])],
    "Rotate": [lambda h, w: T.Rotate([90, 180])],
    "Zoom": [lambda h, w: T.Zoom([2.0])],
}
# Dots more than the largest shift (2) from the border stay in view and never show up in the
# padding too (reflect padding copies the pixels 1..|shift| away from the border).
SHIFT_MARGIN = 3
CASES = [(name, i) for name in T.list_transforms() for i in range(len(EXAMPLES.get(name, [None])))]
CASE_IDS = [f"{name}-{i}" for name, i in CASES]


def make(name: str, index: int, h: int, w: int) -> T.BaseTransform:
    if name not in EXAMPLES:
        pytest.fail(f"registered transform {name} has no example in tests/test_transforms.py EXAMPLES")
    return EXAMPLES[name][index](h, w)


def one_step(transform: T.BaseTransform, param) -> Transformer:
    return Transformer([Step(transform, param)])


def test_every_registered_transform_has_examples():
    assert set(T.list_transforms()) <= set(EXAMPLES), set(T.list_transforms()) - set(EXAMPLES)
    assert {"HorizontalFlip", "Rotate90", "Scale", "Resize", "FiveCrops", "TenCrops", "Shift"} <= set(EXAMPLES)


sizes = st.tuples(st.integers(3, 10), st.integers(3, 10))


def margin(transform) -> int:
    return SHIFT_MARGIN if isinstance(transform, (T.Shift, T.Translate)) else 0


# Zoom resamples (bilinear) at other than whole pixels: dots and rectangles blur, so the pixel
# images below cannot locate them exactly. Its keypoint and box maps need their own test (B).
NOT_PIXEL_EXACT = ("Zoom",)


# --------------------------------------------------------------------------- masks


@pytest.mark.parametrize("name, index", CASES, ids=CASE_IDS)
@FAST
@given(size=sizes, data=st.data())
def test_mask_round_trip(name, index, size, data):
    h, w = size
    transform = make(name, index, h, w)
    x = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 2**16))))
    for param in transform.params:
        t = one_step(transform, param)
        augmented = t.augment_image(x)
        if "mask" not in transform.targets:
            with pytest.raises(NotInvertibleError, match=f"{name}.*'mask'"):
                t.deaugment_mask(augmented)
            continue
        if isinstance(transform, T.ImageOnlyTransform):
            # Pixel values change, geometry does not: a mask comes back untouched.
            assert torch.equal(t.deaugment_mask(augmented), augmented)
            continue
        # An identity "segmentation model" on the view; the mask is exact on the pixels it saw.
        back, weight = t.deaugment_mask_weighted(augmented)
        assert back.shape == x.shape
        assert torch.equal(t.deaugment_mask(augmented), back)
        seen = torch.ones(h, w, dtype=torch.bool) if weight is None else weight[0, 0] > 0
        assert bool(seen.any()), (name, param)
        if not getattr(transform, "loses_pixels", False):  # e.g. tiles, circular shifts: every pixel seen
            assert bool(seen.all()), (name, param)
        torch.testing.assert_close(back[..., seen], x[..., seen], rtol=0, atol=1e-6, msg=f"{name} {param}")


@FAST
@given(
    size=st.tuples(st.integers(1, 13), st.integers(1, 13)),
    factor=st.sampled_from([0.34, 0.5, 0.7, 1.5, 2.0, 2.5]),
    interpolation=st.sampled_from(["nearest", "nearest-exact", "linear", "bilinear", "bicubic", "area"]),
)
def test_scale_restores_the_recorded_size(size, factor, interpolation):
    h, w = size
    if int(h * factor) < 1 or int(w * factor) < 1:
        with pytest.raises(InvalidInputError, match=f"scale {factor} turns a {h}x{w} image into"):
            one_step(T.Scale([factor], interpolation), factor).augment_image(torch.rand(1, 1, h, w))
        return
    t = one_step(T.Scale([factor], interpolation), factor)
    view = t.augment_image(torch.rand(1, 2, h, w))
    assert view.shape[-2:] == (int(h * factor), int(w * factor))
    assert t.input_sizes == [(h, w)]
    assert t.deaugment_mask(torch.rand_like(view)).shape == (1, 2, h, w)


def test_scale_round_trips_odd_sizes_where_ttach_does_not():
    # ttach's bug: int(5 * 0.5) = 2, then 2 * (1 / 0.5) = 4, so the mask comes back 4x4.
    x = torch.rand(1, 1, 5, 5)
    theirs = ttach.Scale([0.5])
    assert theirs.apply_deaug_mask(theirs.apply_aug_image(x, scale=0.5), scale=0.5).shape[-2:] == (4, 4)
    t = one_step(T.Scale([0.5]), 0.5)
    assert t.deaugment_mask(t.augment_image(x)).shape[-2:] == (5, 5)


# --------------------------------------------------------------------------- keypoints and boxes


def draw_pixels(data, h, w, m, n):
    rows = st.integers(m, h - 1 - m)
    cols = st.integers(m, w - 1 - m)
    return data.draw(st.lists(st.tuples(rows, cols), min_size=n, max_size=n, unique=True))


def centroid(view: torch.Tensor, value: float) -> torch.Tensor | None:
    """Normalised centroid of the pixels of ``view: (H, W)`` equal to ``value`` (None if absent)."""
    hit = (view == value).nonzero().to(torch.float64)
    if len(hit) == 0:
        return None
    h, w = view.shape
    return torch.tensor([(hit[:, 1].mean() + 0.5) / w, (hit[:, 0].mean() + 0.5) / h])


@pytest.mark.parametrize("name, index", CASES, ids=CASE_IDS)
@FAST
@given(size=sizes, data=st.data())
def test_keypoints_round_trip_against_dot_images(name, index, size, data):
    h, w = size
    transform = make(name, index, h, w)
    m = margin(transform)
    if h <= 2 * m or w <= 2 * m or name in NOT_PIXEL_EXACT or getattr(transform, "multiplies_batch", False):
        return  # tiles: one view is many images, each with its own keypoints; Tiles refuses keypoints
    pixels = draw_pixels(data, h, w, m, 2)
    values = (1.0, 0.5)
    image = torch.zeros(1, 1, h, w)
    for (r, c), v in zip(pixels, values, strict=True):
        image[0, 0, r, c] = v
    truth = torch.tensor([[[(c + 0.5) / w, (r + 0.5) / h] for r, c in pixels]], dtype=torch.float64)
    seen = 0
    for param in transform.params:
        t = one_step(transform, param)
        view = t.augment_image(image)[0, 0]
        if isinstance(transform, T.ImageOnlyTransform):
            points = torch.rand(1, 3, 2)
            assert torch.equal(t.deaugment_keypoints(points), points)
            continue
        # Where did each dot land? (independent of the keypoint maps under test)
        found = [centroid(view, v) for v in values]
        for i, point in enumerate(found):
            if point is None:  # a crop that does not hold this dot
                continue
            back = t.deaugment_keypoints(point.view(1, 1, 2))
            assert torch.allclose(back, truth[:, i : i + 1], atol=1e-9), (name, param, pixels[i])
            seen += 1
    if not isinstance(transform, T.ImageOnlyTransform):
        assert seen >= 2  # every dot is in at least one view


@pytest.mark.parametrize("name, index", CASES, ids=CASE_IDS)
@FAST
@given(size=sizes, data=st.data())
def test_boxes_round_trip_against_rectangle_images(name, index, size, data):
    h, w = size
    transform = make(name, index, h, w)
    m = margin(transform)
    if h <= 2 * m or w <= 2 * m or name in NOT_PIXEL_EXACT or "boxes" not in transform.targets:
        return  # refusing boxes is checked in test_labels_pass_through_and_missing_targets_are_refused
    if getattr(transform, "multiplies_batch", False):
        return  # one view is many images (tiles): tests/test_tiles.py maps their boxes back
    (r0, c0), (r1, c1) = draw_pixels(data, h, w, m, 2)
    r0, r1, c0, c1 = min(r0, r1), max(r0, r1), min(c0, c1), max(c0, c1)
    image = torch.zeros(1, 1, h, w)
    image[0, 0, r0 : r1 + 1, c0 : c1 + 1] = 1.0
    truth = torch.tensor([[[c0 / w, r0 / h, (c1 + 1) / w, (r1 + 1) / h]]], dtype=torch.float64)
    for param in transform.params:
        t = one_step(transform, param)
        view = t.augment_image(image)[0, 0]
        if isinstance(transform, T.ImageOnlyTransform):
            boxes = torch.rand(1, 2, 4)
            assert torch.equal(t.deaugment_boxes(boxes), boxes)
            continue
        hit = (view == 1.0).nonzero().tolist()
        if len(hit) == 0:
            continue
        vh, vw = view.shape
        top, bottom = min(r for r, _ in hit), max(r for r, _ in hit)
        left, right = min(c for _, c in hit), max(c for _, c in hit)
        if isinstance(transform, (T.FiveCrops, T.TenCrops)) and len(hit) != (r1 - r0 + 1) * (c1 - c0 + 1):
            continue  # a crop that cuts the rectangle
        observed = torch.tensor([[[left / vw, top / vh, (right + 1) / vw, (bottom + 1) / vh]]], dtype=torch.float64)
        assert torch.allclose(t.deaugment_boxes(observed), truth, atol=1e-9), (name, param)


@pytest.mark.parametrize("name", T.list_transforms())
def test_labels_pass_through_and_missing_targets_are_refused(name):
    transform = make(name, 0, 6, 8)
    label = torch.rand(2, 5)
    for param in transform.params:
        t = one_step(transform, param)
        t.augment_image(torch.rand(2, 3, 6, 8))
        if "label" in transform.targets:
            assert torch.equal(t.deaugment_label(label), label)
        else:
            with pytest.raises(NotInvertibleError, match=f"^{name} cannot invert the 'label' target"):
                t.deaugment_label(label)
        for target in set(T.TARGETS) - {"image", "label"} - transform.targets:
            method = getattr(t, f"deaugment_{'mask' if target == 'mask' else target}")
            arg = {"mask": torch.rand(2, 1, 6, 8), "keypoints": torch.rand(2, 1, 2), "boxes": torch.rand(2, 1, 4)}
            with pytest.raises(NotInvertibleError, match=f"^{name} cannot invert the '{target}' target"):
                method(arg[target])


def test_declared_targets():
    everything = set(T.TARGETS)
    for name in ["HorizontalFlip", "VerticalFlip", "Rotate90", "Scale", "Resize", "Shift", "Add", "Brightness"]:
        assert set(make(name, 0, 6, 6).targets) == everything, name
    for name in ["FiveCrops", "TenCrops"]:
        assert set(make(name, 0, 6, 6).targets) == everything, name
    assert set(make("Tiles", 0, 6, 6).targets) == {"image", "mask", "boxes"}


def test_five_crops_masks_are_pasted_into_the_full_frame():
    x = torch.rand(2, 3, 5, 7)
    # 2x3 crops of a 5x7 image, placed as ttach places them (centre: row 5 // 2 - 1, column 7 // 2 - 1).
    rectangles = {"lt": (0, 0), "lb": (3, 0), "rb": (3, 4), "rt": (0, 4), "center": (1, 2)}
    transform = T.FiveCrops(2, 3)
    for crop, (top, left) in rectangles.items():
        t = one_step(transform, crop)
        view = t.augment_image(x)
        assert torch.equal(view, x[..., top : top + 2, left : left + 3]), crop
        values, weight = t.deaugment_mask_weighted(view)  # an identity "segmentation model"
        inside = torch.zeros(5, 7, dtype=torch.bool)
        inside[top : top + 2, left : left + 3] = True
        assert values.shape == x.shape and weight.shape == (1, 1, 5, 7)
        assert torch.equal(values[..., inside], x[..., inside]), crop
        assert torch.equal(weight[0, 0], inside.float()), crop
        assert torch.equal(t.deaugment_mask(view), values), crop


# --------------------------------------------------------------------------- ttach's names and defaults

SHARED = {
    "HorizontalFlip": ((), {}),
    "VerticalFlip": ((), {}),
    "Rotate90": (([90, 270],), {}),
    "Scale": (([0.5, 2],), {}),
    "Resize": (([(4, 4), (12, 16)],), {"original_size": (8, 8)}),
    "Add": (([0.1, -0.2],), {}),
    "Multiply": (([0.9, 1.1],), {}),
    "FiveCrops": ((5, 6), {}),
}


@pytest.mark.parametrize("name", SHARED)
def test_constructor_signature_matches_ttach(name):
    ours = inspect.signature(getattr(ttakit, name)).parameters
    theirs = inspect.signature(getattr(ttach, name)).parameters
    assert list(ours)[: len(theirs)] == list(theirs)
    for arg, p in theirs.items():
        assert ours[arg].default == p.default, (name, arg)


@pytest.mark.parametrize("name", SHARED)
def test_params_and_augmented_images_match_ttach(name):
    args, kwargs = SHARED[name]
    ours, theirs = getattr(ttakit, name)(*args, **kwargs), getattr(ttach, name)(*args, **kwargs)
    assert ours.pname == theirs.pname or name == "FiveCrops"
    assert len(ours.params) == len(theirs.params)
    if name != "FiveCrops":  # ttach's crop parameters are functions, ours position names
        assert [tuple(p) if isinstance(p, list) else p for p in ours.params] == list(theirs.params)
        assert ours.identity_param == theirs.identity_param
    x = torch.rand(2, 3, 8, 8)
    for p_ours, p_theirs in zip(ours.params, theirs.params, strict=True):
        a = ours.apply_aug_image(x, **{ours.pname: p_ours})
        b = theirs.apply_aug_image(x, **{theirs.pname: p_theirs})
        assert torch.equal(a, b), (name, p_ours)
        if name in ("HorizontalFlip", "VerticalFlip", "Rotate90"):
            assert torch.equal(
                ours.apply_deaug_mask(a, **{ours.pname: p_ours}), theirs.apply_deaug_mask(b, **{theirs.pname: p_theirs})
            )


def test_scale_defaults():
    s = T.Scale([2])
    assert (s.params, s.interpolation, s.align_corners) == ([1, 2], "nearest", None)
    assert T.Rotate90([90]).params == [0, 90] and T.Rotate90([0, 90]).params == [0, 90]
    assert T.Add([1]).params == [0, 1] and T.Multiply([2]).params == [1, 2]
    assert T.Resize([(4, 4)]).params == [(4, 4)] and T.Resize([(4, 4)], original_size=(8, 8)).params == [(8, 8), (4, 4)]
    assert len(T.FiveCrops(3, 3).params) == 5 and len(T.TenCrops(3, 3).params) == 10
    assert T.Shift([(1, 0)]).params == [(0, 0), (1, 0)] and T.Shift([(1, 0)]).padding_mode == "constant"
    assert T.Brightness([0.1]).params == [0, 0.1] and T.Contrast([2]).params == [1, 2]


def test_ten_crops_views_equal_ttach_ten_crop_transform():
    x = torch.rand(1, 2, 9, 7)
    theirs = [t.augment_image(x) for t in ttach.aliases.ten_crop_transform(4, 5)]
    ours_t = T.TenCrops(4, 5)
    ours = [ours_t.apply_aug_image(x, crop=p) for p in ours_t.params]
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True)) and len(ours) == 10


def test_resize_without_original_size_uses_the_recorded_size():
    # ttach raises here ("Provide original image size"); the recorded input size suffices.
    x = torch.rand(1, 1, 5, 7)
    t = one_step(T.Resize([(10, 14)]), (10, 14))
    view = t.augment_image(x)
    assert view.shape[-2:] == (10, 14)
    assert torch.equal(t.deaugment_mask(view), x)
    with pytest.raises(ValueError, match="original image size"):
        ttach.Resize([(10, 14)]).apply_deaug_mask(view, size=(10, 14))


def test_linear_interpolation_works_where_ttach_fails():
    x = torch.rand(1, 1, 4, 4)
    with pytest.raises(NotImplementedError):
        ttach.Scale([2], interpolation="linear").apply_aug_image(x, scale=2)
    t = one_step(T.Scale([2], interpolation="linear"), 2)
    expected = torch.nn.functional.interpolate(x, size=(8, 8), mode="bilinear")
    assert torch.allclose(t.augment_image(x), expected)
    assert t.deaugment_mask(t.augment_image(x)).shape == x.shape


# --------------------------------------------------------------------------- bad arguments


def test_rotate90_rejects_45_degrees_where_ttach_silently_does_nothing():
    x = torch.rand(1, 1, 4, 4)
    theirs = ttach.Rotate90([45])
    assert 45 in theirs.params and torch.equal(theirs.apply_aug_image(x, angle=45), x)  # ttach's bug
    with pytest.raises(InvalidInputError, match=r"multiples of 90 degrees, got \[45\]"):
        T.Rotate90([45])
    with pytest.raises(InvalidInputError, match="multiple of 90 degrees, got 45"):
        T.Rotate90([90]).apply_aug_image(x, angle=45)


@pytest.mark.parametrize(
    "build, pattern",
    [
        (lambda: T.Rotate90([90, 135]), r"got \[135\]"),
        (lambda: T.Rotate90(90), r"angles must be a non-empty list, got 90"),
        (lambda: T.Scale([0.5, 0]), r"scales must be positive finite numbers, got \[0.5, 0\]"),
        (lambda: T.Scale([-2]), r"got \[-2\]"),
        (lambda: T.Scale(["2"]), r"got \['2'\]"),
        (lambda: T.Scale([2], interpolation="cubic"), r"got 'cubic'"),
        (lambda: T.Scale([2], align_corners=True), r"align_corners=True.*'nearest'"),
        (lambda: T.Resize([(0, 4)]), r"sizes must hold \(height, width\) pairs of positive integers, got \(0, 4\)"),
        (lambda: T.Resize([(4,)]), r"got \(4,\)"),
        (lambda: T.Resize([(4, 4)], original_size=(4.5, 4)), r"original_size.*\(4.5, 4\)"),
        (lambda: T.Add([]), r"values must be a non-empty list, got \[\]"),
        (lambda: T.Multiply([float("nan")]), r"factors must be finite numbers, got \[nan\]"),
        (lambda: T.Contrast([0]), r"factors must be positive finite numbers, got \[0\]"),
        (lambda: T.FiveCrops(0, 3), r"crop_height must be a positive integer number of pixels, got 0"),
        (lambda: T.TenCrops(3, 2.5), r"crop_width.*got 2.5"),
        (lambda: T.Shift([(1.5, 0)]), r"shifts must hold \(dx, dy\) pairs of integers, got \(1.5, 0\)"),
        (lambda: T.Shift([(1, 0)], padding_mode="wrap"), r"padding_mode must be one of.*got 'wrap'"),
        (lambda: T.Shift.around((1,), directions=6), r"directions must be 4 or 8, got 6"),
    ],
)
def test_bad_arguments_raise_naming_the_value(build, pattern):
    with pytest.raises(InvalidInputError, match=pattern):
        build()


def test_crop_larger_than_the_image_raises_naming_sizes():
    t = one_step(T.FiveCrops(10, 4), "lt")
    with pytest.raises(InvalidInputError, match="crop of 10x4 does not fit an image of 8x8"):
        t.augment_image(torch.rand(1, 1, 8, 8))


def test_shift_around_builds_axis_and_diagonal_shifts():
    assert T.Shift.around((1,), 4).params == [(0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)]
    eight = T.Shift.around((1, 2), 8, "reflect")
    assert len(eight.params) == 17 and (-2, 2) in eight.params and eight.padding_mode == "reflect"


def test_photometric_views_by_hand():
    x = torch.tensor([0.2, 0.4, 0.6]).view(1, 1, 1, 3)
    assert torch.allclose(T.Brightness([0.5]).apply_aug_image(x, delta=0.5).flatten(), torch.tensor([0.7, 0.9, 1.0]))
    assert torch.allclose(T.Contrast([2]).apply_aug_image(x, factor=2).flatten(), torch.tensor([0.0, 0.4, 0.8]))
    assert torch.allclose(T.Add([0.1]).apply_aug_image(x, value=0.1).flatten(), torch.tensor([0.3, 0.5, 0.7]))
    assert T.Multiply([3]).apply_aug_image(x, factor=1) is x  # the identity view is free


def test_registry_lookup():
    assert T.get_transform_class("Shift") is T.Shift
    with pytest.raises(ttakit.UnknownNameError, match="unknown transform 'Blur'; expected one of: .*Shift"):
        T.get_transform_class("Blur")
