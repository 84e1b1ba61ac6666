"""ttakit predict on real Fashion-MNIST PNG files written by the tests: rows, decoding, errors,
resume, and a run killed with SIGKILL."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ttakit.cli import main
from ttakit.data import FASHION_MNIST_CLASSES, load_fashion_mnist
from ttakit.data.decode import DecodeError, decode_image, list_images
from ttakit.engine import TTAEngine
from ttakit.errors import DataError, DataNotFoundError, InvalidInputError
from ttakit.jobs._predict_resume import settings_path
from ttakit.jobs.predict import errors_path, output_columns, predict_images
from ttakit.models import CheckpointMeta, create_model, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def fashion():
    """The first 48 Fashion-MNIST test images (N, 1, 28, 28) in [0, 1] and their uint8 pixels."""
    test = load_fashion_mnist("test")
    images = test.images[:48]
    return images, (images * 255).round().to(torch.uint8)


def write_pngs(folder: Path, pixels: torch.Tensor, nested: bool = True) -> list[Path]:
    """One grayscale PNG per image; half of them in a sub-folder (predict searches recursively)."""
    paths = []
    for i, image in enumerate(pixels):
        sub = folder / ("more" if nested and i % 2 else "")
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"img{i:03d}.png"
        Image.fromarray(image[0].numpy(), mode="L").save(path)
        paths.append(path)
    return sorted(paths)


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    model = create_model("seed-cnn", in_channels=1, num_classes=10, image_size=(28, 28), mean=[0.286], std=[0.353])
    model.eval()
    meta = CheckpointMeta(
        arch="seed-cnn", classes=list(FASHION_MNIST_CLASSES), in_channels=1, image_size=[28, 28], mean=[0.286], std=[0.353]
    )
    return save_checkpoint(tmp_path / "run", model, meta), model


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


# --------------------------------------------------------------------------- rows are the engine's numbers


def test_predict_rows_equal_the_engine_on_preloaded_images(tmp_path, fashion, checkpoint):
    images, pixels = fashion
    run, model = checkpoint
    paths = write_pngs(tmp_path / "imgs", pixels[:24])
    out = tmp_path / "preds.csv"
    summary = predict_images(run, tmp_path / "imgs", out=out, policy="hflip", workers=0, batch_size=10, progress=False)
    assert summary["n_predicted"] == 24 and summary["n_errors"] == 0 and summary["errors"] is None

    rows = read_rows(out)
    assert list(rows[0]) == output_columns(5)
    assert [r["path"] for r in rows] == [str(p) for p in paths]  # sorted, sub-folders included
    order = [int(Path(r["path"]).stem[3:]) for r in rows]
    reference = TTAEngine(model, "hflip").run(images[order], return_views=True)
    probs = reference.merged
    top = probs.topk(5, dim=1)
    for i, row in enumerate(rows):
        assert [row[f"class_{k}"] for k in range(1, 6)] == [FASHION_MNIST_CLASSES[c] for c in top.indices[i]]
        assert [float(row[f"prob_{k}"]) for k in range(1, 6)] == pytest.approx(top.values[i].tolist(), abs=1e-6)
        entropy = -(probs[i] * probs[i].log()).sum().item()
        assert float(row["entropy"]) == pytest.approx(entropy, abs=1e-5)
        view_classes = reference.views[:, i].argmax(dim=1)
        disagree = (view_classes != probs[i].argmax()).float().mean().item()
        assert float(row["disagreement"]) == pytest.approx(disagree)
        assert row["forward_passes"] == "2"
    assert any(float(r["disagreement"]) > 0 for r in rows)  # the flip changes some answers


def test_gated_policy_reports_the_passes_each_image_got(tmp_path, fashion, checkpoint):
    from ttakit.aliases import get_policy

    images, pixels = fashion
    run, model = checkpoint
    write_pngs(tmp_path / "imgs", pixels[:24], nested=False)
    with torch.inference_mode():
        plain = torch.softmax(model(images[:24]), 1).amax(1)
    threshold = float(plain.median())  # about half the images are confident enough
    policy = get_policy("d4")
    policy.gate_threshold = threshold
    out = tmp_path / "gated.jsonl"
    predict_images(run, tmp_path / "imgs", out=out, policy=policy, workers=0, progress=False, top_k=3)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    confident = plain >= threshold
    assert [r["forward_passes"] for r in rows] == [1 if c else 8 for c in confident.tolist()]
    assert 0 < sum(confident.tolist()) < 24  # both kinds of rows exist
    assert all(len(r["top_k"]) == 3 and set(r["top_k"][0]) == {"class", "prob"} for r in rows)
    assert all(r["disagreement"] == 0 for r, c in zip(rows, confident.tolist(), strict=True) if c)


# --------------------------------------------------------------------------- bad files, resume


def test_bad_files_go_to_the_errors_file_and_the_run_goes_on(tmp_path, fashion, checkpoint):
    _, pixels = fashion
    run, _ = checkpoint
    folder = tmp_path / "imgs"
    write_pngs(folder, pixels[:10], nested=False)
    whole = (folder / "img000.png").read_bytes()
    (folder / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (folder / "notes.png").write_text("this is not an image", encoding="utf-8")
    (folder / "empty.jpg").write_bytes(b"")
    out = tmp_path / "preds.csv"
    summary = predict_images(run, folder, out=out, workers=0, batch_size=4, progress=False)
    assert (summary["n_predicted"], summary["n_errors"]) == (10, 3)
    errors = {Path(r["path"]).name: r["reason"] for r in read_rows(errors_path(out))}
    assert set(errors) == {"truncated.png", "notes.png", "empty.jpg"}
    assert "truncated" in errors["truncated.png"].lower() or "OSError" in errors["truncated.png"]
    assert errors["notes.png"] == "not an image file Pillow can read"
    assert len(read_rows(out)) == 10


def test_resume_completes_a_torn_output_to_one_row_per_image(tmp_path, fashion, checkpoint):
    _, pixels = fashion
    run, _ = checkpoint
    paths = write_pngs(tmp_path / "imgs", pixels[:20])
    out = tmp_path / "preds.csv"
    predict_images(run, tmp_path / "imgs", out=out, policy="hflip", workers=0, progress=False)
    full = out.read_text(encoding="utf-8")
    lines = full.splitlines(keepends=True)
    out.write_text("".join(lines[:9]) + lines[9][:17], encoding="utf-8")  # 8 rows and a torn one
    summary = predict_images(run, tmp_path / "imgs", out=out, policy="hflip", workers=0, progress=False, resume=True)
    assert (summary["n_done_before"], summary["n_predicted"]) == (8, 12)
    assert out.read_text(encoding="utf-8") == full  # same rows, same order, nothing doubled
    summary = predict_images(run, tmp_path / "imgs", out=out, policy="hflip", workers=0, progress=False, resume=True)
    assert summary["n_predicted"] == 0 and len(read_rows(out)) == len(paths)
    with pytest.raises(InvalidInputError, match=r"was made with other settings: .*--top-k \(5 then, 2 now\)"):
        predict_images(run, tmp_path / "imgs", out=out, top_k=2, workers=0, progress=False, resume=True)


# --------------------------------------------------------------------------- decoding


def test_listing_folders_globs_and_lists(tmp_path):
    folder = tmp_path / "photos"
    (folder / "a" / "b").mkdir(parents=True)
    (folder / ".hidden").mkdir()
    for name in ("x.png", "a/y.JPG", "a/b/z.webp", ".hidden/h.png", "a/readme.txt", ".dot.png"):
        (folder / name).write_bytes(b"")
    assert [p.relative_to(folder).as_posix() for p in list_images(folder)] == ["a/b/z.webp", "a/y.JPG", "x.png"]
    assert [p.name for p in list_images(str(folder / "**" / "*.png"))] == ["x.png"]
    listing = tmp_path / "list.txt"
    listing.write_text("# my files\nphotos/x.png\n\n" + str(folder / "a" / "y.JPG") + "\n", encoding="utf-8")
    assert list_images(listing) == [folder / "x.png", folder / "a" / "y.JPG"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no image files"):
        list_images(tmp_path / "empty")
    with pytest.raises(DataError, match="matches no files"):
        list_images(str(tmp_path / "*.tiff"))
    with pytest.raises(DataNotFoundError, match="do not exist"):
        list_images(tmp_path / "nowhere")


def test_formats_modes_exif_and_resizing(tmp_path):
    rgb = np.zeros((4, 8, 3), dtype=np.uint8)
    rgb[:, :2] = (255, 0, 0)  # a red strip on the left
    for suffix in ("png", "bmp", "webp", "tiff"):
        Image.fromarray(rgb).save(tmp_path / f"strip.{suffix}", **({"lossless": True} if suffix == "webp" else {}))
        decoded = decode_image(tmp_path / f"strip.{suffix}", 3, (4, 8))
        assert decoded.shape == (4, 8, 3) and decoded[0, 0].tolist() == [255, 0, 0] and decoded[0, 7].tolist() == [0, 0, 0]
    # EXIF orientation 6: the camera held sideways; the strip on the left ends up on top.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb).save(tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=100)
    upright = decode_image(tmp_path / "rotated.jpg", 1, (8, 4))
    assert upright[:2].mean() > 60 and upright[-2:].mean() < 10
    # GIF: the first frame (black), not the second (white).
    frames = [Image.new("L", (5, 5), 0), Image.new("L", (5, 5), 255)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert decode_image(tmp_path / "anim.gif", 1, (5, 5)).max() == 0
    # Gray to RGB copies the channel; RGBA to gray drops alpha; 16-bit gray scales to 8 bits.
    Image.new("L", (3, 3), 200).save(tmp_path / "gray.png")
    assert decode_image(tmp_path / "gray.png", 3, (3, 3)).reshape(-1, 3).tolist() == [[200, 200, 200]] * 9
    Image.new("RGBA", (3, 3), (0, 0, 255, 0)).save(tmp_path / "rgba.png")
    assert decode_image(tmp_path / "rgba.png", 1, (3, 3)).max() == 29  # ITU-R 601 luma of pure blue
    Image.fromarray(np.full((3, 3), 65535, dtype=np.uint16)).save(tmp_path / "deep.png")
    assert decode_image(tmp_path / "deep.png", 1, (3, 3)).min() == 255
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    palette.save(tmp_path / "palette.png", transparency=0)
    assert decode_image(tmp_path / "palette.png", 3, (4, 4))[0, 0].tolist() == [10, 20, 30]
    Image.new("L", (56, 56), 128).save(tmp_path / "big.png")
    assert decode_image(tmp_path / "big.png", 4, (28, 28)).shape == (28, 28, 4)
    (tmp_path / "fake.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(DecodeError):
        decode_image(tmp_path / "fake.png", 1, (3, 3))


# --------------------------------------------------------------------------- one-line errors, exit 2


def _onnx(path: Path, shape):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x"], ["y"], axes=[2, 3], keepdims=0)],
        "mean",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", shape[1]])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _cli_error(args, capsys) -> str:
    code = main(["--no-progress", "predict", *map(str, args)])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_input_is_one_line_and_exit_code_2(tmp_path, fashion, checkpoint, capsys):
    _, pixels = fashion
    run, _ = checkpoint
    write_pngs(tmp_path / "imgs", pixels[:2], nested=False)
    (tmp_path / "empty").mkdir()
    out = tmp_path / "p.csv"
    assert "holds no image files" in _cli_error([run, tmp_path / "empty", "--out", out], capsys)
    assert "matches no files" in _cli_error([run, tmp_path / "*.jpeg", "--out", out], capsys)
    assert "does not exist; create it first" in _cli_error([run, tmp_path / "imgs", "--out", tmp_path / "no" / "p.csv"], capsys)
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert "cannot write" in _cli_error([run, tmp_path / "imgs", "--out", locked / "p.csv"], capsys)
    (tmp_path / "model.tflite").write_bytes(b"TFL3")
    assert "unknown type (.tflite)" in _cli_error([tmp_path / "model.tflite", tmp_path / "imgs", "--out", out], capsys)
    dynamic = _onnx(tmp_path / "dyn.onnx", ["N", 1, "H", "W"])
    err = _cli_error([dynamic, tmp_path / "imgs", "--out", out, "--outputs", "logits"], capsys)
    assert "dynamic input size" in err and "--input-size" in err
    two = _onnx(tmp_path / "two.onnx", ["N", 2, 8, 8])
    err = _cli_error([two, tmp_path / "imgs", "--out", out, "--outputs", "logits", "--layout", "nchw"], capsys)
    assert "takes 2-channel images" in err and "1 (gray), 3 (RGB) or 4 (RGBA)" in err
    assert "outputs='logits' or 'probs'" in _cli_error([dynamic, tmp_path / "imgs", "--out", out, "--input-size", "8"], capsys)
    assert "device must be" in _cli_error([run, tmp_path / "imgs", "--out", out, "--device", "gpu"], capsys)


def test_onnx_model_end_to_end_through_the_cli(tmp_path, fashion, capsys):
    _, pixels = fashion
    write_pngs(tmp_path / "imgs", pixels[:6], nested=False)
    model = _onnx(tmp_path / "mean.onnx", ["N", 3, "H", "W"])  # mean of each RGB channel: 3 "classes"
    classes = tmp_path / "classes.txt"
    classes.write_text("red\ngreen\nblue\n", encoding="utf-8")
    out = tmp_path / "p.csv"
    args = [model, tmp_path / "imgs", "--out", out, "--input-size", "14x14", "--outputs", "logits",
            "--classes", classes, "--workers", "0", "--top-k", "2"]
    assert main(["--no-progress", "predict", *map(str, args)]) == 0
    assert "predicted 6 of 6 images" in capsys.readouterr().out
    rows = read_rows(out)
    assert len(rows) == 6 and {r["class_1"] for r in rows} <= {"red", "green", "blue"}
    # Gray images become RGB with equal channels: the three "classes" tie at 1/3.
    assert all(float(r["prob_1"]) == pytest.approx(1 / 3, abs=1e-5) for r in rows)
    assert all(float(r["entropy"]) == pytest.approx(math.log(3), abs=1e-5) for r in rows)


# --------------------------------------------------------------------------- end to end, with processes


def _cli(*args, env=None, **kwargs):
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *(env or {}).get("PYTHONPATH", "").split(os.pathsep)])}
    full_env.update({k: v for k, v in (env or {}).items() if k != "PYTHONPATH"})
    full_env.setdefault("OMP_NUM_THREADS", "1")  # a loaded 2-core machine stalls multi-threaded ops
    return subprocess.Popen(
        [sys.executable, "-m", "ttakit.cli", "--no-progress", "predict", *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env, **kwargs,
    )


@pytest.mark.slow
def test_cli_with_worker_processes_and_jsonl(tmp_path, fashion, checkpoint, capsys):
    images, pixels = fashion
    run, model = checkpoint
    paths = write_pngs(tmp_path / "imgs", pixels)
    listing = tmp_path / "files.txt"
    listing.write_text("\n".join(str(p.relative_to(tmp_path)) for p in paths) + "\n", encoding="utf-8")
    out = tmp_path / "preds.jsonl"
    args = [run, listing, "--policy", "d4", "--out", out, "--workers", "2", "--batch-size", "8", "--top-k", "1"]
    assert main(["--no-progress", "predict", *map(str, args)]) == 0
    stdout = capsys.readouterr().out
    assert "predicted 48 of 48 images" in stdout and "img/s" in stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["path"] for r in rows] == [str(p) for p in paths]
    order = [int(Path(r["path"]).stem[3:]) for r in rows]
    expected = TTAEngine(model, "d4").run(images[order]).merged.max(dim=1).values
    assert [r["top_k"][0]["prob"] for r in rows] == pytest.approx(expected.tolist(), abs=1e-6)
    assert all(r["forward_passes"] == 8 for r in rows)


SLOW_MODEL = '''
import time
import numpy as np

def predict(batch):
    time.sleep(0.2)
    bright = batch.mean(axis=(1, 2, 3))
    return np.stack([bright, 1.0 - bright, bright * bright], axis=1)
'''


@pytest.mark.slow
def test_sigkill_halfway_leaves_whole_rows_and_resume_completes(tmp_path, fashion):
    _, pixels = fashion
    paths = write_pngs(tmp_path / "imgs", pixels[:40])
    (tmp_path / "slowmodel.py").write_text(SLOW_MODEL, encoding="utf-8")
    out = tmp_path / "preds.csv"
    args = ["slowmodel:predict", tmp_path / "imgs", "--out", out, "--outputs", "logits", "--channels", "1",
            "--input-size", "28", "--batch-size", "4", "--workers", "1", "--policy", "hflip"]
    env = {"PYTHONPATH": str(tmp_path)}
    proc = _cli(*args, env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 4):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    text = out.read_text(encoding="utf-8")
    assert text.endswith("\n")  # whole rows only
    partial = list(csv.reader(io.StringIO(text)))
    assert all(len(row) == len(output_columns(3)) for row in partial)
    assert 3 <= len(partial) - 1 < 40  # killed halfway

    proc = _cli(*args, "--resume", env=env)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    rows = read_rows(out)
    assert sorted(r["path"] for r in rows) == [str(p) for p in paths]  # exactly one row per image
    assert f"({len(partial) - 1} already in {out})" in stdout
    # The resumed rows are the numbers an uninterrupted run gives.
    sys.path.insert(0, str(tmp_path))
    try:
        reference = tmp_path / "reference.csv"
        predict_images("slowmodel:predict", tmp_path / "imgs", out=reference, policy="hflip", workers=0,
                       batch_size=40, progress=False, model_options={"outputs": "logits", "channels": 1, "input_size": 28})
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("slowmodel", None)
    assert sorted(map(tuple, (r.values() for r in rows))) == sorted(map(tuple, (r.values() for r in read_rows(reference))))


@pytest.mark.parametrize("command", ["evaluate", "search"])
def test_device_flag_on_evaluate_and_search_is_checked(tmp_path, checkpoint, command, capsys):
    run, _ = checkpoint
    code = main(["--no-progress", command, str(run), "--device", "tpu", "--amp", "--max-batch", "64"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "device must be one of 'cpu', 'cuda', 'cuda:N'" in err and "got 'tpu'" in err


@pytest.mark.slow
def test_conformal_sets_are_the_calibrated_sets_of_the_merged_probabilities(tmp_path, fashion):
    from ttakit.conformal import ConformalCalibration
    from ttakit.jobs.train import train_run
    from ttakit.training.config import TrainConfig

    images, pixels = fashion
    config = TrainConfig(epochs=1, limit=600)
    result = train_run("fashion-mnist", out_dir=tmp_path / "run", config=config, val_fraction=0.01, progress=False)
    write_pngs(tmp_path / "imgs", pixels[:24], nested=False)
    out = tmp_path / "sets.csv"
    summary = predict_images(result.checkpoint_dir, tmp_path / "imgs", out=out, policy="hflip", workers=0,
                             progress=False, conformal=0.2)
    rows = read_rows(out)
    assert list(rows[0])[-1] == "set"
    calibration = ConformalCalibration(**summary["conformal"])
    assert (calibration.alpha, calibration.method) == (0.2, "lac")
    assert calibration.n_calibration == 600  # the held-out validation split: 1% of 60,000, stratified
    probs = TTAEngine(result.model.eval(), "hflip").run(images[:24]).merged
    sets = calibration.predict_sets(probs)
    expected = ["|".join(FASHION_MNIST_CLASSES[c] for c in torch.nonzero(s).flatten().tolist()) for s in sets]
    assert [r["set"] for r in rows] == expected
    assert all(r["class_1"] in r["set"].split("|") for r in rows if r["set"])


# --------------------------------------------------------------------------- several models: the ensemble


def _member_checkpoint(folder: Path, seed: int, classes=FASHION_MNIST_CLASSES):
    torch.manual_seed(seed)
    model = create_model("seed-cnn", in_channels=1, num_classes=10, image_size=(28, 28), mean=[0.286], std=[0.353])
    model.eval()
    meta = CheckpointMeta(arch="seed-cnn", classes=list(classes), in_channels=1, image_size=[28, 28], mean=[0.286],
                          std=[0.353])
    return save_checkpoint(folder, model, meta), model


def test_several_models_write_the_soft_vote_of_their_engines(tmp_path, fashion, capsys):
    """`ttakit predict A:hflip B:d4 IMAGES`: each row is the mean of the two members' TTA
    probabilities (no shared validation split here, so no temperatures), the members' disagreement
    with the ensemble's class, and the passes of both policies."""
    images, pixels = fashion
    (run_a, model_a), (run_b, model_b) = _member_checkpoint(tmp_path / "a", 0), _member_checkpoint(tmp_path / "b", 1)
    paths = write_pngs(tmp_path / "imgs", pixels[:20])
    out = tmp_path / "ens.csv"
    code = main(["--no-progress", "predict", f"{run_a}:hflip", f"{run_b}:d4", str(tmp_path / "imgs"), "--out", str(out),
                 "--workers", "0", "--batch-size", "7", "--top-k", "3"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "an ensemble of 2 models, soft vote" in printed and "10.00 passes/img" in printed
    rows = read_rows(out)
    assert [r["path"] for r in rows] == [str(p) for p in paths]
    order = [int(Path(r["path"]).stem[3:]) for r in rows]
    a = TTAEngine(model_a, "hflip")(images[order])
    b = TTAEngine(model_b, "d4")(images[order])
    mean = (a + b) / 2
    top = mean.topk(3, dim=1)
    members_differ = ((a.argmax(1) != mean.argmax(1)).float() + (b.argmax(1) != mean.argmax(1)).float()) / 2
    for i, row in enumerate(rows):
        assert [row[f"class_{k}"] for k in (1, 2, 3)] == [FASHION_MNIST_CLASSES[c] for c in top.indices[i]]
        assert [float(row[f"prob_{k}"]) for k in (1, 2, 3)] == pytest.approx(top.values[i].tolist(), abs=1e-5)
        assert float(row["disagreement"]) == pytest.approx(members_differ[i].item())
        assert row["forward_passes"] == "10"
    assert any(float(r["disagreement"]) > 0 for r in rows)  # two random networks disagree somewhere
    # --weights 1,3: the weighted mean
    out_w = tmp_path / "weighted.jsonl"
    summary = predict_images([run_a, run_b], tmp_path / "imgs", out=out_w, policy=["hflip", "d4"], weights=[1, 3],
                             workers=0, progress=False, top_k=1)
    assert summary["ensemble"]["weights"] == [1.0, 3.0] and summary["passes_per_image"] == 10
    weighted = (a + 3 * b) / 4
    got = [json.loads(line)["top_k"][0]["prob"] for line in out_w.read_text().splitlines()]
    assert got == pytest.approx(weighted.max(1).values.tolist(), abs=1e-5)


def test_hard_vote_ties_are_seeded_per_image_and_resume_completes(tmp_path, fashion):
    """Hard vote with the random tie-break: two members that disagree tie, and each image's pick
    depends on the seed and its file, not on the batch it came in; a torn ensemble output resumes
    to exactly the rows of a full run."""
    _, pixels = fashion
    (run_a, model_a), (run_b, model_b) = _member_checkpoint(tmp_path / "a", 0), _member_checkpoint(tmp_path / "b", 1)
    write_pngs(tmp_path / "imgs", pixels[:24], nested=False)
    common = {"policy": "none", "vote": "hard", "tie_break": "random", "workers": 0, "progress": False, "top_k": 2}
    predict_images([run_a, run_b], tmp_path / "imgs", out=tmp_path / "b5.csv", batch_size=5, **common)
    predict_images([run_a, run_b], tmp_path / "imgs", out=tmp_path / "b24.csv", batch_size=24, **common)
    rows5, rows24 = read_rows(tmp_path / "b5.csv"), read_rows(tmp_path / "b24.csv")
    assert rows5 == rows24
    ties = [r for r in rows5 if float(r["prob_1"]) == 0.5]
    assert len(ties) >= 3  # the two members disagree on these: a one-one vote
    assert all(float(r["disagreement"]) == 0.5 for r in ties)
    # class_1 is the vote's winner, as ensemble.hard_vote picks it with one stream per file
    import zlib

    from ttakit.ensemble_vote import hard_vote

    images, _ = fashion
    order = [int(Path(r["path"]).stem[3:]) for r in rows5]
    with torch.inference_mode():
        stack = torch.stack([torch.softmax(m(images[order]), 1) for m in (model_a, model_b)])
    seeds = torch.tensor([zlib.crc32(os.path.abspath(r["path"]).encode()) for r in rows5])
    winners, _ = hard_vote(stack, tie_break="random", seed=0, row_seeds=seeds)
    assert [r["class_1"] for r in rows5] == [FASHION_MNIST_CLASSES[c] for c in winners.tolist()]
    # another seed picks the other class on some tied images
    predict_images([run_a, run_b], tmp_path / "imgs", out=tmp_path / "s7.csv", batch_size=5, seed=7, **common)
    other = read_rows(tmp_path / "s7.csv")
    assert any(x["class_1"] != y["class_1"] for x, y in zip(rows5, other, strict=True) if float(x["prob_1"]) == 0.5)
    # a run cut after 10 rows (and a torn 11th) resumes to the full run's rows
    torn = tmp_path / "torn.csv"
    lines = (tmp_path / "b5.csv").read_text().splitlines(keepends=True)
    torn.write_text("".join(lines[:11]) + lines[11][:9])
    with pytest.raises(InvalidInputError, match="torn.csv.settings.json is missing"):
        predict_images([run_a, run_b], tmp_path / "imgs", out=torn, batch_size=4, resume=True, **common)
    settings_path(torn).write_bytes(settings_path(tmp_path / "b5.csv").read_bytes())  # what its rows depend on
    summary = predict_images([run_a, run_b], tmp_path / "imgs", out=torn, batch_size=4, resume=True, **common)
    assert summary["n_done_before"] == 10 and summary["n_predicted"] == 14
    assert read_rows(torn) == rows5


def test_several_models_bad_input_is_one_line_and_exit_code_2(tmp_path, fashion, capsys):
    _, pixels = fashion
    run_a, _ = _member_checkpoint(tmp_path / "a", 0)
    run_x, _ = _member_checkpoint(tmp_path / "x", 1, classes=[f"c{i}" for i in range(10)])
    write_pngs(tmp_path / "imgs", pixels[:2], nested=False)
    imgs, out = tmp_path / "imgs", tmp_path / "p.csv"
    err = _cli_error([run_a, run_x, imgs, "--out", out], capsys)
    assert "same classes in the same order" in err and "c0" in err
    assert "--weights needs one number per model (2), got 3" in _cli_error(
        [run_a, f"{run_a}:hflip", imgs, "--out", out, "--weights", "1,2,3"], capsys)
    assert "'no-such-policy'" in _cli_error([f"{run_a}:no-such-policy", run_a, imgs, "--out", out], capsys)
    err = _cli_error([run_a, f"{run_a}:hflip", imgs, "--out", out, "--conformal", "0.1"], capsys)
    assert "every member must be a ttakit checkpoint trained on the same data" in err
    assert "at least one model and the images" in _cli_error([imgs, "--out", out], capsys)
    assert not out.exists()


@pytest.mark.slow
def test_ensemble_of_trained_checkpoints_is_calibrated_and_writes_conformal_sets(tmp_path, fashion, capsys):
    """Two seed CNNs trained on the same Fashion-MNIST recipe share their validation split: predict
    temperature-scales each on it (soft vote of calibrated probabilities, as `ttakit ensemble`)
    and calibrates the ensemble's conformal sets on the other rows of it (never the rows the
    temperatures were fitted on: :func:`ttakit.ensemble.calibration_rows`)."""
    from ttakit.aliases import get_policy
    from ttakit.conformal import calibrate
    from ttakit.jobs._ensemble_predict import calibration_rows, ensemble_predict
    from ttakit.jobs._eval_data import load_eval_data
    from ttakit.jobs.train import train_run
    from ttakit.training.config import TrainConfig

    images, pixels = fashion
    runs = []
    for seed in (0, 1):
        config = TrainConfig(epochs=1, limit=600, seed=seed, augment=("flip",))
        runs.append(train_run("fashion-mnist", out_dir=tmp_path / f"m{seed}", config=config, val_fraction=0.01,
                              progress=False))
    write_pngs(tmp_path / "imgs", pixels[:24], nested=False)
    out = tmp_path / "ens.csv"
    code = main(["--no-progress", "predict", f"{runs[0].checkpoint_dir}:hflip", str(runs[1].checkpoint_dir),
                 str(tmp_path / "imgs"), "--out", str(out), "--workers", "0", "--conformal", "0.2"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    rows = read_rows(out)
    val = load_eval_data(runs[0].meta, None, "val", None)
    policies = ["hflip", "none"]
    fit, held = calibration_rows(val, [get_policy(p) for p in policies])
    assert not set(fit) & set(held) and len(fit) + len(held) == len(val) == 600
    assert (f"temperature-scaled on the shared validation split ({len(fit)} of its 600 images; conformal sets "
            f"calibrated on the other {len(held)})") in printed
    models = [r.model.eval() for r in runs]
    fitted = ensemble_predict(models, images[:1], policies=policies, calibration=(val.images[fit], val.labels[fit]))
    assert all(t is not None and t > 0 for t in fitted.temperatures)
    expected = ensemble_predict(models, images[:24], policies=policies, temperatures=fitted.temperatures)
    order = [int(Path(r["path"]).stem[3:]) for r in rows]
    assert [float(r["prob_1"]) for r in rows] == pytest.approx(expected.probs[order].max(1).values.tolist(), abs=1e-5)
    on_val = ensemble_predict(models, val.images[held], policies=policies, temperatures=fitted.temperatures)
    calibration = calibrate(on_val.probs, val.labels[held], 0.2)
    sets = calibration.predict_sets(expected.probs[order])
    assert [r["set"] for r in rows] == ["|".join(FASHION_MNIST_CLASSES[c] for c in torch.nonzero(s).flatten().tolist())
                                        for s in sets]


# --------------------------------------------------------------------------- models that normalize themselves


def test_mean_std_are_refused_for_models_that_normalize_themselves(tmp_path, fashion, checkpoint, capsys):
    """A ttakit checkpoint (and its export) normalizes in its first layer: --mean/--std would
    normalize a second time, so they are refused with one line naming the model."""
    from ttakit.jobs.export import export_checkpoint

    _, pixels = fashion
    run, _ = checkpoint
    write_pngs(tmp_path / "imgs", pixels[:3], nested=False)
    out = tmp_path / "p.csv"
    exported = export_checkpoint(run, "torchscript", tmp_path / "cnn.pt")
    for model in (run, exported):
        err = _cli_error([model, tmp_path / "imgs", "--out", out, "--mean", "0.5", "--std", "0.25"], capsys)
        assert str(model) in err and "normalizes its inputs itself" in err and "--mean/--std" in err
    assert not out.exists()
    # A model without its own normalization takes them (applied inside the predictor).
    onnx = _onnx(tmp_path / "mean.onnx", ["N", 1, "H", "W"])
    args = [onnx, tmp_path / "imgs", "--out", out, "--input-size", "28", "--outputs", "probs", "--workers", "0",
            "--mean", "0.5", "--std", "0.25"]
    assert main(["--no-progress", "predict", *map(str, args)]) == 0
    assert len(read_rows(out)) == 3


# --------------------------------------------------------------------------- --device with one model


def test_one_model_is_moved_to_the_device_before_the_engine_is_built(tmp_path, fashion, checkpoint, monkeypatch):
    """The engine refuses a device the model is not on, so the model must be moved first (as the
    ensemble path does). On a CPU machine the order is recorded: the move, then the engine."""
    import ttakit.jobs._predict_runners as P
    from ttakit.predictors import Predictor

    _, pixels = fashion
    run, _ = checkpoint
    write_pngs(tmp_path / "imgs", pixels[:2], nested=False)
    events = []
    real_to, real_engine = Predictor.to, P.TTAEngine

    def recording_to(self, *args, **kwargs):
        events.append(("to", str(args[0]) if args else str(kwargs.get("device"))))
        return real_to(self, *args, **kwargs)

    def recording_engine(model, *args, **kwargs):
        events.append(("engine", str(kwargs.get("device"))))
        return real_engine(model, *args, **kwargs)

    monkeypatch.setattr(Predictor, "to", recording_to)
    monkeypatch.setattr(P, "TTAEngine", recording_engine)
    predict_images(run, tmp_path / "imgs", out=tmp_path / "p.csv", device="cpu", workers=0, progress=False)
    assert events[:2] == [("to", "cpu"), ("engine", "cpu")]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_one_model_on_cuda_through_the_cli(tmp_path, fashion, checkpoint, capsys):
    _, pixels = fashion
    run, _ = checkpoint
    write_pngs(tmp_path / "imgs", pixels[:12], nested=False)
    base = [run, tmp_path / "imgs", "--policy", "hflip", "--workers", "0", "--batch-size", "5"]
    assert main(["--no-progress", "predict", *map(str, base), "--out", str(tmp_path / "cpu.csv")]) == 0
    code = main(["--no-progress", "predict", *map(str, base), "--out", str(tmp_path / "gpu.csv"), "--device", "cuda"])
    assert code == 0, capsys.readouterr().err
    cpu, gpu = read_rows(tmp_path / "cpu.csv"), read_rows(tmp_path / "gpu.csv")
    assert [r["path"] for r in gpu] == [r["path"] for r in cpu]
    for a, b in zip(cpu, gpu, strict=True):
        assert float(a["prob_1"]) == pytest.approx(float(b["prob_1"]), abs=1e-4)


# --------------------------------------------------------------------------- --resume checks what the rows depend on


def test_resume_refuses_a_run_whose_answers_would_differ(tmp_path, fashion, capsys):
    """The first run records what its rows depend on beside the output; --resume with another
    model, policy or answer-changing option is refused with one line naming what differs, while
    batch size, workers, max batch and device may change."""
    _, pixels = fashion
    run_a, _ = _member_checkpoint(tmp_path / "a", 0)
    run_b, _ = _member_checkpoint(tmp_path / "b", 1)
    copy_a, _ = _member_checkpoint(tmp_path / "copy" / "a", 0)  # the same weights in another folder
    write_pngs(tmp_path / "imgs", pixels[:8], nested=False)
    out = tmp_path / "p.csv"
    first = [run_a, tmp_path / "imgs", "--out", out, "--policy", "hflip", "--top-k", "3", "--workers", "0"]
    assert main(["--no-progress", "predict", *map(str, first)]) == 0
    full = out.read_text(encoding="utf-8")
    assert (tmp_path / "p.csv.settings.json").is_file()
    out.write_text("".join(full.splitlines(keepends=True)[:4]), encoding="utf-8")  # 3 rows left

    def refused(args, *expected):
        err = _cli_error([*args, "--resume"], capsys)
        assert "--resume" in err and "was made with other settings: " in err, err
        for text in expected:
            assert text in err, err
        assert out.read_text(encoding="utf-8") == "".join(full.splitlines(keepends=True)[:4])  # untouched

    base = [tmp_path / "imgs", "--out", out, "--workers", "0"]
    refused([run_b, *base, "--policy", "hflip", "--top-k", "3"], "the model (weights of")
    refused([run_a, *base, "--policy", "d4", "--top-k", "3"], "the policy (hflip then, d4 now)")
    refused([run_a, *base, "--policy", "hflip", "--top-k", "3", "--amp"], "--amp (off then, on now)")
    refused([run_a, *base, "--policy", "hflip", "--top-k", "3", "--resize", "fit"], '--resize ("stretch" then, "fit" now)')
    refused([run_a, run_b, *base, "--policy", "hflip", "--top-k", "3"], "the number of models (1 then, 2 now)")
    # Options that do not change an answer do not block; the same weights named another way match.
    resumed = [copy_a, *base, "--policy", "hflip", "--top-k", "3", "--batch-size", "2", "--max-batch", "16",
               "--device", "cpu", "--resume"]
    assert main(["--no-progress", "predict", *map(str, resumed)]) == 0
    assert "(3 already in" in capsys.readouterr().out
    rows, expected = read_rows(out), list(csv.DictReader(io.StringIO(full)))
    assert [(r["path"], r["class_1"], r["class_2"]) for r in rows] == [(r["path"], r["class_1"], r["class_2"]) for r in expected]
    assert [float(r["prob_1"]) for r in rows] == pytest.approx([float(r["prob_1"]) for r in expected], abs=1e-5)
    # An output without its settings file cannot be checked: refused.
    settings_file = tmp_path / "p.csv.settings.json"
    settings_file.unlink()
    err = _cli_error([run_a, *base, "--policy", "hflip", "--top-k", "3", "--resume"], capsys)
    assert "p.csv.settings.json is missing" in err


def test_resume_of_an_ensemble_checks_the_vote_and_its_seed(tmp_path, fashion, capsys):
    _, pixels = fashion
    run_a, _ = _member_checkpoint(tmp_path / "a", 0)
    run_b, _ = _member_checkpoint(tmp_path / "b", 1)
    write_pngs(tmp_path / "imgs", pixels[:4], nested=False)
    out = tmp_path / "e.jsonl"
    args = [run_a, run_b, tmp_path / "imgs", "--out", out, "--workers", "0", "--vote", "hard", "--tie-break", "random"]
    assert main(["--no-progress", "predict", *map(str, args)]) == 0
    assert "--seed (0 then, 7 now)" in _cli_error([*args, "--seed", "7", "--resume"], capsys)
    err = _cli_error([*args[:-4], "--resume"], capsys)
    assert "--vote (\"hard\" then, \"soft\" now)" in err and "--tie-break" in err
    assert main(["--no-progress", "predict", *map(str, args), "--resume", "--batch-size", "3"]) == 0


def test_retry_errors_tries_the_listed_files_again(tmp_path, fashion, capsys):
    _, pixels = fashion
    run, _ = _member_checkpoint(tmp_path / "run", 0)
    folder = tmp_path / "imgs"
    write_pngs(folder, pixels[:4], nested=False)
    (folder / "late.png").write_bytes(b"")  # still being copied when the first run read it
    (folder / "junk.png").write_text("not an image", encoding="utf-8")
    out = tmp_path / "p.csv"
    args = [run, folder, "--out", out, "--workers", "0"]
    assert main(["--no-progress", "predict", *map(str, args)]) == 0
    errors = errors_path(out)
    assert sorted(Path(r["path"]).name for r in read_rows(errors)) == ["junk.png", "late.png"]
    Image.fromarray(pixels[5, 0].numpy(), mode="L").save(folder / "late.png")  # now it is there
    # --resume alone keeps the listed files as done
    assert main(["--no-progress", "predict", *map(str, args), "--resume"]) == 0
    assert len(read_rows(out)) == 4 and len(read_rows(errors)) == 2
    capsys.readouterr()
    assert main(["--no-progress", "predict", *map(str, args), "--resume", "--retry-errors"]) == 0
    printed = capsys.readouterr().out
    assert "predicted 1 of 6 images" in printed and "(2 from the errors file retried)" in printed
    assert sorted(Path(r["path"]).name for r in read_rows(out)) == [f"img{i:03d}.png" for i in range(4)] + ["late.png"]
    assert [Path(r["path"]).name for r in read_rows(errors)] == ["junk.png"]  # listed once, still failing
    (folder / "junk.png").unlink()
    Image.fromarray(pixels[6, 0].numpy(), mode="L").save(folder / "junk.png")
    assert main(["--no-progress", "predict", *map(str, args), "--resume", "--retry-errors"]) == 0
    assert len(read_rows(out)) == 6 and not errors.exists()  # every file predicted: no errors file
    assert "add --resume" in _cli_error([*args, "--retry-errors"], capsys)
