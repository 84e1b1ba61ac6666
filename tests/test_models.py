"""Architectures from the registry, Normalize, and checkpoint save/load/refusal."""

from __future__ import annotations

import json

import pytest
import torch

from ttakit.errors import CheckpointError, InvalidInputError, UnknownNameError
from ttakit.models import (
    CheckpointMeta,
    Normalize,
    check_compatible,
    create_model,
    list_models,
    load_checkpoint,
    register_model,
    save_checkpoint,
)


def _meta(**overrides) -> CheckpointMeta:
    fields = dict(
        arch="seed-cnn",
        classes=["a", "b", "c"],
        in_channels=1,
        image_size=[12, 12],
        mean=[0.3],
        std=[0.2],
        train_augmentations=[{"name": "flip", "p": 0.5}, {"name": "shift", "max_pixels": 2}],
        dataset="toy",
        seed=3,
        metrics={"train_acc": 0.5},
    )
    fields.update(overrides)
    return CheckpointMeta(**fields)


def _model_for(meta: CheckpointMeta) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model(
        meta.arch,
        in_channels=meta.in_channels,
        num_classes=meta.num_classes,
        image_size=tuple(meta.image_size),
        mean=meta.mean,
        std=meta.std,
    )
    # move BatchNorm running stats off their defaults so the round trip checks buffers too
    model.train()
    with torch.no_grad():
        model(torch.rand(8, meta.in_channels, *meta.image_size))
    return model.eval()


@pytest.fixture
def saved(tmp_path):
    meta = _meta()
    model = _model_for(meta)
    directory = save_checkpoint(tmp_path / "run", model, meta)
    return directory, model, meta


# ----------------------------------------------------------------------------- registry


def test_registry_lists_builtin_models():
    assert {"seed-cnn", "resnet20"} <= set(list_models())


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("channels,height,width,classes", [(1, 28, 28, 10), (3, 32, 32, 7)])
def test_every_model_gives_logits(name, channels, height, width, classes):
    model = create_model(
        name, in_channels=channels, num_classes=classes, image_size=(height, width)
    ).eval()
    first = next(
        m for m in model.modules() if not isinstance(m, torch.nn.Sequential) and m is not model
    )
    assert isinstance(first, Normalize)  # raw [0, 1] images in, normalization travels with weights
    with torch.inference_mode():
        out = model(torch.rand(3, channels, height, width))
    assert out.shape == (3, classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", list_models())
def test_every_model_handles_small_odd_images(name):
    model = create_model(name, in_channels=2, num_classes=2, image_size=(5, 7)).eval()
    with torch.inference_mode():
        assert model(torch.rand(2, 2, 5, 7)).shape == (2, 2)


def test_unknown_architecture_lists_choices():
    with pytest.raises(UnknownNameError, match="unknown architecture 'vgg'.*resnet20, seed-cnn"):
        create_model("vgg", in_channels=1, num_classes=2)


def test_bad_create_arguments():
    with pytest.raises(InvalidInputError, match="num_classes"):
        create_model("seed-cnn", in_channels=1, num_classes=0)
    with pytest.raises(InvalidInputError, match="at least 4x4"):
        create_model("seed-cnn", in_channels=1, num_classes=2, image_size=(3, 8))
    with pytest.raises(InvalidInputError, match="image_size"):
        create_model("seed-cnn", in_channels=1, num_classes=2, image_size=(8,))


def test_register_model_refuses_duplicates():
    with pytest.raises(InvalidInputError, match="already registered"):
        register_model("seed-cnn")(lambda **kw: None)


# ----------------------------------------------------------------------------- Normalize


def test_normalize_uses_stats():
    norm = Normalize([0.5, 0.1], [0.25, 0.5])
    x = torch.rand(2, 2, 3, 3)
    expected = torch.stack([(x[:, 0] - 0.5) / 0.25, (x[:, 1] - 0.1) / 0.5], dim=1)
    torch.testing.assert_close(norm(x), expected)
    assert "mean" in dict(norm.named_buffers())


def test_normalize_identity_without_stats():
    x = torch.rand(2, 3, 4, 4)
    assert torch.equal(Normalize(channels=3)(x), x)


def test_normalize_refuses_bad_stats():
    with pytest.raises(InvalidInputError, match="together"):
        Normalize([0.5], None)
    with pytest.raises(InvalidInputError, match="one per channel"):
        Normalize([0.5], [0.2], channels=3)
    with pytest.raises(InvalidInputError, match="positive"):
        Normalize([0.5], [0.0])


@pytest.mark.parametrize("name", list_models())
def test_model_applies_its_normalization(name):
    torch.manual_seed(0)
    plain = create_model(name, in_channels=1, num_classes=3, image_size=(8, 8)).eval()
    normed = create_model(
        name, in_channels=1, num_classes=3, image_size=(8, 8), mean=[0.5], std=[0.25]
    )
    prefix = next(n for n, m in normed.named_modules() if isinstance(m, Normalize))
    stats = {f"{prefix}.mean", f"{prefix}.std"}
    state = plain.state_dict()
    state.update({k: v for k, v in normed.state_dict().items() if k in stats})
    normed.load_state_dict(state)
    normed.eval()
    x = torch.rand(2, 1, 8, 8)
    with torch.inference_mode():
        torch.testing.assert_close(normed(x), plain((x - 0.5) / 0.25))


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("name", list_models())
def test_checkpoint_round_trip_identical_outputs(tmp_path, name):
    meta = _meta(arch=name, in_channels=3, image_size=[10, 12], mean=[0.1, 0.2, 0.3], std=[1, 2, 3])
    model = _model_for(meta)
    directory = save_checkpoint(tmp_path / "ckpt", model, meta)
    assert sorted(p.name for p in directory.iterdir()) == ["checkpoint.json", "model.safetensors"]
    loaded, loaded_meta = load_checkpoint(directory)
    assert not loaded.training
    assert loaded_meta == meta
    x = torch.rand(4, 3, 10, 12)
    with torch.inference_mode():
        assert torch.equal(loaded(x), model(x))


def test_load_accepts_either_file(saved):
    directory, model, meta = saved
    for path in (directory / "checkpoint.json", directory / "model.safetensors", str(directory)):
        _, loaded_meta = load_checkpoint(path)
        assert loaded_meta.train_augmentations == meta.train_augmentations
        assert loaded_meta.source == str(directory)


def test_checkpoint_json_is_self_describing(saved):
    directory, _, _ = saved
    data = json.loads((directory / "checkpoint.json").read_text())
    assert data["format"] == "ttakit-checkpoint" and data["format_version"] == 1
    for key in (
        "arch",
        "arch_kwargs",
        "classes",
        "in_channels",
        "image_size",
        "mean",
        "std",
        "train_augmentations",
        "dataset",
        "seed",
        "created",
        "metrics",
        "extra",
    ):
        assert key in data
    assert "source" not in data


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")


def test_missing_weights_file(saved):
    directory, _, _ = saved
    (directory / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no model.safetensors"):
        load_checkpoint(directory)


def test_random_file_is_refused(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\x00\x01random")
    with pytest.raises(CheckpointError, match="not a ttakit checkpoint"):
        load_checkpoint(path)


def test_corrupt_safetensors(saved):
    directory, _, _ = saved
    (directory / "model.safetensors").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(CheckpointError, match="corrupt or not a safetensors file"):
        load_checkpoint(directory)


def test_foreign_json(saved):
    directory, _, _ = saved
    (directory / "checkpoint.json").write_text(json.dumps({"model_type": "bert", "hidden": 768}))
    with pytest.raises(CheckpointError, match="not a ttakit checkpoint.*format None"):
        load_checkpoint(directory)


def test_json_that_is_not_json(saved):
    directory, _, _ = saved
    (directory / "checkpoint.json").write_bytes(b"\x89PNG\r\n")
    with pytest.raises(CheckpointError, match="not readable JSON"):
        load_checkpoint(directory)


def test_newer_format_version(saved):
    directory, _, _ = saved
    data = json.loads((directory / "checkpoint.json").read_text())
    data["format_version"] = 2
    (directory / "checkpoint.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="format_version 2, newer.*upgrade ttakit"):
        load_checkpoint(directory)


def test_bad_metadata_field(saved):
    directory, _, _ = saved
    data = json.loads((directory / "checkpoint.json").read_text())
    data["image_size"] = [28]
    (directory / "checkpoint.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="'image_size' must be"):
        load_checkpoint(directory)


def test_unknown_arch_in_checkpoint(saved):
    directory, _, _ = saved
    data = json.loads((directory / "checkpoint.json").read_text())
    data["arch"] = "vit-huge"
    (directory / "checkpoint.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="unknown architecture 'vit-huge'"):
        load_checkpoint(directory)


def test_mismatched_weights_name_keys_and_shapes(tmp_path):
    meta = _meta()
    # weights of a 5-class model filed under metadata that says 3 classes
    other = create_model(
        "seed-cnn", in_channels=1, num_classes=5, image_size=(12, 12), mean=[0.3], std=[0.2]
    )
    save_checkpoint(tmp_path / "run", other, meta)
    with pytest.raises(
        CheckpointError, match=r"do not match.*shape mismatches.*\(5, 128\) vs \(3, 128\)"
    ):
        load_checkpoint(tmp_path / "run")
    # weights of another architecture entirely
    resnet = create_model("resnet20", in_channels=1, num_classes=3, mean=[0.3], std=[0.2])
    save_checkpoint(tmp_path / "run2", resnet, meta)
    with pytest.raises(CheckpointError, match="missing keys: .*unexpected keys: "):
        load_checkpoint(tmp_path / "run2")


def test_load_never_unpickles(saved, monkeypatch):
    directory, _, _ = saved

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load must not be called")

    monkeypatch.setattr(torch, "load", refuse)
    load_checkpoint(directory)


def test_check_compatible(saved):
    directory, _, _ = saved
    _, meta = load_checkpoint(directory)
    check_compatible(meta, 1, (12, 12))
    with pytest.raises(CheckpointError) as info:
        check_compatible(meta, 3, (32, 32))
    message = str(info.value)
    assert message == (
        f"checkpoint {directory} expects 1-channel 12x12 images but the data has 3-channel 32x32 "
        "images; evaluate it on the data set it was trained on (toy)"
    )
    with pytest.raises(
        CheckpointError, match="checkpoint runs/cnn expects 1-channel 12x12 .* 1-channel 28x28"
    ):
        check_compatible(meta, 1, (28, 28), source="runs/cnn")
