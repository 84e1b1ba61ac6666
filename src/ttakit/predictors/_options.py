"""Option checks shared by the loaders: input size, layout, pixel range, outputs, mean/std,
class names, channels; the metadata key and the missing-extra error."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..errors import DataNotFoundError, InvalidInputError, TTAKitError

Layout = Literal["nchw", "nhwc"]


PixelRange = Literal["0-1", "0-255"]


Outputs = Literal["logits", "probs"]


LAYOUTS = ("nchw", "nhwc")


PIXEL_RANGES = ("0-1", "0-255")


OUTPUTS = ("logits", "probs")


# What a model predicts: class scores (B, classes), or a dense output that the task's wrapper
# de-augments and merges (segmentation (B, classes, H, W), detection boxes, keypoints (B, 2N)).
TASKS = ("classification", "segmentation", "detection", "keypoints")


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


def _check_channels(channels: Any) -> int | None:
    if channels is None:
        return None
    if isinstance(channels, bool) or not isinstance(channels, (int, np.integer)) or channels < 1:
        raise InvalidInputError(f"channels must be a positive integer (1 gray, 3 RGB, 4 RGBA), got {channels!r}")
    return int(channels)
