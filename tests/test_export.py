"""ttakit export: a checkpoint written as .pt2, TorchScript and ONNX gives the same TTA output as
the original, and predictors.load reads the metadata back."""

from __future__ import annotations

import pytest
import torch

from ttakit import predictors
from ttakit.cli import main
from ttakit.engine import TTAEngine
from ttakit.jobs.export import export_checkpoint
from ttakit.models import CheckpointMeta, create_model, save_checkpoint

CLASSES = ["t-shirt", "trouser", "pullover", "dress"]


def _checkpoint(folder):
    torch.manual_seed(0)
    model = create_model("seed-cnn", in_channels=1, num_classes=4, image_size=(12, 12), mean=[0.29], std=[0.35])
    # Non-trivial batch-norm statistics, so a graph that dropped them would differ.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    model.eval()
    meta = CheckpointMeta(
        arch="seed-cnn", classes=CLASSES, in_channels=1, image_size=[12, 12], mean=[0.29], std=[0.35],
        train_augmentations=[{"name": "flip"}, {"name": "shift", "max_shift": 1}],
    )
    return save_checkpoint(folder / "run", model, meta), model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    run, model = _checkpoint(folder)
    files = {
        fmt: export_checkpoint(run, fmt, folder / f"model.{suffix}")
        for fmt, suffix in (("pt2", "pt2"), ("torchscript", "pt"), ("onnx", "onnx"))
    }
    return run, model, files


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["pt2", "torchscript", "onnx"])
def test_exported_model_gives_the_same_tta_output(exported, fmt):
    run, model, files = exported
    x = torch.rand(7, 1, 12, 12, generator=torch.Generator().manual_seed(3))
    reference = TTAEngine(model, "hflip-shift").run(x, return_views=True)
    predictor = predictors.load(files[fmt])
    out = TTAEngine(predictor, "hflip-shift").run(x, return_views=True)
    assert torch.allclose(out.merged, reference.merged, atol=1e-4)
    assert torch.allclose(out.views, reference.views, atol=1e-4)  # every view, not only the mean
    assert predictor.kind == fmt
    assert predictor.classes == CLASSES
    assert (predictor.channels, predictor.input_size, predictor.layout) == (1, (12, 12), "nchw")
    assert predictor.outputs == "logits"
    # Normalization is the graph's first layer: recorded, not applied a second time.
    assert predictor.normalization == "model" and predictor.mean == pytest.approx([0.29])
    assert predictor.train_augmentations[0] == {"name": "flip"}
    assert predictor(x[:1]).shape == (1, 4) and predictor(x).shape == (7, 4)  # dynamic batch


@pytest.mark.slow
def test_cli_export_writes_a_file_predict_can_load(tmp_path, capsys):
    run, _ = _checkpoint(tmp_path)
    out = tmp_path / "cnn.pt"
    assert main(["--no-progress", "export", str(run), "--format", "torchscript", "--out", str(out)]) == 0
    assert "exported" in capsys.readouterr().out
    assert predictors.load(out).classes == CLASSES


def test_cli_export_bad_input_is_one_line_exit_2(tmp_path, capsys):
    run, _ = _checkpoint(tmp_path)
    code = main(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "missing" / "m.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(run), "--format", "tflite", "--out", str(tmp_path / "m.tflite")])
    assert exit_info.value.code == 2
    code = main(["export", str(tmp_path / "nothing"), "--format", "pt2", "--out", str(tmp_path / "m.pt2")])
    assert code == 2


# --------------------------------------------------------------------------- ONNX models with a fixed batch size


def _onnx_with_batch(model, path, batch):
    """``model`` exported by torch's TorchScript-based ONNX exporter with a fixed batch
    (``batch``) or a dynamic one (None)."""
    import contextlib
    import io
    import warnings

    x = torch.rand(batch or 2, 1, 12, 12)
    dynamic = {"images": {0: "N"}} if batch is None else None
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), input_names=["images"], output_names=["logits"],
                          dynamic_axes=dynamic, dynamo=False)
    return path


@pytest.mark.parametrize("batch", [1, 4, None], ids=["fixed1", "fixed4", "dynamic"])
def test_onnx_with_a_fixed_batch_predicts_any_batch_like_the_torch_model(tmp_path, batch):
    """A graph exported for batches of 4 is fed chunks of 4, the last one padded and its padded
    rows dropped: every batch size (and every stacked pass of the engine) gives the torch model's
    outputs."""
    _, model = _checkpoint(tmp_path)
    path = _onnx_with_batch(model, tmp_path / "model.onnx", batch)
    predictor = predictors.load(path, outputs="logits")
    assert predictor.fixed_batch == batch
    for n in (1, 3, 4, 5, 9):
        x = torch.rand(n, 1, 12, 12, generator=torch.Generator().manual_seed(n))
        with torch.inference_mode():
            expected = model(x)
        got = predictor(x)
        assert got.shape == (n, 4)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        # The engine stacks the views of a batch into passes of any size: the same answer.
        reference = TTAEngine(model, "hflip-shift").run(x, return_views=True)
        out = TTAEngine(predictor, "hflip-shift").run(x, return_views=True)
        torch.testing.assert_close(out.views, reference.views, atol=1e-5, rtol=0)
        torch.testing.assert_close(out.merged, reference.merged, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- the export is checked against the original


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_cli_export_prints_the_largest_difference_from_the_original(tmp_path, capsys, fmt):
    run, _ = _checkpoint(tmp_path)
    out = tmp_path / f"cnn.{fmt}"
    assert main(["--no-progress", "export", str(run), "--format", fmt, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "checked against the checkpoint on 5 random 1x12x12 inputs: largest absolute difference" in printed
    assert "(tolerance 0.0001)" in printed
    assert predictors.load(out).classes == CLASSES
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_cli_export_fails_when_the_exported_model_differs(tmp_path, capsys, monkeypatch):
    """An exporter that changes the numbers (here: a bias nudged by 0.01 before tracing) is caught:
    one line naming the difference and the tolerance, exit code 2, and nothing written."""
    import copy

    import ttakit.jobs.export as E

    run, _ = _checkpoint(tmp_path)
    real = E.export_model

    def drifting_export(model, *args, **kwargs):
        model = copy.deepcopy(model)
        with torch.no_grad():
            [p for p in model.parameters() if p.ndim == 1][-1].add_(0.01)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(E, "export_model", drifting_export)
    out = tmp_path / "cnn.pt"
    code = main(["--no-progress", "export", str(run), "--format", "torchscript", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "largest absolute difference 1.0e-02" in err and "--tolerance 0.0001" in err and "nothing was written" in err
    assert not out.exists() and not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    # A looser --tolerance accepts it.
    args = ["--no-progress", "export", str(run), "--format", "torchscript", "--out", str(out), "--tolerance", "0.05"]
    assert main(args) == 0 and out.exists()


def test_cli_export_opset_and_tolerance_options(tmp_path, capsys):
    import onnx

    run, _ = _checkpoint(tmp_path)
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--opset" in text and "(default 18)" in text and "--tolerance" in text
    out = tmp_path / "m.onnx"
    assert main(["--no-progress", "export", str(run), "--format", "onnx", "--out", str(out), "--opset", "20"]) == 0
    assert [o.version for o in onnx.load(str(out)).opset_import if o.domain in ("", "ai.onnx")] == [20]
    capsys.readouterr()
    code = main(["export", str(run), "--format", "torchscript", "--out", str(tmp_path / "m.pt"), "--opset", "20"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--opset applies to --format onnx only" in err and len(err.splitlines()) == 1
    for bad in ("-1", "nan"):
        with pytest.raises(SystemExit) as exit_info:
            main(["export", str(run), "--format", "pt2", "--out", str(tmp_path / "m.pt2"), "--tolerance", bad])
        assert exit_info.value.code == 2
        assert "--tolerance" in capsys.readouterr().err
