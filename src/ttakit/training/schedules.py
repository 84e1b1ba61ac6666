"""Learning-rate schedules, discriminative rates and the optimizer."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import unknown_name
from .config import SCHEDULES, TrainConfig


def schedule_factor(
    schedule: str,
    step: int,
    total_steps: int,
    cycle_steps: int | None = None,
    pct_start: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
) -> float:
    """The multiplier of the peak rate at optimizer step ``step`` (0-based) of ``total_steps``.

    - ``constant``: 1.
    - ``onecycle`` (the rates of ``torch.optim.lr_scheduler.OneCycleLR`` with cosine annealing):
      ``1/25`` at step 0, rising along a half cosine to 1 at step ``0.3 * T - 1``, then falling
      to ``1 / (25 * 1e4)`` at the last step ``T - 1``.
    - ``cosine``: ``(1 + cos(pi * step / T)) / 2``: 1 at step 0, 0.5 at step ``T / 2``.
    - ``sgdr``: the same cosine within each cycle of ``C = cycle_steps`` steps, restarting at 1
      on steps ``0, C, 2C, ...``; 0.5 at ``C / 2`` of every cycle.

    Example:
        >>> round(schedule_factor("onecycle", 0, 100), 6), schedule_factor("onecycle", 29, 100)
        (0.04, 1.0)
        >>> schedule_factor("sgdr", 100, 200, cycle_steps=100), schedule_factor("sgdr", 150, 200, cycle_steps=100)
        (1.0, 0.5)
    """
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * step / max(total_steps, 1)))
    if schedule == "sgdr":
        cycle = max(int(cycle_steps or total_steps), 1)
        return 0.5 * (1.0 + math.cos(math.pi * (step % cycle) / cycle))
    if schedule == "onecycle":
        initial, low = 1.0 / div_factor, 1.0 / (div_factor * final_div_factor)

        def anneal(start: float, end: float, pct: float) -> float:
            return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1.0)

        peak_step = float(pct_start * total_steps) - 1
        last_step = total_steps - 1
        if peak_step > 0 and step <= peak_step:
            return anneal(initial, 1.0, step / peak_step)
        start = max(peak_step, 0.0)
        if last_step <= start:
            return 1.0
        return anneal(1.0, low, min((step - start) / (last_step - start), 1.0))
    raise unknown_name("schedule", schedule, SCHEDULES)


def slice_rates(low: float, high: float, groups: int) -> list[float]:
    """Rates spread geometrically from ``low`` (first group) to ``high`` (last group, the head).

    Example:
        >>> [round(r, 6) for r in slice_rates(1e-4, 1e-2, 3)]
        [0.0001, 0.001, 0.01]
    """
    if groups == 1:
        return [float(high)]
    return [float(low * (high / low) ** (i / (groups - 1))) for i in range(groups)]


# ----------------------------------------------------------------------------- transfer


def _make_optimizer(config: TrainConfig, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=0.9, nesterov=True, weight_decay=config.weight_decay)
    return torch.optim.Adam(groups, weight_decay=config.weight_decay)


# ----------------------------------------------------------------------------- training
