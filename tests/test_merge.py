"""ttakit.merge: every mode against hand-computed values, activations, weights, vote tie-breaks,
errors, and ttach's Merger."""

from __future__ import annotations

import math

import pytest
import torch
import ttach

from ttakit.errors import InvalidInputError, UnknownNameError
from ttakit.merge import (
    MERGE_MODES,
    MergeAccumulator,
    Merger,
    apply_matrix_scaling,
    apply_temperature,
    check_matrix_scaling,
    merge,
)

pytestmark = pytest.mark.usefixtures("single_thread")

# Three views of one image over three classes.
STACK = torch.tensor([[[0.2, 0.5, 0.3]], [[0.6, 0.3, 0.1]], [[0.1, 0.8, 0.1]]], dtype=torch.float64)
NUDGE = 1e-6

EXPECTED = {
    "mean": [0.3, 1.6 / 3, 0.5 / 3],
    "sum": [0.9, 1.6, 0.5],
    "max": [0.6, 0.8, 0.3],
    "min": [0.1, 0.3, 0.1],
    # cube roots of 0.2*0.6*0.1, 0.5*0.3*0.8, 0.3*0.1*0.1
    "gmean": [0.228942848510666, 0.493242414866094, 0.144224957030741],
    # means of square roots
    "tsharpen": [0.512679343586093, 0.716418843230543, 0.393392696512947],
    # argmaxes 1, 0, 1: two thirds vote for class 1, which gets the nudge
    "vote": [1 / 3, 2 / 3 + NUDGE, 0.0],
}


def test_every_mode_has_a_hand_computed_case():
    assert set(EXPECTED) == set(MERGE_MODES)


@pytest.mark.parametrize("mode", MERGE_MODES)
def test_merge_by_hand(mode):
    out = merge(STACK, mode)
    assert out.shape == (1, 3)
    assert torch.allclose(out, torch.tensor([EXPECTED[mode]], dtype=torch.float64), atol=1e-9)


@pytest.mark.parametrize(
    "mode, weights, expected",
    [
        ("mean", [1, 2, 1], [0.375, 0.475, 0.15]),
        ("sum", [1, 2, 1], [1.5, 1.9, 0.6]),
        # (0.2 * 0.6**2 * 0.1) ** (1/4) ...
        ("gmean", [1, 2, 1], [0.291295063024394, 0.435587717469286, 0.131607401295249]),
        ("tsharpen", [0, 1, 1], [(math.sqrt(0.6) + math.sqrt(0.1)) / 2, (math.sqrt(0.3) + math.sqrt(0.8)) / 2,
                                 math.sqrt(0.1)]),
        # class 0 gets weight 3 of 5, class 1 weight 2 of 5
        ("vote", [1, 3, 1], [0.6 + NUDGE, 0.4, 0.0]),
    ],
)
def test_weighted_merge_by_hand(mode, weights, expected):
    out = merge(STACK, mode, weights=weights)
    assert torch.allclose(out, torch.tensor([expected], dtype=torch.float64), atol=1e-9)


def test_zero_weight_views_contribute_nothing_even_with_zeros():
    stack = torch.tensor([[[0.5, 0.5]], [[1.0, 0.0]]])
    out = merge(stack, "gmean", weights=[1, 0])  # log(0) * 0 would be NaN
    assert torch.allclose(out, torch.tensor([[0.5, 0.5]]))


def test_softmax_and_sigmoid_activations_by_hand():
    logits = torch.tensor([[[2.0, 0.0]], [[0.0, 1.0]]], dtype=torch.float64)
    p1 = [math.exp(2) / (math.exp(2) + 1), 1 / (math.exp(2) + 1)]
    p2 = [1 / (1 + math.e), math.e / (1 + math.e)]
    mean = [(a + b) / 2 for a, b in zip(p1, p2, strict=True)]
    assert torch.allclose(merge(logits, "mean", activation="softmax"), torch.tensor([mean], dtype=torch.float64))
    g = [math.sqrt(a * b) for a, b in zip(p1, p2, strict=True)]
    assert torch.allclose(merge(logits, "gmean", activation="softmax"),
                          torch.tensor([[v / sum(g) for v in g]], dtype=torch.float64))  # renormalised
    sig = [(1 / (1 + math.exp(-2)) + 0.5) / 2, (0.5 + 1 / (1 + math.exp(-1))) / 2]
    assert torch.allclose(merge(logits, "mean", activation="sigmoid"), torch.tensor([sig], dtype=torch.float64))
    assert torch.equal(merge(logits, "max", activation=None), torch.tensor([[2.0, 1.0]], dtype=torch.float64))


def test_softmax_uses_the_class_dimension_of_masks():
    stack = torch.randn(2, 1, 3, 2, 2)  # (K, B, C, H, W)
    out = merge(stack, "mean", activation="softmax")
    assert torch.allclose(out, torch.softmax(stack, dim=2).mean(0))
    assert torch.allclose(out.sum(dim=1), torch.ones(1, 2, 2))


@pytest.mark.parametrize("mode", ["gmean", "tsharpen"])
def test_negative_values_raise_instead_of_nan(mode):
    stack = torch.tensor([[[1.0, -2.5]], [[0.5, 0.5]], [[0.5, 0.5]]])
    with pytest.raises(InvalidInputError, match=f"merge mode '{mode}' needs non-negative.*minimum of -2.5.*softmax"):
        merge(stack, mode)
    assert torch.isnan(_ttach_merge(stack, mode)).any()  # what ttach returns
    assert torch.isfinite(merge(stack, mode, activation="softmax")).all()


def _ttach_merge(stack, mode):
    merger = ttach.base.Merger(mode, len(stack))
    for view in stack:
        merger.append(view)
    return merger.result


def test_vote_tie_goes_to_the_higher_summed_score():
    stack = torch.tensor([[[0.9, 0.1, 0.0]], [[0.2, 0.7, 0.1]]])  # one vote each for classes 0 and 1
    out = merge(stack, "vote")
    assert torch.allclose(out, torch.tensor([[0.5 + NUDGE, 0.5, 0.0]]))
    assert out.argmax(dim=1).item() == 0


def test_vote_full_tie_is_a_random_pick_seeded_by_the_row_id():
    one = torch.tensor([1.0, 0.0, 0.0])
    two = torch.tensor([0.0, 1.0, 0.0])
    stack = torch.stack([one.expand(64, 3), two.expand(64, 3)])  # votes and scores tie in all 64 rows
    ids = torch.arange(64) * 3 + 1000
    picks = {seed: merge(stack, "vote", seed=seed, ids=ids).argmax(dim=1) for seed in (0, 1, 2)}
    for seed, pick in picks.items():
        assert set(pick.tolist()) == {0, 1}  # random over ids, never the untied class 2
        assert torch.equal(pick, merge(stack, "vote", seed=seed, ids=ids).argmax(dim=1))  # reproducible
        # A function of (seed, id) only: the same row alone, or given its id lazily, picks the same.
        assert merge(stack[:, 5:6], "vote", seed=seed, ids=[int(ids[5])]).argmax(dim=1).item() == pick[5].item()
        lazy = MergeAccumulator("vote", 2, seed=seed)
        for view in stack:
            lazy.add(view)
        assert torch.equal(lazy.result(ids=lambda rows: ids[rows]).argmax(dim=1), pick)
    assert not torch.equal(picks[0], picks[1]) or not torch.equal(picks[0], picks[2])
    fractions = merge(stack, "vote", seed=0, ids=ids)
    assert torch.allclose(fractions.sum(dim=1), torch.full((64,), 1 + NUDGE))
    # Without ids the pick follows the row's own votes and scores: identical rows pick alike.
    plain = merge(stack, "vote").argmax(dim=1)
    assert len(set(plain.tolist())) == 1 and plain[0].item() in (0, 1)
    assert merge(stack[:, :1], "vote").argmax(dim=1).item() == plain[0].item()


def test_a_rows_vote_does_not_depend_on_the_rows_beside_it():
    # Row 0: one vote each, summed scores 1.0 and 1.0000001 (a tie to float rounding). Row 1:
    # huge scores. The tie tolerance is the row's own, so row 0 merges alike alone or with row 1.
    row0 = torch.tensor([[0.6, 0.4], [0.4, 0.6000001]])
    row1 = torch.tensor([[1e6, 0.0], [0.0, 1e6]])
    stack = torch.stack([row0, row1], dim=1)  # (K=2, B=2, C=2)
    for seed in range(8):
        alone = merge(stack[:, :1], "vote", seed=seed)
        together = merge(stack, "vote", seed=seed)
        assert torch.equal(together[:1], alone), seed
        assert torch.equal(merge(stack[:, 1:], "vote", seed=seed), together[1:]), seed


def test_take_rows_keeps_what_was_added_for_those_rows():
    stack = torch.rand(3, 5, 4, generator=torch.Generator().manual_seed(0))
    for mode in ("mean", "vote", "max"):
        acc = MergeAccumulator(mode, 3)
        acc.add(stack[0], 0)
        rows = torch.tensor([1, 3])
        kept = acc.take_rows(rows)
        kept.add(stack[1, rows], 1)
        kept.add(stack[2, rows], 2)
        assert torch.allclose(kept.result(), merge(stack, mode)[rows], atol=1e-6), mode


def test_vote_on_masks_by_hand():
    # 3 views of a (1, 2, 1, 2) mask: pixel 0 votes class 1, 1, 0; pixel 1 votes class 0, 0, 0.
    stack = torch.tensor([[[[[0.1, 0.9]], [[0.9, 0.1]]]], [[[[0.2, 0.8]], [[0.8, 0.2]]]],
                          [[[[0.7, 0.6]], [[0.3, 0.4]]]]])
    out = merge(stack, "vote")
    expected = torch.tensor([[[[1 / 3, 1 + NUDGE]], [[2 / 3 + NUDGE, 0.0]]]])
    assert torch.allclose(out, expected)


@pytest.mark.parametrize("mode", MERGE_MODES)
def test_streaming_accumulator_equals_merge_in_any_order(mode):
    stack = torch.rand(5, 4, 6, dtype=torch.float64)
    weights = None if mode in ("max", "min") else [0.5, 1.0, 2.0, 0.0, 1.5]
    acc = MergeAccumulator(mode, 5, weights)
    for k in [3, 0, 4, 1, 2]:
        acc.add(stack[k], k)
    assert torch.allclose(acc.result(), merge(stack, mode, weights=weights))


@pytest.mark.parametrize(
    "call, error, pattern",
    [
        (lambda: merge(STACK, "median"), UnknownNameError,
         "unknown merge mode 'median'; expected one of: gmean, max, mean, min, sum, tsharpen, vote"),
        (lambda: merge(STACK, "mean", activation="relu"), InvalidInputError,
         "activation must be None, 'softmax' or 'sigmoid', got 'relu'"),
        (lambda: merge(STACK, "max", weights=[1, 1, 1]), InvalidInputError, "do not apply to merge mode 'max'"),
        (lambda: merge(STACK, "mean", weights=[1, 1]), InvalidInputError, r"one value per view \(3\), got 2"),
        (lambda: merge(STACK, "mean", weights=[1, -1, 1]), InvalidInputError, r"non-negative.*\[1.0, -1.0, 1.0\]"),
        (lambda: merge(torch.rand(3), "mean"), InvalidInputError, r"\(K, B, ...\) tensor, got torch.Size\(\[3\]\)"),
        (lambda: MergeAccumulator("mean", 0), InvalidInputError, "n_views must be a positive integer, got 0"),
        (lambda: MergeAccumulator("mean", 2).add(torch.rand(2), 2), InvalidInputError, r"\[0, 1\], got 2"),
        (lambda: MergeAccumulator("mean", 2).result(), InvalidInputError, "no views were added"),
        (lambda: Merger("vote"), InvalidInputError, "Not correct merge type `vote`"),
    ],
)
def test_errors_name_the_bad_value(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


def test_unknown_mode_is_also_a_value_error_and_a_key_error():
    with pytest.raises(ValueError):
        merge(STACK, "median")
    with pytest.raises(KeyError):
        merge(STACK, "median")


@pytest.mark.parametrize("mode", ["mean", "gmean", "sum", "max", "min", "tsharpen"])
@pytest.mark.parametrize("n", [1, 4])
def test_merger_equals_ttach_merger(mode, n):
    views = torch.rand(n, 3, 5, generator=torch.Generator().manual_seed(n)) + 0.01
    ours, theirs = Merger(mode, n), ttach.base.Merger(mode, n)
    for v in views:
        ours.append(v)
        theirs.append(v)
    assert torch.allclose(ours.result, theirs.result, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", MERGE_MODES)
@pytest.mark.parametrize("activation", [None, "softmax"])
def test_adding_a_stack_equals_adding_its_views_one_by_one(mode, activation):
    stack = torch.rand(4, 3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    weights = None if mode in ("max", "min") else [0.5, 0.0, 2.0, 1.0]
    one = MergeAccumulator(mode, 4, weights, activation)
    for k in range(4):
        one.add(stack[k], k)
    two = MergeAccumulator(mode, 4, weights, activation).fresh()  # fresh: same settings, empty
    two.add_stack(stack[[2, 0]], [2, 0])
    two.add_stack(stack[[1, 3]], [1, 3])
    assert torch.allclose(two.result(), one.result(), atol=1e-12)
    assert two.count == 4


def test_fresh_accumulators_do_not_share_state():
    template = MergeAccumulator("mean", 2, [1.0, 3.0])
    a, b = template.fresh(), template.fresh()
    a.add(torch.ones(1, 2), 0)
    a.add(torch.zeros(1, 2), 1)
    b.add(torch.zeros(1, 2), 0)
    b.add(torch.ones(1, 2), 1)
    assert torch.allclose(a.result(), torch.full((1, 2), 0.25))
    assert torch.allclose(b.result(), torch.full((1, 2), 0.75))
    with pytest.raises(InvalidInputError, match="no views were added"):
        template.result()


def test_probabilities_merged_with_renormalize_equal_softmax_of_their_logits():
    logits = torch.randn(3, 4, 6, dtype=torch.float64)
    expected = merge(logits, "gmean", [1, 2, 3], activation="softmax")
    acc = MergeAccumulator("gmean", 3, [1, 2, 3], activation=None, renormalize=True)
    for k, p in enumerate(torch.softmax(logits, dim=2)):
        acc.add(p, k)
    assert torch.allclose(acc.result(), expected, atol=1e-12)


def test_apply_temperature_by_hand():
    out = apply_temperature(torch.tensor([[0.8, 0.2]]), 2.0)
    # softmax(log p / 2) = sqrt(p) / sum(sqrt(p))
    a, b = math.sqrt(0.8), math.sqrt(0.2)
    assert torch.allclose(out, torch.tensor([[a / (a + b), b / (a + b)]]), atol=1e-7)
    masks = torch.tensor([[[[0.8]], [[0.2]]]])  # (B, C, H, W): classes on dim 1
    assert torch.allclose(apply_temperature(masks, 2.0, class_dim=1).flatten(), out.flatten(), atol=1e-7)
    assert apply_temperature(out, None) is out
    with pytest.raises(InvalidInputError, match="`temperature` to be a positive number.*got -1"):
        apply_temperature(out, -1)


def test_matrix_scaling_by_hand():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    # W = I / T, b = 0 is temperature scaling.
    assert torch.allclose(apply_matrix_scaling(p, torch.eye(3) / 2, torch.zeros(3)), apply_temperature(p, 2.0))
    weight, bias = torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, 0.0], [0.2, 0.0, 2.0]]), torch.tensor([0.1, -0.2, 0.3])
    expected = torch.softmax(p.log() @ weight.T + bias, dim=1)
    assert torch.allclose(apply_matrix_scaling(p, weight, bias), expected)
    # Class dimension 1 of (B, C, H, W) masks; raw logits are mapped without a softmax.
    masks = p.T.reshape(1, 3, 2, 1).expand(2, 3, 2, 1)
    got = apply_matrix_scaling(masks, weight, bias, class_dim=1)
    assert torch.allclose(got[1, :, :, 0].T, expected)
    z = torch.tensor([[1.0, -1.0, 0.5]])
    assert torch.allclose(apply_matrix_scaling(z, weight, bias, probs=False), z @ weight.T + bias)
    with pytest.raises(InvalidInputError, match="2-class weights, but the merged output has 3 classes"):
        apply_matrix_scaling(p, torch.eye(2), torch.zeros(2))


@pytest.mark.parametrize(
    "value, pattern",
    [
        ([[1.0]], 'Expected argument `matrix_scaling` to be {"weight"'),
        ({"weight": [[1.0, 0.0], [0.0, 1.0]], "bias": [0.0, 0.0], "x": 1}, '"bias": C numbers'),
        ({"weight": [[1.0]], "bias": [0.0]}, "C >= 2"),
        ({"weight": [[1.0, 0.0], [0.0, math.inf]], "bias": [0.0, 0.0]}, "NaN/inf"),
    ],
)
def test_bad_matrix_scaling_is_named(value, pattern):
    with pytest.raises(InvalidInputError, match=pattern):
        check_matrix_scaling(value)


@pytest.mark.parametrize(
    "weights, pattern",
    [
        ("abc", r"weights must be a list of 3 numbers \(one per view\), got str 'abc'"),
        (5, r"weights must be a list of 3 numbers \(one per view\), got int 5"),
        ([1, None, 1], r"not a number: None"),
        ([1, True, 1], r"not a number: True"),
        (torch.ones(3, 1, 1), r"3 numbers \(one per view\) or 3 lists of C numbers.*shape \(3, 1, 1\)"),
        (torch.ones(3, 1), r"class-by-view weights hold 1 classes per view, but the model's output has 3"),
    ],
)
def test_weights_of_the_wrong_type_are_named(weights, pattern):
    with pytest.raises(InvalidInputError, match=pattern):
        merge(STACK, "mean", weights=weights)


@pytest.mark.parametrize("n", ["x", 0, -1, 2.5, True, None])
def test_merger_refuses_a_bad_count(n):
    with pytest.raises(InvalidInputError, match=f"Merger's `n` must be a positive integer.*got {n!r}"):
        Merger("mean", n)
