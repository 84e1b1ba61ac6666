""":func:`load` and :func:`model_kind`: which loader a source needs, and the options it takes."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import DataNotFoundError, InvalidInputError
from ._options import (
    _FILE_SPEC,
    _IMPORT_SPEC,
    _KERAS_SUFFIXES,
    LAYOUTS,
    OUTPUTS,
    PIXEL_RANGES,
    TASKS,
    _check_channels,
    _choice,
    _floats,
    parse_input_size,
    read_classes,
)
from .keras import _load_keras
from .onnx import _load_onnx
from .predictor import Predictor
from .python_callable import _load_callable, _load_import
from .torch_export import _load_pt2
from .torch_module import _load_checkpoint, _load_module, _load_predictor
from .torchscript import _load_torchscript


def model_kind(source: Any) -> str:
    """Which loader ``source`` needs: ``"predictor"``, ``"module"``, ``"callable"``,
    ``"checkpoint"``, ``"pt2"``, ``"torchscript"``, ``"onnx"`` or ``"keras"``.

    Raises:
        DataNotFoundError: a path that does not exist.
        InvalidInputError: a file of unknown type (pickled state dicts are refused: they would
            have to be unpickled).
    """
    if isinstance(source, Predictor):
        return "predictor"
    if isinstance(source, nn.Module):
        return "module"
    if hasattr(source, "module") and type(source).__name__ == "ExportedProgram":
        return "pt2"
    if not isinstance(source, (str, os.PathLike)):
        if callable(source):
            return "callable"
        raise InvalidInputError(
            f"model must be a path, an nn.Module or a callable over NumPy arrays, got {type(source).__name__}"
        )
    path = Path(source)
    if not path.exists():
        if isinstance(source, str) and (_IMPORT_SPEC.match(source) or _FILE_SPEC.match(source)):
            return "import"
        raise DataNotFoundError(f"model {path} does not exist")
    if path.is_dir():
        if (path / "checkpoint.json").is_file():
            return "checkpoint"
        if (path / "saved_model.pb").is_file():
            raise InvalidInputError(
                f"model {path} is a TensorFlow SavedModel, which ttakit does not load; convert it to ONNX "
                "(python -m tf2onnx.convert) or save it with Keras 3 as .keras"
            )
        raise InvalidInputError(f"model folder {path} is not a ttakit checkpoint (it has no checkpoint.json)")
    if path.name in ("checkpoint.json", "model.safetensors"):
        return "checkpoint"
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix in _KERAS_SUFFIXES:
        return "keras"
    if suffix == ".pt2":
        return "pt2"
    if zipfile.is_zipfile(path):
        names = zipfile.ZipFile(path).namelist()
        if any(n.endswith("/code/") or "/code/" in n for n in names) and any(n.endswith("constants.pkl") for n in names):
            return "torchscript"
        if any(n.endswith("archive_format") or "/models/" in n for n in names):
            return "pt2"
        if any(n.endswith("data.pkl") for n in names):
            raise InvalidInputError(
                f"model {path} is a pickled PyTorch file (torch.save), which ttakit does not unpickle; load the "
                "model in Python and pass the nn.Module, or save it with torch.export (.pt2) or TorchScript"
            )
    raise InvalidInputError(
        f"model {path} has an unknown type ({suffix or 'no extension'}); expected a ttakit checkpoint folder, "
        ".pt2 (torch.export), TorchScript (.pt/.ts), .onnx, .keras or .h5"
    )


def load(
    source: Any,
    *,
    layout: str | None = None,
    input_size: Any = None,
    channels: int | None = None,
    pixel_range: str | None = None,
    mean: Any = None,
    std: Any = None,
    classes: Any = None,
    outputs: str | None = None,
    task: str | None = None,
) -> Predictor:
    """Load any model as a :class:`Predictor`.

    Args:
        source: a ttakit checkpoint folder, a ``.pt2``/TorchScript/``.onnx``/``.keras``/``.h5``
            file, an ``nn.Module`` (or ``torch.export.ExportedProgram``), a Python callable
            taking a float32 NumPy batch in ``layout`` and returning ``(B, classes)``, or a
            Predictor (returned as it is).
        layout: ``"nchw"`` or ``"nhwc"``: the model's input layout (the predictor always takes NCHW).
        input_size: ``(H, W)`` (or one int) the model takes; images are resized to it by predict.
        channels: image channels ``C`` the model takes.
        pixel_range: ``"0-1"`` or ``"0-255"``: the pixel scale the model expects.
        mean, std: per-channel normalization in ``pixel_range`` units, applied inside the predictor.
        classes: class names, or a text file with one name a line.
        outputs: ``"logits"`` or ``"probs"``; detected where the file says (ttakit metadata, a
            Keras model's final activation), otherwise required for classification and
            segmentation (detection and keypoint outputs are merged as they are).
        task: ``"classification"`` (default: ``(B, classes)`` scores), ``"segmentation"``
            (``(B, classes, H, W)``), ``"detection"`` (boxes in any form the detection wrapper
            reads) or ``"keypoints"`` (``(B, 2N)`` or ``(B, N, 2)``); read from a ttakit
            checkpoint or export that records it.

    Raises:
        InvalidInputError: an unknown file type, a bad option, or ``outputs`` missing where
            it cannot be detected.
        MissingExtraError: ONNX or Keras without the optional extra installed.
    """
    if isinstance(source, Predictor):
        return source
    options = {
        "layout": _choice("layout", layout, LAYOUTS),
        "input_size": parse_input_size(input_size),
        "channels": _check_channels(channels),
        "pixel_range": _choice("pixel_range", pixel_range, PIXEL_RANGES),
        "mean": _floats("mean", mean),
        "std": _floats("std", std),
        "classes": read_classes(classes),
        "outputs": _choice("outputs", outputs, OUTPUTS),
        "task": _choice("task", task, TASKS),
    }
    if (options["mean"] is None) != (options["std"] is None):
        raise InvalidInputError("give mean and std together (one value per channel each), or neither")
    kind = model_kind(source)
    loader = _LOADERS[kind]
    return loader(source, options)


_LOADERS: dict[str, Callable[[Any, dict[str, Any]], Predictor]] = {
    "predictor": _load_predictor,
    "checkpoint": _load_checkpoint,
    "module": _load_module,
    "pt2": _load_pt2,
    "torchscript": _load_torchscript,
    "onnx": _load_onnx,
    "keras": _load_keras,
    "callable": _load_callable,
    "import": _load_import,
}
