"""Canvases of Fashion-MNIST items: masks and boxes agree with the pasted items, splits draw from
disjoint source images, and the same seed gives the same canvases."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ttakit.data import load_fashion_mnist
from ttakit.data.canvases import VAL_SOURCE_ROWS, load_fashion_canvases, make_canvases
from ttakit.errors import DataNotFoundError, InvalidInputError


@pytest.fixture(scope="module")
def fashion():
    try:
        return load_fashion_mnist("test")
    except DataNotFoundError:
        pytest.skip("Fashion-MNIST is not installed")


@pytest.fixture(scope="module")
def canvases(fashion):
    return make_canvases(fashion.images[:500], fashion.labels[:500], n=40, seed=3, name="t")


def test_shapes_and_ranges(canvases):
    assert canvases.images.shape == (40, 1, 96, 96) and canvases.images.dtype == torch.float32
    assert canvases.masks.shape == (40, 96, 96) and canvases.masks.dtype == torch.int64
    assert 0.0 <= float(canvases.images.min()) and float(canvases.images.max()) <= 1.0
    assert int(canvases.masks.min()) == 0 and int(canvases.masks.max()) <= 10
    counts = [len(b) for b in canvases.boxes]
    assert min(counts) >= 1 and max(counts) <= 4 and len(set(counts)) > 1
    assert canvases.mask_classes[0] == "background" and len(canvases.mask_classes) == 11


def test_masks_boxes_and_labels_agree_with_the_pasted_items(canvases, fashion):
    for i in range(len(canvases)):
        inst, mask = canvases.instances[i], canvases.masks[i]
        assert torch.equal(inst > 0, mask > 0)  # every item pixel belongs to exactly one item
        for j, (box, label, source) in enumerate(
            zip(canvases.boxes[i], canvases.labels[i], canvases.sources[i], strict=True)
        ):
            assert int(label) == int(fashion.labels[int(source)])
            pixels = inst == j + 1
            assert bool((mask[pixels] == int(label) + 1).all())
            ys, xs = torch.nonzero(pixels, as_tuple=True)
            assert box.tolist() == [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def test_an_item_alone_is_pasted_pixel_for_pixel(fashion):
    """One item, no noise: the canvas holds the resized item's pixels above the threshold,
    exactly inside its box, and the mask is those pixels."""
    c = make_canvases(fashion.images[:1], fashion.labels[:1], n=1, items=(1, 1), scales=(28, 28), noise=0.0, seed=0)
    x1, y1, x2, y2 = (int(v) for v in c.boxes[0][0])
    item = fashion.images[0, 0]
    inside = item > 0.2
    ys, xs = torch.nonzero(inside, as_tuple=True)
    top, left = y1 - int(ys.min()), x1 - int(xs.min())
    window = c.images[0, 0, top : top + 28, left : left + 28]
    assert torch.allclose(window[inside], item[inside])
    assert torch.equal(c.masks[0, top : top + 28, left : left + 28] > 0, inside)
    assert int((c.masks[0] > 0).sum()) == int(inside.sum())
    assert (x2 - x1, y2 - y1) == (int(xs.max() - xs.min()) + 1, int(ys.max() - ys.min()) + 1)


def test_scaled_items_keep_their_side(fashion):
    c = make_canvases(fashion.images[:1], fashion.labels[:1], n=1, items=(1, 1), scales=(40, 40), noise=0.0, seed=2)
    resized = F.interpolate(fashion.images[:1], size=(40, 40), mode="bilinear", align_corners=False)[0, 0]
    assert int((c.masks[0] > 0).sum()) == int((resized.clamp(0, 1) > 0.2).sum())


def test_same_seed_same_canvases_other_seed_other(fashion):
    a = make_canvases(fashion.images[:200], fashion.labels[:200], n=5, seed=7)
    b = make_canvases(fashion.images[:200], fashion.labels[:200], n=5, seed=7)
    c = make_canvases(fashion.images[:200], fashion.labels[:200], n=5, seed=8)
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
    assert all(torch.equal(x, y) for x, y in zip(a.boxes, b.boxes, strict=True))
    assert not torch.equal(a.images, c.images)


def test_rows_limit_the_sources(fashion):
    c = make_canvases(fashion.images[:100], fashion.labels[:100], n=20, rows=range(10, 20), seed=0)
    sources = torch.cat(c.sources)
    assert int(sources.min()) >= 10 and int(sources.max()) < 20


def test_splits_come_from_disjoint_source_images():
    try:
        train = load_fashion_canvases("train", 60, seed=0)
        val = load_fashion_canvases("val", 60, seed=0)
        test = load_fashion_canvases("test", 20, seed=0)
    except DataNotFoundError:
        pytest.skip("Fashion-MNIST is not installed")
    train_rows, val_rows = torch.cat(train.sources), torch.cat(val.sources)
    assert int(train_rows.max()) < 60_000 - VAL_SOURCE_ROWS <= int(val_rows.min())
    assert train.name == "fashion-canvases/train" and test.name == "fashion-canvases/test"
    test_images = load_fashion_mnist("test").images
    # test items come from the test images: the first test item's pixels are in the canvas
    box, source = test.boxes[0][0], int(test.sources[0][0])
    assert test_images.shape[0] == 10_000 and 0 <= source < 10_000 and box[2] > box[0]
    again = load_fashion_canvases("test", 20, seed=0)
    assert torch.equal(again.images, test.images)  # deterministic
    longer = load_fashion_canvases("test", 25, seed=0)
    assert torch.equal(longer.images[:20], test.images)  # a longer draw extends a shorter one


def test_subset_and_targets(canvases):
    part = canvases.subset([3, 1])
    assert len(part) == 2 and torch.equal(part.images[0], canvases.images[3])
    assert part.targets()[1]["boxes"] is canvases.boxes[1]


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"items": (0, 2)}, "items must be"),
        ({"scales": (20, 200)}, "scales must be"),
        ({"threshold": 1.5}, "threshold must"),
        ({"n": -1}, "n must be"),
        ({"rows": [100]}, "rows must be"),
    ],
)
def test_bad_arguments_are_refused(kwargs, fragment):
    options = {"n": 1, **kwargs}
    with pytest.raises(InvalidInputError, match=fragment):
        make_canvases(torch.rand(3, 28, 28), torch.tensor([0, 1, 2]), **options)


def test_uint8_items_equal_float_items():
    items = torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8)
    a = make_canvases(items, torch.arange(4), n=2, seed=1)
    b = make_canvases(items.float() / 255, torch.arange(4), n=2, seed=1)
    assert torch.equal(a.images, b.images)
