"""Any image classifier as a :class:`Predictor`: NCHW float images in ``[0, 1]`` in, ``(B, classes)``
outputs out, plus what it knows about itself.

:func:`load` takes a ttakit checkpoint folder, an ``nn.Module``, a ``torch.export`` archive
(``.pt2``), a TorchScript file, an ONNX file (run with onnxruntime), a Keras 3 model (``.keras``
or legacy ``.h5``, run on Keras' torch backend) or a Python callable over NumPy arrays. Whatever
the source, the predictor takes RAW images ``(B, C, H, W)`` in ``[0, 1]`` and applies the
model's own preprocessing inside (pixel range, mean/std normalization, NHWC layout), so TTA
views act on raw images exactly as on a ttakit checkpoint (whose models normalize in their first
layer).

Where a file does not say, the caller does, with the same names as the CLI flags: ``layout``
(``"nchw"``/``"nhwc"``), ``input_size``, ``channels``, ``pixel_range`` (``"0-1"``/``"0-255"``),
``mean``/``std``, ``classes`` (a text file, one name a line, or a list) and ``outputs``
(``"logits"``/``"probs"``). ``outputs`` decides whether the engine applies softmax: a model that
already returns probabilities is merged in probability space without a second softmax. It is
read from the file where possible (ttakit metadata, a Keras model's last activation) and must be
given otherwise.

Example:
    >>> predictor = load(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)),
    ...                  outputs="logits", input_size=2, channels=1)
    >>> predictor(torch.rand(5, 1, 2, 2)).shape
    torch.Size([5, 3])
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import warnings
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from .errors import (
    CheckpointError,
    DataNotFoundError,
    InvalidInputError,
    ModelOutputError,
    TTAKitError,
)

__all__ = [
    "Predictor",
    "MissingExtraError",
    "load",
    "model_kind",
    "METADATA_KEY",
    "read_classes",
    "parse_input_size",
    "resolve_device",
    "prepare_model",
]

Layout = Literal["nchw", "nhwc"]
PixelRange = Literal["0-1", "0-255"]
Outputs = Literal["logits", "probs"]

LAYOUTS = ("nchw", "nhwc")
PIXEL_RANGES = ("0-1", "0-255")
OUTPUTS = ("logits", "probs")
# Where ttakit export stores its metadata: ONNX metadata_props key, TorchScript / pt2 extra file.
METADATA_KEY = "ttakit.json"
EXPORT_FORMAT = "ttakit-export"

# "package.module:function": a Python callable over NumPy arrays, named on the command line.
_IMPORT_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
# "path/to/file.py:function": the same, found by the file's path (no PYTHONPATH needed).
_FILE_SPEC = re.compile(r"^(?P<file>.+\.py):(?P<attribute>[A-Za-z_][\w.]*)$")
_KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")


class MissingExtraError(TTAKitError, ImportError):
    """An optional dependency (``ttakit[onnx]``, ``ttakit[keras]``) is not installed."""


def _missing(extra: str, what: str, exc: ImportError) -> MissingExtraError:
    return MissingExtraError(
        f"loading {what} needs the optional extra: pip install 'ttakit[{extra}]' ({exc.name or exc} is not installed)"
    )


# --------------------------------------------------------------------------- option checks


def parse_input_size(value: Any, name: str = "input_size") -> tuple[int, int] | None:
    """``(H, W)`` from an int (square), a pair, or text ``"28"``, ``"28x28"``, ``"28,28"``."""
    if value is None:
        return None
    if isinstance(value, str):
        parts = value.lower().replace(",", "x").split("x")
        try:
            numbers = [int(p) for p in parts]
        except ValueError:
            numbers = []
        if len(numbers) == 1:
            numbers *= 2
        if len(numbers) != 2:
            raise InvalidInputError(f"{name} must be HxW (like 224x224) or one number, got {value!r}")
        value = numbers
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = (int(value), int(value))
    if (
        not isinstance(value, Sequence)
        or len(value) != 2
        or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1 for v in value)
    ):
        raise InvalidInputError(f"{name} must be (height, width) positive integers or one integer, got {value!r}")
    return int(value[0]), int(value[1])


def _choice(name: str, value: Any, choices: Sequence[str]) -> Any:
    if value is None:
        return None
    text = str(value).lower()
    if text not in choices:
        raise InvalidInputError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return text


def _floats(name: str, value: Any) -> list[float] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [v for v in value.replace(",", " ").split() if v]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    try:
        numbers = [float(v) for v in value]
    except (TypeError, ValueError):
        raise InvalidInputError(f"{name} must be numbers, one per channel (like 0.5,0.5,0.5), got {value!r}") from None
    if not numbers or not all(np.isfinite(numbers)):
        raise InvalidInputError(f"{name} must be finite numbers, one per channel, got {value!r}")
    return numbers


def read_classes(value: Any) -> list[str] | None:
    """Class names from a list, or from a text file with one name a line (blank lines skipped)."""
    if value is None:
        return None
    if isinstance(value, (str, os.PathLike)):
        path = Path(value)
        if not path.is_file():
            raise DataNotFoundError(f"classes file {path} does not exist (expected a text file, one class name a line)")
        try:
            names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidInputError(f"classes file {path} is not readable UTF-8 text ({exc})") from exc
        names = [n for n in names if n]
        if not names:
            raise InvalidInputError(f"classes file {path} holds no class names (expected one name a line)")
        return names
    if isinstance(value, Sequence) and value and all(isinstance(c, str) for c in value):
        return list(value)
    raise InvalidInputError(f"classes must be a text file (one name a line) or a list of names, got {value!r}")


# --------------------------------------------------------------------------- the Predictor


class Predictor(nn.Module):
    """A classifier behind one calling convention: ``(B, C, H, W)`` float images in ``[0, 1]`` ->
    ``(B, classes)`` logits or probabilities (``outputs`` says which).

    Inside, in this order: the pixels are scaled to ``pixel_range``; ``(x - mean) / std`` is
    applied when ``normalization == "predictor"`` (``mean``/``std`` in ``pixel_range`` units);
    the batch is permuted to NHWC when ``layout == "nhwc"``; the backend runs; its output comes
    back as a float tensor on the input's device. A ttakit checkpoint normalizes in its first
    layer (``normalization == "model"``), so ``mean``/``std`` are recorded there for
    information only.

    Attributes:
        kind: ``"checkpoint"``, ``"module"``, ``"pt2"``, ``"torchscript"``, ``"onnx"``,
            ``"keras"`` or ``"callable"``.
        source: where it was loaded from (for messages).
        input_size: ``(H, W)`` the model takes, or None when any size works / is unknown.
        channels: ``C``, or None when unknown.
        layout, pixel_range, mean, std, normalization, classes, outputs: as described above.
        train_augmentations: the training augmentations a ttakit model records (for
            ``train-aug`` policies); empty otherwise.

    Shape:
        - Input: ``(B, C, H, W)`` float in ``[0, 1]``.
        - Output: ``(B, classes)`` float32.
    """

    def __init__(
        self,
        backend: Callable[[torch.Tensor], Any],
        *,
        kind: str,
        source: str = "",
        outputs: str,
        input_size: tuple[int, int] | None = None,
        channels: int | None = None,
        layout: str = "nchw",
        pixel_range: str = "0-1",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        normalization: str | None = None,
        classes: Sequence[str] | None = None,
        train_augmentations: Sequence[dict[str, Any]] = (),
        fixed_batch: int | None = None,
    ) -> None:
        super().__init__()
        if isinstance(backend, nn.Module):
            self.model = backend  # registered: .to(device), .eval() and parameters reach it
        else:
            self._backend = backend
        self.kind = kind
        self.source = source
        self.outputs = _choice("outputs", outputs, OUTPUTS)
        self.input_size = input_size
        self.channels = channels
        self.layout = _choice("layout", layout, LAYOUTS)
        self.pixel_range = _choice("pixel_range", pixel_range, PIXEL_RANGES)
        self.mean = list(mean) if mean is not None else None
        self.std = list(std) if std is not None else None
        if (self.mean is None) != (self.std is None):
            raise InvalidInputError("mean and std must be given together (one value per channel each), or neither")
        if self.std is not None and not all(s > 0 for s in self.std):
            raise InvalidInputError(f"std must be positive, got {self.std}")
        if self.mean is not None and len(self.mean) != len(self.std):
            raise InvalidInputError(f"mean and std need one value per channel each, got {len(self.mean)} and {len(self.std)}")
        if self.mean is not None and channels is not None and len(self.mean) not in (1, channels):
            raise InvalidInputError(
                f"mean/std must have 1 or {channels} values (one per channel), got {len(self.mean)}"
            )
        self.normalization = normalization if self.mean is not None else None
        if self.normalization == "predictor":
            self.register_buffer("_mean", torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
            self.register_buffer("_std", torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.classes = list(classes) if classes is not None else None
        self.train_augmentations = list(train_augmentations)
        self.fixed_batch = fixed_batch

    @property
    def num_classes(self) -> int | None:
        return len(self.classes) if self.classes is not None else None

    def describe(self) -> dict[str, Any]:
        """What the predictor knows, as plain JSON-ready values."""
        return {
            "kind": self.kind,
            "source": self.source,
            "input_size": list(self.input_size) if self.input_size else None,
            "channels": self.channels,
            "layout": self.layout,
            "pixel_range": self.pixel_range,
            "mean": self.mean,
            "std": self.std,
            "normalization": self.normalization,
            "classes": self.classes,
            "outputs": self.outputs,
        }

    def extra_repr(self) -> str:
        size = "x".join(map(str, self.input_size)) if self.input_size else "any"
        return (
            f"kind={self.kind}, source={self.source!r}, input={self.channels or '?'}x{size} {self.layout}, "
            f"pixel_range={self.pixel_range}, normalization={self.normalization}, outputs={self.outputs}"
        )

    def check_input(self, images: Any, name: str = "images") -> None:
        """Refuse a batch this model cannot take, naming the batch's own shape: not ``(B, C, H, W)``
        (a 3-D batch is told which axis to add), other channels than :attr:`channels`, another
        size than :attr:`input_size`, or float pixels above 1 (0-255 images: the predictor takes
        ``[0, 1]`` and scales to its ``pixel_range`` itself; they would saturate silently, so they
        are refused rather than warned about).

        Raises:
            InvalidInputError: naming ``name``, the shape or range found and the expected form.
        """
        if not isinstance(images, torch.Tensor):
            raise InvalidInputError(f"{name} must be a (B, C, H, W) tensor, got {type(images).__name__}")
        shape = tuple(images.shape)
        if images.ndim == 3:
            raise InvalidInputError(f"{name} must have shape (B, C, H, W), got 3-D shape {shape}{_axis_hint(shape, self.channels)}")
        if images.ndim != 4:
            raise InvalidInputError(f"{name} must have shape (B, C, H, W), got {images.ndim}-D shape {shape}")
        if self.channels is not None and shape[1] != self.channels:
            raise InvalidInputError(
                f"{self._name()} takes {self.channels}-channel images (B, {self.channels}, H, W), got {name} of shape {shape}"
            )
        if self.input_size is not None and tuple(shape[2:]) != tuple(self.input_size):
            h, w = self.input_size
            raise InvalidInputError(
                f"{self._name()} takes {h}x{w} images (B, {self.channels or 'C'}, {h}, {w}), got {name} of shape "
                f"{shape}; resize them to {h}x{w} first (ttakit predict does)"
            )
        if images.is_floating_point() and images.numel():
            high = float(images.detach().amax())
            if high > 1.0 + 1e-3:
                low = float(images.detach().amin())
                raise InvalidInputError(
                    f"{name} hold values in [{low:g}, {high:g}]; {self._name()} takes float images in [0, 1] (it "
                    f"scales to its pixel range {self.pixel_range} itself): divide 0-255 images by 255"
                )

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Raw ``(B, C, H, W)`` images in ``[0, 1]`` -> what the backend takes."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            hint = _axis_hint(shape, self.channels) if isinstance(images, torch.Tensor) and images.ndim == 3 else ""
            raise InvalidInputError(f"images must be a (B, C, H, W) tensor, got {shape}{hint}")
        if self.channels is not None and images.shape[1] != self.channels:
            raise InvalidInputError(
                f"{self._name()} takes {self.channels}-channel images, got a batch of shape {tuple(images.shape)}"
            )
        x = images if images.is_floating_point() else images.float()
        if self.pixel_range == "0-255":
            x = x * 255.0
        if self.normalization == "predictor":
            x = (x - self._mean.to(x.device)) / self._std.to(x.device)
        if self.layout == "nhwc":
            x = x.permute(0, 2, 3, 1)
        return x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(images)
        backend = self.model if "model" in self._modules else self._backend
        try:
            if self.fixed_batch and x.shape[0] != self.fixed_batch:
                out = torch.cat([self._fixed_call(backend, part) for part in x.split(self.fixed_batch)])
            else:
                out = self._call(backend, x)
        except (RuntimeError, ModelOutputError) as exc:
            # A batch of another size than the model records (a size-agnostic model may take it,
            # so it is tried) fails inside the model with a raw shape error: say what it takes.
            if self.input_size is not None and tuple(images.shape[2:]) != tuple(self.input_size):
                h, w = self.input_size
                raise InvalidInputError(
                    f"{self._name()} takes {h}x{w} images, got a batch of shape {tuple(images.shape)} "
                    f"({type(exc).__name__} inside the model); resize the images to {h}x{w}"
                ) from exc
            raise
        return self._postprocess(out, images)

    def _fixed_call(self, backend: Callable[[torch.Tensor], Any], part: torch.Tensor) -> torch.Tensor:
        """One chunk through a graph that takes exactly ``fixed_batch`` images: a short (last)
        chunk is padded with copies of its last image and the padded rows are dropped."""
        rows = part.shape[0]
        if rows < self.fixed_batch:
            part = torch.cat([part, part[-1:].expand(self.fixed_batch - rows, *part.shape[1:])])
        out = self._call(backend, part)
        if isinstance(out, (list, tuple)) and len(out) == 1:
            out = out[0]
        if not isinstance(out, torch.Tensor):
            out = torch.as_tensor(np.asarray(out))
        if out.ndim < 1 or out.shape[0] != self.fixed_batch:
            raise ModelOutputError(
                f"{self._name()} returned shape {tuple(out.shape)} for a batch of {self.fixed_batch} images "
                "(its fixed batch size); expected (B, classes)"
            )
        return out[:rows]

    def _call(self, backend: Callable[[torch.Tensor], Any], x: torch.Tensor) -> Any:
        if self.kind in ("checkpoint", "module", "pt2", "torchscript"):
            return backend(x)  # torch errors here are the model's own: let them through
        try:
            return backend(x)
        except TTAKitError:
            raise
        except Exception as exc:  # onnxruntime, keras or user code: one line that says which model
            detail = " ".join(str(exc).split())[:300]
            raise ModelOutputError(
                f"{self._name()} failed on a batch of shape {tuple(x.shape)} ({self.layout}): {type(exc).__name__}: {detail}"
            ) from exc

    def _postprocess(self, out: Any, images: torch.Tensor) -> torch.Tensor:
        if isinstance(out, (list, tuple)) and len(out) == 1:
            out = out[0]
        if not isinstance(out, torch.Tensor):
            try:
                out = torch.as_tensor(np.asarray(out))
            except (TypeError, ValueError) as exc:
                raise ModelOutputError(
                    f"{self._name()} must return a (B, classes) array, got {type(out).__name__}"
                ) from exc
        if out.ndim != 2 or out.shape[0] != images.shape[0]:
            raise ModelOutputError(
                f"{self._name()} returned shape {tuple(out.shape)} for {images.shape[0]} images; expected (B, classes)"
            )
        if self.classes is not None and out.shape[1] != len(self.classes):
            raise ModelOutputError(
                f"{self._name()} returned {out.shape[1]} outputs per image but {len(self.classes)} class names were given"
            )
        if out.device != images.device:
            out = out.to(images.device)
        return out if out.dtype == torch.float32 or images.dtype != torch.float32 else out.float()

    def _name(self) -> str:
        return f"the {self.kind} model {self.source}".rstrip() if self.source else f"the {self.kind} model"


def _axis_hint(shape: tuple[int, ...], channels: int | None = None) -> str:
    """Which axis a 3-D batch lacks: ``(C, H, W)`` one image -> ``unsqueeze(0)``; ``(B, H, W)``
    grayscale images -> ``unsqueeze(1)``."""
    first = shape[0]
    batch = f" (a batch of {first} grayscale images (B, H, W): add the channel axis with x.unsqueeze(1))"
    single = f" (one {first}-channel image (C, H, W): add the batch axis with x.unsqueeze(0))"
    if channels is not None:
        return single if first == channels else batch
    if first in (3, 4):
        return single + " or" + batch
    if first == 1:
        return single
    return batch


# --------------------------------------------------------------------------- loading


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
            Keras model's final activation), otherwise required.

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
    }
    if (options["mean"] is None) != (options["std"] is None):
        raise InvalidInputError("give mean and std together (one value per channel each), or neither")
    kind = model_kind(source)
    loader = _LOADERS[kind]
    return loader(source, options)


def _check_channels(channels: Any) -> int | None:
    if channels is None:
        return None
    if isinstance(channels, bool) or not isinstance(channels, (int, np.integer)) or channels < 1:
        raise InvalidInputError(f"channels must be a positive integer (1 gray, 3 RGB, 4 RGBA), got {channels!r}")
    return int(channels)


def _name_of(source: Any) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__


def _build(backend, kind: str, source: Any, options: dict[str, Any], found: dict[str, Any]) -> Predictor:
    """Merge what the file says (``found``) with the caller's options (which win) and build."""
    name = _name_of(source)
    if options.get("mean") is not None and found.get("normalization") == "model":
        # Applying the caller's mean/std as well would normalize every image twice.
        raise InvalidInputError(
            f"mean/std (--mean/--std) {options['mean']}/{options['std']} given for {kind} model {name}, which "
            f"normalizes its inputs itself (mean {found.get('mean')}, std {found.get('std')} inside the model); "
            "applying them too would normalize twice: drop --mean/--std for this model"
        )
    _check_contradictions(kind, name, options, found)
    settings = {k: v for k, v in found.items() if v is not None}
    settings.update({k: v for k, v in options.items() if v is not None})
    if options.get("mean") is not None:
        settings["normalization"] = "predictor"  # the caller asked for it: apply it here
    if settings.get("outputs") is None:
        raise InvalidInputError(
            f"say whether {kind} model {name} returns logits or probabilities: outputs='logits' or 'probs' "
            "(--outputs logits|probs); a second softmax over probabilities would be wrong"
        )
    return Predictor(
        backend,
        kind=kind,
        source=name,
        outputs=settings["outputs"],
        input_size=settings.get("input_size"),
        channels=settings.get("channels"),
        layout=settings.get("layout", "nchw"),
        pixel_range=settings.get("pixel_range", "0-1"),
        mean=settings.get("mean"),
        std=settings.get("std"),
        normalization=settings.get("normalization", "predictor"),
        classes=settings.get("classes"),
        train_augmentations=settings.get("train_augmentations", ()),
        fixed_batch=settings.get("fixed_batch"),
    )


def _check_contradictions(kind: str, name: str, options: dict[str, Any], found: dict[str, Any]) -> None:
    """Refuse --input-size / --channels that contradict what the model file records: the model
    would fail on the first batch with a raw shape error (or worse, run on resized garbage)."""
    what = "checkpoint" if kind == "checkpoint" else f"{kind} model"
    size, recorded_size = options.get("input_size"), found.get("input_size")
    if size is not None and recorded_size is not None and tuple(size) != tuple(recorded_size):
        raise InvalidInputError(
            f"input_size (--input-size) {size[0]}x{size[1]} contradicts {what} {name}, which takes "
            f"{recorded_size[0]}x{recorded_size[1]} images; drop --input-size (predict resizes images to "
            f"{recorded_size[0]}x{recorded_size[1]} itself)"
        )
    channels, recorded_channels = options.get("channels"), found.get("channels")
    if channels is not None and recorded_channels is not None and int(channels) != int(recorded_channels):
        raise InvalidInputError(
            f"channels (--channels) {channels} contradicts {what} {name}, which takes {recorded_channels}-channel "
            f"images; drop --channels (predict converts images to {recorded_channels} channel(s) itself)"
        )


def _from_metadata(meta: dict[str, Any] | None, source: str) -> dict[str, Any]:
    """Settings recorded by ``ttakit export`` (see :mod:`ttakit.export`)."""
    if not meta:
        return {}
    if meta.get("format") != EXPORT_FORMAT:
        return {}
    try:
        return {
            "classes": meta.get("classes"),
            "input_size": parse_input_size(meta.get("input_size")),
            "channels": meta.get("channels"),
            "layout": meta.get("layout"),
            "pixel_range": meta.get("pixel_range"),
            "mean": meta.get("mean"),
            "std": meta.get("std"),
            "normalization": meta.get("normalization"),
            "outputs": meta.get("outputs"),
            "train_augmentations": meta.get("train_augmentations") or (),
        }
    except TTAKitError as exc:
        raise CheckpointError(f"{source}: its ttakit metadata is invalid ({exc})") from exc


def _parse_metadata(text: Any, source: str) -> dict[str, Any] | None:
    if text in (None, "", b""):
        return None
    try:
        data = json.loads(text.decode("utf-8") if isinstance(text, bytes) else text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{source}: its {METADATA_KEY} metadata is not valid JSON ({exc})") from exc
    return data if isinstance(data, dict) else None


def _load_predictor(source: Predictor, options: dict[str, Any]) -> Predictor:
    return source


def _load_checkpoint(source: Any, options: dict[str, Any]) -> Predictor:
    from .models import load_checkpoint

    model, meta = load_checkpoint(source)
    found = {
        "classes": meta.classes,
        "input_size": (int(meta.image_size[0]), int(meta.image_size[1])),
        "channels": meta.in_channels,
        "layout": "nchw",
        "pixel_range": "0-1",
        "mean": meta.mean,
        "std": meta.std,
        "normalization": "model",  # the model's first layer normalizes (models.registry.Normalize)
        "outputs": "logits",
        "train_augmentations": meta.train_augmentations,
    }
    predictor = _build(model, "checkpoint", source, options, found)
    predictor.meta = meta
    return predictor


def _load_module(source: nn.Module, options: dict[str, Any]) -> Predictor:
    found: dict[str, Any] = {}
    children = list(source.children())
    last = children[-1] if children else None
    if isinstance(last, nn.Softmax):
        found["outputs"] = "probs"
    from .models.registry import Normalize

    first = children[0] if children else None
    if isinstance(first, Normalize):  # a ttakit architecture: normalizes itself, returns logits
        found.update(
            outputs="logits",
            normalization="model",
            mean=first.mean.flatten().tolist(),
            std=first.std.flatten().tolist(),
            channels=int(first.mean.numel()),
        )
    return _build(source.eval(), "module", source, options, found)


@contextlib.contextmanager
def _quiet_loader():
    """Silence what torch's loaders log and warn while they try a file (torch.export logs a
    13-line traceback for a file that is not its archive): the one-line error that follows says
    what went wrong. The loggers' levels are restored afterwards."""
    loggers = [logging.getLogger(name) for name in ("torch", "torch.export", "torch._export", "torch.jit",
                                                    "torch.export.pt2_archive")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _load_pt2(source: Any, options: dict[str, Any]) -> Predictor:
    if isinstance(source, (str, os.PathLike)):
        extra = {METADATA_KEY: ""}
        # torch.export.load falls back to pickle for objects its weights-only loader refuses;
        # forcing weights-only keeps untrusted archives from running code.
        previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
        os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
        try:
            with _quiet_loader():
                program = torch.export.load(source, extra_files=extra)
        except Exception as exc:
            raise CheckpointError(
                f"{source} is not a readable torch.export archive ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
            ) from exc
        finally:
            if previous is None:
                os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
            else:
                os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous
        found = _from_metadata(_parse_metadata(extra.get(METADATA_KEY), str(source)), str(source))
    else:
        program, found = source, {}
    shape = _pt2_input_shape(program)
    if shape is not None and len(shape) == 4:
        found = {**_shape_settings(shape, options.get("layout") or found.get("layout")), **found}
    return _build(program.module(), "pt2", source, options, found)


def _pt2_input_shape(program: Any) -> list[Any] | None:
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in program.graph_signature.user_inputs:
            value = node.meta.get("val")
            if value is not None and hasattr(value, "shape"):
                return [int(d) if isinstance(d, int) or str(d).isdigit() else None for d in value.shape]
    return None


def _load_torchscript(source: Any, options: dict[str, Any]) -> Predictor:
    extra = {METADATA_KEY: ""}
    try:
        with _quiet_loader():  # the user chose TorchScript: no deprecation nagging, no loader log
            module = torch.jit.load(str(source), map_location="cpu", _extra_files=extra)
    except Exception as exc:
        raise CheckpointError(
            f"{source} is not a readable TorchScript file ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
        ) from exc
    found = _from_metadata(_parse_metadata(extra.get(METADATA_KEY), str(source)), str(source))
    return _build(module.eval(), "torchscript", source, options, found)


def _guess_layout(dims: list[Any]) -> str | None:
    """NCHW or NHWC from a 4-d shape: the channel axis holds 1, 3 or 4 and the other two agree."""
    first, last = dims[1] in (1, 3, 4), dims[3] in (1, 3, 4)
    if first != last:
        return "nchw" if first else "nhwc"
    if not first:
        return None
    if dims[2] == dims[3] and dims[1] != dims[2]:
        return "nchw"  # (C, S, S)
    if dims[1] == dims[2] and dims[3] != dims[1]:
        return "nhwc"  # (S, S, C)
    if dims[1] != dims[3]:
        return "nchw" if dims[1] < dims[3] else "nhwc"
    return None


def _shape_settings(shape: Sequence[Any], layout: str | None) -> dict[str, Any]:
    """Layout, channels and input size from a 4-d input shape whose unknown dims are None."""
    dims = list(shape)
    if layout is None:
        layout = _guess_layout(dims)
        if layout is None:
            return {}
    channels, height, width = (dims[1], dims[2], dims[3]) if layout == "nchw" else (dims[3], dims[1], dims[2])
    settings: dict[str, Any] = {"layout": layout, "channels": channels}
    if height is not None and width is not None:
        settings["input_size"] = (int(height), int(width))
    return settings


class _OnnxRunner:
    """Calls an onnxruntime session on a torch batch (CPU NumPy in, torch out)."""

    def __init__(self, session: Any, input_name: str, input_type: str):
        self.session = session
        self.input_name = input_name
        self.dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
                      "tensor(uint8)": np.uint8}[input_type]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        if self.dtype == np.uint8:
            array = np.clip(np.rint(array), 0, 255)
        outputs = self.session.run(None, {self.input_name: array.astype(self.dtype, copy=False)})
        return torch.from_numpy(np.asarray(outputs[0], dtype=np.float32))


def _load_onnx(source: Any, options: dict[str, Any]) -> Predictor:
    try:
        import onnxruntime
    except ImportError as exc:
        raise _missing("onnx", f"ONNX model {source}", exc) from exc
    try:
        session_options = onnxruntime.SessionOptions()
        session_options.log_severity_level = 4  # fatal only: a failure is reported as one line below
        session = onnxruntime.InferenceSession(str(source), session_options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise CheckpointError(
            f"{source} is not a loadable ONNX model ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
        ) from exc
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise InvalidInputError(
            f"ONNX model {source} takes {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); ttakit needs one image input"
        )
    spec = inputs[0]
    if spec.type not in ("tensor(float)", "tensor(float16)", "tensor(double)", "tensor(uint8)"):
        raise InvalidInputError(f"ONNX model {source} takes {spec.type} input; ttakit feeds float or uint8 images")
    shape = [d if isinstance(d, int) and d > 0 else None for d in spec.shape]
    if len(shape) != 4:
        raise InvalidInputError(
            f"ONNX model {source} takes input of shape {spec.shape}; expected 4 dims (NCHW or NHWC)"
        )
    metadata = session.get_modelmeta().custom_metadata_map
    found = _from_metadata(_parse_metadata(metadata.get(METADATA_KEY), str(source)), str(source))
    detected = _shape_settings(shape, options.get("layout") or found.get("layout"))
    if not detected:
        raise InvalidInputError(
            f"cannot tell the layout of ONNX model {source} from its input shape {spec.shape}; pass layout='nchw' or 'nhwc' (--layout)"
        )
    found = {**detected, **found}
    if spec.type == "tensor(uint8)":
        found["pixel_range"] = "0-255"
    if "input_size" not in detected and options.get("input_size") is None and found.get("input_size") is None:
        raise InvalidInputError(
            f"ONNX model {source} has a dynamic input size (input shape {spec.shape}); pass input_size (--input-size HxW, like 224x224)"
        )
    if options.get("input_size") is not None and "input_size" in detected and detected["input_size"] != options["input_size"]:
        raise InvalidInputError(
            f"input_size {options['input_size']} does not match ONNX model {source}, whose input is fixed at {detected['input_size']}"
        )
    if isinstance(spec.shape[0], int) and spec.shape[0] > 0:
        found["fixed_batch"] = int(spec.shape[0])
    return _build(_OnnxRunner(session, spec.name, spec.type), "onnx", source, options, found)


def _import_keras(source: Any) -> Any:
    existing = sys.modules.get("keras")
    if existing is not None:
        backend = existing.backend.backend()
        if backend != "torch":
            raise InvalidInputError(
                f"Keras is already imported with the {backend!r} backend; ttakit runs Keras models on the torch "
                "backend: set KERAS_BACKEND=torch before anything imports keras (or load the model first)"
            )
        return existing
    os.environ["KERAS_BACKEND"] = "torch"
    try:
        import keras
    except ImportError as exc:
        raise _missing("keras", f"Keras model {source}", exc) from exc
    if keras.backend.backend() != "torch":  # pragma: no cover - keras reads the env var at import
        raise InvalidInputError(f"Keras started with the {keras.backend.backend()!r} backend; set KERAS_BACKEND=torch")
    return keras


def keras_outputs(model: Any) -> str | None:
    """``"probs"`` when a Keras model ends in a softmax, ``"logits"`` when it ends linear, else None."""
    keras = sys.modules["keras"]
    layer = model.layers[-1] if getattr(model, "layers", None) else None
    if layer is None:
        return None
    if isinstance(layer, keras.layers.Softmax):
        return "probs"
    activation = getattr(layer, "activation", None)
    name = getattr(activation, "__name__", None) or (activation if isinstance(activation, str) else None)
    if name == "softmax":
        return "probs"
    if name == "linear":
        return "logits"
    return None


class _KerasRunner:
    def __init__(self, model: Any):
        self.model = model

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x.detach().contiguous(), training=False)
        if not isinstance(out, torch.Tensor):
            out = torch.as_tensor(np.asarray(out))
        return out.detach()


def _load_keras(source: Any, options: dict[str, Any]) -> Predictor:
    try:
        import h5py  # noqa: F401  (needed for .h5; a clear message beats Keras' own)
    except ImportError as exc:
        if str(source).lower().endswith((".h5", ".hdf5")):
            raise _missing("keras", f"Keras model {source}", exc) from exc
    keras = _import_keras(source)
    try:
        model = keras.saving.load_model(str(source), compile=False, safe_mode=True)
    except Exception as exc:
        raise CheckpointError(
            f"{source} is not a loadable Keras model ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
        ) from exc
    shape = model.input_shape
    if isinstance(shape, list):
        if len(shape) != 1:
            raise InvalidInputError(f"Keras model {source} has {len(shape)} inputs; ttakit needs one image input")
        shape = shape[0]
    shape = [d if isinstance(d, int) else None for d in shape]
    if len(shape) != 4:
        raise InvalidInputError(f"Keras model {source} takes input of shape {tuple(shape)}; expected (B, H, W, C) images")
    layout = options.get("layout") or ("nchw" if keras.config.image_data_format() == "channels_first" else None)
    found = _shape_settings(shape, layout) or {"layout": "nhwc"}
    found["outputs"] = keras_outputs(model)
    if found.get("input_size") is None and options.get("input_size") is None:
        raise InvalidInputError(
            f"Keras model {source} has a dynamic input size (input shape {tuple(shape)}); pass input_size (--input-size HxW)"
        )
    return _build(_KerasRunner(model), "keras", source, options, found)


class _NumpyRunner:
    def __init__(self, function: Callable[[np.ndarray], Any]):
        self.function = function

    def __call__(self, x: torch.Tensor) -> Any:
        return self.function(x.detach().to("cpu", torch.float32).contiguous().numpy())


def _load_callable(source: Callable[[np.ndarray], Any], options: dict[str, Any]) -> Predictor:
    return _build(_NumpyRunner(source), "callable", source, options, {})


def _import_target(source: str) -> Any:
    """The object ``file.py:name`` (by file path) or ``module:name`` (the current folder is
    searched first, as ``python -m`` does) names."""
    import importlib.util

    match = _FILE_SPEC.match(source)
    if match:
        file, attribute = Path(match["file"]), match["attribute"]
        if not file.is_file():
            raise DataNotFoundError(f"model {source!r}: file {str(file)!r} does not exist (expected FILE.py:FUNCTION)")
        spec = importlib.util.spec_from_file_location(f"_ttakit_user_model_{abs(hash(str(file.resolve())))}", file)
        target: Any = importlib.util.module_from_spec(spec)
        folder = str(file.resolve().parent)
        sys.path.insert(0, folder)  # its own imports of modules beside it
        try:
            spec.loader.exec_module(target)
        except Exception as exc:
            raise InvalidInputError(
                f"model {source!r}: running {str(file)!r} failed ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
            ) from exc
        finally:
            if sys.path and sys.path[0] == folder:
                sys.path.pop(0)
        where = f"file {str(file)!r}"
    else:
        module_name, _, attribute = source.partition(":")
        sys.path.insert(0, os.getcwd())  # module:function from the current folder without PYTHONPATH=.
        try:
            target = importlib.import_module(module_name)
        except ImportError as exc:
            raise InvalidInputError(
                f"model {source!r}: cannot import module {module_name!r} ({exc}); give FILE.py:FUNCTION, or put "
                "its folder on PYTHONPATH"
            ) from exc
        finally:
            if sys.path and sys.path[0] == os.getcwd():
                sys.path.pop(0)
        where = f"module {module_name!r}"
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise InvalidInputError(f"model {source!r}: {where} has no attribute {attribute!r}")
        target = getattr(target, part)
    return target


def _is_factory(target: Any) -> bool:
    """A class or a function called with no arguments (it builds the model), not a predict function."""
    import inspect

    if isinstance(target, type):
        return True
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return False
    return not any(
        p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        for p in signature.parameters.values()
    )


class _TorchRunner:
    """A callable over torch tensors (what a model factory may return instead of an nn.Module)."""

    def __init__(self, function: Callable[[torch.Tensor], Any]):
        self.function = function

    def __call__(self, x: torch.Tensor) -> Any:
        with torch.inference_mode():
            return self.function(x)


def _load_import(source: str, options: dict[str, Any]) -> Predictor:
    """``module:function`` or ``file.py:function``: an ``nn.Module``; a function of no arguments
    (or a class) that builds an ``nn.Module`` or returns a callable over torch tensors; or a
    function over NumPy batches (one argument: the batch)."""
    target = _import_target(source)
    if not isinstance(target, nn.Module) and callable(target) and _is_factory(target):
        try:
            built = target()
        except Exception as exc:
            raise InvalidInputError(
                f"model {source!r}: calling it to build the model failed ({type(exc).__name__}: "
                f"{' '.join(str(exc).split())[:200]})"
            ) from exc
        if isinstance(built, nn.Module):
            predictor = _load_module(built, options)
        elif callable(built):
            predictor = _build(_TorchRunner(built), "callable", source, options, {})
        else:
            raise InvalidInputError(
                f"model {source!r} returned a {type(built).__name__}; a function of no arguments must return an "
                "nn.Module or a callable over (B, C, H, W) torch tensors"
            )
    elif isinstance(target, nn.Module):
        predictor = _load_module(target, options)
    elif callable(target):
        predictor = _build(_NumpyRunner(target), "callable", source, options, {})
    else:
        raise InvalidInputError(f"model {source!r} is a {type(target).__name__}, not a callable or nn.Module")
    predictor.source = source
    return predictor


# --------------------------------------------------------------------------- device and AMP


def resolve_device(device: str | torch.device | None) -> torch.device | None:
    """``cpu``, ``cuda``, ``cuda:N`` or ``mps`` as a torch device, refused when absent here: the
    one device parser, :func:`ttakit.engine.check_device` (``--device`` on every command).

    Raises:
        InvalidInputError: an unknown form, or a device this machine does not have.
    """
    from .engine import check_device

    return check_device(device)


class _Autocast(nn.Module):
    """Runs ``model`` under ``torch.autocast`` (bfloat16 on CPU, float16 on CUDA/MPS); float32 out."""

    def __init__(self, model: nn.Module, device_type: str):
        super().__init__()
        self.model = model
        self.device_type = device_type
        self.outputs = getattr(model, "outputs", "logits")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.bfloat16 if self.device_type == "cpu" else torch.float16
        with torch.autocast(self.device_type, dtype=dtype):
            out = self.model(x)
        return out.float()


def prepare_model(model: Any, device: str | torch.device | None = None, amp: bool = False) -> Any:
    """``model`` moved to ``device`` (an ``nn.Module``) and, with ``amp``, run under autocast: the
    ``--device``/``--amp`` options of evaluate and search, for code that takes a model."""
    target = resolve_device(device)
    if target is not None and isinstance(model, nn.Module):
        model = model.to(target)
    if amp:
        device_type = target.type if target is not None else "cpu"
        model = _Autocast(model, device_type).eval() if isinstance(model, nn.Module) else model
    return model


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
