"""ttakit.functional: hand-computed values, inverses, purity and input validation."""

from __future__ import annotations

import pytest
import torch

from ttakit import functional as F
from ttakit.errors import InvalidInputError

pytestmark = pytest.mark.usefixtures("single_thread")

GRID = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]]).view(1, 1, 3, 3)


def test_flips_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]).view(1, 1, 2, 3)
    assert F.hflip(x).flatten().tolist() == [3, 2, 1, 6, 5, 4]
    assert F.vflip(x).flatten().tolist() == [4, 5, 6, 1, 2, 3]
    assert torch.equal(F.hflip(F.hflip(x)), x) and torch.equal(F.vflip(F.vflip(x)), x)


def test_rot90_is_counter_clockwise_and_swaps_sides():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]).view(1, 1, 2, 3)
    y = F.rot90(x, 1)
    assert y.shape == (1, 1, 3, 2)
    assert y[0, 0].tolist() == [[3, 6], [2, 5], [1, 4]]
    for k in range(-3, 5):
        assert torch.equal(F.rot90(F.rot90(x, k), -k), x)
    assert torch.equal(F.rot90(x, 4), x) and torch.equal(F.rot90(x, -1), F.rot90(x, 3))


@pytest.mark.parametrize(
    "shape, factor, expected",
    [((5, 5), 0.5, (2, 2)), ((8, 6), 2, (16, 12)), ((7, 9), 1.5, (10, 13)), ((28, 28), 0.29, (8, 8))],
)
def test_scaled_size_truncates_as_ttach(shape, factor, expected):
    assert F.scaled_size(shape, factor) == expected
    assert tuple(F.scale(torch.rand(1, 1, *shape), factor).shape[-2:]) == expected


@pytest.mark.parametrize("shape, factor", [((4, 5), 2), ((4, 5), 4), ((5, 7), 0.5), ((9, 6), 3), ((7, 7), 1.5)])
def test_unscale_is_ttachs_inverse(shape, factor):
    import ttach

    x = torch.arange(shape[0] * shape[1], dtype=torch.float32).reshape(1, 1, *shape)
    view = F.scale(x, factor)
    back = F.unscale(view, factor)
    assert torch.equal(back, ttach.functional.scale(view, 1 / factor))
    size = tuple(int(s * factor) for s in shape)
    assert back.shape[-2:] == tuple(int(s * (1 / factor)) for s in size)
    if factor in (2, 3, 4):  # whole up-scales round-trip exactly; 5 * 0.5 -> 2 -> 4 does not
        assert torch.equal(back, x)
    with pytest.raises(InvalidInputError, match="factor must be a positive number, got 0"):
        F.unscale(x, 0)


def test_scaled_size_rounding_to_zero_names_the_values():
    with pytest.raises(InvalidInputError, match=r"scale 0\.1 turns a 5x7 image into 0x0"):
        F.scaled_size((5, 7), 0.1)


def test_resize_by_hand_and_size_errors():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    assert F.resize(x, (4, 4))[0, 0].tolist() == [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]
    assert F.resize(x, (2, 2)) is x  # nothing to do
    with pytest.raises(InvalidInputError, match=r"\(0, 3\)"):
        F.resize(x, (0, 3))


@pytest.mark.parametrize("name, expected", [("linear", "bilinear"), ("nearest", "nearest"), ("bicubic", "bicubic")])
def test_normalize_interpolation(name, expected):
    assert F.normalize_interpolation(name) == expected


def test_linear_works_on_4d_tensors_where_interpolate_rejects_it():
    x = torch.rand(1, 1, 4, 4)
    with pytest.raises(NotImplementedError):  # what ttach passes straight to F.interpolate
        torch.nn.functional.interpolate(x, size=(8, 8), mode="linear")
    expected = torch.nn.functional.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False)
    assert torch.allclose(F.resize(x, (8, 8), "linear", align_corners=False), expected)


def test_bad_interpolation_and_align_corners_messages():
    with pytest.raises(InvalidInputError, match=r"'cubic'.*|.*'cubic'") as err:
        F.normalize_interpolation("cubic")
    assert "bilinear" in str(err.value)  # lists the choices
    with pytest.raises(InvalidInputError, match=r"align_corners=True.*'nearest'"):
        F.normalize_interpolation("nearest", True)


@pytest.mark.parametrize(
    "position, origin", [("lt", (0, 0)), ("lb", (4, 0)), ("rb", (4, 3)), ("rt", (0, 3)), ("center", (2, 2))]
)
def test_crop_origin_matches_ttach_placement(position, origin):
    # A 7x8 image and a 3x5 crop: bottom = 7 - 3, right = 8 - 5, centre = (7//2 - 3//2, 8//2 - 5//2).
    assert F.crop_origin((7, 8), (3, 5), position) == origin


def test_crop_values_and_errors():
    assert F.crop(GRID, 1, 0, 2, 2)[0, 0].tolist() == [[4, 5], [7, 8]]
    with pytest.raises(InvalidInputError, match="crop of 4x2 does not fit an image of 3x3"):
        F.crop_origin((3, 3), (4, 2), "lt")
    with pytest.raises(InvalidInputError, match="'middle'"):
        F.crop_origin((3, 3), (2, 2), "middle")
    with pytest.raises(InvalidInputError, match=r"\(2, 2, 2, 2\) falls outside a 3x3"):
        F.crop(GRID, 2, 2, 2, 2)


@pytest.mark.parametrize(
    "mode, dx, dy, expected",
    [
        ("constant", 1, 0, [[0, 1, 2], [0, 4, 5], [0, 7, 8]]),
        ("reflect", 1, 0, [[2, 1, 2], [5, 4, 5], [8, 7, 8]]),
        ("replicate", 1, 0, [[1, 1, 2], [4, 4, 5], [7, 7, 8]]),
        ("circular", 1, 0, [[3, 1, 2], [6, 4, 5], [9, 7, 8]]),
        ("constant", 0, -1, [[4, 5, 6], [7, 8, 9], [0, 0, 0]]),
        ("replicate", -1, 1, [[2, 3, 3], [2, 3, 3], [5, 6, 6]]),
        ("circular", -1, 1, [[8, 9, 7], [2, 3, 1], [5, 6, 4]]),
    ],
)
def test_shift_by_hand(mode, dx, dy, expected):
    assert F.shift(GRID, dx, dy, mode)[0, 0].tolist() == expected


def test_shift_errors_name_the_values():
    with pytest.raises(InvalidInputError, match=r"shift \(3, 0\) is as large as the 3x3 image"):
        F.shift(GRID, 3, 0)
    with pytest.raises(InvalidInputError, match="'wrap'"):
        F.shift(GRID, 1, 0, "wrap")


@pytest.mark.parametrize("mode", F.PADDING_MODES)
def test_unshift_mask_exact_where_seen(mode):
    x = torch.rand(2, 3, 6, 9)
    dx, dy = 2, -1
    back = F.unshift_mask(F.shift(x, dx, dy, mode), dx, dy, mode)
    if mode == "circular":
        assert torch.equal(back, x)
    # The view saw rows 1.. and columns ..6 of the original (content moved right 2 and up 1).
    assert torch.equal(back[..., 1:, :7], x[..., 1:, :7])
    # The strip it never saw repeats the nearest prediction it made (no bias towards zero).
    if mode != "circular":
        assert torch.equal(back[..., 0, :7], back[..., 1, :7])
        assert torch.equal(back[..., :, 7], back[..., :, 6])


def test_photometric_by_hand():
    x = torch.tensor([0.2, 0.4, 0.6]).view(1, 1, 1, 3)
    assert torch.allclose(F.add(x, 0.5).flatten(), torch.tensor([0.7, 0.9, 1.1]))
    assert torch.allclose(F.multiply(x, 2).flatten(), torch.tensor([0.4, 0.8, 1.2]))
    assert torch.allclose(F.brightness(x, 0.5).flatten(), torch.tensor([0.7, 0.9, 1.0]))
    assert torch.allclose(F.brightness(x, 0.5, clip=False).flatten(), torch.tensor([0.7, 0.9, 1.1]))
    assert torch.allclose(F.contrast(x, 2).flatten(), torch.tensor([0.0, 0.4, 0.8]))
    assert torch.allclose(F.contrast(x, 3).flatten(), torch.tensor([0.0, 0.4, 1.0]))
    assert torch.allclose(F.contrast(x, 3, clip=False).flatten(), torch.tensor([-0.2, 0.4, 1.0]))


def test_contrast_is_per_image_and_channel():
    x = torch.stack([torch.full((2, 2, 2), 0.3), torch.full((2, 2, 2), 0.7)])  # constant images
    assert torch.allclose(F.contrast(x, 2.0), x)


def test_keypoint_maps_by_hand():
    p = torch.tensor([[[0.3, 1 / 6]]])
    assert torch.allclose(F.keypoints_hflip(p), torch.tensor([[[0.7, 1 / 6]]]))
    assert torch.allclose(F.keypoints_vflip(p), torch.tensor([[[0.3, 5 / 6]]]))
    assert torch.allclose(F.keypoints_rot90(p, 1), torch.tensor([[[1 / 6, 0.7]]]))
    assert torch.allclose(F.keypoints_rot90(p, 2), torch.tensor([[[0.7, 5 / 6]]]))
    assert torch.allclose(F.keypoints_rot90(p, 3), torch.tensor([[[5 / 6, 0.3]]]))
    assert torch.allclose(F.keypoints_rot90(p, -1), F.keypoints_rot90(p, 3))
    q = torch.tensor([[[0.25, 0.5]]])
    assert torch.allclose(F.keypoints_shift(q, 2, -1, (4, 8)), torch.tensor([[[0.5, 0.25]]]))
    assert torch.allclose(F.keypoints_uncrop(torch.tensor([[[0.5, 0.5]]]), 2, 1, (4, 5), (8, 10)),
                          torch.tensor([[[0.35, 0.5]]]))


def test_keypoints_rot90_follows_the_pixels_of_a_non_square_image():
    # A dot at row 0, column 1 of a 3x5 image; after rot90 the image is 5x3 and the dot sits at
    # row W-1-c = 3, column r = 0. Keypoints are normalised by the size of *their* image.
    image = torch.zeros(1, 1, 3, 5)
    image[0, 0, 0, 1] = 1
    rotated = F.rot90(image, 1)
    assert rotated.shape[-2:] == (5, 3) and rotated[0, 0, 3, 0] == 1
    point = torch.tensor([[[1.5 / 5, 0.5 / 3]]])
    assert torch.allclose(F.keypoints_rot90(point, 1), torch.tensor([[[0.5 / 3, 3.5 / 5]]]))


def test_box_maps_by_hand():
    b = torch.tensor([[[0.1, 0.2, 0.4, 0.6]]])
    assert torch.allclose(F.boxes_hflip(b), torch.tensor([[[0.6, 0.2, 0.9, 0.6]]]))
    assert torch.allclose(F.boxes_vflip(b), torch.tensor([[[0.1, 0.4, 0.4, 0.8]]]))
    assert torch.allclose(F.boxes_rot90(b, 1), torch.tensor([[[0.2, 0.6, 0.6, 0.9]]]))
    assert torch.allclose(F.boxes_shift(b, 1, 2, (10, 10)), torch.tensor([[[0.2, 0.4, 0.5, 0.8]]]))
    assert torch.allclose(F.boxes_uncrop(b, 0, 5, (10, 5), (10, 10)), torch.tensor([[[0.55, 0.2, 0.7, 0.6]]]))
    assert F.boxes_from_corners(torch.tensor([0.5, 0.1]), torch.tensor([0.2, 0.3])).tolist() == pytest.approx(
        [0.2, 0.1, 0.5, 0.3]
    )


def test_no_function_modifies_its_input():
    image = torch.rand(2, 3, 6, 5)
    points = torch.rand(2, 4, 2)
    boxes = torch.rand(2, 4, 4)
    calls = [
        lambda: F.hflip(image), lambda: F.vflip(image), lambda: F.rot90(image, 1),
        lambda: F.resize(image, (9, 7), "bilinear"), lambda: F.scale(image, 2), lambda: F.crop(image, 1, 1, 3, 3),
        lambda: F.shift(image, 1, -2), lambda: F.shift(image, 1, 1, "reflect"), lambda: F.unshift_mask(image, 1, 1),
        lambda: F.add(image, 1), lambda: F.multiply(image, 2), lambda: F.brightness(image, 0.3),
        lambda: F.contrast(image, 2), lambda: F.keypoints_hflip(points), lambda: F.keypoints_vflip(points),
        lambda: F.keypoints_rot90(points, 0), lambda: F.keypoints_rot90(points, 1),
        lambda: F.keypoints_shift(points, 1, 1, (6, 5)), lambda: F.keypoints_uncrop(points, 1, 1, (3, 3), (6, 5)),
        lambda: F.boxes_hflip(boxes), lambda: F.boxes_rot90(boxes, 3), lambda: F.boxes_shift(boxes, 1, 1, (6, 5)),
        lambda: F.boxes_uncrop(boxes, 1, 1, (3, 3), (6, 5)),
    ]
    before = [image.clone(), points.clone(), boxes.clone()]
    for call in calls:
        call()
    assert torch.equal(image, before[0]) and torch.equal(points, before[1]) and torch.equal(boxes, before[2])
    # The keypoint identity rotation returns a copy, not the input.
    assert F.keypoints_rot90(points, 4).data_ptr() != points.data_ptr()


@pytest.mark.parametrize(
    "value, pattern",
    [
        ([[1.0]], "must be a torch.Tensor of shape \\(B, C, H, W\\), got list"),
        (torch.rand(3, 8, 8), "got 3-D shape \\(3, 8, 8\\).*unsqueeze"),
        (torch.rand(8, 8), "got 2-D shape \\(8, 8\\)"),
        (torch.zeros(1, 3, 8, 8, dtype=torch.uint8), "floating-point.*torch.uint8"),
        (torch.rand(2, 28, 28, 1), "channels-last \\(NHWC\\) with shape \\(2, 28, 28, 1\\)"),
        (torch.rand(2, 32, 32, 3), "NHWC.*\\(2, 32, 32, 3\\).*permute"),
    ],
)
def test_check_image_rejects_with_the_bad_value(value, pattern):
    with pytest.raises(InvalidInputError, match=pattern):
        F.check_image(value)


def test_check_image_accepts_nchw():
    for shape in [(1, 1, 28, 28), (2, 3, 32, 32), (4, 64, 7, 7), (1, 3, 2, 3)]:
        x = torch.rand(shape)
        assert F.check_image(x) is x


@pytest.mark.parametrize(
    "call, pattern",
    [
        (lambda: F.keypoints_hflip(torch.rand(2, 3, 3)), r"keypoints.*\(B, N, 2\).*\(2, 3, 3\)"),
        (lambda: F.keypoints_rot90(torch.rand(5), 1), r"keypoints.*\(5,\)"),
        (lambda: F.boxes_hflip(torch.rand(2, 3, 2)), r"boxes.*\(B, N, 4\).*\(2, 3, 2\)"),
        (lambda: F.keypoints_shift([[0.1, 0.2]], 1, 1, (4, 4)), r"keypoints must be a torch.Tensor.*got list"),
    ],
)
def test_point_and_box_shapes_are_checked(call, pattern):
    with pytest.raises(InvalidInputError, match=pattern):
        call()
