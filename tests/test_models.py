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
    classifier_module,
    create_model,
    list_models,
    load_checkpoint,
    register_model,
    save_checkpoint,
)

# The torchvision-layout ResNets (11-25 M parameters) run the registry-wide tests in the slow
# suite; their fast tests are the resnet section at the end of this file.
HEAVY_MODELS = ("resnet18", "resnet34", "resnet50")
MODELS = [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY_MODELS else n for n in list_models()]


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


@pytest.mark.parametrize("name", MODELS)
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


@pytest.mark.parametrize("name", MODELS)
def test_every_model_handles_small_odd_images(name):
    model = create_model(name, in_channels=2, num_classes=2, image_size=(5, 7)).eval()
    with torch.inference_mode():
        assert model(torch.rand(2, 2, 5, 7)).shape == (2, 2)


@pytest.mark.parametrize("name", MODELS)
def test_classifier_module_is_the_layer_that_outputs_the_logits(name):
    """Transfer starts only this layer afresh, so it must be the very last one: zero it and
    every logit is 0; its output width is the number of classes."""
    model = create_model(name, in_channels=1, num_classes=3, image_size=(16, 16)).eval()
    classifier = classifier_module(model)
    assert isinstance(classifier, torch.nn.Linear) and classifier.out_features == 3
    with torch.no_grad():
        classifier.weight.zero_()
        classifier.bias.fill_(0.25)
        out = model(torch.rand(2, 1, 16, 16))
    assert torch.equal(out, torch.full((2, 3), 0.25))


def test_unknown_architecture_lists_choices():
    with pytest.raises(UnknownNameError, match="unknown architecture 'vgg'.*resnet18, resnet20, resnet34, resnet50, seed-cnn"):
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


@pytest.mark.parametrize("name", MODELS)
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


@pytest.mark.parametrize("name", MODELS)
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
    # the metadata records the weights' hash: swapped or damaged weights are caught first
    with pytest.raises(CheckpointError, match="is not the weights checkpoint.json was saved with"):
        load_checkpoint(directory)
    # a checkpoint without the hash (older ttakit) still refuses a corrupt file
    data = json.loads((directory / "checkpoint.json").read_text())
    data["weights_sha256"] = None
    (directory / "checkpoint.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="corrupt or not a safetensors file"):
        load_checkpoint(directory)


def test_weights_from_another_save_are_refused(tmp_path):
    meta = _meta()
    first = save_checkpoint(tmp_path / "a", _model_for(meta), _meta())
    torch.manual_seed(5)
    other = create_model("seed-cnn", in_channels=1, num_classes=3, image_size=(12, 12), mean=[0.3], std=[0.2])
    second = save_checkpoint(tmp_path / "b", other, _meta())
    # same architecture, same shapes: only the hash tells the two trainings apart
    (first / "model.safetensors").write_bytes((second / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match=r"a/model.safetensors is not the weights .* retrain it"):
        load_checkpoint(first)


def test_checkpoint_is_written_as_one_unit(tmp_path, monkeypatch):
    from ttakit.models import checkpoint as ckpt

    meta = _meta()
    model = _model_for(meta)
    real_save_file = ckpt.save_file

    def crash_half_way(state, filename, metadata=None):
        real_save_file(state, filename, metadata=metadata)
        with open(filename, "r+b") as f:  # a half-written file, then the process dies
            f.truncate(100)
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "save_file", crash_half_way)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "new", model, _meta())
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing half-made is left behind

    monkeypatch.setattr(ckpt, "save_file", real_save_file)
    directory = save_checkpoint(tmp_path / "run", model, _meta())
    (directory / "eval").mkdir()  # results beside the checkpoint survive a re-save
    torch.manual_seed(9)
    retrained = create_model("seed-cnn", in_channels=1, num_classes=3, image_size=(12, 12), mean=[0.3], std=[0.2])
    monkeypatch.setattr(ckpt, "save_file", crash_half_way)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(directory, retrained, _meta())
    loaded, _ = load_checkpoint(directory)  # the old checkpoint is intact
    x = torch.rand(2, 1, 12, 12)
    with torch.inference_mode():
        assert torch.equal(loaded(x), model(x))
    monkeypatch.setattr(ckpt, "save_file", real_save_file)
    save_checkpoint(directory, retrained, _meta())
    loaded, _ = load_checkpoint(directory)
    with torch.inference_mode():
        assert torch.equal(loaded(x), retrained.eval()(x))
    assert sorted(p.name for p in directory.iterdir()) == ["checkpoint.json", "eval", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.parametrize("cut", [0, 1, 10, 100, -2])
def test_truncated_metadata(saved, cut):
    directory, _, _ = saved
    text = (directory / "checkpoint.json").read_text()
    (directory / "checkpoint.json").write_text(text[:cut])
    with pytest.raises(CheckpointError, match=r"checkpoint.json is not readable JSON .* truncated"):
        load_checkpoint(directory)


@pytest.mark.parametrize(
    "field, value, fragment",
    [
        ("image_size", [100_000, 100_000], "'image_size' must be [H, W], integers from 1 to 16384"),
        ("image_size", [2, 2], "cannot build 'seed-cnn'"),
        ("in_channels", 10**9, "'in_channels' must be an integer from 1 to 64"),
        ("classes", ["a", "a", "b"], "'classes' must be a list of distinct class names"),
        ("classes", "abc", "'classes' must be a non-empty list"),
        ("std", [0.0], "'std' must be null or a list of 1 finite numbers"),
        ("mean", [float("nan")], "'mean' must be null or a list of 1 finite numbers"),
        ("weights_sha256", "xyz", "'weights_sha256' must be null or 64 lowercase hex digits"),
        ("created", 5, "'created' must be an ISO date string"),
        ("arch_kwargs", {"hidden": "wide"}, "cannot build 'seed-cnn'"),
        ("arch_kwargs", {"no_such_option": 1}, "cannot build 'seed-cnn'"),
        ("extra", [], "'extra' must be an object"),
    ],
)
def test_malformed_metadata_is_one_checkpoint_error(saved, field, value, fragment):
    directory, _, _ = saved
    data = json.loads((directory / "checkpoint.json").read_text())
    data[field] = value
    (directory / "checkpoint.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(directory)
    message = str(info.value)
    assert fragment in message and "\n" not in message


def test_deeply_nested_metadata(saved):
    directory, _, _ = saved
    (directory / "checkpoint.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match="not readable JSON"):
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


class _Hostile:
    """Unpickling this runs ``marker.touch()``: proof that a loader unpickled it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (self.marker,))


def test_load_never_unpickles(saved, monkeypatch, tmp_path):
    import pickle

    directory, _, _ = saved
    calls = []

    def refuse(name):
        def call(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} must not be called")

        return call

    monkeypatch.setattr(torch, "load", refuse("torch.load"))
    monkeypatch.setattr(pickle, "load", refuse("pickle.load"))
    monkeypatch.setattr(pickle, "loads", refuse("pickle.loads"))
    monkeypatch.setattr(pickle, "Unpickler", refuse("pickle.Unpickler"))
    loaded, meta = load_checkpoint(directory)
    assert calls == [] and meta.arch == "seed-cnn" and isinstance(loaded, torch.nn.Module)
    monkeypatch.undo()

    # a hostile file in place of the weights: refused, and its payload never runs
    marker = tmp_path / "pwned"
    with open(directory / "model.safetensors", "wb") as f:
        pickle.dump({"conv.weight": _Hostile(marker)}, f)
    data = json.loads((directory / "checkpoint.json").read_text())
    data["weights_sha256"] = None  # skip the hash check: the loader itself must refuse it
    (directory / "checkpoint.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="corrupt or not a safetensors file"):
        load_checkpoint(directory)
    assert not marker.exists()
    with open(directory / "model.safetensors", "rb") as f:  # the payload is live: pickle runs it
        pickle.load(f)
    assert marker.exists()


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


# ----------------------------------------------------------------------------- torchvision-layout ResNets (issue 12)


def _torchvision_keys(blocks: tuple[int, ...], bottleneck: bool) -> list[str]:
    """The state-dict keys of torchvision's resnet18/34/50, in order, written out from its layout
    (conv1, bn1, layer1..4 of blocks with conv/bn pairs and a downsample on the first block of
    a stage that changes shape, fc), independently of ttakit's implementation."""
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    keys = ["conv1.weight", *[f"bn1.{b}" for b in bn]]
    convs = 3 if bottleneck else 2
    for stage, count in enumerate(blocks, start=1):
        for block in range(count):
            prefix = f"layer{stage}.{block}"
            for i in range(1, convs + 1):
                keys += [f"{prefix}.conv{i}.weight", *[f"{prefix}.bn{i}.{b}" for b in bn]]
            if block == 0 and (stage > 1 or bottleneck):
                keys += [f"{prefix}.downsample.0.weight", *[f"{prefix}.downsample.1.{b}" for b in bn]]
    return [*keys, "fc.weight", "fc.bias"]


# torchvision's documented parameter counts for 1000 classes, RGB input
TORCHVISION = {
    "resnet18": ((2, 2, 2, 2), False, 11_689_512),
    "resnet34": ((3, 4, 6, 3), False, 21_797_672),
    "resnet50": ((3, 4, 6, 3), True, 25_557_032),
}


@pytest.mark.parametrize(
    "name", ["resnet18", pytest.param("resnet34", marks=pytest.mark.slow), pytest.param("resnet50", marks=pytest.mark.slow)]
)
def test_resnet_state_dict_has_torchvision_layout(name):
    blocks, bottleneck, params = TORCHVISION[name]
    model = create_model(name, in_channels=3, num_classes=1000)
    keys = [k for k in model.state_dict() if not k.startswith("normalize.")]
    assert keys == _torchvision_keys(blocks, bottleneck)  # names and order exactly
    assert [k for k in model.state_dict() if k.startswith("normalize.")] == ["normalize.mean", "normalize.std"]
    assert sum(p.numel() for p in model.parameters()) == params
    state = model.state_dict()
    assert state["conv1.weight"].shape == (64, 3, 7, 7)
    assert state["fc.weight"].shape == (1000, 2048 if bottleneck else 512)
    if bottleneck:
        assert state["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
        assert state["layer2.0.conv2.weight"].shape == (128, 128, 3, 3)  # v1.5: stride on the 3x3
    else:
        assert state["layer4.1.conv2.weight"].shape == (512, 512, 3, 3)
        assert state["layer4.0.downsample.1.running_var"].shape == (512,)


def test_resnet18_state_dict_round_trips_through_files(tmp_path):
    from safetensors.torch import save_file

    from ttakit.training.transfer import load_init_weights

    torch.manual_seed(0)
    source = create_model("resnet18", in_channels=1, num_classes=10).eval()
    assert source.state_dict()["conv1.weight"].shape == (64, 1, 7, 7)  # grayscale stem
    # a torchvision-style file: no normalization buffers, saved both ways
    plain = {k: v.clone() for k, v in source.state_dict().items() if not k.startswith("normalize.")}
    save_file(plain, str(tmp_path / "r18.safetensors"))
    torch.save(plain, tmp_path / "r18.pth")
    x = torch.rand(2, 1, 28, 28)
    with torch.inference_mode():
        expected = source(x)
    for path in (tmp_path / "r18.safetensors", tmp_path / "r18.pth"):
        torch.manual_seed(1)
        target = create_model("resnet18", in_channels=1, num_classes=10)
        report = load_init_weights(target, path, "resnet18")
        assert report.new == ["normalize.mean", "normalize.std"] and report.skipped == []
        assert len(report.loaded) == len(plain)
        with torch.inference_mode():
            torch.testing.assert_close(target.eval()(x), expected, rtol=0, atol=0)


def test_rgb_resnet_weights_into_a_grayscale_resnet_skip_the_stem(tmp_path):
    from ttakit.training.transfer import load_init_weights

    rgb = create_model("resnet18", in_channels=3, num_classes=1000)
    torch.save({k: v for k, v in rgb.state_dict().items() if not k.startswith("normalize.")}, tmp_path / "rgb.pt")
    gray = create_model("resnet18", in_channels=1, num_classes=10)
    report = load_init_weights(gray, tmp_path / "rgb.pt", "resnet18")
    assert sorted(report.skipped) == [
        "conv1.weight (shape (64, 3, 7, 7) vs (64, 1, 7, 7))",
        "fc.bias (shape (1000,) vs (10,))",
        "fc.weight (shape (1000, 512) vs (10, 512))",
    ]
    assert {"conv1.weight", "fc.weight", "fc.bias"} <= set(report.new)
    assert torch.equal(gray.state_dict()["layer4.1.bn2.running_var"], rgb.state_dict()["layer4.1.bn2.running_var"])


def test_resnets_take_any_size_and_group_their_layers():
    from ttakit.models import is_fixed_size, layer_groups

    model = create_model("resnet18", in_channels=1, num_classes=4).eval()
    with torch.inference_mode():
        for size in (14, 28, 33):
            assert model(torch.rand(1, 1, size, size)).shape == (1, 4)
    groups = layer_groups(model)
    assert len(groups) == 5 and [p.shape for p in groups[-1]] == [(4, 512), (4,)]
    assert sum(len(g) for g in groups) == len(list(model.parameters()))
    assert not is_fixed_size("resnet18") and not is_fixed_size("resnet20") and is_fixed_size("seed-cnn")
    assert not is_fixed_size("seed-cnn-gap")  # global pooling: trains at 14x14, predicts at 28x28


def test_metadata_asking_for_a_huge_model_is_refused_before_allocating(saved):
    # seed-cnn's dense layer grows with the image: 2048x2048 would be ~2 billion parameters (8 GB).
    directory, _, _ = saved
    data = json.loads((directory / "checkpoint.json").read_text())
    data["image_size"] = [2048, 2048]
    (directory / "checkpoint.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"do not match architecture 'seed-cnn': shape mismatches"):
        load_checkpoint(directory)
