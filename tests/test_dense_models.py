"""The dense architectures (U-Net, CenterNet), their checkpoints, and their training loops."""

from __future__ import annotations

import json

import pytest
import torch

from ttakit.data.canvases import make_canvases
from ttakit.errors import CheckpointError, InvalidInputError
from ttakit.models import (
    CheckpointMeta,
    create_model,
    list_models,
    load_checkpoint,
    model_task,
    read_checkpoint_meta,
    save_checkpoint,
)
from ttakit.models.centernet import centernet_loss, centernet_targets, decode_heads
from ttakit.training.dense import DenseTrainConfig, train_detection, train_segmentation


def _canvases(n: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    items = (torch.rand(20, 1, 28, 28, generator=g) > 0.4).float() * 0.9
    return make_canvases(items, torch.arange(20) % 10, n=n, size=32, scales=(8, 14), seed=seed)


def test_registry_knows_the_tasks():
    assert model_task("unet-small") == "segmentation" and model_task("centernet-small") == "detection"
    assert "unet-small" in list_models("segmentation") and "centernet-small" in list_models("detection")
    assert "unet-small" not in list_models() and "seed-cnn" in list_models()  # classifiers by default
    assert {"unet-small", "centernet-small", "seed-cnn"} <= set(list_models(None))


@pytest.mark.parametrize("size", [(96, 96), (72, 120), (33, 50)])
def test_unet_keeps_the_input_size(size):
    model = create_model("unet-small", in_channels=1, num_classes=11, image_size=(96, 96)).eval()
    assert 30_000 <= sum(p.numel() for p in model.parameters()) <= 500_000
    with torch.inference_mode():
        assert model(torch.rand(2, 1, *size)).shape == (2, 11, *size)


@pytest.mark.parametrize("size", [(96, 96), (72, 120), (50, 33)])
def test_centernet_padded_output(size):
    model = create_model("centernet-small", in_channels=1, num_classes=10, image_size=(96, 96), max_det=16).eval()
    with torch.inference_mode():
        out = model(torch.rand(3, 1, *size))
        heatmap, wh, offset = model.heads(torch.rand(3, 1, *size))
    assert out.shape == (3, 16, 6)
    assert heatmap.shape == (3, 10, -(-size[0] // 4), -(-size[1] // 4)) and wh.shape[1] == offset.shape[1] == 2
    padding = out[..., 5] < 0
    assert bool((out[padding][:, :5] == 0).all())
    real = out[~padding]
    assert bool((real[:, 4] > 0).all()) and bool((real[:, 5] == real[:, 5].round()).all())
    assert bool((real[:, [0, 2]] <= size[1]).all()) and bool((real[:, [1, 3]] <= size[0]).all())
    assert bool((real[:, :4] >= 0).all())
    scores = out[..., 4]
    assert bool((scores[:, :-1] >= scores[:, 1:]).all())  # by falling score


def test_decode_finds_the_constructed_box():
    """A heatmap peak for class 3 at cell (row 5, col 7), size 6x4 cells and offset (0.25, 0.5):
    the box is centred at ((7.25) * 4, (5.5) * 4) = (29, 22), 24 px wide and 16 px tall."""
    heatmap = torch.zeros(1, 5, 16, 16)
    heatmap[0, 3, 5, 7] = 0.8
    heatmap[0, 3, 5, 6] = 0.5  # a neighbour that is not a peak: suppressed by the 3x3 max-pool
    heatmap[0, 1, 12, 2] = 0.3  # a second, weaker object
    size = torch.zeros(1, 2, 16, 16)
    size[0, :, 5, 7] = torch.tensor([6.0, 4.0])
    offset = torch.zeros(1, 2, 16, 16)
    offset[0, :, 5, 7] = torch.tensor([0.25, 0.5])
    rows = decode_heads(heatmap, size, offset, max_det=4, score_threshold=0.1)
    assert rows.shape == (1, 4, 6)
    assert rows[0, 0].tolist() == pytest.approx([17.0, 14.0, 41.0, 30.0, 0.8, 3.0])
    assert rows[0, 1, 4:].tolist() == pytest.approx([0.3, 1.0])
    assert rows[0, 2:].tolist() == [[0.0, 0.0, 0.0, 0.0, 0.0, -1.0]] * 2


def test_targets_then_decode_give_the_boxes_back():
    boxes = [torch.tensor([[10.0, 20.0, 40.0, 44.0], [50.0, 4.0, 70.0, 30.0]])]
    labels = [torch.tensor([2, 7])]
    t = centernet_targets(boxes, labels, num_classes=10, image_size=(96, 96))
    assert t["heatmap"].shape == (1, 10, 24, 24) and int(t["centres"].sum()) == 2
    assert float(t["heatmap"].max()) == 1.0
    rows = decode_heads(t["heatmap"], t["size"], t["offset"], max_det=2)
    got = sorted(rows[0].tolist(), key=lambda r: r[5])
    assert got[0][:4] == pytest.approx([10.0, 20.0, 40.0, 44.0]) and got[0][5] == 2
    assert got[1][:4] == pytest.approx([50.0, 4.0, 70.0, 30.0]) and got[1][5] == 7


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the traced size is fixed, as documented
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.trace: still what TorchScript users call
def test_centernet_traces_to_torchscript():
    model = create_model("centernet-small", in_channels=1, num_classes=10, image_size=(32, 32), width=8).eval()
    x = torch.rand(2, 1, 32, 32)
    scripted = torch.jit.trace(model, x, check_trace=False)
    with torch.inference_mode():
        assert torch.allclose(scripted(x), model(x))


@pytest.mark.parametrize("arch, task, classes", [("unet-small", "segmentation", 11), ("centernet-small", "detection", 10)])
def test_checkpoint_round_trip_records_the_task(tmp_path, arch, task, classes):
    torch.manual_seed(0)
    model = create_model(arch, in_channels=1, num_classes=classes, image_size=(32, 32), mean=[0.2], std=[0.3])
    model.train()
    with torch.no_grad():  # move BatchNorm statistics off their defaults
        model.heads(torch.rand(4, 1, 32, 32)) if task == "detection" else model(torch.rand(4, 1, 32, 32))
    model.eval()
    names = [f"c{i}" for i in range(classes)]
    meta = CheckpointMeta(arch=arch, task=task, classes=names, in_channels=1, image_size=[32, 32], mean=[0.2], std=[0.3])
    folder = save_checkpoint(tmp_path / arch, model, meta)
    assert json.loads((folder / "checkpoint.json").read_text())["task"] == task
    loaded, loaded_meta = load_checkpoint(folder)
    assert loaded_meta.task == task and read_checkpoint_meta(folder).task == task
    x = torch.rand(2, 1, 32, 32)
    with torch.inference_mode():
        assert torch.equal(loaded(x), model(x))


def test_checkpoint_refuses_a_task_the_architecture_does_not_do(tmp_path):
    model = create_model("unet-small", in_channels=1, num_classes=2, image_size=(16, 16))
    meta = CheckpointMeta(arch="unet-small", task="detection", classes=["a", "b"], in_channels=1, image_size=[16, 16])
    folder = save_checkpoint(tmp_path / "wrong", model, meta)
    with pytest.raises(CheckpointError, match="'task' is 'detection' but architecture 'unet-small' is a segmentation"):
        load_checkpoint(folder)
    data = json.loads((folder / "checkpoint.json").read_text())
    data["task"] = "ranking"
    (folder / "checkpoint.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="field 'task' must be one of classification"):
        read_checkpoint_meta(folder)


def test_old_checkpoints_are_classifiers():
    meta = CheckpointMeta.from_dict(
        {"format": "ttakit-checkpoint", "format_version": 1, "arch": "seed-cnn", "classes": ["a"],
         "in_channels": 1, "image_size": [28, 28]}
    )
    assert meta.task == "classification"


def test_segmentation_training_lowers_the_loss():
    train = _canvases(16)
    result = train_segmentation(train, DenseTrainConfig(epochs=3, batch_size=8, lr=1e-2), val=train, progress=False)
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0]
    assert result.meta.task == "segmentation" and result.meta.classes[0] == "background"
    assert result.meta.train_augmentations == [{"name": "flip", "p": 0.5}]
    assert 0.0 <= result.meta.metrics["val_miou"] <= 1.0 and not result.model.training


def test_detection_training_lowers_the_loss():
    train = _canvases(16)
    config = DenseTrainConfig(epochs=3, batch_size=8, lr=1e-2)
    result = train_detection(train, config, val=train, arch_kwargs={"width": 16}, progress=False)
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0]
    assert result.meta.task == "detection" and len(result.meta.classes) == 10
    assert {"val_map", "val_map50"} <= set(result.meta.metrics)
    again = train_detection(train, config, arch_kwargs={"width": 16}, progress=False)
    assert [h["loss"] for h in again.history] == pytest.approx(losses)  # seeded


def test_one_step_of_the_detection_loss_lowers_it():
    torch.manual_seed(0)
    model = create_model("centernet-small", in_channels=1, num_classes=10, image_size=(32, 32), width=16)
    train = _canvases(8)
    targets = centernet_targets(train.boxes, train.labels, 10, (32, 32))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        loss, parts = centernet_loss(model.heads(train.images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] and set(parts) == {"heatmap", "size", "offset"}


def test_training_refuses_the_wrong_architecture():
    with pytest.raises(InvalidInputError, match="arch must be a segmentation architecture"):
        train_segmentation(_canvases(2), arch="centernet-small", progress=False)
    with pytest.raises(InvalidInputError, match="epochs must be a positive integer"):
        DenseTrainConfig(epochs=0)
