"""Loader for a TorchScript file."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import CheckpointError
from ._build import _build, _from_metadata, _parse_metadata, _quiet_loader
from ._options import METADATA_KEY
from .predictor import Predictor


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
