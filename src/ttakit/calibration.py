"""Temperature scaling of merged class probabilities."""

from __future__ import annotations

import numbers

import torch

from .errors import InvalidInputError

__all__ = ["apply_temperature", "PROB_FLOOR"]

# log(0) would be -inf; probabilities this small carry no information a float32 softmax can use.
PROB_FLOOR = 1e-30


def apply_temperature(probs: torch.Tensor, temperature: float | None) -> torch.Tensor:
    """Temperature-scale merged probabilities ``probs: (..., C)``: ``softmax(log(p) / T)`` over the
    last dimension.

    A policy's merged output is a probability vector; its log is a logit vector up to a
    constant, so this is ordinary temperature scaling of the merged prediction. ``T > 1``
    softens, ``T < 1`` sharpens, the argmax never changes, and ``temperature=None`` returns
    ``probs`` unchanged.

    Example:
        >>> apply_temperature(torch.tensor([[0.8, 0.2]]), 2.0)
        tensor([[0.6667, 0.3333]])
    """
    if temperature is None:
        return probs
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not temperature > 0:
        raise InvalidInputError(f"Expected argument `temperature` to be a positive number, but got {temperature!r}")
    return torch.softmax(torch.log(probs.float().clamp_min(PROB_FLOOR)) / float(temperature), dim=-1)
