"""Opt-in choice of how many images each forward pass holds, by timing (the engine's
``pass_size="auto"``, like ``torch.backends.cudnn.benchmark``).

How views are batched changes speed, never results (the engine's answers, checks and errors do
not depend on its plan beyond float rounding): stacking the views of a small batch into one pass
usually saves the model's fixed cost per call, but on CPU a pass of a few images can run slower
per image than separate passes, and a large pass slower per image than passes of 32 (caches).
Which wins depends on the model, the batch size and the machine. The engine's default plan is
fixed (no timing); with ``pass_size="auto"`` the first calls of each input shape try each
distinct plan in turn (real calls, whose outputs are used: nothing runs twice), then every later
call uses the fastest.

A *plan* is how one call of ``batch`` images and ``n_views`` views is cut: chunks of ``chunk``
images, ``per_pass`` views of a chunk stacked into one forward pass. Pass sizes that give the
same plan are one candidate. The tuner reads time from ``clock`` (default
:func:`time.perf_counter`), so tests can drive it with a fake clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence
from typing import NamedTuple

__all__ = ["PassPlan", "PassTuner", "pass_plan", "candidate_pass_sizes"]

# Calls per candidate before choosing: the fastest of 5 shrugs off a few disturbed calls.
TRIALS = 5
# Another plan replaces the default only when this much faster: noise must not flip a tie.
MARGIN = 0.03
# Input shapes tuned per engine (each is a few floats); shapes beyond it use the default plan.
MAX_SHAPES = 64


class PassPlan(NamedTuple):
    chunk: int  # images per chunk
    per_pass: int  # views of a chunk per forward pass


def pass_plan(batch: int, n_views: int, pass_size: int) -> PassPlan:
    """The plan a pass size gives a call of ``batch`` images and ``n_views`` views."""
    chunk = min(batch, pass_size)
    return PassPlan(chunk, min(n_views, max(1, pass_size // chunk)))


def candidate_pass_sizes(batch: int, n_views: int, default: int, max_batch: int) -> list[int]:
    """Pass sizes with distinct plans, the reference first: ``default`` (views of a batch that
    fits it stacked into passes of ``default`` images), the whole batch (one view per pass:
    ttach's plan) and ``max_batch`` (as many views per pass as the memory bound allows). Each is
    clipped to ``[1, max_batch]``. The reference, which the others must beat by the tuner's
    margin, is the whole batch when it is larger than ``default`` and smaller than ``max_batch``
    (chunks of ``default`` must then prove themselves against ttach's plan), else ``default`` (a
    small batch: stacked views; ``max_batch`` images or a whole data set in one call: chunks of
    ``default``, the least memory, for calls that may never repeat)."""
    sizes: list[int] = []
    plans: set[PassPlan] = set()
    ttach_first = default < batch < max_batch
    order = (batch, default, max_batch) if ttach_first else (default, batch, max_batch)
    for size in order:
        size = max(1, min(size, max_batch))
        plan = pass_plan(batch, n_views, size)
        if plan not in plans:
            plans.add(plan)
            sizes.append(size)
    return sizes


class PassTuner:
    """Chooses a pass size per input shape from the wall time of real calls.

    ``choose(key, candidates)`` gives the pass size for a call; ``record(key, size, seconds)``
    reports how long the call took, measured with ``clock`` (seconds, monotonic). After ``trials``
    calls of every candidate, the one with the lowest minimum time is kept for ``key`` from then
    on; the first candidate (the default) is kept unless another is at least ``margin`` faster.
    """

    def __init__(
        self,
        trials: int = TRIALS,
        max_shapes: int = MAX_SHAPES,
        margin: float = MARGIN,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.trials = trials
        self.margin = margin
        self.max_shapes = max_shapes
        self.clock = clock
        self.chosen: dict[Hashable, int] = {}
        self._times: dict[Hashable, dict[int, list[float]]] = {}

    def choose(self, key: Hashable, candidates: Sequence[int]) -> tuple[int, bool]:
        """``(pass size, whether to time this call)`` for a call with input ``key``."""
        size = self.chosen.get(key)
        if size is not None:
            return size, False
        times = self._times.get(key)
        if times is None:
            if len(candidates) == 1 or len(self.chosen) + len(self._times) >= self.max_shapes:
                if len(candidates) == 1 and len(self.chosen) < self.max_shapes:
                    self.chosen[key] = candidates[0]
                return candidates[0], False
            times = self._times[key] = {size: [] for size in candidates}
        # The candidate tried least so far (the default first on ties).
        return min(times, key=lambda s: len(times[s])), True

    def record(self, key: Hashable, size: int, seconds: float) -> None:
        times = self._times.get(key)
        if times is None or size not in times:
            return
        times[size].append(seconds)
        if all(len(t) >= self.trials for t in times.values()):
            fastest = {s: min(t) for s, t in times.items()}
            default = next(iter(fastest))
            best = min(fastest, key=fastest.__getitem__)
            self.chosen[key] = best if fastest[best] < (1 - self.margin) * fastest[default] else default
            del self._times[key]
