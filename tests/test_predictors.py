"""ttakit.predictors: every model source behind one calling convention, with real files."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from ttakit import predictors
from ttakit.engine import TTAEngine
from ttakit.errors import DataNotFoundError, InvalidInputError, ModelOutputError
from ttakit.models import CheckpointMeta, create_model, save_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")


def _checkpoint(tmp_path, seed: int = 0):
    torch.manual_seed(seed)
    model = create_model("seed-cnn", in_channels=1, num_classes=4, image_size=(8, 8), mean=[0.3], std=[0.4]).eval()
    meta = CheckpointMeta(
        arch="seed-cnn",
        classes=["a", "b", "c", "d"],
        in_channels=1,
        image_size=[8, 8],
        mean=[0.3],
        std=[0.4],
        train_augmentations=[{"name": "flip"}],
    )
    return save_checkpoint(tmp_path / "run", model, meta), model


def _images(n: int = 6, channels: int = 1, size: int = 8) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------- checkpoints and modules


def test_checkpoint_predictor_matches_the_model_and_records_what_it_knows(tmp_path):
    folder, model = _checkpoint(tmp_path)
    predictor = predictors.load(folder)
    x = _images()
    with torch.inference_mode():
        assert torch.equal(predictor(x), model(x))  # normalization stays in the model: not applied twice
    assert predictor.kind == "checkpoint"
    assert predictor.classes == ["a", "b", "c", "d"]
    assert predictor.input_size == (8, 8) and predictor.channels == 1
    assert predictor.outputs == "logits"
    assert predictor.normalization == "model" and predictor.mean == pytest.approx([0.3])
    assert predictor.train_augmentations == [{"name": "flip"}]
    # The engine gives the same TTA output for the predictor as for the raw model.
    engine_model = TTAEngine(model, "hflip-shift").run(x).merged
    engine_predictor = TTAEngine(predictor, "hflip-shift").run(x).merged
    assert torch.equal(engine_model, engine_predictor)


def test_evaluate_accepts_a_predictor_and_gives_identical_results(tmp_path):
    from ttakit.data import ImageDataset
    from ttakit.jobs._policies import resolve_policies
    from ttakit.jobs._policy_eval import evaluate_policies

    folder, model = _checkpoint(tmp_path)
    data = ImageDataset(_images(40), torch.arange(40) % 4, ["a", "b", "c", "d"])
    policies = resolve_policies(["none,hflip"])
    plain = evaluate_policies(model, data, policies, progress=False)
    wrapped = evaluate_policies(predictors.load(folder), data, policies, progress=False)
    for a, b in zip(plain, wrapped, strict=True):
        assert a.name == b.name
        assert torch.equal(a.probs, b.probs)
        assert a.metrics["accuracy"] == b.metrics["accuracy"]


def test_module_needs_outputs_unless_it_ends_in_softmax():
    torch.manual_seed(0)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    with pytest.raises(InvalidInputError, match="outputs='logits' or 'probs'"):
        predictors.load(linear)
    assert predictors.load(linear, outputs="logits").outputs == "logits"
    soft = nn.Sequential(nn.Flatten(), nn.Linear(16, 3), nn.Softmax(dim=1))
    assert predictors.load(soft).outputs == "probs"
    ttakit_arch = create_model("seed-cnn", in_channels=1, num_classes=3, image_size=(8, 8), mean=[0.5], std=[0.2])
    found = predictors.load(ttakit_arch)
    assert (found.outputs, found.normalization, found.channels) == ("logits", "model", 1)


def test_mean_std_and_pixel_range_are_applied_inside_in_that_order():
    seen = {}

    def model(batch: np.ndarray) -> np.ndarray:
        seen["batch"] = batch.copy()
        return batch.reshape(len(batch), -1)[:, :3]

    predictor = predictors.load(
        model, layout="nhwc", pixel_range="0-255", mean=[100, 110, 120], std=[50, 60, 70], outputs="logits", channels=3
    )
    x = _images(2, channels=3, size=4)
    out = predictor(x)
    expected = (x * 255 - torch.tensor([100.0, 110, 120]).view(1, 3, 1, 1)) / torch.tensor([50.0, 60, 70]).view(1, 3, 1, 1)
    expected = expected.permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(seen["batch"], expected, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(out.numpy(), expected.reshape(2, -1)[:, :3], rtol=1e-6, atol=1e-5)
    assert seen["batch"].shape == (2, 4, 4, 3)


def test_numpy_callable_tta_equals_a_hand_computed_flip_average():
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(16, 3)).astype(np.float32)

    def model(batch: np.ndarray) -> np.ndarray:  # (B, 4, 4, 1) -> (B, 3) softmax
        logits = batch.reshape(len(batch), -1) @ weights
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    predictor = predictors.load(model, layout="nhwc", outputs="probs", input_size=4, channels=1)
    x = _images(5, size=4)
    merged = TTAEngine(predictor, "hflip").run(x).merged
    nhwc = x.permute(0, 2, 3, 1).numpy()
    expected = (model(nhwc) + model(nhwc[:, :, ::-1].copy())) / 2
    np.testing.assert_allclose(merged.numpy(), expected, atol=1e-6)


def test_callable_failures_and_bad_outputs_are_one_line_model_errors():
    def broken(batch):
        raise RuntimeError("boom\nsecond line")

    with pytest.raises(ModelOutputError, match="failed on a batch of shape .*RuntimeError: boom second line"):
        predictors.load(broken, outputs="logits")(_images(2))
    with pytest.raises(ModelOutputError, match=r"returned shape \(2,\)"):
        predictors.load(lambda b: np.zeros(len(b)), outputs="logits")(_images(2))
    with pytest.raises(ModelOutputError, match="3 outputs per image but 2 class names"):
        predictors.load(lambda b: np.zeros((len(b), 3)), outputs="logits", classes=["x", "y"])(_images(2))


def test_classes_file_and_option_errors(tmp_path):
    names = tmp_path / "classes.txt"
    names.write_text("cat\n\ndog\nbird\n", encoding="utf-8")
    predictor = predictors.load(lambda b: np.zeros((len(b), 3)), outputs="logits", classes=names)
    assert predictor.classes == ["cat", "dog", "bird"]
    with pytest.raises(InvalidInputError, match="layout must be one of nchw, nhwc, got 'chw'"):
        predictors.load(lambda b: b, layout="chw", outputs="logits")
    with pytest.raises(InvalidInputError, match="input_size must be HxW"):
        predictors.load(lambda b: b, input_size="big", outputs="logits")
    assert predictors.parse_input_size("28x32") == (28, 32) and predictors.parse_input_size(5) == (5, 5)
    with pytest.raises(InvalidInputError, match="mean and std together"):
        predictors.load(lambda b: b, mean=[0.5], outputs="logits")
    with pytest.raises(DataNotFoundError, match="classes file .* does not exist"):
        predictors.load(lambda b: b, classes=tmp_path / "nope.txt", outputs="logits")


def test_unknown_and_unsafe_model_files_are_refused(tmp_path):
    weird = tmp_path / "model.bin"
    weird.write_bytes(b"\x00\x01")
    with pytest.raises(InvalidInputError, match=r"unknown type \(\.bin\)"):
        predictors.load(weird)
    pickled = tmp_path / "weights.pth"
    torch.save({"w": torch.zeros(2)}, pickled)
    with pytest.raises(InvalidInputError, match="does not unpickle"):
        predictors.load(pickled)
    with pytest.raises(DataNotFoundError, match="does not exist"):
        predictors.load(tmp_path / "missing.onnx")
    with pytest.raises(InvalidInputError, match="not a ttakit checkpoint"):
        predictors.load(tmp_path)


# --------------------------------------------------------------------------- ONNX (a hand-built graph)


def _onnx_model(path, shape, layout: str, metadata: str | None = None, softmax: bool = False):
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    weights = rng.normal(size=(16, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Flatten", ["x"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "w"], ["logits"]),
    ]
    out_name = "logits"
    if softmax:
        nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=1))
        out_name = "probs"
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor("w", TensorProto.FLOAT, [16, 3], weights.flatten())],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if metadata is not None:
        entry = model.metadata_props.add()
        entry.key, entry.value = predictors.METADATA_KEY, metadata
    onnx.save(model, str(path))
    return weights


def test_onnx_nhwc_is_detected_and_matches_numpy(tmp_path):
    path = tmp_path / "tiny.onnx"
    weights = _onnx_model(path, ["N", 4, 4, 1], "nhwc")
    predictor = predictors.load(path, outputs="logits")
    assert (predictor.layout, predictor.channels, predictor.input_size) == ("nhwc", 1, (4, 4))
    x = _images(3, size=4)
    expected = x.permute(0, 2, 3, 1).reshape(3, -1).numpy() @ weights
    np.testing.assert_allclose(predictor(x).numpy(), expected, rtol=1e-5, atol=1e-5)


def test_onnx_metadata_is_read_and_a_fixed_batch_is_split(tmp_path):
    import json

    path = tmp_path / "meta.onnx"
    meta = {"format": "ttakit-export", "classes": ["p", "q", "r"], "outputs": "probs", "layout": "nchw"}
    _onnx_model(path, [1, 1, 4, 4], "nchw", metadata=json.dumps(meta), softmax=True)
    predictor = predictors.load(path)
    assert predictor.classes == ["p", "q", "r"] and predictor.outputs == "probs"
    out = predictor(_images(5, size=4))  # the graph takes batches of 1: split and rejoined
    assert out.shape == (5, 3)
    np.testing.assert_allclose(out.sum(1).numpy(), np.ones(5), atol=1e-6)


def test_onnx_dynamic_input_size_needs_input_size(tmp_path):
    path = tmp_path / "dynamic.onnx"
    _onnx_model(path, ["N", 1, "H", "W"], "nchw")
    with pytest.raises(InvalidInputError, match="dynamic input size .*--input-size HxW"):
        predictors.load(path, outputs="logits")
    predictor = predictors.load(path, outputs="logits", input_size="4x4")
    assert predictor.input_size == (4, 4)
    # a batch of another size than the model records fails inside it: the error says the size it takes
    with pytest.raises(InvalidInputError, match="the onnx model .* takes 4x4 images, got a batch of shape \\(2, 1, 5, 5\\)"):
        predictor(_images(2, size=5))


def test_missing_extras_name_the_pip_command(tmp_path, monkeypatch):
    path = tmp_path / "tiny.onnx"
    path.write_bytes(b"not really onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(predictors.MissingExtraError, match=r"pip install 'ttakit\[onnx\]'"):
        predictors.load(path)
    keras_file = tmp_path / "m.keras"
    keras_file.write_bytes(b"zip?")
    monkeypatch.setitem(sys.modules, "keras", None)
    with pytest.raises(predictors.MissingExtraError, match=r"pip install 'ttakit\[keras\]'"):
        predictors.load(keras_file)


def test_keras_with_another_backend_is_a_clear_error(tmp_path, monkeypatch):
    fake = types.SimpleNamespace(backend=types.SimpleNamespace(backend=lambda: "jax"))
    monkeypatch.setitem(sys.modules, "keras", fake)
    keras_file = tmp_path / "m.keras"
    keras_file.write_bytes(b"zip?")
    with pytest.raises(InvalidInputError, match="already imported with the 'jax' backend.*KERAS_BACKEND=torch"):
        predictors.load(keras_file)


# --------------------------------------------------------------------------- device and amp


def test_devices_are_checked_and_amp_stays_close():
    assert predictors.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(InvalidInputError, match="device must be one of 'cpu', 'cuda', 'cuda:N'.*got 'gpu'"):
        predictors.resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidInputError, match="CUDA is not available"):
            predictors.resolve_device("cuda:1")
    torch.manual_seed(0)
    model = create_model("seed-cnn", in_channels=1, num_classes=4, image_size=(8, 8)).eval()
    fast = predictors.prepare_model(model, "cpu", amp=True)
    x = _images(4)
    with torch.inference_mode():
        exact, approx = model(x), fast(x)
    assert approx.dtype == torch.float32
    assert torch.allclose(exact, approx, atol=0.1) and not torch.equal(exact, approx)  # bfloat16 really ran


# --------------------------------------------------------------------------- Keras 3 (real files)


def _keras_model(tmp_path, final: str):
    import os

    os.environ["KERAS_BACKEND"] = "torch"
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":
        pytest.skip("keras was imported with another backend")
    keras.utils.set_random_seed(0)
    layers = [
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(4, 3, padding="same", activation="relu"),
        keras.layers.Flatten(),
        keras.layers.Dense(3, activation=final),
    ]
    model = keras.Sequential(layers)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=final == "linear")
    model.compile(optimizer="adam", loss=loss)
    rng = np.random.default_rng(0)
    x = rng.random((32, 8, 8, 1), dtype=np.float32)
    y = (x[:, :, :4].mean(axis=(1, 2, 3)) > x[:, :, 4:].mean(axis=(1, 2, 3))).astype(np.int64) + (x[:, 0, 0, 0] > 0.9)
    model.fit(x, y, epochs=2, batch_size=16, verbose=0)
    model.save(tmp_path / "model.keras")
    model.save(tmp_path / "model.h5")
    return model


@pytest.mark.slow
def test_keras_keras_and_h5_files_softmax_nhwc_tta_equals_flip_average(tmp_path):
    model = _keras_model(tmp_path, "softmax")
    x = _images(6)
    nhwc = x.permute(0, 2, 3, 1).numpy()
    plain = np.asarray(model.predict(nhwc, verbose=0))
    flipped = np.asarray(model.predict(nhwc[:, :, ::-1].copy(), verbose=0))
    expected = (plain + flipped) / 2
    assert not np.allclose(plain, flipped, atol=1e-3)  # the flip really changes the answer
    for name in ("model.keras", "model.h5"):
        predictor = predictors.load(tmp_path / name)
        assert (predictor.kind, predictor.layout, predictor.outputs) == ("keras", "nhwc", "probs")
        assert (predictor.channels, predictor.input_size) == (1, (8, 8))
        merged = TTAEngine(predictor, "hflip").run(x).merged
        np.testing.assert_allclose(merged.numpy(), expected, atol=1e-5)


@pytest.mark.slow
def test_keras_linear_head_is_detected_as_logits(tmp_path):
    model = _keras_model(tmp_path, "linear")
    predictor = predictors.load(tmp_path / "model.keras")
    assert predictor.outputs == "logits"
    x = _images(3)
    logits = np.asarray(model.predict(x.permute(0, 2, 3, 1).numpy(), verbose=0))
    merged = TTAEngine(predictor, "none").run(x).merged
    np.testing.assert_allclose(merged.numpy(), torch.softmax(torch.from_numpy(logits), 1).numpy(), atol=1e-5)


def test_evaluate_merges_a_probs_model_without_a_second_softmax():
    from ttakit.data import ImageDataset
    from ttakit.jobs._policies import resolve_policies
    from ttakit.jobs._policy_eval import evaluate_policies

    rng = np.random.default_rng(1)
    weights = rng.normal(size=(16, 3)).astype(np.float32) * 4

    def model(batch: np.ndarray) -> np.ndarray:
        logits = batch.reshape(len(batch), -1) @ weights
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    predictor = predictors.load(model, outputs="probs", channels=1, input_size=4)
    x = _images(30, size=4)
    data = ImageDataset(x, torch.arange(30) % 3, ["a", "b", "c"])
    (plain,) = evaluate_policies(predictor, data, resolve_policies(["none"]), progress=False)
    np.testing.assert_allclose(plain.probs.numpy(), model(x.numpy()), atol=1e-6)


def test_a_python_file_model_has_the_same_digest_in_every_process(tmp_path):
    """--resume compares weights digests across processes; the module name a FILE.py:NAME model is
    imported under enters the digest, so it must not depend on the per-process hash salt."""
    import os
    import subprocess
    import sys

    (tmp_path / "net.py").write_text(
        "import torch\n\n\nclass Net(torch.nn.Sequential):  # defined here: its __module__ is the file's\n"
        "    pass\n\n\ntorch.manual_seed(0)\nmodel = Net(torch.nn.Flatten(), torch.nn.Linear(16, 3))\n"
    )
    code = ("import ttakit.predictors as p; "
            f"print(p.load({str(tmp_path / 'net.py') + ':model'!r}, input_size=(4, 4), channels=1, outputs='logits').weights_digest())")
    digests = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONHASHSEED": seed}).stdout.strip()
        for seed in ("1", "2")
    }
    assert len(digests) == 1 and len(next(iter(digests))) > 8
