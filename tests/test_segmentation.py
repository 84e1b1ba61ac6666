"""Segmentation TTA: masks de-augment exactly for every transform that declares them (on the pixels
each view saw), a pointwise segmenter gets its plain output back through every exactly invertible
policy, views that see part of the image (crops, shifts) are merged per pixel over the views that
saw it, and bad policies or model outputs are one-line errors."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import ttakit
from ttakit import functional as F
from ttakit import transforms as T
from ttakit.engine import TTAEngine
from ttakit.errors import InvalidInputError, ModelOutputError
from ttakit.policy import Compose, Policy, Step, Transformer, View

pytestmark = pytest.mark.usefixtures("single_thread")
FAST = settings(max_examples=25, deadline=None)

# name -> factories of instances for an (H, W) image (H, W >= 3) that map masks back exactly on the
# pixels they saw: whole-pixel geometry, integer up-scaling with nearest neighbours.
MASK_EXAMPLES: dict[str, list[Callable[[int, int], T.BaseTransform]]] = {
    "HorizontalFlip": [lambda h, w: T.HorizontalFlip()],
    "VerticalFlip": [lambda h, w: T.VerticalFlip()],
    "Rotate90": [lambda h, w: T.Rotate90([90, 180, 270])],
    "Scale": [lambda h, w: T.Scale([2, 3])],
    "Resize": [lambda h, w: T.Resize([(2 * h, 3 * w)], original_size=(h, w))],
    "FiveCrops": [lambda h, w: T.FiveCrops((h + 1) // 2, (w + 1) // 2), lambda h, w: T.FiveCrops(h - 1, w)],
    "TenCrops": [lambda h, w: T.TenCrops(h - 2, (w + 1) // 2)],
    "Shift": [lambda h, w, m=m: T.Shift([(1, 0), (-2, 1), (0, -1), (2, 2)], m) for m in F.PADDING_MODES],
    "Tiles": [
        lambda h, w: T.Tiles((max(1, h // 2), max(1, w - 1)), 0.25),
        lambda h, w: T.Tiles((h, (w + 2) // 3), 0.5, "gaussian", full_image=True),
    ],
    "Add": [lambda h, w: T.Add([0.5])],
    "Multiply": [lambda h, w: T.Multiply([2.0])],
    "Brightness": [lambda h, w: T.Brightness([0.2])],
    "Contrast": [lambda h, w: T.Contrast([1.5])],
}
MASK_TRANSFORMS = [n for n in T.list_transforms() if "mask" in T.get_transform_class(n).targets]
CASES = [(n, i) for n in MASK_TRANSFORMS for i in range(len(MASK_EXAMPLES.get(n, [None])))]


def test_every_registered_mask_transform_has_an_example():
    assert set(MASK_TRANSFORMS) <= set(MASK_EXAMPLES), set(MASK_TRANSFORMS) - set(MASK_EXAMPLES)
    assert {"FiveCrops", "TenCrops", "Shift", "Tiles", "Rotate90"} <= set(MASK_TRANSFORMS)


def coordinate_image(batch: int, h: int, w: int) -> torch.Tensor:
    """``(batch, 3, h, w)``: each pixel holds its row, its column and its image's index."""
    rows = torch.arange(h, dtype=torch.float64)[:, None].expand(h, w)
    cols = torch.arange(w, dtype=torch.float64)[None, :].expand(h, w)
    return torch.stack([torch.stack([rows, cols, torch.full((h, w), float(b))]) for b in range(batch)])


def expected_seen(transform, param, h: int, w: int) -> int:
    """How many pixels of an (h, w) image the view saw."""
    if isinstance(transform, (T.FiveCrops, T.TenCrops)):
        return transform.crop_height * transform.crop_width
    if isinstance(transform, T.Shift) and transform.padding_mode != "circular":
        dx, dy = param
        return (h - abs(dy)) * (w - abs(dx))
    return h * w


@pytest.mark.parametrize("name, index", CASES, ids=[f"{n}-{i}" for n, i in CASES])
@FAST
@given(size=st.tuples(st.integers(3, 12), st.integers(3, 12)).filter(lambda s: s[0] != s[1]))
def test_masks_come_back_on_the_pixels_each_view_saw(name, index, size):
    h, w = size
    transform = MASK_EXAMPLES[name][index](h, w)
    x = coordinate_image(2, h, w)
    for param in transform.params:
        t = Transformer([Step(transform, param)])
        augmented = t.augment_image(x)
        if isinstance(transform, T.ImageOnlyTransform):
            # Pixel values change, geometry does not: any mask on the view comes back untouched.
            values, weight = t.deaugment_mask_weighted(augmented)
            assert values is augmented and weight is None
            continue
        values, weight = t.deaugment_mask_weighted(augmented)  # the coordinate image as the "model output"
        assert values.shape == x.shape
        seen = torch.ones(h, w, dtype=torch.bool) if weight is None else weight[0, 0] > 0
        assert int(seen.sum()) == expected_seen(transform, param, h, w), (name, param)
        torch.testing.assert_close(values[..., seen], x[..., seen], rtol=0, atol=1e-9)
        assert torch.equal(t.deaugment_mask(augmented), values)


# --------------------------------------------------------------------------- a pointwise segmenter


def pointwise() -> nn.Module:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 1).eval()
    for p in conv.parameters():
        p.requires_grad_(False)
    return conv


EXACT_POLICIES = {
    "flip": lambda: ttakit.aliases.flip_transform(),
    "d4": lambda: ttakit.aliases.d4_transform(),  # quarter-turns of a non-square image
    "rot90": lambda: Compose([T.Rotate90([90, 270])]),
    **{f"shift-{m}": (lambda m=m: Compose([T.Shift.around((1, 2), 8, m)])) for m in F.PADDING_MODES},
    "scale": lambda: Compose([T.Scale([2])]),
    "resize": lambda: Compose([T.Resize([(20, 39)])]),
    "five-crops": lambda: ttakit.aliases.five_crop_transform(6, 7),
    "ten-crops": lambda: Compose([T.TenCrops(6, 7)]),
    "hflip-five-crops": lambda: ttakit.aliases.ten_crop_transform(5, 8),
    "tiles": lambda: Compose([T.Tiles((4, 5), 0.25)]),
    "tiles-gaussian": lambda: Compose([T.Tiles((6, 4), 0.5, "gaussian")]),
    "tiles-hflip": lambda: Compose([T.Tiles(4, 0.25), T.HorizontalFlip()]),
    "tiles-full-rot": lambda: Compose([T.Tiles((5, 6), 0.25, "gaussian", full_image=True), T.Rotate90([90])]),
    "tiles-crops": lambda: Compose([T.Tiles((8, 9), 0.25), T.FiveCrops(5, 6)]),
}


@pytest.mark.parametrize("name", sorted(EXACT_POLICIES))
def test_a_pointwise_segmenter_gets_its_plain_output_back(name):
    model = pointwise()
    x = torch.rand(3, 3, 10, 13)
    plain = model(x)
    wrapped = ttakit.SegmentationTTAWrapper(model, EXACT_POLICIES[name](), max_batch=8)
    torch.testing.assert_close(wrapped(x), plain, rtol=0, atol=1e-5)
    engine = TTAEngine(model, EXACT_POLICIES[name](), target="mask", activation="softmax", max_batch=8)
    torch.testing.assert_close(engine(x), torch.softmax(plain, 1), rtol=0, atol=1e-5)
    for mode in ("gmean", "max", "vote"):
        merged = TTAEngine(model, EXACT_POLICIES[name](), target="mask", activation="softmax", merge_mode=mode)(x)
        assert torch.equal(merged.argmax(1), plain.argmax(1)), mode


# --------------------------------------------------------------------------- per-pixel merge


def by_hand(model, policy, x, mode="mean"):
    """Each view run on its own; each pixel merged over the views that saw it."""
    num, den = 0.0, 0.0
    for t in policy:
        values, weight = t.deaugment_mask_weighted(model(t.augment_image(x)))
        weight = torch.ones(1, 1, *x.shape[-2:]) if weight is None else weight
        if mode == "vote":
            values = torch.nn.functional.one_hot(values.argmax(1), values.shape[1]).permute(0, 3, 1, 2).float()
        num, den = num + values * weight, den + weight
    return num / den


@pytest.mark.parametrize(
    "policy",
    [
        Compose([T.Shift.around((1, 2), 8)]).to_policy(),
        Compose([T.HorizontalFlip(), T.Shift([(3, -2)], "reflect")]).to_policy(),
        Policy([View.identity(), *Compose([T.FiveCrops(4, 5)]).views]),
        ttakit.aliases.ten_crop_transform(6, 8).to_policy(),
    ],
    ids=["shift8", "hflip-shift-reflect", "identity-crops", "ten-crops"],
)
def test_each_pixel_is_merged_over_the_views_that_saw_it(seg_logits_model, policy):
    x = torch.rand(2, 3, 9, 11)
    with torch.no_grad():
        expected = by_hand(seg_logits_model, policy, x)
        votes = by_hand(seg_logits_model, policy, x, "vote")
    merged = TTAEngine(seg_logits_model, policy, target="mask", activation=None)(x)
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-5)
    voted = TTAEngine(seg_logits_model, policy, target="mask", activation=None, merge_mode="vote")(x)
    # Vote fractions over the covering views; the winner carries the engine's 1e-6 nudge.
    torch.testing.assert_close(voted, votes, rtol=0, atol=2e-6)


def test_views_without_coverage_loss_keep_the_plain_mean(seg_logits_model):
    x = torch.rand(2, 3, 7, 9)
    policy = ttakit.aliases.d4_transform()
    with torch.no_grad():
        expected = torch.stack([t.deaugment_mask(seg_logits_model(t.augment_image(x))) for t in policy]).mean(0)
    torch.testing.assert_close(TTAEngine(seg_logits_model, policy, target="mask")(x), expected, rtol=0, atol=1e-6)


def test_one_answer_per_image_whatever_the_batch(seg_logits_model):
    policy = Compose([T.TenCrops(5, 6)])
    x = torch.rand(5, 3, 8, 9)
    together = TTAEngine(seg_logits_model, policy, target="mask", max_batch=4)(x)
    for i in range(5):
        alone = TTAEngine(seg_logits_model, policy, target="mask", max_batch=64)(x[i : i + 1])
        torch.testing.assert_close(alone, together[i : i + 1], rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- bad input


class Recorder(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, x):
        self.calls += 1
        return self.model(x)


def test_a_crop_policy_leaving_pixels_unseen_is_refused_before_any_forward_pass():
    model = Recorder(pointwise())
    # 3x4 corner and centre crops of a 10x13 image: by hand, the crops see 3 * 4 * 5 = 60 of 130 pixels.
    wrapped = ttakit.SegmentationTTAWrapper(model, ttakit.aliases.five_crop_transform(3, 4))
    with pytest.raises(InvalidInputError) as info:
        wrapped(torch.rand(2, 3, 10, 13))
    message = str(info.value)
    assert message.startswith("policy 'compose' leaves 70 of 130 pixels of a 10x13 image unseen by every view")
    assert "crop_lt, crop_lb, crop_rb, crop_rt, crop_center" in message and "crop size 3x4" in message
    assert "\n" not in message and model.calls == 0
    # With the identity view every pixel is seen.
    policy = Policy([View.identity(), *ttakit.aliases.five_crop_transform(3, 4).views])
    assert ttakit.SegmentationTTAWrapper(model, policy)(torch.rand(2, 3, 10, 13)).shape == (2, 4, 10, 13)


@pytest.mark.parametrize(
    "model, pattern",
    [
        (lambda x: x.mean(dim=(2, 3)), r"^a segmentation model must return masks of shape \(B, C, H, W\), got shape \({n}, 3\)$"),
        (lambda x: x[:, :, None], r"^a segmentation model must return masks of shape \(B, C, H, W\), got shape \({n}, 3, 1, {h}, {w}\)$"),
        (lambda x: x[..., ::2, ::2], r"^a segmentation model must return masks of its input's spatial size {h}x{w} \(B, C, H, W\), got shape \({n}, 3, {h2}, {w2}\)$"),
    ],
    ids=["rank-2", "rank-5", "half-size"],
)
def test_a_segmentation_model_returning_the_wrong_shape_is_a_one_line_error(model, pattern):
    # (policy, rows of one view's output, view size) for 2 images of 6x7: 4x4 tiles at overlap 0.5
    # start at rows 0, 2 and columns 0, 2, 3 (6 tiles per image).
    cases = [("hflip", 2, 6, 7), (Compose([T.FiveCrops(4, 5)]), 2, 4, 5), (Compose([T.Tiles(4, 0.5)]), 2 * 6, 4, 4)]
    for policy, n, h, w in cases:
        expected = pattern.format(n=n, h=h, w=w, h2=(h + 1) // 2, w2=(w + 1) // 2)
        with pytest.raises(ModelOutputError, match=expected):
            TTAEngine(model, policy, target="mask")(torch.rand(2, 3, 6, 7))


def test_tiles_larger_than_the_image_and_bad_overlap_are_one_line_errors():
    with pytest.raises(InvalidInputError, match=r"^tiles of 8x8 do not fit an image of 6x7; use tiles at most the image size$"):
        ttakit.SegmentationTTAWrapper(pointwise(), Compose([T.Tiles(8)]))(torch.rand(1, 3, 6, 7))
    with pytest.raises(InvalidInputError, match=r"^overlap must be a fraction of the tile in \[0, 1\), got 1.5$"):
        T.Tiles(8, 1.5)


def test_merge_modes_that_cannot_merge_partial_views_are_refused_when_built():
    with pytest.raises(InvalidInputError, match=r"^merge mode 'sum' cannot merge views that see different pixels"):
        ttakit.SegmentationTTAWrapper(pointwise(), ttakit.aliases.five_crop_transform(4, 4), "sum")
    # Shifts with circular padding see every pixel (wrapped): any mode works.
    ttakit.SegmentationTTAWrapper(pointwise(), Compose([T.Shift([(1, 0)], "circular")]), "sum")


# --------------------------------------------------------------------------- the accumulator


@pytest.mark.parametrize("mode", ["mean", "gmean", "tsharpen", "max", "min", "vote"])
def test_the_accumulator_merges_each_pixel_over_the_views_that_saw_it(mode):
    from ttakit.merge import MergeAccumulator

    g = torch.Generator().manual_seed(0)
    views = torch.rand(3, 2, 4, 5, 6, generator=g)  # (K, B, C, H, W) probabilities
    coverage = [None, (torch.rand(1, 1, 5, 6, generator=g) > 0.5).float(), torch.zeros(1, 1, 5, 6)]
    coverage[2][..., :2, :] = 1.0
    weights = None if mode in ("max", "min") else [1.0, 2.0, 0.5]
    acc = MergeAccumulator(mode, 3, weights).fresh(coverage=True)
    for k in range(3):
        acc.add(views[k] * (1 if coverage[k] is None else coverage[k]), k, coverage[k])  # 0 where unseen
    merged = acc.result()
    w = torch.tensor(weights or [1.0, 1.0, 1.0])
    maps = torch.stack([torch.ones(1, 1, 5, 6) if c is None else c for c in coverage]) * w.view(3, 1, 1, 1, 1)
    seen = maps > 0
    if mode == "mean":
        expected = (views * maps).sum(0) / maps.sum(0)
    elif mode == "gmean":
        expected = torch.exp((torch.log(views) * maps).sum(0) / maps.sum(0))
    elif mode == "tsharpen":
        expected = (views.sqrt() * maps).sum(0) / maps.sum(0)
    elif mode == "max":
        expected = torch.where(seen, views, torch.tensor(-1.0)).amax(0)
    elif mode == "min":
        expected = torch.where(seen, views, torch.tensor(2.0)).amin(0)
    else:
        one_hot = torch.nn.functional.one_hot(views.argmax(2), 4).permute(0, 1, 4, 2, 3).float()
        expected = (one_hot * maps).sum(0) / maps.sum(0)
        torch.testing.assert_close(merged, expected, rtol=0, atol=2e-6)
        return
    torch.testing.assert_close(merged, expected, rtol=1e-6, atol=1e-6)


def test_coverage_maps_need_a_coverage_accumulator():
    from ttakit.merge import MergeAccumulator

    with pytest.raises(InvalidInputError, match=r"coverage maps need an accumulator made by fresh\(coverage=True\)"):
        MergeAccumulator("mean", 2).add(torch.rand(1, 2, 3, 3), 0, torch.ones(1, 1, 3, 3))
    with pytest.raises(InvalidInputError, match=r"^merge mode 'sum' cannot merge views that see different pixels"):
        MergeAccumulator("sum", 2).fresh(coverage=True)
