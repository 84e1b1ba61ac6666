"""Dense policy search: views by mIoU, views and box-fusion settings by COCO mAP."""

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ttakit.dense_metrics import detection_map, mean_iou
from ttakit.detection import DetectionTTAWrapper
from ttakit.errors import TTAKitError
from ttakit.policy import View
from ttakit.search import dense_search
from ttakit.search.dense import (
    DETECTION_GRID,
    PLAIN_SETTINGS,
    _fuse_all,
    _plain,
    default_dense_pool,
    detection_view_cache,
    search_detection,
    search_segmentation,
    segmentation_view_cache,
)

CENTRES = torch.tensor([0.1, 0.5, 0.9])  # pixel value of each class


class RampSegmenter(nn.Module):
    """Reads the class from the pixel value, but the left quarter of what it sees leans to class 0
    by ``bias``: the identity view errs there; with the mirrored view the lean halves on each side,
    which for 3.2 < bias < 6.4 is below the 3.2 margin: identity + hflip is right everywhere."""

    def __init__(self, bias: float = 5.0):
        super().__init__()
        self.bias = bias

    def forward(self, x):
        logits = -20 * (x - CENTRES.view(1, 3, 1, 1)) ** 2  # (B, 3, H, W) from (B, 1, H, W)
        lean = torch.zeros_like(logits)
        lean[:, 0, :, : x.shape[-1] // 4] = self.bias
        return logits + lean


def _class_images(n=6, size=(12, 16), seed=0):
    g = torch.Generator().manual_seed(seed)
    masks = torch.randint(0, 3, (n, *size), generator=g)
    return CENTRES[masks][:, None], masks


def test_segmentation_search_finds_the_flip_that_cancels_a_lean():
    images, masks = _class_images()
    pool = default_dense_pool(scales=())  # identity, hflip, vflip
    result = dense_search(RampSegmenter(), images, masks, task="segmentation", views=pool, budget=3)
    assert result.policy.view_names == ["identity", "hflip"]
    assert result.score == pytest.approx(1.0) and result.baseline < 0.95
    assert result.stop_reason == "no candidate view raises the score"
    merged = RampSegmenter()(images) .softmax(1) + RampSegmenter()(images.flip(-1)).softmax(1).flip(-1)
    assert mean_iou(merged.argmax(1), masks, 3)["miou"] == pytest.approx(result.score)
    again = dense_search(RampSegmenter(), images, masks, task="segmentation", views=pool, budget=3)
    assert again.to_json()["path"] == result.to_json()["path"]  # deterministic


def test_segmentation_search_keeps_the_identity_when_every_view_hurts():
    images, masks = _class_images()
    result = dense_search(RampSegmenter(bias=0.0), images, masks, task="segmentation",
                          views=default_dense_pool(scales=(0.5,)), budget=4)
    assert result.policy.view_names == ["identity"] and result.score == result.baseline == pytest.approx(1.0)


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 4), st.integers(1, 5), st.integers(1, 3), st.integers(0, 10_000))
def test_segmentation_search_is_never_worse_than_the_identity(n_views, n_images, budget, seed):
    g = torch.Generator().manual_seed(seed)
    cache = torch.softmax(torch.randn(n_views, n_images, 3, 4, 5, generator=g) * 3, dim=2).half()
    masks = torch.randint(0, 3, (n_images, 4, 5), generator=g)
    views = default_dense_pool(scales=(0.5, 2.0))[:n_views]
    result = search_segmentation(cache, masks, views, num_classes=3, budget=budget)
    chosen = [views.index(v) for v in result.policy.views]
    assert chosen[0] == 0 and len(chosen) <= budget
    assert result.score >= result.baseline
    expected = mean_iou(cache[chosen].float().sum(0).argmax(1), masks, 3)["miou"]
    assert result.score == pytest.approx(expected)
    assert result.baseline == pytest.approx(mean_iou(cache[0].float().argmax(1), masks, 3)["miou"])


def test_segmentation_cache_holds_each_views_deaugmented_probabilities():
    images, _ = _class_images(n=3)
    model = RampSegmenter()
    cache = segmentation_view_cache(model, images, default_dense_pool(scales=()))
    assert cache.shape == (3, 3, 3, 12, 16) and cache.dtype == torch.float16
    torch.testing.assert_close(cache[1].float(), model(images.flip(-1)).softmax(1).flip(-1), atol=1e-3, rtol=0)


# --------------------------------------------------------------------------- detection


class BrightBox(nn.Module):
    """The box of the pixels above 0.5, label 0, shifted ``shift`` px right (a lean hflip cancels);
    ``duplicate``: also a copy ``duplicate`` px further right, scored just below it. Image i's
    scores fall with i, so duplicates rank between true boxes (they cost AP unless suppressed)."""

    def __init__(self, shift: float = 0.0, duplicate: float = 0.0):
        super().__init__()
        self.shift, self.duplicate = shift, duplicate

    def forward(self, x):
        out = []
        for i, image in enumerate(x):
            ys, xs = torch.nonzero(image[0] > 0.5, as_tuple=True)
            box = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()
            boxes = [box + torch.tensor([self.shift, 0, self.shift, 0])]
            score = 0.9 - 0.05 * (i % 8)
            scores = [score]
            if self.duplicate:
                boxes.append(boxes[0] + torch.tensor([self.duplicate, 0, self.duplicate, 0]))
                scores.append(score - 0.01)
            w = float(image.shape[-1])
            out.append({"boxes": torch.stack(boxes).clamp(0, w), "scores": torch.tensor(scores),
                        "labels": torch.zeros(len(boxes), dtype=torch.long)})
        return out


def _box_images(n=8, size=(32, 40), seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.zeros(n, 1, *size)
    targets = []
    for i in range(n):
        x1, y1 = (int(v) for v in torch.randint(2, 14, (2,), generator=g))
        w, h = 16, 14
        images[i, 0, y1:y1 + h, x1:x1 + w] = 1.0
        targets.append({"boxes": torch.tensor([[x1, y1, x1 + w, y1 + h]], dtype=torch.float32),
                        "labels": torch.tensor([0])})
    return images, targets


def _map_of(model, images, targets, policy, settings):
    wrapper = DetectionTTAWrapper(model, policy, **settings)
    found = [{"boxes": d.boxes, "scores": d.scores, "labels": d.labels} for d in wrapper.run(images).detections]
    return detection_map(found, targets)["map"]


def test_detection_search_selects_the_flip_and_the_settings_that_score_best():
    images, targets = _box_images()
    model = BrightBox(shift=3.0)  # views +-3 px apart: IoU 0.45, but IoS 0.625: merged by IoS
    result = dense_search(model, images, targets, task="detection", views=default_dense_pool(scales=()), budget=3)
    assert result.policy.view_names == ["identity", "hflip"]
    assert result.score == pytest.approx(1.0) and result.baseline < 0.6
    best = max(row["score"] for row in result.grid)
    assert result.score == best
    first_best = next(row for row in result.grid if row["score"] == best)
    assert result.settings == {"skip_box_thr": 0.0, **first_best["settings"]}
    assert result.settings["match"] == "ios"  # IoU matching keeps the two views' boxes apart
    assert result.policy.meta["detection"] == result.settings
    # What predict runs with the searched policy scores what the search saw.
    assert _map_of(model, images, targets, result.policy, result.settings) == pytest.approx(result.score)


def test_detection_grid_suppresses_duplicates_and_is_never_worse_than_the_plain_boxes():
    images, targets = _box_images()
    model = BrightBox(duplicate=4.0)
    pool = [View.identity()]
    cache = detection_view_cache(model, images, pool)
    result = search_detection(cache, targets, pool, size=(32, 40))
    plain = detection_map(_plain(cache), targets)["map"]
    assert result.baseline == pytest.approx(plain) and plain < 0.95
    assert result.score == pytest.approx(1.0) and result.settings["merge"] == "nms"
    assert len(result.grid) == 1 + len(DETECTION_GRID)
    # The floor: nms at IoU 1 through the wrapper is the detector's own output.
    fused = _fuse_all(cache, [0], pool, PLAIN_SETTINGS, (32, 40))
    assert detection_map(fused, targets)["map"] == pytest.approx(plain)


def test_detection_search_returns_plain_boxes_when_nothing_helps():
    images, targets = _box_images(n=4)
    pool = default_dense_pool(scales=())
    result = dense_search(BrightBox(), images, targets, task="detection", views=pool, budget=2,
                          grid=[{"merge": "wbf", "iou_thr": 0.9, "match": "iou", "conf_type": "max"}])
    assert result.policy.view_names == ["identity"] and result.score == result.baseline == pytest.approx(1.0)
    assert result.settings["iou_thr"] == 1.0  # a tie goes to the plain boxes


@pytest.mark.parametrize(("call", "fragment"), [
    (lambda: search_segmentation(torch.zeros(2, 1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long),
                                 default_dense_pool(scales=())[1:3], num_classes=3), "must start with the identity"),
    (lambda: search_segmentation(torch.zeros(1, 1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long),
                                 [View.identity()], num_classes=3, budget=0), "budget must be an integer >= 1"),
    (lambda: search_segmentation(torch.zeros(1, 1, 3, 2, 2), torch.zeros(2, 2, 2, dtype=torch.long),
                                 [View.identity()], num_classes=3), "masks must be"),
    (lambda: search_detection(torch.zeros(1, 1, 2, 6), [{}], [View.identity()], size=(4, 4), objective="f1"),
     "objective must be one of map, map50"),
    (lambda: search_detection(torch.zeros(1, 1, 2, 6), [{}], [View.identity()], size=(4, 4),
                              grid=[{"merge": "vote", "iou_thr": 0.5}]), "unknown merge method 'vote'"),
    (lambda: dense_search(nn.Identity(), torch.zeros(1, 1, 4, 4), [], task="keypoints"), "task must be one of"),
])
def test_bad_search_input_is_one_line(call, fragment):
    with pytest.raises(TTAKitError, match=fragment) as info:
        call()
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- job and command line

FASHION = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


def _unet_checkpoint(folder: Path) -> Path:
    from ttakit.models import CheckpointMeta, create_model, save_checkpoint

    torch.manual_seed(0)
    model = create_model("unet-small", in_channels=1, num_classes=11, image_size=(32, 32), mean=[0.2], std=[0.3])
    meta = CheckpointMeta(arch="unet-small", task="segmentation", classes=["background", *"abcdefghij"],
                          in_channels=1, image_size=[32, 32], mean=[0.2], std=[0.3], dataset="fashion-canvases/train")
    save_checkpoint(folder, model, meta)
    return folder


def test_search_command_dispatches_a_segmentation_checkpoint(tmp_path, capsys):
    from ttakit.cli import main

    try:
        from ttakit.data import load_fashion_mnist

        load_fashion_mnist("test")
    except Exception:
        pytest.skip("Fashion-MNIST is not installed")
    ckpt = _unet_checkpoint(tmp_path / "unet")
    code = main(["search", str(ckpt), "--limit", "6", "--test-limit", "4", "--budget", "2", "--out",
                 str(tmp_path / "found"), "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0 and "validation (6 canvases): miou" in printed and "searched" in printed
    policy = json.loads((tmp_path / "found" / "policy.json").read_text())
    assert policy["views"][0]["name"] == "identity" and policy["meta"]["kind"] == "dense-search"
    report = json.loads((tmp_path / "found" / "search-segmentation.json").read_text())
    assert [row["policy"] for row in report["test"]] == ["none", "hflip", "multiscale", "searched"]
    assert report["validation"]["score"] >= report["validation"]["baseline"]
    assert main(["search", str(ckpt), "--task", "segmentation", "--no-gate"]) == 2
    assert "--no-gate does not apply to a segmentation search" in capsys.readouterr().err
