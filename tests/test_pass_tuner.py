"""The opt-in choice of images per forward pass by timing (ttakit._pass_tuner, the engine's
``pass_size="auto"``), driven by a fake clock: no sleeps."""

import pytest
import torch
from torch import nn

from ttakit import TTAEngine
from ttakit._pass_tuner import PassPlan, PassTuner, candidate_pass_sizes, pass_plan


class FakeClock:
    """A clock that moves only when told: ``clock()`` reads it, ``advance(seconds)`` moves it."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_pass_plan_cuts_a_call_into_chunks_and_stacked_views():
    assert pass_plan(batch=1, n_views=2, pass_size=32) == PassPlan(chunk=1, per_pass=2)
    assert pass_plan(batch=1, n_views=2, pass_size=1) == PassPlan(chunk=1, per_pass=1)
    assert pass_plan(batch=8, n_views=8, pass_size=32) == PassPlan(chunk=8, per_pass=4)
    assert pass_plan(batch=256, n_views=8, pass_size=32) == PassPlan(chunk=32, per_pass=1)
    assert pass_plan(batch=64, n_views=8, pass_size=256) == PassPlan(chunk=64, per_pass=4)


@pytest.mark.parametrize(
    ("batch", "n_views", "expected"),
    [
        (1, 2, [32, 1]),  # stacked (32 and 256 give the same plan) or one view per pass
        (256, 8, [32, 256]),  # max_batch images: chunks of 32 first (least memory), or ttach's plan
        (128, 8, [128, 32, 256]),  # ttach's whole batch per view first
        (64, 8, [64, 32, 256]),
        (32, 1, [32]),  # one view: every size gives one pass of the batch
    ],
)
def test_candidates_are_distinct_plans_with_the_reference_first(batch, n_views, expected):
    assert candidate_pass_sizes(batch, n_views, default=32, max_batch=256) == expected


def test_candidates_respect_max_batch():
    assert candidate_pass_sizes(256, 4, default=32, max_batch=16) == [16]
    # A whole data set in one call: chunks of the default first (ttach's plan does not fit).
    assert candidate_pass_sizes(10_000, 4, default=32, max_batch=256) == [32, 256]


def test_the_tuner_reads_time_from_its_clock():
    assert PassTuner().clock is not None
    clock = FakeClock()
    tuner = PassTuner(trials=1, clock=clock)
    for size, seconds in [(32, 0.5), (1, 0.1)]:
        assert tuner.choose("k", [32, 1]) == (size, True)
        start = tuner.clock()
        clock.advance(seconds)
        tuner.record("k", size, tuner.clock() - start)
    assert tuner.chosen == {"k": 1}


def test_tuner_tries_each_candidate_then_keeps_the_fastest():
    tuner = PassTuner(trials=2)
    seconds = {32: 0.5, 1: 0.1}
    tried = []
    for _ in range(4):
        size, timed = tuner.choose("k", [32, 1])
        assert timed
        tried.append(size)
        tuner.record("k", size, seconds[size])
    assert tried == [32, 1, 32, 1]  # the default first, then round robin
    assert tuner.choose("k", [32, 1]) == (1, False)
    assert tuner.chosen == {"k": 1}


def test_tuner_keeps_the_default_unless_another_is_clearly_faster():
    tuner = PassTuner(trials=1, margin=0.05)
    for size, t in [(32, 1.0), (1, 0.97)]:
        tuner.choose("k", [32, 1])
        tuner.record("k", size, t)
    assert tuner.chosen["k"] == 32  # 3% faster is within the margin


def test_tuner_keeps_the_minimum_not_the_mean():
    tuner = PassTuner(trials=3)
    for size, t in [(32, 0.2), (1, 9.0), (32, 0.2), (1, 0.1), (32, 0.2), (1, 9.0)]:
        tuner.record("k", size, t) if tuner.choose("k", [32, 1])[0] == size else pytest.fail("order")
    assert tuner.chosen["k"] == 1  # one undisturbed call at 0.1 s beats 0.2 s


def test_tuner_bounds_the_shapes_it_tunes():
    tuner = PassTuner(trials=1, max_shapes=2)
    tuner.choose("a", [32, 1])
    tuner.choose("b", [32, 1])
    assert tuner.choose("c", [32, 1]) == (32, False)  # the default, untimed


class Timed(nn.Module):
    """A model that advances a fake clock: ``per_call`` seconds per forward pass plus
    ``per_stacked`` more for a pass of more than one image."""

    def __init__(self, clock: FakeClock, per_call: float, per_stacked: float):
        super().__init__()
        self.linear = nn.Linear(16, 3)
        self.clock, self.per_call, self.per_stacked = clock, per_call, per_stacked
        self.batches: list[int] = []

    def forward(self, x):
        self.batches.append(x.shape[0])
        self.clock.advance(self.per_call + (self.per_stacked if x.shape[0] > 1 else 0.0))
        return self.linear(x.flatten(1))


def _auto_engine(model: Timed, clock: FakeClock) -> TTAEngine:
    engine = TTAEngine(model, "hflip", pass_size="auto")
    engine.pass_tuner = PassTuner(clock=clock)
    return engine


def test_engine_learns_to_run_views_one_per_pass_when_stacking_is_slower():
    clock = FakeClock()
    model = Timed(clock, per_call=0.001, per_stacked=0.03)
    engine = _auto_engine(model, clock)
    x = torch.rand(1, 1, 4, 4)
    outputs = [engine(x) for _ in range(12)]
    model.batches.clear()
    outputs.append(engine(x))
    assert model.batches == [1, 1]  # tuned: two passes of one image
    assert engine.tuned_pass_sizes == {(1, 1, 4, 4): 1}
    for out in outputs[1:]:  # every plan gives the same merge
        assert torch.allclose(out, outputs[0], atol=1e-6)


def test_engine_keeps_stacking_when_it_is_faster():
    clock = FakeClock()
    model = Timed(clock, per_call=0.03, per_stacked=0.0)  # a fixed cost per call: fewer calls win
    engine = _auto_engine(model, clock)
    for _ in range(12):
        engine(torch.rand(1, 1, 4, 4))
    model.batches.clear()
    engine(torch.rand(1, 1, 4, 4))
    assert model.batches == [2]


@pytest.mark.parametrize("pass_size", [None, 32])
def test_the_default_and_a_fixed_pass_size_are_never_tuned(pass_size):
    clock = FakeClock()
    model = Timed(clock, per_call=0.001, per_stacked=0.03)
    engine = TTAEngine(model, "hflip", pass_size=pass_size)
    assert engine.pass_tuner is None
    for _ in range(12):
        engine(torch.rand(1, 1, 4, 4))
    assert model.batches == [2] * 12
