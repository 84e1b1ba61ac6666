"""The benchmarks' timing harness (``benchmarks/common.py``): who runs when, in each order of turns."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import least_disturbed, time_rounds  # noqa: E402


def _recording(log: list[tuple[str, int]]):
    def contender(name: str):
        def call(batch: torch.Tensor) -> None:
            log.append((name, int(batch[0])))

        return call

    return {name: contender(name) for name in ("a", "b", "c")}


def _batches(n: int = 4) -> list[torch.Tensor]:
    return [torch.tensor([i]) for i in range(n)]


def _timed_calls(log: list[tuple[str, int]], order: str) -> list[tuple[str, int]]:
    """The timed calls of ``log``: with ``after-itself`` every second call (each follows an untimed one)."""
    return log[1::2] if order == "after-itself" else log


@pytest.mark.parametrize("order", ["rotate", "shuffle", "after-itself"])
def test_every_contender_times_every_batch_once_per_round(order: str) -> None:
    log: list[tuple[str, int]] = []
    times = time_rounds(_recording(log), _batches(), rounds=3, device=torch.device("cpu"), warmup=0, order=order)
    assert set(times) == {"a", "b", "c"}
    assert all(len(rounds) == 3 and all(len(r) == 4 for r in rounds) for rounds in times.values())
    timed = _timed_calls(log, order)
    for name in "abc":
        assert [i for who, i in timed if who == name] == [0, 1, 2, 3] * 3
    # Turns are taken batch by batch: all three contenders time batch i before anyone times batch i + 1.
    assert [i for _, i in timed] == [i for _ in range(3) for i in range(4) for _ in range(3)]


def test_after_itself_times_each_call_right_after_the_same_contender() -> None:
    log: list[tuple[str, int]] = []
    time_rounds(_recording(log), _batches(), rounds=2, device=torch.device("cpu"), warmup=0, order="after-itself")
    # Calls come in pairs: an untimed call on the previous batch, then the timed one, same contender.
    for (first, previous), (second, batch) in zip(log[::2], log[1::2], strict=True):
        assert first == second
        assert previous == (batch - 1) % 4


@pytest.mark.parametrize("order", ["rotate", "shuffle"])
def test_turn_orders_within_a_batch(order: str) -> None:
    log: list[tuple[str, int]] = []
    time_rounds(_recording(log), _batches(8), rounds=6, device=torch.device("cpu"), warmup=0, order=order)
    turns = [log[k : k + 3] for k in range(0, len(log), 3)]  # one batch's three calls
    followed = {(x[0], y[0]) for turn in turns for x, y in zip(turn[:-1], turn[1:], strict=True)}
    if order == "rotate":  # a rotation of (a, b, c): the same neighbours every time
        assert followed == {("a", "b"), ("b", "c"), ("c", "a")}
    else:  # a random order: each contender follows each other one
        assert followed == {(x, y) for x in "abc" for y in "abc" if x != y}


def test_unknown_order_is_refused() -> None:
    with pytest.raises(ValueError, match="order must be"):
        time_rounds(_recording([]), _batches(), rounds=1, device=torch.device("cpu"), order="blocked")


def test_least_disturbed_sums_each_batchs_fastest_round() -> None:
    assert least_disturbed([[3.0, 1.0], [2.0, 5.0]]) == 2.0 + 1.0
