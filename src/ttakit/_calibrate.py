"""Recalibrating a merged output: temperature scaling (``softmax(log(p) / T)``) and matrix scaling
(``softmax(W log(p) + b)``, Guo et al. 2017), on probabilities, logits or sigmoid outputs."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch

from ._merge_checks import PROB_FLOOR, _at_least_float32, _show
from .errors import InvalidInputError


def check_temperature(temperature: object, name: str = "temperature") -> float | None:
    """``None`` or a positive finite number, as a float."""
    if temperature is None:
        return None
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, numbers.Real)
        or not math.isfinite(temperature)
        or not temperature > 0
    ):
        raise InvalidInputError(
            f"Expected argument `{name}` to be a positive number (or None for no temperature), but got {temperature!r}"
        )
    return float(temperature)


def apply_temperature(probs: torch.Tensor, temperature: float | None, class_dim: int = -1) -> torch.Tensor:
    """Temperature-scale merged probabilities ``probs`` ``(..., C, ...)``: ``softmax(log(p) / T)``
    over ``class_dim`` (default the last dimension).

    A merged output is a probability vector; its log is a logit vector up to a constant, so this
    is ordinary temperature scaling of the merged prediction. ``T > 1`` softens, ``T < 1``
    sharpens, the argmax never changes, and ``temperature=None`` returns ``probs`` unchanged.

    Example:
        >>> apply_temperature(torch.tensor([[0.8, 0.2]]), 2.0)
        tensor([[0.6667, 0.3333]])
    """
    temperature = check_temperature(temperature)
    if temperature is None:
        return probs
    return torch.softmax(torch.log(_at_least_float32(probs).clamp_min(PROB_FLOOR)) / temperature, dim=class_dim)


def check_matrix_scaling(value: object, name: str = "matrix_scaling") -> dict[str, list] | None:
    """``None``, or matrix scaling as plain lists: ``{"weight": C lists of C numbers, "bias": C numbers}``.

    Accepts lists or tensors for either entry; every number must be finite.
    """
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"weight", "bias"}:
        raise InvalidInputError(
            f'Expected argument `{name}` to be {{"weight": C lists of C numbers, "bias": C numbers}} (or None), '
            f"but got {_show(value)}"
        )
    try:
        weight = torch.as_tensor(value["weight"], dtype=torch.float64)
        bias = torch.as_tensor(value["bias"], dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise InvalidInputError(f"Expected `{name}` to hold numbers, but got {_show(value)}") from None
    if weight.ndim != 2 or weight.shape[0] != weight.shape[1] or weight.shape[0] < 2 or bias.shape != weight.shape[:1]:
        raise InvalidInputError(
            f"Expected `{name}` to hold a (C, C) weight and a (C,) bias with C >= 2, but got weight "
            f"{tuple(weight.shape)} and bias {tuple(bias.shape)}"
        )
    if not (torch.isfinite(weight).all() and torch.isfinite(bias).all()):
        raise InvalidInputError(f"Expected `{name}` to hold finite numbers, but it holds NaN/inf")
    return {"weight": weight.tolist(), "bias": bias.tolist()}


def apply_matrix_scaling(
    x: torch.Tensor,
    weight: torch.Tensor | Sequence[Sequence[float]],
    bias: torch.Tensor | Sequence[float],
    class_dim: int = -1,
    *,
    probs: bool = True,
) -> torch.Tensor:
    """Matrix scaling (Guo et al. 2017) of merged scores ``x`` ``(..., C, ...)`` over ``class_dim``.

    Probabilities (``probs=True``): ``softmax(W log(p) + b)``; raw logits: ``W z + b``. ``W = I / T``,
    ``b = 0`` is temperature scaling; a full ``W`` and ``b`` also correct the class biases a model
    shows on held-out data, so unlike a temperature it can change the argmax.

    Args:
        x: merged probabilities or logits, ``C`` classes along ``class_dim``.
        weight: ``(C, C)``; bias: ``(C,)``.

    Example:
        >>> p = torch.tensor([[0.8, 0.2]])
        >>> apply_matrix_scaling(p, torch.eye(2) / 2, torch.zeros(2))  # = apply_temperature(p, 2.0)
        tensor([[0.6667, 0.3333]])
    """
    x = _at_least_float32(x)
    w = torch.as_tensor(weight, dtype=x.dtype, device=x.device)
    b = torch.as_tensor(bias, dtype=x.dtype, device=x.device)
    if x.ndim == 0 or not -x.ndim <= class_dim < x.ndim:
        raise InvalidInputError(f"class_dim={class_dim} does not fit merged scores of shape {tuple(x.shape)}")
    classes = x.shape[class_dim]
    if w.shape != (classes, classes) or b.shape != (classes,):
        raise InvalidInputError(
            f"matrix scaling holds {w.shape[0]}-class weights, but the merged output has {classes} classes along "
            f"dimension {class_dim} (shape {tuple(x.shape)}): it was fitted for another model"
        )
    z = x.clamp_min(PROB_FLOOR).log() if probs else x
    z = z.movedim(class_dim, -1) @ w.T + b
    return (torch.softmax(z, dim=-1) if probs else z).movedim(-1, class_dim)


def calibrate(
    x: torch.Tensor,
    temperature: float | None = None,
    matrix_scaling: Mapping[str, Any] | None = None,
    class_dim: int = -1,
    *,
    space: Literal["probs", "raw", "sigmoid"] = "probs",
) -> torch.Tensor:
    """A policy's calibration on merged scores ``x``: its temperature, then its matrix scaling
    (either may be None). The one implementation: the engine and the search apply it.

    ``space`` says what ``x`` holds: ``"probs"`` (``softmax(log(p) / T)``, then
    ``softmax(W log(p) + b)``), ``"raw"`` logits (``z / T``, then ``W z + b``) or ``"sigmoid"``
    outputs (``sigmoid(logit(p) / T)``; no matrix scaling).

    Args:
        x: merged scores, ``C`` classes along ``class_dim``.
        temperature: a positive number or None.
        matrix_scaling: ``{"weight": (C, C), "bias": (C,)}`` (lists or tensors) or None.

    Example:
        >>> calibrate(torch.tensor([[0.8, 0.2]]), 2.0)
        tensor([[0.6667, 0.3333]])
    """
    if temperature is not None:
        if space == "probs":
            x = apply_temperature(x, temperature, class_dim)
        elif space == "sigmoid":
            p = _at_least_float32(x).clamp(1e-7, 1 - 1e-7)
            x = torch.sigmoid(torch.logit(p) / temperature)
        else:
            x = _at_least_float32(x) / temperature
    if matrix_scaling is not None:
        x = apply_matrix_scaling(
            x, matrix_scaling["weight"], matrix_scaling["bias"], class_dim, probs=space == "probs"
        )
    return x
