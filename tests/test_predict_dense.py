"""``predict --task``: segmentation label maps, COCO detections, keypoint JSON; resume and errors."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from ttakit.errors import InvalidInputError, ModelOutputError
from ttakit.jobs import _dense_outputs as outputs
from ttakit.jobs.predict_dense import predict_dense
from ttakit.policy import Policy, View
from ttakit.predictors import load
from ttakit.search.dense import DETECTION_DEFAULTS, detection_settings

SEG = {"input_size": 16, "channels": 1, "outputs": "logits"}


def _segmenter() -> nn.Module:
    torch.manual_seed(0)
    return nn.Conv2d(1, 3, 3, padding=1)


def _gray(folder: Path, name: str, size=(16, 16), seed=0) -> Path:
    rng = np.random.default_rng(seed)
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((rng.random(size) * 255).astype(np.uint8)).save(path)
    return path


def _images(tmp_path: Path, n=3, size=(16, 16)) -> Path:
    folder = tmp_path / "imgs"
    for i in range(n):
        _gray(folder, f"img{i}.png", size, seed=i)
    return folder


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _run(model, images, out, task="segmentation", **kw):
    kw.setdefault("model_options", SEG)
    return predict_dense(model, images, task=task, out=out, workers=0, progress=False, **kw)


# --------------------------------------------------------------------------- segmentation


def test_segmentation_png_is_the_argmax_of_the_merged_probabilities(tmp_path):
    model = _segmenter()
    images = _images(tmp_path, 2)
    summary = _run(model, images, tmp_path / "masks", policy="hflip", probs=True)
    assert summary["n_predicted"] == 2 and summary["views"] == ["identity", "hflip"]
    for i in range(2):
        x = torch.from_numpy(np.array(Image.open(images / f"img{i}.png"))).float().div(255)[None, None]
        with torch.no_grad():
            probs = (torch.softmax(model(x), 1) + torch.softmax(model(x.flip(-1)), 1).flip(-1)) / 2
        png = Image.open(tmp_path / "masks" / f"img{i}.png")
        assert png.mode == "P" and png.getpalette()[:6] == [0, 0, 0, 128, 0, 0]
        assert np.array_equal(np.array(png), probs[0].argmax(0).numpy())
        saved = np.load(tmp_path / "masks" / "probs" / f"img{i}.npz")["probs"]
        assert saved.dtype == np.float16 and saved.shape == (3, 16, 16)
        np.testing.assert_allclose(saved, probs[0].numpy(), atol=1e-3)
    rows = _rows(tmp_path / "masks" / "index.csv")
    assert [r["mask"] for r in rows] == ["img0.png", "img1.png"]
    assert rows[0]["probs"] == "probs/img0.npz" and (rows[0]["height"], rows[0]["width"]) == ("16", "16")


def test_segmentation_maps_come_back_at_each_files_own_size(tmp_path):
    folder = tmp_path / "imgs"
    _gray(folder, "wide.png", (20, 30))
    _gray(folder, "sub/tall.jpg", (40, 12))
    _run(_segmenter(), folder, tmp_path / "out", resize="fit")
    assert Image.open(tmp_path / "out" / "wide.png").size == (30, 20)
    assert Image.open(tmp_path / "out" / "sub" / "tall.png").size == (12, 40)  # relative names kept


def test_segmentation_refuses_crop_resize_and_a_model_of_another_task(tmp_path):
    images = _images(tmp_path, 1)
    with pytest.raises(InvalidInputError, match="--resize crop with --task segmentation"):
        _run(_segmenter(), images, tmp_path / "a", resize="crop")
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(256, 4))
    with pytest.raises(ModelOutputError, match=r"returned shape \(1, 4\).*segmentation model returns"):
        _run(classifier, images, tmp_path / "b")


def test_output_names_keep_extensions_only_where_names_collide(tmp_path):
    paths = [str(tmp_path / "a.jpg"), str(tmp_path / "a.png"), str(tmp_path / "d" / "b.png")]
    names = outputs.output_names(paths, paths, ".png")
    assert list(names.values()) == ["a.jpg.png", "a.png.png", "d/b.png"]


# --------------------------------------------------------------------------- resume and errors


def test_resume_predicts_only_new_images_and_lists_an_unreadable_file_once(tmp_path):
    images = _images(tmp_path, 2)
    (images / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "masks"
    first = _run(_segmenter(), images, out)
    assert (first["n_predicted"], first["n_errors"]) == (2, 1)
    _gray(images, "img9.png", seed=9)
    second = _run(_segmenter(), images, out, resume=True)
    assert (second["n_done_before"], second["n_predicted"], second["n_errors"]) == (3, 1, 0)
    assert [r["mask"] for r in _rows(out / "index.csv")] == ["img0.png", "img1.png", "img9.png"]
    errors = _rows(out / "index.csv.errors.csv")
    assert [Path(r["path"]).name for r in errors] == ["broken.png"] and "not an image" in errors[0]["reason"]
    third = _run(_segmenter(), images, out, resume=True, retry_errors=True)
    assert (third["n_retried"], third["n_errors"]) == (1, 1)
    assert len(_rows(out / "index.csv.errors.csv")) == 1  # still once


def test_resume_with_another_policy_or_existing_output_is_refused(tmp_path):
    images = _images(tmp_path, 1)
    out = tmp_path / "masks"
    _run(_segmenter(), images, out)
    with pytest.raises(InvalidInputError, match="already holds predictions.*--resume.*--overwrite"):
        _run(_segmenter(), images, out)
    with pytest.raises(InvalidInputError, match=r"the policy \(none then, hflip now\)"):
        _run(_segmenter(), images, out, policy="hflip", resume=True)
    again = _run(_segmenter(), images, out, policy="hflip", overwrite=True)
    assert again["n_predicted"] == 1 and len(_rows(out / "index.csv")) == 1


@pytest.mark.parametrize(("task", "fragment"), [("classify", r"task \(--task\) must be one of segmentation, keypoints, detection, got .classify."),
                                                ("classification", "ttakit predict without --task")])
def test_bad_task_is_one_line(tmp_path, task, fragment):
    with pytest.raises(InvalidInputError, match=fragment) as info:
        _run(_segmenter(), _images(tmp_path, 1), tmp_path / "o", task=task)
    assert "\n" not in str(info.value)


def test_a_task_that_contradicts_the_model_file_is_refused():
    from ttakit.predictors._build import _check_contradictions

    with pytest.raises(InvalidInputError, match="task \\(--task\\) detection contradicts checkpoint x"):
        _check_contradictions("checkpoint", "x", {"task": "detection"}, {"task": "segmentation"})


# --------------------------------------------------------------------------- detection


class BrightBox(nn.Module):
    """Returns, per image, the box of its pixels above 0.5 (pixels of the input), label 1, score
    0.9, as torchvision-style dicts; ``shift`` moves it right (a bias TTA's hflip cancels)."""

    def __init__(self, shift: float = 0.0):
        super().__init__()
        self.shift = shift

    def forward(self, x):
        out = []
        for image in x:
            ys, xs = torch.nonzero(image[0] > 0.5, as_tuple=True)
            if len(xs) == 0:
                out.append({"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)})
                continue
            box = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()
            box = box + torch.tensor([self.shift, 0.0, self.shift, 0.0])
            w = float(image.shape[-1])
            out.append({"boxes": box.clamp(0, w)[None], "scores": torch.tensor([0.9]), "labels": torch.tensor([1])})
        return out


def _rectangle_images(tmp_path: Path) -> Path:
    folder = tmp_path / "boxes"
    folder.mkdir()
    for i, (x1, y1, x2, y2) in enumerate([(8, 4, 24, 20), (30, 10, 50, 40)]):
        pixels = np.zeros((48, 64), np.uint8)  # H 48, W 64: resized to the model's 32x32
        pixels[y1:y2, x1:x2] = 255
        Image.fromarray(pixels).save(folder / f"r{i}.png")
    (folder / "empty.png").write_bytes(np.zeros(0, np.uint8).tobytes())
    return folder


def test_detection_writes_coco_results_a_name_map_and_a_csv(tmp_path):
    images = _rectangle_images(tmp_path)
    out = tmp_path / "dets.json"
    summary = _run(BrightBox(), images, out, task="detection", policy="hflip",
                   model_options={"input_size": 32, "channels": 1}, merge="wbf", iou_thr=0.5)
    assert (summary["n_predicted"], summary["n_errors"], summary["n_detections"]) == (2, 1, 2)
    results = json.loads(out.read_text())
    assert sorted(results[0]) == ["bbox", "box_std", "category_id", "image_id", "n_views", "score", "score_std"]
    truths = {1: (8, 4, 16, 16), 2: (30, 10, 20, 30)}  # image_id = index in the input list (empty.png is 0)
    for r in results:
        assert r["category_id"] == 1 and r["n_views"] == 2 and r["score"] == pytest.approx(0.9, abs=1e-4)
        np.testing.assert_allclose(r["bbox"], truths[r["image_id"]], atol=2.0)  # x, y, w, h in file pixels
        assert len(r["box_std"]) == 4 and r["score_std"] == pytest.approx(0.0, abs=1e-5)
    names = json.loads((tmp_path / "dets.images.json").read_text())
    assert [(i["id"], Path(i["file_name"]).name, i["height"], i["width"]) for i in names["images"]] == \
        [(1, "r0.png", 48, 64), (2, "r1.png", 48, 64)]
    rows = _rows(tmp_path / "dets.csv")
    assert list(rows[0]) == outputs.DETECTION_CSV_COLUMNS and len(rows) == 2
    assert float(rows[0]["w"]) == pytest.approx(results[0]["bbox"][2])


def test_detection_resume_keeps_image_ids_and_reads_the_searched_settings(tmp_path):
    images = _rectangle_images(tmp_path)
    out = tmp_path / "dets.json"
    searched = Policy([View.identity()], name="searched", meta={"detection": {"merge": "nms", "iou_thr": 0.7}})
    options = {"input_size": 32, "channels": 1}
    first = _run(BrightBox(), [images / "r0.png"], out, task="detection", policy=searched, model_options=options)
    assert first["settings"]["detection"]["merge"] == "nms" and first["settings"]["detection"]["iou_thr"] == 0.7
    both = [images / "r0.png", images / "r1.png"]
    second = _run(BrightBox(), both, out, task="detection", policy=searched, model_options=options, resume=True)
    assert (second["n_done_before"], second["n_predicted"]) == (1, 1)
    assert sorted(r["image_id"] for r in json.loads(out.read_text())) == [0, 1]
    with pytest.raises(InvalidInputError, match="COCO results, a .json file"):
        _run(BrightBox(), both, tmp_path / "dets.csv", task="detection", model_options=options)


def test_detection_settings_precedence():
    policy = Policy([View.identity()], meta={"detection": {"merge": "nms", "iou_thr": 0.4}})
    assert detection_settings(policy, iou_thr=0.6) == {**DETECTION_DEFAULTS, "merge": "nms", "iou_thr": 0.6}
    assert detection_settings(Policy.identity()) == DETECTION_DEFAULTS


class PaddedBright(nn.Module):
    """BrightBox's box as one padded ``(B, 2, 6)`` tensor (a second, padding row: score 0, label -1),
    the form a CenterNet export returns; traceable (no data-dependent control flow)."""

    def forward(self, x):
        bright = (x[:, 0] > 0.5).float()  # (B, H, W)
        h, w = bright.shape[-2:]
        cols = torch.arange(w, dtype=x.dtype)
        rows = torch.arange(h, dtype=x.dtype)
        on_cols, on_rows = bright.amax(dim=1), bright.amax(dim=2)  # (B, W), (B, H)
        x1 = (cols + (1 - on_cols) * 1e4).amin(dim=1)
        x2 = (cols * on_cols).amax(dim=1) + 1
        y1 = (rows + (1 - on_rows) * 1e4).amin(dim=1)
        y2 = (rows * on_rows).amax(dim=1) + 1
        found = torch.stack([x1, y1, x2, y2, torch.full_like(x1, 0.8), torch.full_like(x1, 2.0)], dim=1)
        pad = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, -1.0]).expand_as(found)
        return torch.stack([found, pad], dim=1)


@pytest.mark.parametrize("kind", ["torchscript", "pt2"])
def test_exported_dense_models_predict_through_the_loaders(tmp_path, kind):
    images = _rectangle_images(tmp_path)
    example = torch.rand(2, 1, 32, 32)
    if kind == "torchscript":
        path = tmp_path / "det.pt"
        torch.jit.save(torch.jit.trace(PaddedBright(), example), str(path))
    else:
        path = tmp_path / "det.pt2"
        batch = {"x": {0: torch.export.Dim("batch", min=1, max=1024)}}
        torch.export.save(torch.export.export(PaddedBright(), (example,), dynamic_shapes=batch), str(path))
    out = tmp_path / f"{kind}.json"
    summary = _run(str(path), images, out, task="detection", policy="hflip",
                   model_options={"input_size": 32, "channels": 1})
    assert summary["model"]["kind"] == kind and summary["n_detections"] == 2
    results = json.loads(out.read_text())
    assert {r["category_id"] for r in results} == {2} and all(r["n_views"] == 2 for r in results)
    np.testing.assert_allclose(sorted(r["bbox"] for r in results), [[8, 4, 16, 16], [30, 10, 20, 30]], atol=2.0)


# --------------------------------------------------------------------------- keypoints


class TwoPoints(nn.Module):
    """Two keypoints: the brightest pixel's centre ("left") and the darkest's ("right"), in pixels."""

    def forward(self, x):
        flat = x[:, 0].flatten(1)
        w = x.shape[-1]
        points = []
        for index in (flat.argmax(1), flat.argmin(1)):
            points += [(index % w).float() + 0.5, (index // w).float() + 0.5]
        return torch.stack(points, dim=1)


def test_keypoints_json_names_each_point_in_file_pixels(tmp_path):
    folder = tmp_path / "kp"
    folder.mkdir()
    pixels = np.full((16, 16), 128, np.uint8)
    pixels[3, 5], pixels[10, 12] = 255, 0
    Image.fromarray(pixels).save(folder / "a.png")
    summary = _run(TwoPoints(), folder, tmp_path / "out", task="keypoints", policy="hflip",
                   keypoint_names=["bright", "dark"], model_options={"input_size": 16, "channels": 1})
    assert summary["n_predicted"] == 1
    record = json.loads((tmp_path / "out" / "a.json").read_text())
    assert [p["name"] for p in record["keypoints"]] == ["bright", "dark"]
    assert (record["keypoints"][0]["x"], record["keypoints"][0]["y"]) == (5.5, 3.5)
    assert (record["keypoints"][1]["x"], record["keypoints"][1]["y"]) == (12.5, 10.5)
    assert record["keypoints"][0]["std"] == [0.0, 0.0]  # the flipped view finds the same pixel
    assert _rows(tmp_path / "out" / "index.csv")[0]["keypoints"] == "a.json"
    with pytest.raises(ModelOutputError, match="returns 2 keypoints per image but 3 keypoint names"):
        _run(TwoPoints(), folder, tmp_path / "out3", task="keypoints", keypoint_names=["a", "b", "c"],
             model_options={"input_size": 16, "channels": 1})


class LeftRight(nn.Module):
    """Two keypoints: the leftmost and the rightmost bright pixel (a mirror swaps which is which)."""

    def forward(self, x):
        points = []
        for image in x:
            ys, xs = torch.nonzero(image[0] > 0.9, as_tuple=True)
            left, right = int(xs.argmin()), int(xs.argmax())
            points.append(torch.stack([xs[left] + 0.5, ys[left] + 0.5, xs[right] + 0.5, ys[right] + 0.5]).float())
        return torch.stack(points)


def test_keypoint_flip_pairs_reach_the_wrapper(tmp_path):
    folder = tmp_path / "kp"
    folder.mkdir()
    pixels = np.zeros((16, 16), np.uint8)
    pixels[3, 2], pixels[8, 12] = 255, 255
    Image.fromarray(pixels).save(folder / "a.png")
    options = {"input_size": 16, "channels": 1}
    _run(LeftRight(), folder, tmp_path / "paired", task="keypoints", policy="hflip", flip_pairs=[(0, 1)],
         keypoint_names=["left", "right"], model_options=options)
    paired = json.loads((tmp_path / "paired" / "a.json").read_text())["keypoints"]
    assert [(p["x"], p["y"], p["std"]) for p in paired] == [(2.5, 3.5, [0.0, 0.0]), (12.5, 8.5, [0.0, 0.0])]
    _run(LeftRight(), folder, tmp_path / "unpaired", task="keypoints", policy="hflip", model_options=options)
    unpaired = json.loads((tmp_path / "unpaired" / "a.json").read_text())["keypoints"]
    assert [p["name"] for p in unpaired] == ["kp0", "kp1"] and unpaired[0]["std"][0] > 1


# --------------------------------------------------------------------------- command line


def _predict_takes_task() -> bool:
    from ttakit.cli import build_parser

    try:
        build_parser().parse_args(["predict", "m", "i", "--out", "o", "--task", "segmentation"])
    except SystemExit:
        return False
    return True


def test_predict_command_writes_label_maps_for_a_segmentation_checkpoint(tmp_path, capsys):
    from ttakit.cli import main
    from ttakit.models import CheckpointMeta, create_model, save_checkpoint

    if not _predict_takes_task():
        pytest.skip("ttakit predict does not take --task yet (cli/predict.py is wired by the lead)")
    torch.manual_seed(0)
    model = create_model("unet-small", in_channels=1, num_classes=3, image_size=(16, 16), mean=[0.5], std=[0.5])
    meta = CheckpointMeta(arch="unet-small", task="segmentation", classes=["bg", "a", "b"], in_channels=1,
                          image_size=[16, 16], mean=[0.5], std=[0.5])
    save_checkpoint(tmp_path / "unet", model, meta)
    images = _images(tmp_path, 2, size=(20, 24))
    code = main(["predict", str(tmp_path / "unet"), str(images), "--out", str(tmp_path / "masks"), "--workers", "0",
                 "--no-progress"])  # the checkpoint records its task: no --task needed
    assert code == 0 and "predicted 2 of 2 images (segmentation" in capsys.readouterr().out
    assert Image.open(tmp_path / "masks" / "img0.png").size == (24, 20)
    with pytest.raises(SystemExit) as exited:  # a usage error: argparse's exit, one line
        main(["predict", str(tmp_path / "unet"), str(images), "--out", str(tmp_path / "m2"), "--task", "segment"])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "--task" in err and "segment" in err and "\n" not in err


# --------------------------------------------------------------------------- predictors


def test_dense_predictors_pass_dense_outputs_and_describe_their_task():
    seg = load(_segmenter(), task="segmentation", **SEG)
    assert seg(torch.rand(2, 1, 16, 16)).shape == (2, 3, 16, 16)
    assert seg.describe()["task"] == "segmentation"
    assert "task" not in load(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), outputs="logits").describe()
    det = load(BrightBox(), task="detection", input_size=8, channels=1)
    assert det.outputs == "logits" and isinstance(det(torch.rand(2, 1, 8, 8)), list)
    with pytest.raises(ModelOutputError, match="a keypoints model returns"):
        load(_segmenter(), task="keypoints", **SEG)(torch.rand(1, 1, 16, 16))
