"""``evaluate`` and ``search`` on any model ``ttakit.predictors`` reads (ONNX, ``file.py:function``)
with ``--data``; the resize mode a checkpoint records; audit at the size a checkpoint trained at.

Each through the command line: ``ttakit.cli.main([...])`` on files the test writes; the exit code,
the one line and the files written are checked."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ttakit.cli import main

pytestmark = pytest.mark.usefixtures("single_thread")

MYNET = '''
import torch
from torch import nn


def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(8 * 8, 2))
'''


def halves(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two classes: the bright half of the image is the left (0) or the right (1)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = rng.uniform(0.0, 0.2, size=(n, size, size)).astype(np.float32)
    for i, label in enumerate(y):
        x[i, :, : size // 2] += 0.7 * (label == 0)
        x[i, :, size // 2:] += 0.7 * (label == 1)
    return x, y


def write_npz(path: Path, n: int = 64, size: int = 8, test: int = 0, seed: int = 0) -> Path:
    x, y = halves(n, size, seed)
    arrays = {"x": x, "y": y, "classes": np.array(["left", "right"])}
    if test:
        arrays["x_test"], arrays["y_test"] = halves(test, size, seed + 1)
    np.savez(path, **arrays)
    return path


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A tiny checkpoint trained on 8x8 halves, its ONNX export, and a ``file.py:build`` model."""
    pytest.importorskip("onnxruntime")
    root = tmp_path_factory.mktemp("any-model")
    data = write_npz(root / "train.npz", n=64)
    run = root / "run"
    assert main(["--no-progress", "train", "--data", str(data), "--epochs", "1", "--out", str(run)]) == 0
    onnx = root / "cnn.onnx"
    assert main(["--no-progress", "export", str(run), "--format", "onnx", "--out", str(onnx)]) == 0
    (root / "mynet.py").write_text(MYNET)
    return {"run": run, "onnx": onnx, "py": Path(f"{root / 'mynet.py'}:build")}


PY_OPTIONS = ["--input-size", "8", "--channels", "1", "--outputs", "logits"]


def options(kind: str) -> list[str]:
    return PY_OPTIONS if kind == "py" else []


@pytest.mark.parametrize("kind", ["onnx", "py"])
def test_evaluate_any_model_on_the_datas_own_test_split(tmp_path, models, capsys, kind):
    data = write_npz(tmp_path / "d.npz", n=30, test=20)
    out = tmp_path / "eval"
    code = main(["--no-progress", "evaluate", str(models[kind]), "--data", str(data), "--out", str(out), "--no-plots",
                 *options(kind)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"20 images of the test split of {data} (the model records no split)" in captured.out
    results = json.loads((out / "results.json").read_text())
    assert results["n_images"] == 20
    # the default policies without train-aug (the model records no augmentations)
    assert [row["policy"] for row in results["summary"]] == ["none", "hflip", "d4"]


def test_evaluate_any_model_on_every_row_when_the_data_has_no_test_split(tmp_path, models, capsys):
    data = write_npz(tmp_path / "d.npz", n=26)
    out = tmp_path / "eval"
    code = main(["--no-progress", "evaluate", str(models["onnx"]), "--data", str(data), "--out", str(out),
                 "--no-plots", "--policy", "none,hflip"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"all 26 images of {data} (the model records no split; {data} has no test split of its own)" in captured.out
    assert json.loads((out / "results.json").read_text())["n_images"] == 26


@pytest.mark.parametrize("kind", ["onnx", "py"])
def test_search_any_model_on_val_data_then_evaluate_its_policy(tmp_path, models, capsys, kind):
    data = write_npz(tmp_path / "d.npz", n=30, test=20)
    val = write_npz(tmp_path / "val.npz", n=40, seed=5)
    policy = tmp_path / "policy.json"
    code = main(["--no-progress", "search", str(models[kind]), "--val-data", str(val), "--budget", "2", "--out",
                 str(policy), "--report-dir", str(tmp_path / "search"), "--no-matrix-scaling", *options(kind)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"evaluate it with: ttakit evaluate {models[kind]} --policy none,{policy} --data" in captured.out
    saved = json.loads(policy.read_text())
    assert saved["meta"]["validation_rows"]["n"] == 40 and saved["meta"]["weights_sha256"]
    def evaluate(model_kind: str) -> list[str]:
        return ["--no-progress", "evaluate", str(models[model_kind]), "--data", str(data), "--out",
                str(tmp_path / "eval"), "--no-plots", "--policy", f"none,{policy}", *options(model_kind)]

    # the policy records the model file's digest: another model is refused, the same file is its own
    assert main(evaluate("py" if kind == "onnx" else "onnx")) == 2
    assert "--allow-other-model" in one_error_line(capsys)
    code = main([*evaluate(kind), "--conformal", "0.2", "--val-data", str(val)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert [row["policy"] for row in results["summary"]] == ["none", "searched"]
    assert results["conformal"]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["evaluate", "{onnx}"], "give the labelled images to evaluate with --data"),
        (["evaluate", "{onnx}", "--data", "{data}", "--policy", "train-aug"], "policy 'train-aug' needs the training"),
        (["evaluate", "{onnx}", "--data", "{data}", "--repeats", "2"], "evaluate it with --repeats 1"),
        (["evaluate", "{onnx}", "--data", "{data}", "--conformal", "0.1"], "pass them with --val-data FILE"),
        (["evaluate", "{onnx}", "--data", "{data}", "--split", "val"], "records no split"),
        (["search", "{onnx}", "--data", "{data}"], "pass them with --val-data FILE"),
        (["search", "{onnx}"], "--val-data FILE (every row is validation), or --data"),
        (["evaluate", "{run}", "--input-size", "8"], "--input-size: for models that do not record"),
        (["search", "{run}", "--val-data", "{data}"], "--val-data: for models that record no split"),
    ],
)
def test_what_needs_a_recorded_split_is_refused_in_one_line(tmp_path, models, capsys, args, expected):
    data = write_npz(tmp_path / "d.npz", n=30, test=20)
    names = {"onnx": models["onnx"], "run": models["run"], "data": data}
    filled = [a.format(**names) for a in args]
    assert main(["--no-progress", *filled, "--out", str(tmp_path / "out" / ("p.json" if args[0] == "search" else ""))]) == 2
    line = one_error_line(capsys)
    assert expected in line, line
    assert not (tmp_path / "out").exists()


def test_predict_resizes_as_the_checkpoint_records_it_was_trained(tmp_path, capsys):
    """ttakit train on an image folder records ``resize: stretch``; predict says it resizes so."""
    folder = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (folder / label).mkdir(parents=True)
        for i in range(10):
            Image.fromarray((rng.random((12, 16)) * 255).astype(np.uint8), mode="L").save(folder / label / f"{i}.png")
    run = tmp_path / "run"
    assert main(["--no-progress", "train", "--data", str(folder), "--epochs", "1", "--out", str(run)]) == 0
    assert json.loads((run / "checkpoint.json").read_text())["extra"]["resize"] == "stretch"
    capsys.readouterr()
    assert main(["--no-progress", "predict", str(run), str(folder / "a"), "--out", str(tmp_path / "p.csv"),
                 "--workers", "0"]) == 0
    assert "are resized with --resize stretch (as the model was trained)" in capsys.readouterr().out


def test_audit_resizes_to_the_size_the_checkpoint_trained_at(tmp_path, capsys):
    data = write_npz(tmp_path / "d.npz", n=60, size=12)
    run = tmp_path / "run"
    assert main(["--no-progress", "train", "--data", str(data), "--epochs", "1", "--image-size", "8",
                 "--out", str(run)]) == 0
    capsys.readouterr()
    code = main(["--no-progress", "audit", str(run), "--data", str(data), "--split", "val", "--out",
                 str(tmp_path / "audit")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert (tmp_path / "audit" / "issues.csv").exists()
