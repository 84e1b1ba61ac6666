"""What a new user hit in the first hour ("The first hour of a user"), each through the command
line: ``ttakit.cli.main([...])`` on files the test writes; the exit code, the one line and the
files written are checked."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ttakit.cli import main
from ttakit.data import FASHION_MNIST_CLASSES
from ttakit.models import CheckpointMeta, create_model, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def run(tmp_path) -> Path:
    """A 28x28 grayscale seed CNN checkpoint (untrained: these tests check plumbing)."""
    torch.manual_seed(0)
    model = create_model("seed-cnn", in_channels=1, num_classes=10, image_size=(28, 28), mean=[0.286], std=[0.353])
    meta = CheckpointMeta(arch="seed-cnn", classes=list(FASHION_MNIST_CLASSES), in_channels=1, image_size=[28, 28],
                          mean=[0.286], std=[0.353])
    return save_checkpoint(tmp_path / "run", model.eval(), meta)


@pytest.fixture
def images(tmp_path) -> Path:
    """Four grayscale PNGs of 20x40 (not the model's size, not square)."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray((rng.random((20, 40)) * 255).astype(np.uint8), mode="L").save(folder / f"i{i}.png")
    return folder


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


# --------------------------------------------------------------------------- 1. inputs that contradict the model


@pytest.mark.parametrize(("flag", "value", "expected"), [
    ("--input-size", "64", "--input-size.* 64x64 contradicts checkpoint .*which takes 28x28 images"),
    ("--channels", "3", "--channels.* 3 contradicts checkpoint .*which takes 1-channel images"),
])
def test_options_that_contradict_the_checkpoint_are_one_line(tmp_path, run, images, capsys, flag, value, expected):
    out = tmp_path / "p.csv"
    code = main(["--no-progress", "predict", str(run), str(images), "--out", str(out), "--workers", "0", flag, value])
    line = one_error_line(capsys)
    assert code == 2, line
    assert line.startswith("ttakit predict: error: ") and "internal error" not in line
    assert __import__("re").search(expected, line), line
    assert not out.exists()


def test_batches_the_predictor_cannot_take_are_named_with_the_users_shape(run):
    """The Python side of the same: the engine checks the user's batch against the predictor
    (not the stacked views), and a (2, 28, 28) batch is told to add axis 1."""
    from ttakit.aliases import get_policy
    from ttakit.engine import TTAEngine
    from ttakit.errors import InvalidInputError
    from ttakit.predictors import load

    predictor = load(run)
    engine = TTAEngine(predictor, get_policy("d4"))
    with pytest.raises(InvalidInputError, match=r"takes 28x28 images .*got images of shape \(2, 1, 64, 64\)"):
        engine(torch.rand(2, 1, 64, 64))
    with pytest.raises(InvalidInputError, match=r"takes 28x28 images, got a batch of shape \(2, 1, 64, 64\)"):
        predictor(torch.rand(2, 1, 64, 64))  # not a raw "mat1 and mat2" error
    with pytest.raises(InvalidInputError, match=r"1-channel images .*got images of shape \(2, 3, 28, 28\)"):
        engine(torch.rand(2, 3, 28, 28))  # the user's shape, not the 8 views stacked
    with pytest.raises(InvalidInputError, match=r"a batch of 2 grayscale images .*unsqueeze\(1\)"):
        engine(torch.rand(2, 28, 28))
    with pytest.raises(InvalidInputError, match=r"values in \[0, 255\].*divide 0-255 images by 255"):
        engine(torch.cat([torch.zeros(1, 1, 28, 28), torch.full((1, 1, 28, 28), 255.0)]))  # 0-255 floats
    from ttakit.functional import check_image

    with pytest.raises(InvalidInputError, match=r"unsqueeze\(1\)"):
        check_image(torch.rand(2, 28, 28))


# --------------------------------------------------------------------------- 2. export names and logs


def test_export_refuses_a_suffix_that_contradicts_the_format(tmp_path, run, capsys):
    code = main(["--no-progress", "export", str(run), "--format", "onnx", "--out", str(tmp_path / "x.pt2")])
    line = one_error_line(capsys)
    assert code == 2
    assert "--format onnx writes ONNX, but '.pt2' is the suffix of pt2 files; name it" in line and "x.onnx" in line
    assert not (tmp_path / "x.pt2").exists()


def test_export_to_a_folder_suggests_the_formats_suffix(tmp_path, run, capsys):
    code = main(["--no-progress", "export", str(run), "--format", "pt2", "--out", str(tmp_path)])
    line = one_error_line(capsys)
    assert code == 2 and "is a folder; give a file path like" in line and line.endswith("model.pt2'"), line


def test_export_infers_the_format_and_says_where_the_metadata_is(tmp_path, run, images, capsys):
    out = tmp_path / "cnn.onnx"
    assert main(["--no-progress", "export", str(run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "as onnx" in printed and "metadata inside the ONNX file (metadata_props entry 'ttakit.json')" in printed
    assert "metadata in ttakit.json" not in printed and not (tmp_path / "ttakit.json").exists()
    import onnx

    assert any(p.key == "ttakit.json" for p in onnx.load(str(out)).metadata_props)


def test_predicting_a_misnamed_file_prints_one_line_and_no_torch_log(tmp_path, run, images):
    """An ONNX file named .pt2: torch.export's loader logs a 13-line traceback unless silenced."""
    from ttakit.jobs.export import export_checked

    export_checked(run, "onnx", tmp_path / "m.onnx")
    (tmp_path / "m.pt2").write_bytes((tmp_path / "m.onnx").read_bytes())
    done = subprocess.run(
        [sys.executable, "-c", "import sys; from ttakit.cli import main; sys.exit(main())", "--no-progress", "predict",
         str(tmp_path / "m.pt2"), str(images),
         "--out", str(tmp_path / "p.csv"), "--workers", "0"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "is not a readable torch.export archive" in lines[0], done.stderr


# --------------------------------------------------------------------------- 6. --out, --overwrite, interrupt


def test_predict_refuses_to_overwrite_unless_asked(tmp_path, run, images, capsys):
    out = tmp_path / "p.csv"
    args = ["--no-progress", "predict", str(run), str(images), "--out", str(out), "--workers", "0"]
    assert main(args) == 0
    first = out.read_text()
    capsys.readouterr()
    assert main(args) == 2
    line = one_error_line(capsys)
    assert "already exists" in line and "--resume" in line and "--overwrite" in line
    assert out.read_text() == first
    assert main([*args, "--overwrite"]) == 0 and len(rows(out)) == 4
    capsys.readouterr()
    assert main([*args, "--overwrite", "--resume"]) == 2
    assert "give one" in one_error_line(capsys)


def test_interrupt_says_the_exact_command_to_resume(tmp_path, run, images, capsys, monkeypatch):
    from ttakit.jobs import predict

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(predict, "predict_images", interrupted)
    out = tmp_path / "p.csv"
    args = ["--no-progress", "predict", str(run), str(images), "--out", str(out), "--overwrite"]
    assert main(args) == 130
    line = one_error_line(capsys)
    expected = " ".join(["ttakit", "--no-progress", "predict", str(run), str(images), "--out", str(out), "--resume"])
    assert "interrupted" in line and line.endswith("continue with: " + expected), line


# --------------------------------------------------------------------------- 5. your own model


MYNET = '''
import torch
from torch import nn


def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))


def build_function():
    model = build()
    return lambda x: model(x)
'''


@pytest.mark.parametrize("spec", ["mynet.py:build", "mynet:build", "mynet.py:build_function:hflip"])
def test_own_model_from_a_python_file_on_the_command_line(tmp_path, images, capsys, monkeypatch, spec):
    """``file.py:function`` (by path) and ``module:function`` (from the current folder, no
    PYTHONPATH) that build an nn.Module or return a callable over torch tensors."""
    (tmp_path / "mynet.py").write_text(MYNET)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    out = tmp_path / "p.csv"
    code = main(["--no-progress", "predict", spec, str(images), "--out", str(out), "--workers", "0",
                 "--input-size", "28", "--channels", "1", "--outputs", "logits"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert len(rows(out)) == 4
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10))
    from ttakit.data.decode import decode_image

    first = rows(out)[0]
    image = torch.as_tensor(decode_image(first["path"], 1, (28, 28))).permute(2, 0, 1).float().div(255).unsqueeze(0)
    from ttakit.engine import TTAEngine
    from ttakit.predictors import load

    predictor = load(model, outputs="logits", input_size=28, channels=1)
    expected = TTAEngine(predictor, "hflip" if spec.endswith("hflip") else "none")(image)
    assert float(first["prob_1"]) == pytest.approx(float(expected.max()), abs=1e-4)


def test_own_model_file_that_is_missing_is_one_line(tmp_path, images, capsys):
    code = main(["--no-progress", "predict", str(tmp_path / "nope.py") + ":build", str(images), "--out",
                 str(tmp_path / "p.csv"), "--outputs", "logits"])
    assert code == 2 and "does not exist (expected FILE.py:FUNCTION)" in one_error_line(capsys)


# --------------------------------------------------------------------------- 4. the ensemble table


@pytest.fixture
def halves_runs(tmp_path) -> tuple[Path, Path, Path]:
    """Two seed CNNs trained one epoch on the 8x8 'bright half' data (flips swap its classes)."""
    from tests._fixtures import write_halves_npz

    data = write_halves_npz(tmp_path / "halves.npz", n=200)
    for seed in (0, 1):
        assert main(["--no-progress", "train", "--data", str(data), "--epochs", "1", "--seed", str(seed),
                     "--out", str(tmp_path / f"m{seed}")]) == 0
    return data, tmp_path / "m0", tmp_path / "m1"


def test_ensemble_compares_with_the_best_member_under_any_policy(tmp_path, halves_runs, capsys):
    _, m0, m1 = halves_runs
    capsys.readouterr()
    out = tmp_path / "ens"
    assert main(["--no-progress", "ensemble", f"{m0}:vflip", f"{m1}:hflip", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = json.loads((out / "results.json").read_text())["rows"]
    members, ensembles = rows[:4], rows[4:]
    best = max(members, key=lambda r: r["accuracy"])
    for row in ensembles:
        assert row["lift_accuracy"] == pytest.approx(row["accuracy"] - best["accuracy"])
        assert row["vs"] == f"{best['model']} {best['policy']}"
    assert ensembles[-1]["policy"] == "vflip+hflip"  # the members' order, not reversed or sorted
    assert "best member (any policy)" in printed and "vflip+hflip" in printed


# --------------------------------------------------------------------------- 3. member calibration is cached


def test_predict_with_two_models_caches_member_calibration(tmp_path, halves_runs, capsys, monkeypatch):
    from ttakit.jobs import _ensemble_predict as ensemble

    _, m0, m1 = halves_runs
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i in range(6):
        pixels = np.zeros((8, 8), np.uint8)
        pixels[:, :4] = 200 if i % 2 else 0
        pixels[:, 4:] = 0 if i % 2 else 200
        Image.fromarray(pixels, mode="L").save(folder / f"p{i}.png")
    out = tmp_path / "p.csv"
    args = ["predict", f"{m0}:hflip", str(m1), str(folder), "--out", str(out), "--workers", "0"]
    capsys.readouterr()
    assert main(args) == 0  # progress on: the calibration says so
    first = capsys.readouterr()
    assert "calibrating" in first.out + first.err and "loading and calibrating" in first.out
    caches = [m / "calibration_cache.json" for m in (m0, m1)]
    assert all(len(json.loads(c.read_text())["entries"]) == 1 for c in caches)
    before = out.read_text()
    calls = []
    original = ensemble._fit_temperature
    monkeypatch.setattr(ensemble, "_fit_temperature", lambda *a, **k: calls.append(1) or original(*a, **k))
    assert main(["--no-progress", *args, "--overwrite"]) == 0
    second = capsys.readouterr().out
    assert calls == [] and "2 of 2 temperatures from the calibration cache" in second
    assert out.read_text() == before  # the same temperatures, the same rows
    # another policy for a member: its entry is fitted again and added
    assert main(["--no-progress", "predict", f"{m0}:vflip", str(m1), str(folder), "--out", str(out), "--workers", "0",
                 "--overwrite"]) == 0
    assert "1 of 2 temperatures from the calibration cache" in capsys.readouterr().out
    assert len(json.loads(caches[0].read_text())["entries"]) == 2


@pytest.mark.parametrize("mode", ["fit", "crop", "stretch", None])
def test_predict_resize_modes(tmp_path, run, images, capsys, mode):
    """--resize fit (letterbox), crop (centre) or stretch; the default is said in the output."""
    from ttakit.data.decode import resize_image
    from ttakit.predictors import load

    out = tmp_path / "p.csv"
    extra = ["--resize", mode] if mode else []
    assert main(["--no-progress", "predict", str(run), str(images), "--out", str(out), "--workers", "0",
                 "--top-k", "10", *extra]) == 0
    printed = capsys.readouterr().out
    used = mode or "stretch"
    assert f"are resized with --resize {used} (" in printed
    if mode is None:
        assert "the default: the model does not record" in printed
    row = rows(out)[0]
    with Image.open(row["path"]) as image:
        resized = resize_image(image.convert("L"), (28, 28), used)
    pixels = torch.as_tensor(np.array(resized)).float().div(255).view(1, 1, 28, 28)
    if used == "fit":  # 20x40 into 28x28: 14 rows of image, 7 black rows above and below
        assert pixels[0, 0, :7].max() == 0 and pixels[0, 0, -7:].max() == 0 and pixels[0, 0, 7:21].max() > 0
    expected = load(run)(pixels).softmax(1)[0]
    assert float(row["prob_1"]) == pytest.approx(float(expected.max()), abs=1e-5)
