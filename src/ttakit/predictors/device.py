"""Device and mixed precision for code that takes a model: ``--device`` and ``--amp``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._amp import autocast


def resolve_device(device: str | torch.device | None) -> torch.device | None:
    """``cpu``, ``cuda``, ``cuda:N`` or ``mps`` as a torch device, refused when absent here: the
    one device parser, :func:`ttakit.engine.check_device` (``--device`` on every command).

    Raises:
        InvalidInputError: an unknown form, or a device this machine does not have.
    """
    from ..engine import check_device

    return check_device(device)


class _Autocast(nn.Module):
    """Runs ``model`` under ``torch.autocast`` (bfloat16 on CPU, float16 on CUDA/MPS); float32 out."""

    def __init__(self, model: nn.Module, device_type: str):
        super().__init__()
        self.model = model
        self.device_type = device_type
        self.outputs = getattr(model, "outputs", "logits")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with autocast(self.device_type):
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
