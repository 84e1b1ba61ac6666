"""Where the engine runs: checking a device argument, comparing devices, finding a model's device, and
putting a model in eval mode for a block."""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn

from .errors import InvalidInputError

_DEVICE_FORMS = "'cpu', 'cuda', 'cuda:N' (N = 0, 1, ...), 'mps' or a torch.device"


def check_device(device: object) -> torch.device | None:
    """``None`` or a usable device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"`` or a ``torch.device``.

    Raises :class:`InvalidInputError` naming the value and the valid forms, or saying that CUDA /
    MPS is not available on this machine.
    """
    if device is None:
        return None
    if isinstance(device, torch.device):
        parsed = device
    elif isinstance(device, str):
        try:
            parsed = torch.device(device.strip())
        except (RuntimeError, ValueError):
            raise InvalidInputError(f"device must be one of {_DEVICE_FORMS}, got {device!r}") from None
    else:
        raise InvalidInputError(f"device must be one of {_DEVICE_FORMS}, got {type(device).__name__} {device!r}")
    if parsed.type == "cpu":
        return parsed
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidInputError(
                f"device {device!r}: CUDA is not available on this machine (torch {torch.__version__}, "
                f"CUDA build: {torch.version.cuda is not None}); use device='cpu'"
            )
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise InvalidInputError(
                f"device {device!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
            )
        return parsed
    if parsed.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise InvalidInputError(f"device {device!r}: MPS (Apple GPU) is not available on this machine; use 'cpu'")
        return parsed
    raise InvalidInputError(f"device must be one of {_DEVICE_FORMS}, got {device!r}")


class eval_mode:  # noqa: N801 - used like a function: ``with eval_mode(model):``
    """Put an ``nn.Module`` in eval mode for the block and restore its mode afterwards (any other
    callable is left alone)."""

    def __init__(self, model: Any):
        self.model = model
        self.was_training = bool(getattr(model, "training", False))

    def __enter__(self) -> None:
        if self.was_training and hasattr(self.model, "eval"):
            self.model.eval()

    def __exit__(self, *exc: object) -> None:
        if self.was_training and hasattr(self.model, "train"):
            self.model.train(True)


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two devices are the same; "cuda" (no index) is the current CUDA device."""
    if a.type != b.type:
        return False
    if a.index is None or b.index is None:
        if a.type != "cuda":
            return True
        current = torch.cuda.current_device()
        return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)
    return a.index == b.index


def _first_tensor(model: Any) -> torch.Tensor | None:
    if isinstance(model, nn.Module):
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            return tensor
    return None
