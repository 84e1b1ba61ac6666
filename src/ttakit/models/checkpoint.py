"""Checkpoints: a directory holding ``model.safetensors`` (weights) and ``checkpoint.json``.

The JSON metadata describes the checkpoint fully (architecture and its options, classes,
input shape, normalization, training augmentations, data set and its split recipe, seed,
metrics, and the SHA-256 of the weights file), so a model is rebuilt from the registry and its
weights loaded with safetensors. Nothing is ever unpickled.

A checkpoint is written as one unit: both files go into a temporary folder beside the target,
which is then renamed into place. When the target folder already exists (it may hold results
such as ``eval/``), the two files are moved in one after the other, weights first; the
metadata records the weights' hash, so a crash between the two moves leaves a pair that
:func:`load_checkpoint` refuses rather than one that silently mixes two trainings.

Layout::

    runs/cnn/
        checkpoint.json     # CheckpointMeta as JSON
        model.safetensors   # the state dict
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import shutil
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .._io import _fsync_dir, _fsync_path, atomic_write_json
from ..errors import CheckpointError, InvalidInputError, TTAKitError
from .registry import TASKS, create_model, list_models, model_task

FORMAT = "ttakit-checkpoint"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "checkpoint.json"
MAX_IMAGE_SIDE = 16384  # metadata asking for more is refused before a model is built
MAX_CHANNELS = 64


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(kw_only=True)
class CheckpointMeta:
    """Everything needed to rebuild a model and use it the way it was trained.

    ``task`` is what the model does (one of ``"classification"``, ``"segmentation"``,
    ``"detection"``); checkpoints written before the field existed are classifiers.
    ``source`` is where the checkpoint was loaded from (set by :func:`load_checkpoint`, used in
    messages); it is not written to ``checkpoint.json``.

    Example:
        >>> meta = CheckpointMeta(arch="seed-cnn", classes=["a", "b"], in_channels=1, image_size=[28, 28])
        >>> meta.num_classes
        2
    """

    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    arch: str
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    task: str = "classification"
    classes: list[str]
    in_channels: int
    image_size: list[int]
    mean: list[float] | None = None
    std: list[float] | None = None
    train_augmentations: list[dict[str, Any]] = field(default_factory=list)
    dataset: str = ""
    seed: int = 0
    created: str = field(default_factory=_now)
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    weights_sha256: str | None = None
    source: str = field(default="", repr=False, compare=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready metadata (without ``source``)."""
        data = asdict(self)
        data.pop("source")
        return data

    @classmethod
    def from_dict(cls, data: Any, source: str = "checkpoint") -> CheckpointMeta:
        """Validate ``data`` (parsed ``checkpoint.json``) and build the metadata.

        Raises:
            CheckpointError: not a ttakit checkpoint, a newer format version, or a bad field.
        """
        _check_format(data, source)
        _check_shape_fields(data, source)
        _check_other_fields(data, source)
        known = {f.name for f in fields(cls)} - {"source"}
        kwargs = {k: v for k, v in data.items() if k in known}  # unknown keys: ignored
        kwargs["format_version"] = FORMAT_VERSION
        return cls(**kwargs, source=source)


def _bad(data: dict[str, Any], source: str, name: str, expected: str) -> CheckpointError:
    """The error for a field of ``checkpoint.json`` that is not what it must be."""
    return CheckpointError(
        f"{source}: {META_FILE} field {name!r} must be {expected}, got {data.get(name)!r}"
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_format(data: Any, source: str) -> None:
    """``data`` is a ttakit checkpoint's metadata in a format version this ttakit reads."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(
            f"{source} is not a ttakit checkpoint: {META_FILE} has format {found!r}, expected {FORMAT!r}"
        )
    version = data.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(
            f"{source}: format_version must be a positive integer, got {version!r}"
        )
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{source} has checkpoint format_version {version}, newer than this ttakit reads "
            f"(up to {FORMAT_VERSION}); upgrade ttakit to load it"
        )


def _check_shape_fields(data: dict[str, Any], source: str) -> None:
    """The model's fields: ``arch``, ``classes``, ``in_channels``, ``image_size``, ``mean`` and ``std``."""
    if not isinstance(data.get("arch"), str) or not data["arch"]:
        raise _bad(data, source, "arch", "an architecture name")
    classes = data.get("classes")
    if (
        not isinstance(classes, list)
        or not classes
        or not all(isinstance(c, str) for c in classes)
    ):
        raise _bad(data, source, "classes", "a non-empty list of class names")
    if len(set(classes)) != len(classes):
        raise _bad(data, source, "classes", "a list of distinct class names")
    in_channels = data.get("in_channels")
    if not _is_int(in_channels) or not 1 <= in_channels <= MAX_CHANNELS:
        raise _bad(data, source, "in_channels", f"an integer from 1 to {MAX_CHANNELS}")
    size = data.get("image_size")
    if (
        not isinstance(size, list)
        or len(size) != 2
        or not all(_is_int(s) and 1 <= s <= MAX_IMAGE_SIDE for s in size)
    ):
        raise _bad(data, source, "image_size", f"[H, W], integers from 1 to {MAX_IMAGE_SIDE}")
    for name in ("mean", "std"):
        value = data.get(name)
        if value is not None and (
            not isinstance(value, list)
            or len(value) != in_channels
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
            or (name == "std" and not all(v > 0 for v in value))
        ):
            extra = ", all positive" if name == "std" else ""
            raise _bad(data, source, name, f"null or a list of {in_channels} finite numbers (one per channel{extra})")
    if (data.get("mean") is None) != (data.get("std") is None):
        raise CheckpointError(f"{source}: {META_FILE} must give both mean and std, or neither")


def _check_other_fields(data: dict[str, Any], source: str) -> None:
    """The other fields: objects that are plain JSON, training augmentations, data set, seed,
    creation date and the weights' digest."""
    for name in ("arch_kwargs", "metrics", "extra"):
        if not isinstance(data.get(name, {}), dict):
            raise _bad(data, source, name, "an object")
    augs = data.get("train_augmentations", [])
    if not isinstance(augs, list) or not all(isinstance(a, dict) and "name" in a for a in augs):
        raise _bad(data, source, "train_augmentations", 'a list of objects like {"name": "flip"}')
    if data.get("task", "classification") not in TASKS:
        raise _bad(data, source, "task", f"one of {', '.join(TASKS)}")
    if not isinstance(data.get("dataset", ""), str):
        raise _bad(data, source, "dataset", "a string")
    if not _is_int(data.get("seed", 0)):
        raise _bad(data, source, "seed", "an integer")
    if not isinstance(data.get("created", ""), str):
        raise _bad(data, source, "created", "an ISO date string")
    digest = data.get("weights_sha256")
    if digest is not None and (
        not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest)
    ):
        raise _bad(data, source, "weights_sha256", "null or 64 lowercase hex digits")
    for name in ("arch_kwargs", "metrics", "extra"):
        try:
            json.dumps(data.get(name, {}), allow_nan=True)
        except (TypeError, ValueError, RecursionError):
            raise _bad(data, source, name, "plain JSON") from None


def save_checkpoint(directory: str | os.PathLike, model: nn.Module, meta: CheckpointMeta) -> Path:
    """Write ``model``'s weights and ``meta`` into the checkpoint directory ``directory``.

    Written as one unit (see the module docstring): a new folder appears whole; an existing
    one gets the weights, then the metadata recording their SHA-256 (``meta.weights_sha256``
    is set). Returns the directory.

    Example:
        >>> model = create_model("seed-cnn", in_channels=1, num_classes=2, image_size=(8, 8))
        >>> meta = CheckpointMeta(arch="seed-cnn", classes=["a", "b"], in_channels=1, image_size=[8, 8])
        >>> path = save_checkpoint(tmp_path / "run", model, meta)  # doctest: +SKIP
    """
    if not isinstance(meta, CheckpointMeta):
        raise InvalidInputError(f"meta must be a CheckpointMeta, got {type(meta).__name__}")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(
            f"cannot save a checkpoint to {directory}: it exists and is not a directory"
        )
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = directory.parent / f".{directory.name}.{secrets.token_hex(6)}.tmp"
        os.mkdir(tmp, 0o777)  # the umask applies, as for any folder the user makes
    except OSError as exc:
        raise CheckpointError(f"cannot write a checkpoint to {directory}: {exc.strerror or exc}") from exc
    try:
        # clone: safetensors refuses tensors that share storage or are not contiguous
        state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        _fsync_path(tmp / WEIGHTS_FILE)
        meta.weights_sha256 = _file_sha256(tmp / WEIGHTS_FILE)
        atomic_write_json(tmp / META_FILE, meta.to_dict())
        if not directory.exists():
            os.rename(tmp, directory)  # the whole checkpoint appears at once
        else:  # keep what else the folder holds (eval/, policy.json): weights, then metadata
            os.replace(tmp / WEIGHTS_FILE, directory / WEIGHTS_FILE)
            os.replace(tmp / META_FILE, directory / META_FILE)
        _fsync_dir(directory)
        _fsync_dir(directory.parent)
    except OSError as exc:
        raise CheckpointError(f"cannot write a checkpoint to {directory}: {exc.strerror or exc}") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return directory


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_sha256(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of the weights file of the checkpoint at ``path`` (its content, not its name)."""
    directory = _checkpoint_dir(path)
    try:
        return _file_sha256(directory / WEIGHTS_FILE)
    except OSError as exc:
        raise CheckpointError(f"cannot read {directory / WEIGHTS_FILE}: {exc.strerror or exc}") from exc


def _checkpoint_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_file():
        if path.name not in (WEIGHTS_FILE, META_FILE):
            raise CheckpointError(
                f"{path} is not a ttakit checkpoint: expected a checkpoint directory holding "
                f"{META_FILE} and {WEIGHTS_FILE} (or one of those two files)"
            )
        path = path.parent
    for name in (META_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise CheckpointError(
                f"checkpoint {path} has no {name}; is it a ttakit checkpoint directory?"
            )
    return path


def read_checkpoint_meta(path: str | os.PathLike) -> CheckpointMeta:
    """Read and validate only the metadata of the checkpoint at ``path`` (no weights)."""
    directory = _checkpoint_dir(path)
    try:
        data = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        # JSONDecodeError is a ValueError: truncated, empty or malformed metadata
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise CheckpointError(
            f"{directory} is not a usable ttakit checkpoint: {META_FILE} is not readable JSON ({reason}); "
            "it may be truncated: retrain or restore it"
        ) from exc
    return CheckpointMeta.from_dict(data, source=str(directory))


def _describe_mismatch(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> str:
    def first(items: list[str]) -> str:
        shown = ", ".join(items[:5])
        return shown + (f" and {len(items) - 5} more" if len(items) > 5 else "")

    parts = []
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [
        f"{k} {tuple(found[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in found and found[k].shape != expected[k].shape
    ]
    if missing:
        parts.append(f"missing keys: {first(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {first(unexpected)}")
    if shapes:
        parts.append(f"shape mismatches (file vs architecture): {first(shapes)}")
    return "; ".join(parts)


class _Shape:
    """A tensor stand-in that only has a shape (read from a safetensors header)."""

    def __init__(self, shape: list[int]):
        self.shape = torch.Size(shape)


def _weight_shapes(path: Path) -> dict[str, _Shape]:
    """Names and shapes of the tensors in a safetensors file, from its header alone."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: _Shape(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except Exception as exc:  # safetensors raises its own error types (and OSError) on bad files
        raise CheckpointError(f"{path} is corrupt or not a safetensors file ({type(exc).__name__}: {exc})") from exc


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, CheckpointMeta]:
    """Rebuild the model saved at ``path`` and load its weights (safetensors, never pickle).

    Args:
        path: the checkpoint directory, or its ``checkpoint.json`` or ``model.safetensors``.
        map_location: device for the weights and the returned model.

    Returns:
        ``(model, meta)``; the model is in eval mode.

    Raises:
        CheckpointError: missing files, foreign or newer metadata, unknown architecture,
            corrupt weights, or weights that do not fit the architecture.
    """
    meta = read_checkpoint_meta(path)
    directory = Path(meta.source)
    if meta.arch not in list_models(None):
        raise CheckpointError(
            f"checkpoint {directory} uses unknown architecture {meta.arch!r}; "
            f"expected one of: {', '.join(list_models(None))}"
        )
    if model_task(meta.arch) != meta.task:
        raise CheckpointError(
            f"checkpoint {directory}: {META_FILE} field 'task' is {meta.task!r} but architecture "
            f"{meta.arch!r} is a {model_task(meta.arch)} model"
        )
    def build(stats: bool = True) -> nn.Module:
        try:
            return create_model(
                meta.arch,
                in_channels=meta.in_channels,
                num_classes=meta.num_classes,
                image_size=tuple(meta.image_size),
                mean=meta.mean if stats else None,
                std=meta.std if stats else None,
                **meta.arch_kwargs,
            )
        except (TypeError, ValueError, RuntimeError, MemoryError, OverflowError, TTAKitError) as exc:
            raise CheckpointError(
                f"checkpoint {directory}: cannot build {meta.arch!r} from its metadata ({' '.join(str(exc).split())[:200]})"
            ) from exc

    if meta.weights_sha256 is not None:
        found = weights_sha256(directory)
        if found != meta.weights_sha256:
            raise CheckpointError(
                f"{directory / WEIGHTS_FILE} is not the weights {META_FILE} was saved with (sha256 {found[:12]}..., "
                f"recorded {meta.weights_sha256[:12]}...); the checkpoint was interrupted while saved or mixed: retrain it"
            )
    # Metadata could ask for a model of billions of parameters: build it on the meta device (no
    # memory) and compare with the shapes in the weights file's header before allocating anything.
    # (An architecture whose constructor needs real values, e.g. ``.item()``, skips this check.)
    skeleton_state = None
    try:
        with torch.device("meta"):
            # (normalization stats are checked by value, which meta tensors cannot do; the
            # skeleton only needs shapes, and identity stats have the same shapes)
            skeleton_state = build(stats=False).state_dict()
    except CheckpointError as exc:
        if "meta tensors" not in str(exc):
            raise
    if skeleton_state is not None:
        mismatch = _describe_mismatch(skeleton_state, _weight_shapes(directory / WEIGHTS_FILE))
        if mismatch:
            raise CheckpointError(
                f"weights in {directory / WEIGHTS_FILE} do not match architecture {meta.arch!r}: {mismatch}"
            )
    model = build()
    device = torch.device(map_location)
    try:
        state = load_file(str(directory / WEIGHTS_FILE), device=str(device))
    except Exception as exc:  # safetensors raises its own error types (and OSError) on bad files
        raise CheckpointError(
            f"{directory / WEIGHTS_FILE} is corrupt or not a safetensors file ({type(exc).__name__}: {exc})"
        ) from exc
    expected = model.state_dict()
    mismatch = _describe_mismatch(expected, state)
    if mismatch:
        raise CheckpointError(
            f"weights in {directory / WEIGHTS_FILE} do not match architecture {meta.arch!r}: {mismatch}"
        )
    model.load_state_dict(state)
    model.to(device).eval()
    return model, meta


def check_compatible(
    meta: CheckpointMeta, channels: int, image_size: tuple[int, int], *, source: str | None = None
) -> None:
    """Refuse data whose channels or image size differ from what the checkpoint was trained on.

    Raises:
        CheckpointError: e.g. "checkpoint runs/cnn expects 3-channel 32x32 images but the data
            has 1-channel 28x28 images; evaluate it on the data set it was trained on (cifar10)".
    """
    expected_size = (int(meta.image_size[0]), int(meta.image_size[1]))
    size = (int(image_size[0]), int(image_size[1]))
    if int(channels) == meta.in_channels and size == expected_size:
        return
    name = source or meta.source or meta.arch
    hint = (
        f"evaluate it on the data set it was trained on ({meta.dataset})"
        if meta.dataset
        else "evaluate it on data of the shape it was trained on"
    )
    raise CheckpointError(
        f"checkpoint {name} expects {meta.in_channels}-channel {expected_size[0]}x{expected_size[1]} images "
        f"but the data has {int(channels)}-channel {size[0]}x{size[1]} images; {hint}"
    )
