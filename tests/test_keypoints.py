"""KeypointsTTAWrapper's flip pairs and heatmaps, and keypoint de-augmentation through chains of
transforms (property tests).

The flip-pair model tells left from right as a pose model does, by appearance that a mirror
reverses: each keypoint is drawn as a bright pixel with two dimmer neighbours, and the turn from
the 0.5 neighbour to the 0.25 neighbour is clockwise on screen for the "left" keypoint and
counter-clockwise for the "right" one. Quarter turns keep that handedness; every mirror reverses
it, so on a mirrored view the model calls the person's right keypoint "left"."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ttakit
from ttakit import transforms as T
from ttakit.errors import InvalidInputError, ModelOutputError, NotInvertibleError
from ttakit.policy import Compose, Step, Transformer
from ttakit.wrappers import KeypointsTTAWrapper, mirrors

from ._fixtures import chain_examples

pytestmark = pytest.mark.usefixtures("single_thread")

NEIGHBOURS = ((0, 1), (1, 0), (0, -1), (-1, 0))  # (drow, dcol)


def draw_marker(image: torch.Tensor, row: int, col: int, left: bool) -> None:
    """A handed marker at ``(row, col)`` of ``image: (H, W)``: 1.0 there, 0.5 beside it, 0.25 below."""
    image[row, col] = 1.0
    image[row, col + 1 if left else col - 1] = 0.5
    image[row + 1, col] = 0.25


def find_markers(image: torch.Tensor) -> tuple[tuple[int, int], tuple[int, int]]:
    """``image: (H, W)`` -> ``((row, col) of the left marker, (row, col) of the right marker)``."""
    found = {}
    for row, col in torch.nonzero(image == 1.0).tolist():
        near = {}
        for dr, dc in NEIGHBOURS:
            r, c = row + dr, col + dc
            if 0 <= r < image.shape[0] and 0 <= c < image.shape[1]:
                near[float(image[r, c])] = (dc, dr)  # as (dx, dy) on screen
        (ax, ay), (bx, by) = near[0.5], near[0.25]
        found[ax * by - ay * bx > 0] = (row, col)  # clockwise on screen (y down): "left"
    return found[True], found[False]


def pose_model(images: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, 4)`` pixels ``[x_left, y_left, x_right, y_right]`` (pixel centres)."""
    out = []
    for image in images:
        (lr, lc), (rr, rc) = find_markers(image[0])
        out.append([lc + 0.5, lr + 0.5, rc + 0.5, rr + 0.5])
    return torch.tensor(out)


def heatmap_model(images: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, 2, H, W)``: one-hot heatmaps of the left and right keypoints."""
    maps = torch.zeros(images.shape[0], 2, *images.shape[-2:])
    for i, image in enumerate(images):
        for k, (row, col) in enumerate(find_markers(image[0])):
            maps[i, k, row, col] = 1.0
    return maps


def pose_images() -> tuple[torch.Tensor, torch.Tensor]:
    """Two non-square images and their truth ``(B, 4)``."""
    x = torch.zeros(2, 1, 9, 14)
    draw_marker(x[0, 0], 2, 3, left=True)
    draw_marker(x[0, 0], 5, 10, left=False)
    draw_marker(x[1, 0], 6, 9, left=True)
    draw_marker(x[1, 0], 3, 4, left=False)
    truth = torch.tensor([[3.5, 2.5, 10.5, 5.5], [9.5, 6.5, 4.5, 3.5]])
    return x, truth


MIRRORING = {
    "hflip": lambda: Compose([T.HorizontalFlip()]),
    "d4": ttakit.aliases.d4_transform,
    "vflip+rot90": lambda: Compose([T.VerticalFlip(), T.Rotate90([90, 270])]),
}


def test_the_model_is_right_on_the_image_itself():
    x, truth = pose_images()
    assert torch.equal(pose_model(x), truth)


@pytest.mark.parametrize("policy", list(MIRRORING))
def test_flip_pairs_recover_the_truth_and_without_them_the_merge_is_wrong(policy):
    x, truth = pose_images()
    paired = KeypointsTTAWrapper(pose_model, MIRRORING[policy](), flip_pairs=[(0, 1)])
    assert torch.allclose(paired(x), truth, atol=1e-5)
    views = paired.run(x, return_views=True).views
    assert torch.allclose(views, truth.expand_as(views), atol=1e-5)  # every view, swapped back
    plain = KeypointsTTAWrapper(pose_model, MIRRORING[policy]())(x)
    assert not torch.allclose(plain, truth, atol=0.5)
    # Half the views are mirrors: without the swap each merged point is the midpoint of the two.
    midpoint = (truth[:, :2] + truth[:, 2:]) / 2
    assert torch.allclose(plain, midpoint.repeat(1, 2), atol=1e-5)


def test_flip_pairs_leave_views_that_do_not_mirror_alone():
    x, truth = pose_images()
    policy = Compose([T.Rotate90([90, 180, 270]), T.Shift([(1, 0)])])
    assert torch.allclose(KeypointsTTAWrapper(pose_model, policy, flip_pairs=[(0, 1)])(x), truth, atol=1e-5)


def test_flip_pairs_with_n_by_2_and_scaled_outputs():
    x, truth = pose_images()
    size = torch.tensor([14.0, 9.0]).repeat(2)

    def scaled_pairs(images):
        w, h = images.shape[-1], images.shape[-2]
        return (pose_model(images) / torch.tensor([w, h, w, h])).view(-1, 2, 2)

    wrapped = KeypointsTTAWrapper(scaled_pairs, MIRRORING["hflip"](), scaled=True, flip_pairs=[(1, 0)])
    assert torch.allclose(wrapped(x) * size, truth, atol=1e-5)


def test_heatmaps_with_flip_pairs():
    x, truth = pose_images()
    truth_maps = heatmap_model(x)
    for policy in ("hflip", "vflip+rot90"):
        merged = KeypointsTTAWrapper(heatmap_model, MIRRORING[policy](), flip_pairs=[(0, 1)])(x)
        assert merged.shape == truth_maps.shape and torch.allclose(merged, truth_maps, atol=1e-6), policy
        plain = KeypointsTTAWrapper(heatmap_model, MIRRORING[policy](), heatmaps=True)(x)
        assert not torch.allclose(plain, truth_maps, atol=0.1)
        assert torch.allclose(plain[:, 0], plain[:, 1], atol=1e-6)  # half the views call each marker "left"
    out = KeypointsTTAWrapper(heatmap_model, MIRRORING["hflip"](), flip_pairs=[(0, 1)]).run(x, return_views=True)
    assert out.views.shape == (2, *truth_maps.shape)


def test_smaller_heatmaps_are_resized_to_the_view_and_come_back_at_the_image_size():
    def low_res(images):  # a stride-2 head: heatmaps of half the view's size
        return torch.nn.functional.avg_pool2d(heatmap_model(images), 2) * 4

    x = torch.zeros(1, 1, 8, 12)
    draw_marker(x[0, 0], 2, 2, left=True)
    draw_marker(x[0, 0], 5, 9, left=False)
    merged = KeypointsTTAWrapper(low_res, Compose([T.HorizontalFlip()]), flip_pairs=[(0, 1)])(x)
    assert merged.shape == (1, 2, 8, 12)
    peaks = [divmod(int(merged[0, k].argmax()), 12) for k in range(2)]
    assert abs(peaks[0][0] - 2) <= 1 and abs(peaks[0][1] - 2) <= 1  # left near (2, 2)
    assert abs(peaks[1][0] - 5) <= 1 and abs(peaks[1][1] - 9) <= 1  # right near (5, 9)


def test_heatmaps_are_never_modified_in_place():
    stored = torch.rand(1, 2, 6, 8)
    before = stored.clone()
    wrapped = KeypointsTTAWrapper(lambda x: stored, Compose([T.HorizontalFlip()]), flip_pairs=[(0, 1)],
                                  inference_mode=False, max_batch=1)
    wrapped(torch.rand(1, 1, 6, 8))
    assert torch.equal(stored, before)


# --------------------------------------------------------------------------- which views mirror


@pytest.mark.parametrize(
    "steps, expected",
    [
        ([(T.HorizontalFlip(), True)], True),
        ([(T.VerticalFlip(), True)], True),
        ([(T.HorizontalFlip(), True), (T.VerticalFlip(), True)], False),  # two mirrors: a half turn
        ([(T.HorizontalFlip(), True), (T.Rotate90([90]), 90)], True),
        ([(T.Rotate90([90]), 270)], False),
        ([(T.TenCrops(4, 5), (True, "lt"))], True),
        ([(T.TenCrops(4, 5), (False, "rb"))], False),
        ([(T.Scale([2]), 2), (T.Shift([(1, 1)]), (1, 1))], False),
        ([(T.HorizontalFlip(), False)], False),
    ],
)
def test_mirrors(steps, expected):
    t = Transformer([Step(transform, param) for transform, param in steps])
    t.augment_image(torch.rand(1, 1, 6, 7))
    assert mirrors(t) is expected


# --------------------------------------------------------------------------- chains (properties)

# One example per registered transform that declares keypoints; quarter turns for Rotate keep the
# dot pixel-exact (small angles resample it); the dot stays 3 px from the border for the shifts.
KEYPOINT_EXAMPLES = {n: f for n, f in chain_examples().items() if "keypoints" in T.get_transform_class(n).targets}


def keypoint_transforms() -> list[str]:
    return [n for n in T.list_transforms() if "keypoints" in T.get_transform_class(n).targets]


def test_every_registered_keypoint_transform_has_an_example():
    assert set(keypoint_transforms()) <= set(KEYPOINT_EXAMPLES), set(keypoint_transforms()) - set(KEYPOINT_EXAMPLES)


def mirror_count(step: Step) -> int:
    t, p = step.transform, step.param
    if isinstance(t, (T.HorizontalFlip, T.VerticalFlip)):
        return int(bool(p))
    if isinstance(t, T.TenCrops):
        return int(p[0])
    return 0


@settings(max_examples=60, deadline=None)
@given(
    size=st.tuples(st.integers(14, 24), st.integers(14, 24)),
    names=st.lists(st.sampled_from(sorted(KEYPOINT_EXAMPLES)), min_size=1, max_size=2),
    data=st.data(),
)
def test_keypoints_map_back_through_chains_and_mirrors_are_found(size, names, data):
    """A chain of up to two keypoint transforms at random parameters on a non-square image: the dot
    found on the view, mapped back, is the dot (within half a pixel), and ``mirrors`` is True
    exactly when the chain holds an odd number of mirrors."""
    h, w = size
    names = [n for n in names if n in keypoint_transforms()]
    if not names:
        return
    steps, current = [], torch.zeros(1, 1, h, w)
    for name in names:
        transform = KEYPOINT_EXAMPLES[name](*current.shape[-2:])
        steps.append(Step(transform, data.draw(st.sampled_from(list(transform.params)))))
        current = Transformer(steps[-1:]).augment_image(current)
    row = data.draw(st.integers(h // 4 + 2, 3 * h // 4 - 2))
    col = data.draw(st.integers(w // 4 + 2, 3 * w // 4 - 2))
    image = torch.zeros(1, 1, h, w)
    image[0, 0, row, col] = 1.0
    t = Transformer(steps)
    view = t.augment_image(image)[0, 0]
    assert mirrors(t) is (sum(mirror_count(s) for s in steps) % 2 == 1), names
    low, high = float(view.min()), float(view.max())
    if high - low < 0.1:
        return  # a second step pushed the dot out of view
    hit = (view > (low + high) / 2).nonzero().to(torch.float64)
    vh, vw = view.shape
    if hit[:, 0].min() == 0 or hit[:, 1].min() == 0 or hit[:, 0].max() == vh - 1 or hit[:, 1].max() == vw - 1:
        return  # the dot is cut by the view's edge
    seen = torch.tensor([[[(hit[:, 1].mean() + 0.5) / vw, (hit[:, 0].mean() + 0.5) / vh]]])
    back = t.deaugment_keypoints(seen)[0, 0] * torch.tensor([w, h], dtype=torch.float64)
    assert torch.allclose(back, torch.tensor([col + 0.5, row + 0.5], dtype=torch.float64), atol=0.5 + 1e-6), (
        names, [s.param for s in steps], back.tolist(), (col, row))


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "flip_pairs, pattern",
    [
        ([(0, 0)], r"flip_pairs pair \(0, 0\) repeats keypoint index 0"),
        ([(0, 1), (2, 1)], r"flip_pairs pair \(2, 1\) repeats keypoint index 1"),
        ([(0, -1)], r"flip_pairs must hold \(left, right\) pairs of non-negative keypoint indices, got \(0, -1\)"),
        ([(0, 1, 2)], r"pairs of non-negative keypoint indices, got \(0, 1, 2\)"),
        ([(0, 1.0)], r"got \(0, 1.0\)"),
        ("left,right", r"flip_pairs must be a list of \(left, right\) keypoint index pairs, got 'left,right'"),
    ],
)
def test_bad_flip_pairs_are_refused_when_built(flip_pairs, pattern):
    with pytest.raises(InvalidInputError, match=pattern):
        KeypointsTTAWrapper(pose_model, MIRRORING["hflip"](), flip_pairs=flip_pairs)


def test_flip_pairs_out_of_range_name_the_pair_and_n():
    x, _ = pose_images()
    wrapped = KeypointsTTAWrapper(pose_model, MIRRORING["hflip"](), flip_pairs=[(0, 1), (2, 5)])
    with pytest.raises(InvalidInputError, match=r"flip_pairs pair \(2, 5\) is out of range for N = 2 keypoints"):
        wrapped(x)
    heat = KeypointsTTAWrapper(heatmap_model, MIRRORING["hflip"](), flip_pairs=[(1, 2)])
    with pytest.raises(InvalidInputError, match=r"flip_pairs pair \(1, 2\) is out of range for N = 2 keypoints"):
        heat(x)


def test_heatmap_errors():
    x, _ = pose_images()
    with pytest.raises(ModelOutputError, match=r"heatmaps=True: .* heatmaps \(B, N, H, W\), got shape \(2, 4\)"):
        KeypointsTTAWrapper(pose_model, MIRRORING["hflip"](), heatmaps=True)(x)
    with pytest.raises(InvalidInputError, match=r"heatmaps must be True, False or None .*got 'yes'"):
        KeypointsTTAWrapper(heatmap_model, MIRRORING["hflip"](), heatmaps="yes")
    with pytest.raises(ModelOutputError, match=r"\(B, 2N\).*got shape \(2, 2, 9, 14\)"):
        KeypointsTTAWrapper(heatmap_model, MIRRORING["hflip"](), heatmaps=False)(x)
    with pytest.raises(NotInvertibleError, match="heatmaps need views that see every pixel"):
        KeypointsTTAWrapper(lambda v: torch.zeros(len(v), 2, *v.shape[-2:]), Compose([T.FiveCrops(7, 12)]))(x)
