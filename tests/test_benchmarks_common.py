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


@pytest.mark.parametrize("order", ["rotate", "shuffle", "after-itself"])
def test_every_contender_times_every_batch_once_per_round(order: str) -> None:
    log: list[tuple[str, int]] = []
    times = time_rounds(_recording(log), _batches(), rounds=3, device=torch.device("cpu"), warmup=0, order=order)
    assert set(times) == {"a", "b", "c"}
    assert all(len(rounds) == 3 and all(len(r) == 4 for r in rounds) for rounds in times.values())
    for name in "abc":
        calls = [i for who, i in log if who == name]
        expected_calls = 3 * 4 * (2 if order == "after-itself" else 1)
        assert len(calls) == expected_calls


def test_after_itself_times_each_call_right_after_the_same_contender() -> None:
    log: list[tuple[str, int]] = []
    time_rounds(_recording(log), _batches(), rounds=2, device=torch.device("cpu"), warmup=0, order="after-itself")
    # Calls come in pairs: an untimed call on the previous batch, then the timed one, same contender.
    assert len(log) % 2 == 0
    for (first, previous), (second, batch) in zip(log[::2], log[1::2], strict=True):
        assert first == second
        assert previous == (batch - 1) % 4


def test_shuffle_lets_each_contender_follow_the_others() -> None:
    log: list[tuple[str, int]] = []
    time_rounds(_recording(log), _batches(8), rounds=6, device=torch.device("cpu"), warmup=0, order="shuffle")
    followed = {(before[0], after[0]) for before, after in zip(log[:-1], log[1:], strict=True) if before[0] != after[0]}
    assert followed == {(x, y) for x in "abc" for y in "abc" if x != y}


def test_unknown_order_is_refused() -> None:
    with pytest.raises(ValueError, match="order must be"):
        time_rounds(_recording([]), _batches(), rounds=1, device=torch.device("cpu"), order="blocked")


def test_least_disturbed_sums_each_batchs_fastest_round() -> None:
    assert least_disturbed([[3.0, 1.0], [2.0, 5.0]]) == 2.0 + 1.0
