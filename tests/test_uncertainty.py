"""ttakit.uncertainty: every figure against numbers computed by hand, and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from ttakit.errors import InvalidInputError
from ttakit.uncertainty import UNCERTAINTY_KEYS, entropy, view_uncertainty

# K=3 views of B=2 images over C=2 classes.
VIEWS = torch.tensor(
    [
        [[0.9, 0.1], [0.5, 0.5]],
        [[0.7, 0.3], [0.2, 0.8]],
        [[0.2, 0.8], [0.5, 0.5]],
    ],
    dtype=torch.float64,
)


def h(*p: float) -> float:
    return -sum(x * math.log(x) for x in p if x > 0)


def test_every_figure_by_hand():
    merged = VIEWS.mean(0)  # image 0: [0.6, 0.4]; image 1: [0.4, 0.6]
    u = view_uncertainty(VIEWS, merged)
    assert set(u) == set(UNCERTAINTY_KEYS)
    # population std over the 3 views: image 0 class 0: values 0.9, 0.7, 0.2 around 0.6
    std0 = math.sqrt(((0.3) ** 2 + (0.1) ** 2 + (0.4) ** 2) / 3)
    std1 = math.sqrt(((0.1) ** 2 + (0.2) ** 2 + (0.1) ** 2) / 3)
    assert torch.allclose(u["std"], torch.tensor([[std0, std0], [std1, std1]], dtype=torch.float64), atol=1e-12)
    pred = [h(0.6, 0.4), h(0.4, 0.6)]
    expected = [(h(0.9, 0.1) + h(0.7, 0.3) + h(0.2, 0.8)) / 3, (h(0.5, 0.5) + h(0.2, 0.8) + h(0.5, 0.5)) / 3]
    assert torch.allclose(u["predictive_entropy"], torch.tensor(pred, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(u["expected_entropy"], torch.tensor(expected, dtype=torch.float64), atol=1e-12)
    mi = [p - e for p, e in zip(pred, expected, strict=True)]
    assert torch.allclose(u["mutual_information"], torch.tensor(mi, dtype=torch.float64), atol=1e-12)
    assert (u["mutual_information"] > 0).all()  # Jensen, for a mean merge
    # image 0: merged class 0; view 2 says class 1 -> 1/3. image 1: merged class 1; views 0 and 2
    # tie at 0.5/0.5 and argmax picks class 0 -> 2/3.
    assert torch.allclose(u["disagreement"], torch.tensor([1 / 3, 2 / 3], dtype=torch.float64))


def test_weights_weigh_the_expected_entropy():
    merged = VIEWS.mean(0)
    u = view_uncertainty(VIEWS, merged, weights=[2.0, 1.0, 1.0])
    expected0 = (2 * h(0.9, 0.1) + h(0.7, 0.3) + h(0.2, 0.8)) / 4
    assert float(u["expected_entropy"][0]) == pytest.approx(expected0, abs=1e-12)


def test_views_that_agree_have_no_spread():
    one = torch.tensor([[0.25, 0.75], [1.0, 0.0]])
    views = one.expand(4, 2, 2)
    u = view_uncertainty(views, one)
    assert torch.equal(u["std"], torch.zeros(2, 2))
    assert torch.allclose(u["mutual_information"], torch.zeros(2), atol=1e-7)
    assert torch.equal(u["disagreement"], torch.zeros(2))
    assert float(u["predictive_entropy"][0]) == pytest.approx(h(0.25, 0.75), abs=1e-6)
    assert float(u["predictive_entropy"][1]) == 0.0  # 0 * log 0 counts as 0, not NaN
    assert float(entropy(torch.tensor([0.5, 0.5]))) == pytest.approx(math.log(2))


@pytest.mark.parametrize(
    "views, merged, weights, pattern",
    [
        (torch.rand(2, 3), torch.rand(2, 3), None, r"`view_probs` to be a \(K, B, C\) tensor.*got \(2, 3\)"),
        (torch.rand(0, 2, 3), torch.rand(2, 3), None, r"K >= 1, but got \(0, 2, 3\)"),
        (torch.rand(2, 2, 3), torch.rand(3, 3), None, r"`merged` to be a \(2, 3\) tensor \(B, C\), but got \(3, 3\)"),
        (torch.rand(2, 2, 3), torch.rand(2, 3), [1.0], r"`weights` to hold 2 non-negative numbers.*\[1.0\]"),
    ],
)
def test_bad_input(views, merged, weights, pattern):
    with pytest.raises(InvalidInputError, match=pattern):
        view_uncertainty(views, merged, weights)


def test_disagreement_counts_views_against_the_reported_labels():
    merged = VIEWS.mean(0)  # top classes 0 and 1
    u = view_uncertainty(VIEWS, merged, labels=torch.tensor([1, 0]))
    # image 0: views say 0, 0, 1 -> 2 of 3 differ from 1; image 1: views say 0, 1, 0 -> 1 of 3 differs from 0
    assert torch.allclose(u["disagreement"], torch.tensor([2 / 3, 1 / 3], dtype=torch.float64))
    same = view_uncertainty(VIEWS, merged, labels=merged.argmax(1))
    assert torch.equal(same["disagreement"], view_uncertainty(VIEWS, merged)["disagreement"])


@pytest.mark.parametrize(
    "labels, pattern",
    [
        (torch.tensor([0, 1, 0]), r"`labels` to be a \(2,\) integer tensor.*got \(3,\) torch.int64"),
        (torch.tensor([0.0, 1.0]), r"`labels` to be a \(2,\) integer tensor.*got \(2,\) torch.float32"),
        ([0, 1], r"`labels` to be a \(2,\) integer tensor.*got list"),
    ],
)
def test_bad_labels(labels, pattern):
    with pytest.raises(InvalidInputError, match=pattern):
        view_uncertainty(VIEWS, VIEWS.mean(0), labels=labels)
