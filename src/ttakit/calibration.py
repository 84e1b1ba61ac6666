"""Temperature scaling of merged class probabilities."""

from __future__ import annotations

import torch

from .errors import InvalidInputError

__all__ = ["apply_temperature"]


def apply_temperature(probs: torch.Tensor, temperature: float, class_dim: int = 1) -> torch.Tensor:
    """Calibrate probabilities ``probs: (N, C)`` with ``temperature``: ``softmax(log(p) / T)``.

    The merged output of a policy is a probability vector; its log is a logit vector up to a
    constant, so this is ordinary temperature scaling of the merged prediction. ``T > 1``
    softens, ``T < 1`` sharpens, and the argmax never changes.
    """
    if not temperature > 0:
        raise InvalidInputError(f"temperature must be positive, got {temperature}")
    if temperature == 1.0:
        return probs
    return torch.softmax(torch.log(probs.clamp_min(1e-12)) / temperature, dim=class_dim)
