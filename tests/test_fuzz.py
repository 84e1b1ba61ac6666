"""Fuzzing the three places ttakit reads what others wrote: policy JSON, checkpoint metadata (and
weights) and image bytes. Whatever comes in, only ttakit's documented errors come out: never a
``KeyError``, ``TypeError``, ``IndexError``, ``AttributeError``, nor a PIL or torch exception.

* ``Policy.from_json`` / ``Policy.load``: :class:`~ttakit.errors.PolicyFormatError`.
* ``CheckpointMeta.from_dict`` / ``read_checkpoint_meta`` / ``load_checkpoint``:
  :class:`~ttakit.errors.CheckpointError`.
* ``load_images`` (image folders): :class:`~ttakit.errors.DataError` when no file is readable
  (an unreadable file among readable ones is skipped with a warning);
  ``ttakit.data.decode.decode_image`` (predict): its ``DecodeError``.

Inputs are mostly *near-valid*: a valid document or file with a few mutations (a field
replaced by another JSON value, deleted, or added; bytes truncated, flipped or inserted), which
reaches much deeper than random noise.

The suite runs a few thousand cases (profile ``fuzz-suite``, derandomized so CI is
reproducible); ``make fuzz`` runs many more with fresh randomness
(``TTAKIT_FUZZ_PROFILE=fuzz-deep``).
"""

from __future__ import annotations

import copy
import io
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

import ttakit
from ttakit import transforms as T
from ttakit.data.image_folder import load_images
from ttakit.errors import CheckpointError, DataError, PolicyFormatError
from ttakit.models import (
    CheckpointMeta,
    create_model,
    load_checkpoint,
    read_checkpoint_meta,
    save_checkpoint,
)
from ttakit.policy import Policy

try:  # predict's decoder (helper E); fuzzed too where it exists
    from ttakit.data.decode import DecodeError, decode_image
except ImportError:  # pragma: no cover - an older tree
    decode_image = None

pytestmark = pytest.mark.usefixtures("single_thread")

_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile(
    "fuzz-suite", max_examples=500, deadline=None, derandomize=True, database=None, suppress_health_check=_HEALTH
)
settings.register_profile("fuzz-deep", max_examples=25000, deadline=None, database=None, suppress_health_check=_HEALTH)
PROFILE_NAME = os.environ.get("TTAKIT_FUZZ_PROFILE", "fuzz-suite")
PROFILE = settings.get_profile(PROFILE_NAME)


def examples(share: float) -> settings:
    """``share`` of the profile's examples (the suite budget is split between the tests)."""
    return settings(PROFILE, max_examples=max(10, int(PROFILE.max_examples * share)))


# --------------------------------------------------------------------------- JSON mutation

NEAR_VALUES = [
    "HorizontalFlip", "Rotate90", "Scale", "Resize", "Shift", "FiveCrops", "TenCrops", "Add", "Brightness",
    "mean", "max", "vote", "identity", "steps", "param", "args", "lt", "center", "nearest", "reflect",
    "ttakit-policy", "ttakit-checkpoint", "seed-cnn", "resnet20", 0, 1, 2, -1, 90, 0.5, 1e308, True, False,
    None, [], {}, [1, 0], [0, 0], [True, "rb"], [8, 8], [[1, 0]], {"name": "flip"},
]
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=10)
    | st.sampled_from(NEAR_VALUES).map(copy.deepcopy)  # a fresh copy: mutations must not reach NEAR_VALUES
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=8,
)


def _paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a node of a JSON document (dict keys and list indices)."""
    out = [prefix]
    if isinstance(doc, dict):
        for key, value in doc.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            out += _paths(value, (*prefix, i))
    return out


def _parent(doc: Any, path: tuple) -> Any:
    for key in path[:-1]:
        doc = doc[key]
    return doc


@st.composite
def mutated(draw, documents: list[dict[str, Any]], max_mutations: int = 4) -> Any:
    """A deep copy of one of ``documents`` with 1..max_mutations random edits."""
    doc = copy.deepcopy(draw(st.sampled_from(documents)))
    for _ in range(draw(st.integers(1, max_mutations))):
        paths = _paths(doc)
        if draw(st.booleans()):  # half the time a top-level field: where a wrong type does most harm
            paths = [p for p in paths if len(p) == 1] or paths
        path = draw(st.sampled_from(paths))
        action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if not path:  # the root
            if action == "replace" and draw(st.integers(0, 9)) == 0:
                doc = draw(json_values)
            continue
        parent, key = _parent(doc, path), path[-1]
        if action == "replace":
            parent[key] = draw(json_values)
        elif action == "delete":
            del parent[key]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=8) | st.sampled_from(sorted(parent)))] = draw(json_values)
        else:
            parent.insert(draw(st.integers(0, len(parent))), draw(json_values))
    return doc


@st.composite
def mangled_text(draw, texts: list[str]) -> bytes:
    """A valid document's bytes, truncated, with bytes flipped or inserted, or random bytes."""
    data = bytearray(draw(st.sampled_from(texts)).encode())
    kind = draw(st.sampled_from(["truncate", "flip", "insert", "random"]))
    if kind == "truncate":
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    if kind == "random":
        return draw(st.binary(max_size=200))
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[i] = draw(st.integers(0, 255))
        else:
            data[i:i] = draw(st.binary(min_size=1, max_size=4))
    return bytes(data)


# --------------------------------------------------------------------------- policies

POLICIES = [
    p.to_json()
    for p in [
        ttakit.get_policy("d4"),
        ttakit.get_policy("hflip-shift"),
        ttakit.aliases.multiscale_transform([0.5, 2], "bilinear").to_policy("ms", weights=[1, 2, 3], temperature=1.5),
        ttakit.aliases.ten_crop_transform(3, 4).to_policy("tc", merge_mode="vote", gate_threshold=0.8),
        ttakit.Compose(
            [T.Resize([(6, 7)], (5, 5)), T.Brightness([0.1], clip=False), T.Shift([(1, -2)], "reflect")]
        ).to_policy("mix", meta={"found_by": "search", "scores": [0.1, 0.2]}),
    ]
]
POLICY_TEXTS = [json.dumps(p) for p in POLICIES]


def _check_loaded(policy: Policy) -> None:
    # A policy that loads is a real policy: it saves and reloads to the same JSON.
    again = Policy.from_json(json.loads(json.dumps(policy.to_json())))
    assert again.view_names == policy.view_names and again.merge_mode == policy.merge_mode


@examples(0.9)
@given(doc=mutated(POLICIES))
def test_mutated_policy_json_raises_only_policy_format_error(doc):
    try:
        policy = Policy.from_json(doc)
    except PolicyFormatError as err:
        assert "\n" not in str(err)
        return
    _check_loaded(policy)


@examples(0.3)
@given(doc=json_values)
def test_random_json_is_not_a_policy(doc):
    with pytest.raises(PolicyFormatError):
        Policy.from_json(doc)


@examples(0.4)
@given(data=mangled_text(POLICY_TEXTS))
def test_mangled_policy_files_raise_only_policy_format_error(data, tmp_path_factory):
    path = tmp_path_factory.getbasetemp() / "fuzz-policy.json"
    path.write_bytes(data)
    try:
        _check_loaded(Policy.load(path))
    except PolicyFormatError as err:
        assert "\n" not in str(err)


# --------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = create_model("seed-cnn", in_channels=1, num_classes=3, image_size=(8, 8), hidden=8)
    meta = CheckpointMeta(
        arch="seed-cnn", arch_kwargs={"hidden": 8}, classes=["a", "b", "c"], in_channels=1, image_size=[8, 8],
        mean=[0.5], std=[0.25], train_augmentations=[{"name": "flip"}, {"name": "shift", "max_shift": 2}],
        dataset="x.npz", seed=3, metrics={"val_acc": 0.5}, extra={"split": {"seed": 0, "fraction": 0.15}},
    )
    return save_checkpoint(tmp_path_factory.mktemp("fuzz-ckpt") / "ckpt", model, meta)


def _meta_docs(checkpoint_dir: Path) -> list[dict[str, Any]]:
    return [json.loads((checkpoint_dir / "checkpoint.json").read_text())]


META_DOC = CheckpointMeta(
    arch="resnet20", classes=["x", "y"], in_channels=3, image_size=[32, 32], mean=[0.1, 0.2, 0.3],
    std=[1.0, 1.0, 1.0], train_augmentations=[{"name": "crop"}], weights_sha256="0" * 64,
).to_dict()


@examples(0.9)
@given(doc=mutated([META_DOC]))
def test_mutated_checkpoint_metadata_raises_only_checkpoint_error(doc):
    try:
        meta = CheckpointMeta.from_dict(doc, source="fuzz")
    except CheckpointError as err:
        assert "\n" not in str(err)
        return
    # Metadata that parses is usable: its fields have the documented types.
    assert isinstance(meta.arch, str) and all(isinstance(c, str) for c in meta.classes)
    assert meta.num_classes == len(meta.classes) and len(meta.image_size) == 2


@examples(0.15)
@given(data=st.data())
def test_mangled_checkpoint_files_raise_only_checkpoint_error(data, checkpoint_dir, tmp_path_factory):
    """``load_checkpoint`` on a copy of a real checkpoint whose checkpoint.json or model.safetensors
    was mangled (or whose metadata was mutated as JSON)."""
    meta_text = (checkpoint_dir / "checkpoint.json").read_text()
    weights = (checkpoint_dir / "model.safetensors").read_bytes()
    target = data.draw(st.sampled_from(["meta-bytes", "meta-json", "weights"]))
    if target == "meta-bytes":
        meta_bytes = data.draw(mangled_text([meta_text]))
    elif target == "meta-json":
        meta_bytes = json.dumps(data.draw(mutated(_meta_docs(checkpoint_dir)))).encode()
    else:
        meta_bytes = meta_text.encode()
        weights = _mangle_bytes(data, weights)
    try:  # never build a model of unbounded size here: that is a memory check, not a parse check
        parsed = json.loads(meta_bytes)
        assume(not isinstance(parsed, dict) or _small_model(parsed))
    except (ValueError, RecursionError):
        pass
    folder = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp()))
    (folder / "checkpoint.json").write_bytes(meta_bytes)
    (folder / "model.safetensors").write_bytes(weights)
    try:
        model, meta = load_checkpoint(folder)
    except CheckpointError as err:
        assert "\n" not in str(err)
        return
    finally:
        for name in ("checkpoint.json", "model.safetensors"):
            (folder / name).unlink()
        folder.rmdir()
    out = model(torch.zeros(2, meta.in_channels, *meta.image_size))
    assert out.shape == (2, meta.num_classes)


def _small_model(meta: dict[str, Any]) -> bool:
    size, kwargs = meta.get("image_size"), meta.get("arch_kwargs", {})
    if isinstance(size, list) and all(isinstance(s, int) for s in size) and len(size) == 2:
        if size[0] * size[1] > 64 * 64:
            return False
    return not isinstance(kwargs, dict) or all(not isinstance(v, int) or abs(v) <= 256 for v in kwargs.values())


def _mangle_bytes(data: st.DataObject, blob: bytes) -> bytes:
    blob = bytearray(blob)
    kind = data.draw(st.sampled_from(["truncate", "flip", "header", "random"]))
    if kind == "truncate":
        return bytes(blob[: data.draw(st.integers(0, len(blob) - 1))])
    if kind == "random":
        return data.draw(st.binary(max_size=300))
    if kind == "header":  # safetensors starts with an 8-byte length and a JSON header
        end = min(len(blob), 8 + int.from_bytes(blob[:8], "little"))
        i = data.draw(st.integers(0, end - 1))
    else:
        i = data.draw(st.integers(0, len(blob) - 1))
    for _ in range(data.draw(st.integers(1, 4))):
        blob[min(i, len(blob) - 1)] = data.draw(st.integers(0, 255))
        i += data.draw(st.integers(1, 16))
    return bytes(blob)


@examples(0.3)
@given(data=mangled_text([json.dumps(META_DOC)]))
def test_mangled_checkpoint_metadata_text_raises_only_checkpoint_error(data, checkpoint_dir, tmp_path_factory):
    folder = tmp_path_factory.getbasetemp() / "fuzz-meta"
    folder.mkdir(exist_ok=True)
    (folder / "model.safetensors").write_bytes(b"")
    (folder / "checkpoint.json").write_bytes(data)
    try:
        read_checkpoint_meta(folder)
    except CheckpointError as err:
        assert "\n" not in str(err)


# --------------------------------------------------------------------------- image bytes


def _encoded(fmt: str, mode: str, size: tuple[int, int] = (5, 4)) -> bytes:
    rng = np.random.default_rng(len(fmt) + len(mode))
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    array = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    image = Image.fromarray(array.squeeze(-1) if channels == 1 else array, mode)
    if fmt == "GIF":
        image = image.convert("P")
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


SEED_IMAGES = [
    _encoded(fmt, mode)
    for fmt, modes in {
        "PNG": ["L", "RGB", "RGBA"], "JPEG": ["L", "RGB"], "BMP": ["RGB"], "GIF": ["RGB"], "TIFF": ["RGB", "L"],
        "WEBP": ["RGB"],
    }.items()
    for mode in modes
]


@st.composite
def image_bytes(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEED_IMAGES)))
    kind = draw(st.sampled_from(["truncate", "flip", "flip", "insert", "splice", "random"]))
    if kind == "truncate":
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    if kind == "random":
        return draw(st.binary(max_size=300))
    if kind == "splice":  # one format's header on another's body
        other = draw(st.sampled_from(SEED_IMAGES))
        cut = draw(st.integers(0, min(len(data), len(other)) - 1))
        return bytes(data[:cut] + other[cut:])
    for _ in range(draw(st.integers(1, 6))):
        i = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[i] = draw(st.integers(0, 255))
        else:
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


@pytest.fixture(scope="module")
def image_path(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz-images") / "image.png"


@examples(0.6)
@given(data=image_bytes(), channels=st.sampled_from([None, 1, 3]))
def test_mangled_image_files_raise_only_data_error(data, channels, image_path):
    image_path.write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an unreadable file is skipped with a warning
        try:
            images, loaded, skipped = load_images([image_path], image_size=(4, 5), channels=channels)
        except DataError as err:
            assert str(image_path) in str(err) and "\n" not in str(err)
            return
    assert images.shape[0] == 1 and images.shape[-2:] == (4, 5) and loaded == [image_path] and skipped == []
    assert images.dtype == torch.float32 and 0 <= images.min() and images.max() <= 1


@pytest.mark.skipif(decode_image is None, reason="ttakit.data.decode does not exist in this tree")
@examples(0.6)
@given(data=image_bytes(), channels=st.sampled_from([1, 3, 4]))
def test_mangled_image_files_raise_only_decode_error(data, channels, image_path):
    image_path.write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            array = decode_image(image_path, channels, (4, 5))
        except DecodeError as err:
            assert "\n" not in str(err)
            return
    assert array.shape == (4, 5, channels) and array.dtype == np.uint8


def test_seed_images_decode():
    # The mutations start from files that are valid: otherwise the fuzzing only tests rejection.
    assert len(SEED_IMAGES) == 10
    for data in SEED_IMAGES:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            assert image.size == (5, 4)
    for doc in POLICIES:
        assert len(Policy.from_json(doc)) >= 2


def test_profile_budget():
    # The examples the fuzz tests above actually run, read from their hypothesis settings: the
    # suite keeps to "a few thousand" (the docstring, README), ``make fuzz`` to about 100k.
    fuzz_tests = {
        name: test for name, test in globals().items()
        if name.startswith("test_") and getattr(test, "is_hypothesis_test", False)
    }
    assert len(fuzz_tests) == 8, sorted(fuzz_tests)
    total = sum(test._hypothesis_internal_use_settings.max_examples for test in fuzz_tests.values())
    bounds = {"fuzz-suite": (1_500, 3_000), "fuzz-deep": (75_000, 150_000)}
    assert PROFILE_NAME in bounds, f"unknown TTAKIT_FUZZ_PROFILE {PROFILE_NAME!r}; expected one of {sorted(bounds)}"
    low, high = bounds[PROFILE_NAME]
    assert low <= total <= high, f"{PROFILE_NAME}: {total} examples, expected {low}..{high}"
