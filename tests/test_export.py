"""ttakit export: a checkpoint written as .pt2, TorchScript and ONNX gives the same TTA output as
the original, and predictors.load reads the metadata back."""

from __future__ import annotations

import pytest
import torch

from ttakit import predictors
from ttakit.cli import main
from ttakit.engine import TTAEngine
from ttakit.export import export_checkpoint
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
