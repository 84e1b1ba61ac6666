"""Results as JSON and Markdown, written atomically."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._io import atomic_write_text
from ..errors import InvalidInputError

if TYPE_CHECKING:  # matplotlib is the optional extra ttakit[plots], imported only to draw
    pass


def _jsonable(obj: Any) -> Any:
    """Plain JSON values: tensors/arrays as lists, dataclasses as dicts, NaN/inf as null."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        return _jsonable(obj.tolist())
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        f = float(obj)
        return f if math.isfinite(f) else None
    raise InvalidInputError(
        f"Expected argument `results` to hold only JSON-serialisable values, but got a "
        f"{type(obj).__name__}: {obj!r}"
    )


def write_results(out_dir: str | os.PathLike, results: dict, markdown: str) -> tuple[Path, Path]:
    """Write ``results.json`` and ``results.md`` into ``out_dir``, each atomically.

    Tensors and NumPy values become lists/numbers, dataclasses (e.g.
    :class:`~ttakit.metrics.McNemarResult`) become objects, and NaN/inf become ``null`` so
    the file is strict JSON. ``out_dir`` is created if needed.

    Returns:
        ``(json_path, markdown_path)``.
    """
    if not isinstance(results, Mapping):
        raise InvalidInputError(
            f"Expected argument `results` to be a dict, but got {type(results).__name__}"
        )
    if not isinstance(markdown, str):
        raise InvalidInputError(
            f"Expected argument `markdown` to be a str, but got {type(markdown).__name__}"
        )
    out = Path(out_dir)
    text = json.dumps(_jsonable(results), indent=2, allow_nan=False) + "\n"
    json_path = atomic_write_text(out / "results.json", text)
    md_path = atomic_write_text(
        out / "results.md", markdown if markdown.endswith("\n") else markdown + "\n"
    )
    return json_path, md_path


# --------------------------------------------------------------------------- plots
