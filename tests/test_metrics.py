"""Tests for ttakit.metrics: NumPy references, hand-computed values, validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ttakit.errors import InvalidInputError
from ttakit.metrics import (
    BootstrapResult,
    CalibrationError,
    McNemarResult,
    accuracy,
    brier_score,
    expected_calibration_error,
    mcnemar_test,
    mean_std,
    nll,
    paired_bootstrap,
    reliability_bins,
    summarize,
)

# --------------------------------------------------------------------------- helpers


def random_probs(
    n: int, c: int, seed: int = 0, temp: float = 2.0
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g, dtype=torch.float64) * temp
    labels = torch.randint(0, c, (n,), generator=g)
    # Make the model right more often than chance so every bin has a mix.
    labels = torch.where(torch.rand(n, generator=g) < 0.6, logits.argmax(1), labels)
    return logits.softmax(1), labels


def np_ece(
    p: np.ndarray, y: np.ndarray, n_bins: int
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """Reference ECE by an explicit loop over bins (lo, hi], bin 0 closed at 0."""
    conf = p.max(1)
    correct = (p.argmax(1) == y).astype(float)
    edges = np.linspace(0, 1, n_bins + 1)
    ece, confs, accs, counts = 0.0, [], [], []
    for m in range(n_bins):
        lo, hi = edges[m], edges[m + 1]
        inside = (conf > lo) & (conf <= hi) if m > 0 else (conf >= lo) & (conf <= hi)
        k = int(inside.sum())
        counts.append(k)
        if k == 0:
            confs.append(0.0)
            accs.append(0.0)
            continue
        confs.append(conf[inside].mean())
        accs.append(correct[inside].mean())
        ece += k / len(y) * abs(accs[-1] - confs[-1])
    return ece, np.array(confs), np.array(accs), np.array(counts)


# --------------------------------------------------------------------------- point metrics


def test_metrics_match_numpy_reference() -> None:
    probs, labels = random_probs(500, 7, seed=1)
    p, y = probs.numpy(), labels.numpy()
    onehot = np.eye(7)[y]
    assert accuracy(probs, labels) == pytest.approx((p.argmax(1) == y).mean(), abs=1e-12)
    assert nll(probs, labels) == pytest.approx(-np.log(p[np.arange(500), y]).mean(), rel=1e-10)
    assert brier_score(probs, labels) == pytest.approx(((p - onehot) ** 2).sum(1).mean(), rel=1e-10)
    ref_ece, confs, accs, counts = np_ece(p, y, 15)
    assert expected_calibration_error(probs, labels) == pytest.approx(ref_ece, rel=1e-10)
    bins = reliability_bins(probs, labels, n_bins=15)
    assert bins["count"] == counts.tolist()
    np.testing.assert_allclose(bins["confidence"], confs, rtol=1e-10)
    np.testing.assert_allclose(bins["accuracy"], accs, rtol=1e-10)
    np.testing.assert_allclose(bins["edges"], np.linspace(0, 1, 16))


def test_float32_input_gives_python_floats() -> None:
    probs, labels = random_probs(50, 3, seed=2)
    out = summarize(probs.float(), labels.int())
    assert set(out) == {"accuracy", "nll", "ece", "brier"}
    assert all(type(v) is float for v in out.values())
    assert out["nll"] == pytest.approx(nll(probs, labels), rel=1e-5)


def test_perfect_predictions() -> None:
    labels = torch.tensor([0, 2, 1, 2])
    probs = torch.nn.functional.one_hot(labels, 3).double()
    assert summarize(probs, labels) == {"accuracy": 1.0, "nll": 0.0, "ece": 0.0, "brier": 0.0}
    assert reliability_bins(probs, labels, n_bins=4)["count"] == [0, 0, 0, 4]


def test_known_two_sample_case() -> None:
    # Sample 0: right with confidence 0.95; sample 1: wrong (predicts 1) with confidence 0.75.
    probs = torch.tensor([[0.95, 0.05], [0.25, 0.75]], dtype=torch.float64)
    labels = torch.tensor([0, 0])
    assert accuracy(probs, labels) == 0.5
    assert nll(probs, labels) == pytest.approx(-(math.log(0.95) + math.log(0.25)) / 2)
    # (0.05^2 * 2 + 0.75^2 * 2) / 2
    assert brier_score(probs, labels) == pytest.approx(0.0025 + 0.5625)
    # bin (0.9, 1.0]: |1 - 0.95|; bin (0.7, 0.8]: |0 - 0.75|; each weighted 1/2
    assert expected_calibration_error(probs, labels, n_bins=10) == pytest.approx(0.4)
    bins = reliability_bins(probs, labels, n_bins=10)
    assert bins["count"] == [0] * 7 + [1, 0, 1]
    assert bins["accuracy"][9] == 1.0 and bins["confidence"][7] == pytest.approx(0.75)
    # One bin: |mean correct - mean confidence| = |0.5 - 0.85|
    assert expected_calibration_error(probs, labels, n_bins=1) == pytest.approx(0.35)


def test_nll_clamps_zero_probability() -> None:
    probs = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    assert nll(probs, torch.tensor([1])) == pytest.approx(-math.log(1e-12))
    assert nll(probs, torch.tensor([1]), eps=1e-3) == pytest.approx(-math.log(1e-3))


def test_bin_edges_are_right_closed() -> None:
    # Confidence exactly 0.5 with 2 bins belongs to bin 0 = [0, 0.5]; 0.75 to (0.5, 1].
    probs = torch.tensor([[0.5, 0.5], [0.75, 0.25]], dtype=torch.float64)
    assert reliability_bins(probs, torch.tensor([0, 0]), n_bins=2)["count"] == [1, 1]


# --------------------------------------------------------------------------- class vs function


def test_calibration_error_class_over_batches() -> None:
    probs, labels = random_probs(300, 5, seed=3)
    metric = CalibrationError(n_bins=10)
    for chunk_p, chunk_y in zip(probs.split(64), labels.split(64), strict=True):
        metric.update(chunk_p, chunk_y)
    assert metric.count == 300
    assert metric.compute() == pytest.approx(
        expected_calibration_error(probs, labels, 10), rel=1e-12
    )
    assert metric.bins()["count"] == reliability_bins(probs, labels, 10)["count"]
    metric.reset()
    assert metric.count == 0
    with pytest.raises(InvalidInputError, match="before any update"):
        metric.compute()


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 60),
    c=st.integers(1, 6),
    n_bins=st.integers(1, 20),
    cuts=st.lists(st.integers(0, 60), max_size=4),
)
def test_calibration_error_class_equals_function_property(seed, n, c, n_bins, cuts) -> None:
    probs, labels = random_probs(n, c, seed=seed)
    bounds = sorted({0, n, *(min(k, n) for k in cuts)})
    metric = CalibrationError(n_bins)
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        metric.update(probs[lo:hi], labels[lo:hi])
    expected = expected_calibration_error(probs, labels, n_bins)
    assert metric.compute() == pytest.approx(expected, abs=1e-12)
    assert 0.0 <= expected <= 1.0


def test_calibration_error_rejects_class_count_change() -> None:
    metric = CalibrationError()
    metric.update(*random_probs(4, 3))
    with pytest.raises(InvalidInputError, match="3 classes"):
        metric.update(*random_probs(4, 5))


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("probs", "labels", "pattern"),
    [
        (torch.full((4,), 0.25), torch.tensor([0, 1, 2, 3]), r"`probs`.*\(N, C\).*\(4,\)"),
        (torch.full((2, 2), 0.5), torch.tensor([[0, 1]]), r"`labels`.*\(N,\).*\(1, 2\)"),
        (torch.full((3, 2), 0.5), torch.tensor([0, 1]), r"`labels`.*length.*\(3\).*2"),
        (torch.full((2, 2), 0.5), torch.tensor([0, 2]), r"`labels`.*\[0, 1\].*2"),
        (torch.full((2, 2), 0.5), torch.tensor([-1, 0]), r"`labels`.*-1"),
        (torch.full((2, 2), 0.5), torch.tensor([0.0, 1.0]), r"`labels`.*integer.*float32"),
        (torch.ones(2, 2, dtype=torch.long), torch.tensor([0, 1]), r"`probs`.*floating.*int64"),
        (torch.tensor([[2.0, -1.0]]), torch.tensor([0]), r"`probs`.*\[0, 1\].*softmax"),
        (torch.tensor([[0.3, 0.3]]), torch.tensor([0]), r"`probs`.*sum to 1"),
        (torch.tensor([[float("nan"), 1.0]]), torch.tensor([0]), r"`probs`.*NaN"),
        (torch.empty(0, 3), torch.empty(0, dtype=torch.long), r"`probs`.*at least one"),
        (np.full((2, 2), 0.5), torch.tensor([0, 1]), r"`probs`.*torch.Tensor.*ndarray"),
    ],
)
def test_invalid_inputs(probs, labels, pattern) -> None:
    for fn in (accuracy, nll, brier_score, expected_calibration_error, reliability_bins, summarize):
        with pytest.raises(InvalidInputError, match=pattern):
            fn(probs, labels)
    with pytest.raises(InvalidInputError, match=pattern):
        CalibrationError().update(probs, labels)


def test_invalid_arguments() -> None:
    probs, labels = random_probs(4, 2)
    with pytest.raises(InvalidInputError, match=r"`n_bins`.*larger than 0.*0"):
        expected_calibration_error(probs, labels, n_bins=0)
    with pytest.raises(InvalidInputError, match=r"`n_bins`.*2.5"):
        CalibrationError(n_bins=2.5)
    with pytest.raises(InvalidInputError, match=r"`eps`.*\(0, 1\).*0"):
        nll(probs, labels, eps=0)
    with pytest.raises(ValueError):  # InvalidInputError is a ValueError
        reliability_bins(probs, labels, n_bins=True)


# --------------------------------------------------------------------------- McNemar


def pair(n01: int, n10: int, n11: int = 5, n00: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    a = [True] * n01 + [False] * n10 + [True] * n11 + [False] * n00
    b = [False] * n01 + [True] * n10 + [True] * n11 + [False] * n00
    return torch.tensor(a), torch.tensor(b)


def test_mcnemar_exact_hand_computed() -> None:
    r = mcnemar_test(*pair(0, 6))
    assert isinstance(r, McNemarResult)
    assert (r.n01, r.n10, r.method) == (0, 6, "exact")
    assert r.p_value == pytest.approx(2 * 0.5**6)  # 0.03125
    r = mcnemar_test(*pair(8, 2))
    assert (r.n01, r.n10, r.statistic) == (8, 2, 2.0)
    assert r.p_value == pytest.approx(2 * (1 + 10 + 45) / 1024)  # 0.109375
    assert mcnemar_test(*pair(3, 3)).p_value == 1.0  # capped
    assert mcnemar_test(*pair(0, 0)).p_value == 1.0  # no discordant pairs


@pytest.mark.parametrize(("n01", "n10"), [(1, 1), (0, 1), (4, 11), (20, 29), (24, 25)])
def test_mcnemar_exact_matches_binomial_sum(n01: int, n10: int) -> None:
    n, k = n01 + n10, min(n01, n10)
    ref = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)
    r = mcnemar_test(*pair(n01, n10))
    assert r.method == "exact"
    assert r.p_value == pytest.approx(ref, rel=1e-9)


def test_mcnemar_chi2_hand_computed() -> None:
    r = mcnemar_test(*pair(10, 40))  # 50 discordant pairs: chi-square branch
    assert r.method == "chi2"
    assert r.statistic == pytest.approx((30 - 1) ** 2 / 50)  # 16.82
    # Reference survival of chi2(1) at x: 2 * P[Z > sqrt(x)], Z standard normal, by NumPy quadrature.
    z = np.linspace(math.sqrt(16.82), 12.0, 200_001)
    tail = np.trapezoid(np.exp(-(z**2) / 2) / math.sqrt(2 * math.pi), z)
    assert r.p_value == pytest.approx(2 * tail, rel=1e-6)
    assert r.p_value == pytest.approx(4.112e-5, rel=1e-3)
    assert mcnemar_test(*pair(25, 25)).p_value == pytest.approx(math.erfc(math.sqrt(1 / 50 / 2)))


def test_mcnemar_large_n_no_overflow() -> None:
    r = mcnemar_test(*pair(20000, 20500, n11=0, n00=0))
    assert r.method == "chi2" and 0.0 < r.p_value < 0.2


def test_mcnemar_accepts_01_integers_and_validates() -> None:
    a, b = pair(2, 5)
    assert mcnemar_test(a.long(), b.int()) == mcnemar_test(a, b)
    with pytest.raises(
        InvalidInputError, match=r"`correct_a`.*`correct_b`.*same length.*15 and 14"
    ):
        mcnemar_test(a, b[:-1])
    with pytest.raises(InvalidInputError, match=r"`correct_b`.*bool.*float32"):
        mcnemar_test(a, b.float())
    with pytest.raises(InvalidInputError, match=r"`correct_a`.*0 and 1.*2"):
        mcnemar_test(a.long() * 2, b)
    with pytest.raises(InvalidInputError, match=r"`correct_a`.*\(N,\).*\(3, 5\)"):
        mcnemar_test(a.reshape(3, 5), b)
    with pytest.raises(InvalidInputError, match=r"`correct_a`.*torch.Tensor.*list"):
        mcnemar_test([True, False], b)


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_reproducible_and_contains_observed() -> None:
    a, b = pair(10, 25, n11=150, n00=15)
    state = torch.get_rng_state()
    r1 = paired_bootstrap(a, b, n_resamples=2000, seed=7)
    r2 = paired_bootstrap(a, b, n_resamples=2000, seed=7)
    assert torch.equal(state, torch.get_rng_state())  # private generator only
    assert isinstance(r1, BootstrapResult) and r1 == r2
    assert r1.difference == pytest.approx((25 - 10) / 200)
    assert r1.ci_low < r1.difference < r1.ci_high
    assert (r1.n_resamples, r1.confidence) == (2000, 0.95)
    assert paired_bootstrap(a, b, seed=8) != r1
    wider = paired_bootstrap(a, b, seed=7, confidence=0.99)
    assert wider.ci_low <= r1.ci_low and wider.ci_high >= r1.ci_high


def test_bootstrap_matches_index_resampling_reference() -> None:
    a, b = pair(30, 45, n11=300, n00=25)
    r = paired_bootstrap(a, b, n_resamples=4000, seed=0)
    d = (b.double() - a.double()).numpy()
    rng = np.random.default_rng(0)
    ref = d[rng.integers(0, len(d), size=(4000, len(d)))].mean(1)
    lo, hi = np.quantile(ref, [0.025, 0.975])
    # Same distribution, different random streams: agree to Monte Carlo error.
    assert r.ci_low == pytest.approx(lo, abs=0.006)
    assert r.ci_high == pytest.approx(hi, abs=0.006)
    ref_p = (np.abs(ref - d.mean()) >= abs(d.mean())).mean()
    assert r.p_value == pytest.approx(ref_p, abs=0.03)


def test_bootstrap_no_difference_and_clear_difference() -> None:
    a, _ = pair(5, 5)
    r = paired_bootstrap(a, a.clone(), n_resamples=500)
    assert (r.difference, r.ci_low, r.ci_high, r.p_value) == (0.0, 0.0, 0.0, 1.0)
    a, b = pair(0, 60, n11=40, n00=0)
    r = paired_bootstrap(a, b, n_resamples=999)
    assert r.difference == pytest.approx(0.6)
    assert r.p_value == pytest.approx(1 / 1000)


def test_bootstrap_validates_arguments() -> None:
    a, b = pair(2, 3)
    with pytest.raises(InvalidInputError, match=r"`n_resamples`.*larger than 0.*0"):
        paired_bootstrap(a, b, n_resamples=0)
    with pytest.raises(InvalidInputError, match=r"`confidence`.*\(0, 1\).*95"):
        paired_bootstrap(a, b, confidence=95)
    with pytest.raises(InvalidInputError, match=r"`seed`.*integer.*'x'"):
        paired_bootstrap(a, b, seed="x")
    with pytest.raises(InvalidInputError, match=r"`correct_a`.*empty"):
        paired_bootstrap(torch.tensor([], dtype=torch.bool), torch.tensor([], dtype=torch.bool))


# --------------------------------------------------------------------------- mean_std


def test_mean_std() -> None:
    mean, std = mean_std([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert std == pytest.approx(np.std([1, 2, 3, 4], ddof=1))
    assert mean_std([0.9]) == (0.9, 0.0)
    assert mean_std(torch.tensor([0.5, 0.7])) == pytest.approx((0.6, math.sqrt(0.02)))
    assert all(type(v) is float for v in mean_std(np.array([1, 2])))
    with pytest.raises(InvalidInputError, match=r"`values`.*empty"):
        mean_std([])
    with pytest.raises(InvalidInputError, match=r"`values`.*numbers"):
        mean_std(["a"])


# --------------------------------------------------------------------------- uncertainty


from sklearn.metrics import roc_auc_score  # noqa: E402

from ttakit.metrics import (  # noqa: E402
    accuracy_at_coverage,
    selective_report,
    set_coverage,
    set_size,
    uncertainty_auroc,
)


@pytest.mark.parametrize("seed", range(5))
def test_uncertainty_auroc_matches_sklearn(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n = 300
    errors = torch.rand(n, generator=g) < 0.2
    # Rounded scores force many ties, which sklearn counts as one half.
    scores = (torch.randn(n, generator=g) + errors.double() * 0.8).round(decimals=1)
    ref = roc_auc_score(errors.numpy(), scores.numpy())
    assert uncertainty_auroc(scores, errors) == pytest.approx(ref, abs=1e-12)


def test_uncertainty_auroc_hand_cases() -> None:
    errors = torch.tensor([True, False, True, False])
    assert uncertainty_auroc(torch.tensor([0.9, 0.1, 0.8, 0.2]), errors) == 1.0
    assert uncertainty_auroc(torch.tensor([0.1, 0.9, 0.2, 0.8]), errors) == 0.0
    assert uncertainty_auroc(torch.zeros(4), errors) == 0.5  # all tied
    assert math.isnan(uncertainty_auroc(torch.rand(4), torch.zeros(4, dtype=torch.bool)))
    with pytest.raises(InvalidInputError, match="same length"):
        uncertainty_auroc(torch.rand(3), errors)
    with pytest.raises(InvalidInputError, match="finite"):
        uncertainty_auroc(torch.tensor([0.1, float("nan"), 0.2, 0.3]), errors)


def test_accuracy_at_coverage() -> None:
    scores = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6, 0.0])
    correct = torch.tensor([True, True, False, True, False, True, True, False, True, True])
    # 90%: drop the single least sure (0.9, wrong) -> 7/9 right of the other 9... computed directly:
    keep = scores.argsort()[:9]
    assert accuracy_at_coverage(scores, correct, 0.9) == pytest.approx(correct[keep].double().mean().item())
    assert accuracy_at_coverage(scores, correct, 1.0) == pytest.approx(0.7)
    assert accuracy_at_coverage(scores, correct, 0.3) == 1.0  # 0.0, 0.1, 0.2: all right
    # A score that ranks errors last beats the plain accuracy; a reversed one is worse.
    assert accuracy_at_coverage((~correct).double(), correct, 0.7) == 1.0
    assert accuracy_at_coverage(correct.double(), correct, 0.7) < 0.7
    for bad in (0, 1.5, -0.1, True):
        with pytest.raises(InvalidInputError, match="coverage"):
            accuracy_at_coverage(scores, correct, bad)


def test_selective_report_rows() -> None:
    probs, labels = random_probs(400, 5, seed=3)
    correct = probs.argmax(1) == labels
    conf = 1 - probs.max(1).values
    entropy = -(probs * probs.log()).sum(1)
    rows = selective_report({"softmax": conf, "entropy": entropy}, correct)
    assert [r["score"] for r in rows] == ["softmax", "entropy"]
    assert rows[0]["auroc"] == pytest.approx(roc_auc_score((~correct).numpy(), conf.numpy()))
    assert rows[0]["accuracy_at_coverage"] > accuracy(probs, labels)


def test_set_coverage_and_size() -> None:
    sets = torch.tensor([[True, False, False], [True, True, False], [False, False, False]])
    assert set_coverage(sets, torch.tensor([0, 2, 1])) == pytest.approx(1 / 3)
    assert set_size(sets) == pytest.approx(1.0)
    with pytest.raises(InvalidInputError, match="bool"):
        set_size(sets.float())
    with pytest.raises(InvalidInputError, match="class indices"):
        set_coverage(sets, torch.tensor([0, 3, 1]))
