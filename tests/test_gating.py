"""Tests for ttakit.gating: threshold tuning on constructed data, gated prediction through a model
equal to the cached computation, honest forward-pass counts, and bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ttakit import transforms as T
from ttakit.data import ImageDataset
from ttakit.engine import TTAEngine
from ttakit.errors import InvalidInputError
from ttakit.gating import (
    GATE_ALL,
    evaluate_gated_on_cache,
    forward_passes,
    gated_predict,
    policy_predict,
    tune_gate_threshold,
)
from ttakit.metrics import accuracy
from ttakit.policy import Compose, Policy, Step, View
from ttakit.search import apply_temperature, cache_views

HFLIP = Compose([T.HorizontalFlip()]).views[1]
SHIFT = View([Step(T.Shift([(1, 0)]), (1, 0))])


def constructed(n: int = 1000, seed: int = 0):
    """Plain predictions are wrong mostly where they are unsure; the full policy fixes most of those."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    conf = torch.rand(n, generator=g) * 0.5 + 0.5  # plain confidence in [0.5, 1)
    plain_right = torch.rand(n, generator=g) < conf  # unsure images are wrong more often
    plain_class = torch.where(plain_right, labels, 1 - labels)
    plain = torch.zeros(n, 2)
    plain[torch.arange(n), plain_class] = conf
    plain[torch.arange(n), 1 - plain_class] = 1 - conf
    full_right = plain_right | ((conf < 0.8) & (torch.rand(n, generator=g) < 0.7))
    full_class = torch.where(full_right, labels, 1 - labels)
    full = torch.full((n, 2), 0.3)
    full[torch.arange(n), full_class] = 0.7
    return plain, full, labels


def test_threshold_keeps_the_lift_at_the_lowest_cost() -> None:
    plain, full, labels = constructed()
    tuning = tune_gate_threshold(plain, full, labels, keep=0.95, n_views=8, confidence=0)
    assert tuning.full_lift > 0.05
    assert tuning.kept_lift >= 0.95
    assert tuning.gated_lift >= 0.95 * tuning.full_lift
    conf = plain.max(1).values
    gated = conf < tuning.threshold
    assert tuning.fraction_gated == pytest.approx(float(gated.double().mean()))
    mixed = torch.where(gated[:, None], full, plain)
    assert tuning.gated_accuracy == pytest.approx(accuracy(mixed, labels))
    assert tuning.forward_passes_per_image == pytest.approx(1 + 7 * tuning.fraction_gated)
    assert tuning.fraction_gated < 0.6  # the policy only fixes images with confidence < 0.8 (60%)
    # the cheapest: gating fewer images (the next lower distinct confidence) loses too much
    lower = conf[conf < tuning.threshold].max()
    fewer = conf < lower
    fewer_acc = accuracy(torch.where(fewer[:, None], full, plain), labels)
    assert fewer_acc - tuning.plain_accuracy < 0.95 * tuning.full_lift


def test_bootstrap_confidence_buys_a_margin() -> None:
    plain, full, labels = constructed(n=2000, seed=2)
    tunings = [
        tune_gate_threshold(plain, full, labels, confidence=c, n_boot=100, seed=0)
        for c in (0.0, 0.5, 0.9)
    ]
    fractions = [t.fraction_gated for t in tunings]
    assert fractions == sorted(fractions) and fractions[2] > fractions[0]
    assert all(t.kept_lift >= 0.95 for t in tunings)
    again = tune_gate_threshold(plain, full, labels, confidence=0.9, n_boot=100, seed=0)
    assert again == tunings[2]  # seeded


def test_keep_one_gates_until_the_whole_lift_is_kept() -> None:
    plain, full, labels = constructed(seed=1)
    tuning = tune_gate_threshold(plain, full, labels, keep=1.0, n_views=4)
    assert tuning.gated_accuracy >= tuning.full_accuracy - 1e-12


def test_no_lift_means_no_gating() -> None:
    plain, full, labels = constructed()
    tuning = tune_gate_threshold(full, plain, labels, keep=0.95, n_views=4)  # "full" is worse here
    assert tuning.full_lift <= 0
    assert tuning.threshold == 0.0 and tuning.fraction_gated == 0.0
    assert tuning.forward_passes_per_image == 1.0


def test_gate_all_when_only_the_most_confident_image_is_fixed() -> None:
    plain = torch.tensor([[0.6, 0.4], [0.9, 0.1]])
    full = torch.tensor([[0.6, 0.4], [0.1, 0.9]])
    tuning = tune_gate_threshold(plain, full, torch.tensor([0, 1]), n_views=2)
    assert tuning.threshold == GATE_ALL and tuning.fraction_gated == 1.0
    assert tuning.forward_passes_per_image == 2.0


def test_ties_are_gated_together() -> None:
    plain = torch.tensor([[0.6, 0.4]] * 4)
    full = torch.tensor([[0.4, 0.6], [0.6, 0.4], [0.6, 0.4], [0.6, 0.4]])
    tuning = tune_gate_threshold(plain, full, torch.tensor([1, 0, 0, 0]))
    assert tuning.fraction_gated == 1.0  # one confidence value: all or nothing


def test_forward_passes() -> None:
    assert forward_passes(8, 0.25) == 1 + 7 * 0.25
    assert forward_passes(8, 0.25, reuse_identity=False) == 1 + 8 * 0.25


def model_and_images():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)
    )
    images = torch.rand(50, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    return model, images


@pytest.mark.parametrize("weights", [None, [0.5, 0.2, 0.3]])
def test_gated_predict_equals_the_cache_computation(weights) -> None:
    model, images = model_and_images()
    # the identity need not come first
    policy = Policy([HFLIP, View.identity(), SHIFT], weights=weights)
    ds = ImageDataset(images, torch.arange(50) % 3, ["a", "b", "c"])
    cache = cache_views(model, ds, policy.views, max_batch=16, progress=False)
    conf = torch.softmax(cache.logits[cache.index("identity")], 1).max(1).values
    threshold = float(conf.median())
    out = gated_predict(model, images, policy, threshold, max_batch=16)
    ref = evaluate_gated_on_cache(cache, policy, threshold)
    assert 0 < out.n_gated < 50 and out.n_gated == ref.n_gated
    assert torch.equal(out.gated, ref.gated)
    assert torch.allclose(out.probs, ref.probs, atol=1e-5)
    assert out.forward_passes_per_image == pytest.approx(1 + 2 * out.n_gated / 50)
    # gated images get exactly the full policy's merge, the others exactly the plain prediction
    full = TTAEngine(model, policy, activation="softmax").run(images).merged
    plain = torch.softmax(model(images), 1).detach()
    assert torch.allclose(out.probs[out.gated], full[out.gated], atol=1e-5)
    assert torch.allclose(out.probs[~out.gated], plain[~out.gated], atol=1e-5)


def test_gated_predict_extremes_and_stored_threshold() -> None:
    model, images = model_and_images()
    policy = Policy([View.identity(), HFLIP, SHIFT], gate_threshold=0.0)
    never = gated_predict(model, images, policy)
    assert never.n_gated == 0 and never.forward_passes_per_image == 1.0
    always = gated_predict(model, images, policy, threshold=GATE_ALL)
    assert always.n_gated == 50 and always.forward_passes_per_image == 3.0
    full = TTAEngine(model, policy, activation="softmax", gate_threshold=None).run(images).merged
    assert torch.allclose(always.probs, full, atol=1e-5)


def test_policy_predict_applies_gate_and_temperature() -> None:
    model, images = model_and_images()
    policy = Policy([View.identity(), HFLIP], temperature=2.0, gate_threshold=GATE_ALL)
    out = policy_predict(model, images, policy)
    full = TTAEngine(model, policy, activation="softmax", temperature=None, gate_threshold=None).run(images).merged
    assert torch.allclose(out.probs, apply_temperature(full, 2.0), atol=1e-5)
    ungated = policy_predict(model, images, policy, use_gate=False, calibrate=False)
    assert (
        torch.allclose(ungated.probs, full, atol=1e-6) and ungated.forward_passes_per_image == 2.0
    )


def test_gated_predict_restores_training_mode() -> None:
    model, images = model_and_images()
    model.train()
    gated_predict(model, images, Policy([View.identity(), HFLIP]), threshold=0.5)
    assert model.training


def test_bad_input() -> None:
    model, images = model_and_images()
    with pytest.raises(
        InvalidInputError,
        match=r"holds the identity view .* holds only \['hflip', 'shift\(\+1,\+0\)'\]",
    ):
        gated_predict(model, images, Policy([HFLIP, SHIFT]), threshold=0.5)
    with pytest.raises(InvalidInputError, match="stores no gate_threshold"):
        gated_predict(model, images, Policy([View.identity(), HFLIP]))
    with pytest.raises(
        InvalidInputError, match=r"`threshold` to be a number in \[0, 1\] .* but got -0.1"
    ):
        gated_predict(model, images, Policy([View.identity(), HFLIP]), threshold=-0.1)
    with pytest.raises(InvalidInputError, match="ttakit.Policy, but got str"):
        gated_predict(model, images, "hflip", threshold=0.5)
    plain, full, labels = constructed(n=20)
    with pytest.raises(InvalidInputError, match=r"`keep` to be a number in \(0, 1\], but got 0"):
        tune_gate_threshold(plain, full, labels, keep=0)
    with pytest.raises(
        InvalidInputError, match=r"shape of `plain_probs` \(20, 2\), but got \(19, 2\)"
    ):
        tune_gate_threshold(plain, full[:19], labels)
    with pytest.raises(InvalidInputError, match=r"`labels` to be a \(20,\) tensor"):
        tune_gate_threshold(plain, full, labels[:3])
    with pytest.raises(InvalidInputError, match="non-empty"):
        tune_gate_threshold(torch.zeros(0, 2), torch.zeros(0, 2), torch.zeros(0))
    with pytest.raises(
        InvalidInputError, match=r"`confidence` to be a number in \[0, 1\], but got 2"
    ):
        tune_gate_threshold(plain, full, labels, confidence=2)


def test_max_cost_picks_the_most_robust_cut_within_budget():
    # 1,000 images; the full policy fixes 40 of the 100 least confident ones and breaks 2 of the
    # next 100, so 95% of the lift needs the ~100 least confident images (cost 1 + 7*0.1 of 8).
    n = 1000
    conf = torch.linspace(0.3, 0.99, n)
    labels = torch.zeros(n, dtype=torch.long)
    plain = torch.stack([conf, 1 - conf], 1)
    full = plain.clone()
    fixed = torch.arange(0, 100, 5)[:20].tolist() + torch.arange(1, 100, 5)[:20].tolist()
    plain[fixed] = torch.stack([1 - conf[fixed], conf[fixed]], 1).clamp(0.01, 0.99)
    broken = [150, 170]
    full[broken] = torch.stack([1 - conf[broken], conf[broken]], 1)
    plain = plain / plain.sum(1, keepdim=True)
    full = full / full.sum(1, keepdim=True)
    free = tune_gate_threshold(plain, full, labels, keep=0.95, n_views=8, confidence=0.0)
    capped = tune_gate_threshold(plain, full, labels, keep=0.95, n_views=8, confidence=0.9, max_cost=0.3)
    uncapped = tune_gate_threshold(plain, full, labels, keep=0.95, n_views=8, confidence=0.9)
    assert free.kept_lift >= 0.95 and capped.kept_lift >= 0.95
    assert capped.forward_passes_per_image / 8 <= 0.3 + 1e-9
    assert uncapped.fraction_gated >= capped.fraction_gated >= free.fraction_gated
    with pytest.raises(InvalidInputError, match="max_cost"):
        tune_gate_threshold(plain, full, labels, max_cost=1.5)
