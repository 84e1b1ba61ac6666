"""ttakit._tiles (Tiles) and the tile functions of ttakit.functional: where tiles go (MONAI's
sliding-window placement), the (B * T) layout, the mask merge (uniform and Gaussian windows), boxes
back to the image, policies holding tiles, and the engine's passes over tiled batches."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ttakit import functional as F
from ttakit import transforms as T
from ttakit.engine import TTAEngine
from ttakit.errors import InvalidInputError, ModelOutputError, NotInvertibleError
from ttakit.policy import Compose, Policy, Step, Transformer, View

pytestmark = pytest.mark.usefixtures("single_thread")
FAST = settings(max_examples=40, deadline=None)


def monai_starts(length: int, tile: int, overlap: float) -> list[int]:
    """MONAI's ``dense_patch_slices`` on one axis, written as MONAI writes it (the oracle)."""
    interval = tile if tile == length else max(1, int(tile * (1 - overlap)))
    num = int(math.ceil(float(length) / interval))
    scan_dim = next((d for d in range(num) if d * interval + tile >= length), None)
    scan_num = scan_dim + 1 if scan_dim is not None else 1
    starts = []
    for idx in range(scan_num):
        start = idx * interval
        start -= max(start + tile - length, 0)
        starts.append(start)
    return starts


geometry = st.tuples(st.integers(1, 40), st.integers(1, 40)).flatmap(
    lambda size: st.tuples(
        st.just(size),
        st.tuples(st.integers(1, size[0]), st.integers(1, size[1])),
        st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.75, 0.9]),
    )
)


class Recorder(nn.Module):
    """Records the batch size of every forward pass."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.batches: list[int] = []

    def forward(self, x):
        self.batches.append(x.shape[0])
        return self.model(x)


def pointwise(in_channels: int = 3, classes: int = 2) -> nn.Module:
    torch.manual_seed(0)
    return nn.Conv2d(in_channels, classes, 1).eval()


def one_step(transform, param) -> Transformer:
    return Transformer([Step(transform, param)])


# --------------------------------------------------------------------------- placement


@FAST
@given(geometry)
def test_origins_are_monais_and_cover_every_pixel(case):
    (h, w), (th, tw), overlap = case
    origins = F.tile_origins((h, w), (th, tw), overlap)
    rows, cols = monai_starts(h, th, overlap), monai_starts(w, tw, overlap)
    assert origins == [(r, c) for r in rows for c in cols]
    assert len(set(origins)) == len(origins)
    count = torch.zeros(h, w, dtype=torch.int64)
    for top, left in origins:
        assert 0 <= top <= h - th and 0 <= left <= w - tw
        count[top : top + th, left : left + tw] += 1
    assert bool((count > 0).all())
    assert origins[0] == (0, 0) and origins[-1] == (h - th, w - tw)  # the last tile is flush


def test_origins_stride_is_the_tile_times_one_minus_overlap():
    assert F.tile_origins((10, 4), (4, 4), 0.25) == [(0, 0), (3, 0), (6, 0)]
    assert F.tile_origins((8, 8), (4, 4), 0.0) == [(0, 0), (0, 4), (4, 0), (4, 4)]
    assert F.tile_origins((5, 7), (5, 7), 0.5) == [(0, 0)]
    assert len(T.Tiles(256, 0.25).origins((512, 512))) == 9  # stride 192: 0, 192, 256 on each axis


@FAST
@given(geometry, st.integers(1, 3))
def test_tiles_are_image_major_crops(case, batch):
    (h, w), (th, tw), overlap = case
    x = torch.rand(batch, 2, h, w)
    transform = T.Tiles((th, tw), overlap)
    origins = transform.origins((h, w))
    tiles = transform.apply_aug_image(x, tiles="tiles")
    assert tiles.shape == (batch * len(origins), 2, th, tw)
    for b in range(batch):
        for t, (top, left) in enumerate(origins):
            assert torch.equal(tiles[b * len(origins) + t], x[b, :, top : top + th, left : left + tw])


@FAST
@given(geometry, st.sampled_from(["uniform", "gaussian"]))
def test_masks_merge_back_exactly(case, weighting):
    (h, w), (th, tw), overlap = case
    x = torch.rand(2, 3, h, w, dtype=torch.float64)
    t = one_step(T.Tiles((th, tw), overlap, weighting), "tiles")
    back, weight = t.deaugment_mask_weighted(t.augment_image(x))
    assert weight is None  # tiles see every pixel
    torch.testing.assert_close(back, x, rtol=0, atol=1e-12)


def test_overlaps_are_averaged_with_the_window():
    # Two 1x3 tiles on a 1x4 image overlap on columns 1 and 2: each pixel gets the window-weighted
    # mean of the tiles covering it.
    transform = T.Tiles((1, 3), 0.5)
    assert transform.origins((1, 4)) == [(0, 0), (0, 1)]
    t = one_step(transform, "tiles")
    t.augment_image(torch.zeros(1, 1, 1, 4))
    preds = torch.tensor([[[[1.0, 2.0, 3.0]]], [[[10.0, 20.0, 30.0]]]])
    assert torch.allclose(t.deaugment_mask(preds), torch.tensor([[[[1.0, (2 + 10) / 2, (3 + 20) / 2, 30.0]]]]))
    g = F.tile_window((1, 3), "gaussian")
    gauss = one_step(T.Tiles((1, 3), 0.5, "gaussian"), "tiles")
    gauss.augment_image(torch.zeros(1, 1, 1, 4))
    expected_1 = (g[0, 1] * 2 + g[0, 0] * 10) / (g[0, 1] + g[0, 0])
    assert torch.allclose(gauss.deaugment_mask(preds)[0, 0, 0, 1], expected_1)


def test_gaussian_window_is_monais_importance_map():
    g = F.tile_window((9, 16), "gaussian")
    assert g.shape == (9, 16) and float(g.max()) <= 1.0 and float(g.min()) >= 1e-3
    ys = torch.arange(9.0) - 4.0
    xs = torch.arange(16.0) - 7.5
    by_hand = torch.exp(-(ys[:, None] ** 2) / (2 * (0.125 * 9) ** 2)) * torch.exp(-(xs[None] ** 2) / (2 * (0.125 * 16) ** 2))
    torch.testing.assert_close(g, by_hand.clamp(min=max(float(by_hand.min()), 1e-3)))
    assert torch.equal(F.tile_window((3, 5), "uniform"), torch.ones(3, 5))


# --------------------------------------------------------------------------- boxes


@FAST
@given(geometry, st.integers(1, 3), st.data())
def test_boxes_round_trip_tile_major(case, n, data):
    (h, w), (th, tw), overlap = case
    transform = T.Tiles((th, tw), overlap)
    origins = transform.origins((h, w))
    n_tiles = len(origins)
    # Boxes inside each tile, in image pixels; the model "finds" them on the tiles.
    seed = data.draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    corners = torch.rand(2, n_tiles, n, 2, 2, generator=g, dtype=torch.float64)
    lo, hi = corners.min(dim=3).values, corners.max(dim=3).values  # (2, T, n, 2) fractions of the tile
    on_tile = torch.cat([lo, hi], dim=-1)  # (2, T, n, 4) normalised to the tile
    t = one_step(transform, "tiles")
    t.augment_image(torch.zeros(2, 1, h, w))
    back = t.deaugment_boxes(on_tile.reshape(2 * n_tiles, n, 4))
    assert back.shape == (2, n_tiles * n, 4)
    for b in range(2):
        for ti, (top, left) in enumerate(origins):
            for j in range(n):
                x1, y1, x2, y2 = on_tile[b, ti, j].tolist()
                expected = [(left + x1 * tw) / w, (top + y1 * th) / h, (left + x2 * tw) / w, (top + y2 * th) / h]
                assert torch.allclose(back[b, ti * n + j], torch.tensor(expected, dtype=torch.float64), atol=1e-12)


def test_keypoints_and_labels_are_refused():
    t = one_step(T.Tiles(2), "tiles")
    t.augment_image(torch.zeros(1, 1, 4, 4))
    with pytest.raises(NotInvertibleError, match=r"^Tiles cannot invert the 'keypoints' target"):
        t.deaugment_keypoints(torch.rand(4, 1, 2))
    with pytest.raises(NotInvertibleError, match=r"^Tiles cannot invert the 'label' target"):
        t.deaugment_label(torch.rand(4, 3))
    with pytest.raises(NotInvertibleError, match=r"^Tiles cannot invert the 'label' target"):
        TTAEngine(nn.Flatten(), Compose([T.Tiles(2)]), target="label")
    assert T.Tiles(2).targets == frozenset({"image", "mask", "boxes"})


# --------------------------------------------------------------------------- views and policies


def test_views_names_and_full_image():
    assert T.Tiles(4).params == ["tiles"]
    views = Compose([T.Tiles((4, 6), 0.5, "gaussian", full_image=True)]).to_policy().view_names
    assert views == ["identity", "tiles4x6-o0.5-gauss"]
    x = torch.rand(1, 1, 8, 8)
    assert T.Tiles(4, full_image=True).apply_aug_image(x, tiles="full") is x


def test_policies_with_tiles_round_trip_through_json():
    policy = Compose([T.Tiles((16, 24), 0.25, "gaussian", full_image=True), T.HorizontalFlip()]).to_policy("tiled")
    loaded = Policy.from_json(json.loads(json.dumps(policy.to_json())))
    assert loaded.view_names == policy.view_names == [
        "identity", "hflip", "tiles16x24-o0.25-gauss", "tiles16x24-o0.25-gauss+hflip",
    ]
    tiles = loaded.views[2].steps[0].transform
    assert (tiles.tile_size, tiles.overlap, tiles.weighting, tiles.full_image) == ((16, 24), 0.25, "gaussian", True)


def test_tiles_then_flip_flips_every_tile():
    x = torch.rand(2, 3, 9, 11)
    transform = T.Tiles((5, 6), 0.25)
    flipped = View([Step(transform, "tiles"), Step(T.HorizontalFlip(), True)]).transformer()
    tiles = transform.apply_aug_image(x)
    assert torch.equal(flipped.augment_image(x), tiles.flip(-1))
    torch.testing.assert_close(flipped.deaugment_mask(flipped.augment_image(x)), x)


@pytest.mark.parametrize(
    "make, pattern",
    [
        (lambda: T.Tiles(4, overlap=1.0), r"overlap must be a fraction of the tile in \[0, 1\), got 1.0"),
        (lambda: T.Tiles(4, overlap=-0.1), r"overlap must be a fraction of the tile in \[0, 1\), got -0.1"),
        (lambda: T.Tiles(4, overlap=True), r"overlap must be .*got True"),
        (lambda: T.Tiles(0), r"size must be a positive integer or a \(height, width\) pair of them, got 0"),
        (lambda: T.Tiles((4, 2.5)), r"size must be .*got \(4, 2.5\)"),
        (lambda: T.Tiles(4, weighting="cosine"), r"weighting must be one of uniform, gaussian, got 'cosine'"),
        (lambda: T.Tiles(4, full_image=1), r"full_image must be True or False, got 1"),
        (lambda: F.tile_origins((3, 8), (4, 4), 0.25), r"^tiles of 4x4 do not fit an image of 3x8;"),
    ],
)
def test_bad_settings_are_one_line_errors(make, pattern):
    with pytest.raises(InvalidInputError, match=pattern) as info:
        make()
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- the engine


@pytest.mark.parametrize("max_batch", [1, 3, 5, 64])
def test_passes_never_exceed_max_batch_and_the_merge_does_not_depend_on_them(max_batch):
    # 4 images of 10x13 in 4x6 tiles at overlap 0.25: T = 3 * 3 = 9 tiles each, 2 views.
    model = Recorder(pointwise())
    x = torch.rand(4, 3, 10, 13)
    policy = Compose([T.Tiles((4, 6), 0.25, "gaussian"), T.HorizontalFlip()])
    out = TTAEngine(model, policy, target="mask", max_batch=max_batch)(x)
    assert max(model.batches) <= max_batch
    assert sum(model.batches) == 2 * 4 * 9  # every tile of every view once
    reference = TTAEngine(pointwise(), policy, target="mask", max_batch=256)(x)
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-6)
    alone = TTAEngine(pointwise(), policy, target="mask", max_batch=max_batch)(x[2:3])
    torch.testing.assert_close(alone, out[2:3], rtol=0, atol=1e-6)


def test_a_tile_larger_than_the_image_fails_before_any_forward_pass():
    model = Recorder(pointwise())
    with pytest.raises(InvalidInputError, match=r"^tiles of 16x16 do not fit an image of 8x20; use tiles") as info:
        TTAEngine(model, Compose([T.Tiles(16)]), target="mask")(torch.rand(2, 3, 8, 20))
    assert model.batches == [] and "\n" not in str(info.value)


def test_nan_on_one_tile_names_its_image():
    class NanOnBright(nn.Module):
        def forward(self, x):
            out = x[:, :2].clone()
            out[x[:, :1].amax(dim=(1, 2, 3)) > 5] = float("nan")
            return out

    x = torch.rand(3, 3, 8, 8)
    x[1, 0, 7, 7] = 10.0  # only the last tile of image 1 sees it
    with pytest.raises(ModelOutputError, match=r"NaN/inf for image 1 of the batch under view\(s\) 'tiles4x4-o0'"):
        TTAEngine(NanOnBright(), Compose([T.Tiles(4, 0.0)]), target="mask", max_batch=3)(x)


def test_extra_model_arguments_are_refused_with_tiles():
    with pytest.raises(InvalidInputError, match=r"extra model arguments cannot follow views that cut each image"):
        TTAEngine(lambda x, s: x * s, Compose([T.Tiles(2)]), target="mask")(torch.rand(2, 1, 4, 4), 2.0)
