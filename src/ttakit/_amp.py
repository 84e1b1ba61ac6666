"""The one mixed-precision rule (``--amp``): ``torch.autocast`` in bfloat16 on CPU, float16 on
CUDA and MPS. The engine, :func:`ttakit.predictors.prepare_model` and the trainer use it."""

from __future__ import annotations

import contextlib
from typing import Any

import torch


def amp_dtype(device_type: str) -> torch.dtype:
    """The autocast dtype on ``device_type``: bfloat16 on ``"cpu"`` (float16 is slow there),
    float16 elsewhere."""
    return torch.bfloat16 if device_type == "cpu" else torch.float16


def autocast(device_type: str, enabled: bool = True) -> Any:
    """``torch.autocast`` on ``device_type`` in :func:`amp_dtype`; a no-op context when not
    ``enabled``."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=amp_dtype(device_type))
