"""Class-by-view weights (ClassTTA): saved in a policy, applied by the merge, the engine and the
wrappers exactly as the search fits them (``merge_class_weighted``), refused when malformed, and
saved by the search when they win under cross-validation."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from ttakit.aliases import get_policy
from ttakit.engine import TTAEngine
from ttakit.errors import InvalidInputError, PolicyFormatError
from ttakit.merge import apply_temperature, merge
from ttakit.policy import Policy, View
from ttakit.report import search_markdown
from ttakit.search import ViewCache, greedy_search
from ttakit.search.weights import merge_class_weighted
from ttakit.transforms import HorizontalFlip, VerticalFlip
from ttakit.wrappers import ClassificationTTAWrapper


@pytest.fixture
def linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 5)).eval()


def _class_policy(name: str = "d4", seed: int = 1) -> tuple[Policy, torch.Tensor]:
    policy = get_policy(name)
    weights = torch.rand(len(policy), 5, generator=torch.Generator().manual_seed(seed)) + 0.05
    return replace(policy, weights=weights.tolist()), weights


def test_engine_applies_class_weights_as_the_search_fits_them(linear):
    policy, weights = _class_policy()
    images = torch.rand(70, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    out = TTAEngine(linear, policy, activation="softmax").run(images, return_views=True)  # chunked path
    expected = merge_class_weighted(torch.softmax(out.views, 2), weights)
    assert out.merged.shape == (70, 5)
    assert torch.allclose(out.merged, expected, atol=1e-6)
    assert torch.allclose(out.merged.sum(1), torch.ones(70), atol=1e-6)
    # The one-pass path of a small batch, and the wrapper, give the same numbers.
    small = TTAEngine(linear, policy, activation="softmax")(images[:3])
    assert torch.allclose(small, expected[:3], atol=1e-6)
    wrapped = ClassificationTTAWrapper(linear, policy, activation="softmax")(images)
    assert torch.allclose(wrapped, expected, atol=1e-6)
    # The weights change the answer: the plain mean differs.
    plain = TTAEngine(linear, replace(policy, weights=None), activation="softmax")(images)
    assert (plain - expected).abs().max() > 1e-3


def test_engine_class_weights_with_gate_and_temperature(linear):
    policy, weights = _class_policy("hflip", seed=3)
    images = torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    raw = TTAEngine(linear, replace(policy, weights=None), activation=None).run(images, return_views=True).views
    plain = torch.softmax(raw[0], 1)
    threshold = float(plain.max(1).values.median())
    gated_policy = replace(policy, temperature=1.7, gate_threshold=threshold)
    out = TTAEngine(linear, gated_policy, activation="softmax").run(images)
    rows = plain.max(1).values < threshold
    assert 0 < int(rows.sum()) < 40
    full = apply_temperature(merge_class_weighted(torch.softmax(raw, 2), weights), 1.7)
    expected = torch.where(rows[:, None], full, plain)
    assert torch.allclose(out.merged, expected, atol=1e-6)
    assert out.passes_per_image == pytest.approx(1 + float(rows.double().mean()))


def test_merge_class_weights_by_hand():
    stack = torch.tensor([[[0.5, 0.5]], [[0.9, 0.1]]])
    weights = [[1.0, 0.0], [1.0, 3.0]]  # class 0: 0.5 + 0.9; class 1: 0 + 0.3 -> renormalised
    assert torch.allclose(merge(stack, "mean", weights=weights), torch.tensor([[1.4 / 1.7, 0.3 / 1.7]]))


def test_class_weights_json_round_trip(tmp_path):
    policy, weights = _class_policy()
    policy.save(tmp_path / "p.json")
    loaded = Policy.load(tmp_path / "p.json")
    assert loaded.class_weights and not get_policy("d4").class_weights
    assert torch.allclose(torch.tensor(loaded.weights), weights.double().float())
    assert loaded.weights == policy.weights


@pytest.mark.parametrize(
    "weights, pattern",
    [
        ([[1.0, 1.0], [1.0]], r"2 lists of the same length C.*lengths \[2, 1\]"),
        ([[1.0, 1.0]], r"must have shape \(2, C\).*got shape \(1, 2\)"),
        ([[1.0, 1.0]] * 3, r"must have shape \(2, C\).*got shape \(3, 2\)"),
        ([[1.0, -0.5], [1.0, 1.0]], r"finite and non-negative.*-0.5"),
        ([[1.0, float("inf")], [1.0, 1.0]], r"finite and non-negative.*inf"),
        ([[1.0, 0.0], [2.0, 0.0]], r"class 1 a weight of 0 in every view"),
        ([[1.0, "a"], [1.0, 1.0]], r"row 0 is \[1.0, 'a'\]"),
        ([1.0, [1.0, 1.0]], r"row 0 is 1.0"),
    ],
)
def test_bad_class_weights_are_refused(weights, pattern):
    with pytest.raises(InvalidInputError, match=pattern):
        replace(get_policy("hflip"), weights=weights)
    data = get_policy("hflip").to_json()
    data["weights"] = weights
    with pytest.raises(PolicyFormatError, match=pattern):
        Policy.from_json(data)


def test_class_weights_outside_mean_of_probabilities_are_refused(linear):
    policy, _ = _class_policy("hflip")
    with pytest.raises(InvalidInputError, match=r"merge mode 'mean' of probabilities only, got merge mode 'gmean'"):
        replace(policy, merge_mode="gmean")
    with pytest.raises(InvalidInputError, match=r"merge class probabilities, but activation=None.*activation='softmax'"):
        ClassificationTTAWrapper(linear, policy)  # ttach's default: raw logits
    with pytest.raises(InvalidInputError, match=r"hold 5 classes per view, but the model's output has 3"):
        TTAEngine(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)), policy, activation="softmax")(torch.rand(2, 1, 8, 8))


def _two_specialists(n: int = 400) -> ViewCache:
    """A cache where view ``hflip`` knows classes 0-1 and view ``vflip`` classes 2-3 (and the
    identity is mediocre everywhere): class-by-view weights beat any per-view weighting."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 4
    onehot = torch.nn.functional.one_hot(y, 4).float()
    noise = lambda: torch.randn(n, 4, generator=g)  # noqa: E731
    identity = 1.0 * onehot + noise()
    good_low = 4.0 * onehot * (y < 2)[:, None] + noise() * torch.where(y < 2, 0.5, 2.0)[:, None]
    good_high = 4.0 * onehot * (y >= 2)[:, None] + noise() * torch.where(y >= 2, 0.5, 2.0)[:, None]
    views = [View.identity(), View([(HorizontalFlip(), True)]), View([(VerticalFlip(), True)])]
    return ViewCache(torch.stack([identity, good_low, good_high]), y, views)


def test_search_saves_class_weights_when_they_win_under_cross_validation():
    cache = _two_specialists()
    result = greedy_search(cache, budget=3, gate=False)
    agg, policy = result.aggregation, result.policy
    assert agg["class_used"] and agg["cv_nll_class"] < min(agg["cv_nll_mean"], agg["cv_nll_weighted"]) - 0.02, agg
    assert policy.class_weights and policy.weights == agg["class_weights"]
    assert len(policy.weights) == len(policy) == 3 and all(len(row) == 4 for row in policy.weights)
    rows = [cache.index(n) for n in policy.view_names]
    weights = torch.tensor(policy.weights)
    hflip, vflip = policy.view_names.index("hflip"), policy.view_names.index("vflip")
    # Each specialist weighs most on its own classes.
    assert weights[hflip, :2].mean() > weights[hflip, 2:].mean() + 0.2
    assert weights[vflip, 2:].mean() > weights[vflip, :2].mean() + 0.2
    # The policy as saved, round-tripped through JSON, scores what the search reported.
    saved = Policy.from_json(policy.to_json())
    probs = apply_temperature(merge_class_weighted(cache.probs[rows], weights), saved.temperature)
    nll = float(-probs.gather(1, cache.labels[:, None]).log().mean())
    assert nll == pytest.approx(policy.meta["validation"]["saved"]["nll"], abs=1e-5)
    plain = apply_temperature(cache.probs[rows].mean(0), saved.temperature)
    assert nll < float(-plain.gather(1, cache.labels[:, None]).log().mean()) - 0.05
    # The report says what was saved.
    report = search_markdown(result)
    assert "class-by-view weights (3 views x 4 classes, ClassTTA)" in report and "(wins: the policy stores them)" in report
    assert any(row["policy"] == "searched (class-weighted)" for row in result.rows())
