"""One answer per image: the engine's results, checks and errors do not depend on the pass plan
(``pass_size``) or on how the images are batched. Parametrized over the merge registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.conftest import TinyClassifier
from ttakit import get_policy
from ttakit import transforms as T
from ttakit._pass_tuner import PassTuner
from ttakit.engine import TTAEngine
from ttakit.errors import InvalidInputError, ModelOutputError
from ttakit.merge import MERGE_MODES
from ttakit.policy import Compose, Policy

pytestmark = pytest.mark.usefixtures("single_thread")

N, MAX_BATCH = 10, 64
PLANS = [1, 2, 7, 32, MAX_BATCH]  # images per forward pass: one view of one image ... max_batch
BATCHES = [1, 3, None]  # images per call (None: all N in one call)


def _images(n: int = N) -> torch.Tensor:
    return torch.rand(n, 3, 6, 6, generator=torch.Generator().manual_seed(11)) * 0.9


def _model() -> nn.Module:
    torch.manual_seed(0)
    return TinyClassifier(softmax=False).eval()


def _matrix(classes: int = 5) -> dict:
    g = torch.Generator().manual_seed(4)
    weight = torch.eye(classes).roll(1, 0) + 0.3 * torch.randn(classes, classes, generator=g)  # moves the argmax
    return {"weight": weight.tolist(), "bias": torch.randn(classes, generator=g).tolist()}


def _policy(mode: str, gate: bool, scaled: bool, class_weights: bool) -> Policy:
    policy = Compose([T.HorizontalFlip(), T.Rotate90([0, 90, 180, 270])]).to_policy()  # d4's 8 views
    policy.merge_mode = mode
    if class_weights:
        g = torch.Generator().manual_seed(2)
        policy.weights = (torch.rand(len(policy), 5, generator=g) + 0.1).tolist()
    if gate:
        conf = torch.softmax(_model()(_images()), 1).amax(1).detach()
        policy.gate_threshold = float(conf.median())
    if scaled:
        policy.temperature = 1.7
        policy.matrix_scaling = _matrix()
    return policy


def _run(engine: TTAEngine, x: torch.Tensor, batch: int | None, ids: torch.Tensor | None = None, **kwargs):
    """The engine over ``x`` in calls of ``batch`` images; the outputs concatenated."""
    size = x.shape[0] if batch is None else batch
    if ids is not None:
        kwargs["ids"] = lambda i: ids[i : i + size]
    outs = [
        engine.run(x[i : i + size], **{k: v(i) if k == "ids" else v for k, v in kwargs.items()})
        for i in range(0, x.shape[0], size)
    ]
    merged = torch.cat([o.merged for o in outs])
    gated = None if outs[0].gated is None else torch.cat([o.gated for o in outs])
    unc = None
    if outs[0].uncertainty is not None:
        unc = {key: torch.cat([o.uncertainty[key] for o in outs]) for key in outs[0].uncertainty}
    views = None if outs[0].views is None else torch.cat([o.views for o in outs], 1)
    return merged, gated, unc, views


CONFIGS = [
    pytest.param(mode, gate, scaled, False, id=f"{mode}-{'gate' if gate else 'nogate'}-{'scaled' if scaled else 'plain'}")
    for mode in MERGE_MODES
    for gate in (False, True)
    for scaled in (False, True)
] + [
    pytest.param("mean", gate, scaled, True, id=f"classweights-{'gate' if gate else 'nogate'}-{'scaled' if scaled else 'plain'}")
    for gate in (False, True)
    for scaled in (False, True)
]


@pytest.mark.parametrize(("mode", "gate", "scaled", "class_weights"), CONFIGS)
def test_every_plan_and_batching_gives_the_same_answer(mode, gate, scaled, class_weights):
    x, model = _images(), _model()
    policy = _policy(mode, gate, scaled, class_weights)
    reference = None
    for pass_size in PLANS:
        engine = TTAEngine(model, policy, max_batch=MAX_BATCH, pass_size=pass_size)
        for batch in BATCHES:
            got = _run(engine, x, batch, return_uncertainty=True, return_views=True)
            if reference is None:
                reference = got
                if gate:
                    assert 0 < int(got[1].sum()) < N  # the gate splits the images
                continue
            merged, gated, unc, views = got
            where = f"pass_size={pass_size}, batch={batch}"
            if mode == "vote" and not gate and not scaled:  # vote fractions: exactly the same
                assert torch.equal(merged, reference[0]), where
            # (the gate's plain rows are the identity's probabilities, and a temperature or matrix
            # is a matrix product over the batch: both equal to float rounding)
            assert torch.allclose(merged, reference[0], atol=1e-6, rtol=0), where
            assert torch.equal(merged.argmax(1), reference[0].argmax(1)), where
            assert (gated is None) == (reference[1] is None) and (gated is None or torch.equal(gated, reference[1]))
            assert torch.allclose(views, reference[3], atol=1e-6, rtol=0), where
            for key, value in reference[2].items():
                assert torch.allclose(unc[key], value, atol=1e-6, rtol=0), f"{key}, {where}"


class Faulty(nn.Module):
    """The tiny classifier, with NaN (or -inf in one logit) wherever the view's top-left pixel is
    bright: image 2 (bright bottom-right corner) only under the views that move that corner to
    the top left, image 6 (bright top-left corner) under the identity too."""

    def __init__(self, value: float):
        super().__init__()
        self.model = _model()
        self.value = value

    def forward(self, x):
        out = self.model(x)
        bad = x[:, 0, 0, 0] > 0.95
        if self.value != self.value:  # NaN: every logit
            return torch.where(bad[:, None], torch.full_like(out, self.value), out)
        return torch.where(bad[:, None] & (torch.arange(out.shape[1]) == 0), torch.full_like(out, self.value), out)


def _faulty_images() -> torch.Tensor:
    x = _images()
    x[2, :, -1, -1] = 1.0
    x[6, :, 0, 0] = 1.0
    return x


@pytest.mark.parametrize("value", [float("nan"), float("-inf"), float("inf")], ids=["nan", "-inf", "inf"])
@pytest.mark.parametrize("mode", MERGE_MODES)
@pytest.mark.parametrize("gate", [False, True], ids=["nogate", "gate"])
def test_non_finite_outputs_raise_the_same_error_in_every_plan(value, mode, gate):
    x, ids = _faulty_images(), torch.arange(N) + 100
    policy = _policy(mode, gate, scaled=False, class_weights=False)
    messages = set()
    for pass_size in PLANS:
        engine = TTAEngine(Faulty(value), policy, max_batch=MAX_BATCH, pass_size=pass_size)
        for batch in BATCHES:
            with pytest.raises(ModelOutputError, match="NaN/inf") as caught:
                _run(engine, x, batch, ids=ids)
            messages.add(str(caught.value))
    assert len(messages) == 1, messages
    (message,) = messages
    assert "id 102" in message or "id 106" in message
    if not gate:  # image 2 comes first; every view that shows its bright corner at the top left is named
        assert "id 102" in message and "'rot180'" in message and "'identity'" not in message


def test_non_finite_outputs_without_ids_name_the_row_of_the_call():
    x = _faulty_images()
    policy = _policy("mean", gate=False, scaled=False, class_weights=False)
    for pass_size in PLANS:
        with pytest.raises(ModelOutputError, match=r"image 2 of the batch.*'rot180'"):
            TTAEngine(Faulty(float("-inf")), policy, pass_size=pass_size)(x)
    out = TTAEngine(Faulty(float("nan")), policy, check_outputs=False)(x)
    assert torch.isnan(out[2]).all() and torch.isfinite(out[0]).all()


class SizeDependent(nn.Module):
    """Returns ``(B, W)`` scores: the output shape follows the view's width."""

    def forward(self, x):
        return x.mean(dim=(1, 2))


@pytest.mark.parametrize("pass_size", PLANS)
@pytest.mark.parametrize("check_outputs", [True, False])
def test_views_whose_outputs_change_shape_get_one_clear_error_in_every_plan(pass_size, check_outputs):
    policy = Compose([T.HorizontalFlip(), T.Scale([2])]).to_policy()  # identity, hflip, scale2, hflip+scale2
    engine = TTAEngine(SizeDependent(), policy, activation=None, pass_size=pass_size, check_outputs=check_outputs)
    pattern = r"view 'scale2' returned outputs of shape \(12,\) per image.*view 'identity' returned \(6,\)"
    with pytest.raises(ModelOutputError, match=pattern):
        engine(torch.rand(3, 1, 6, 6))


@pytest.mark.parametrize("pass_size", [1, 2])  # the views run in separate forward passes
@pytest.mark.parametrize("mode", MERGE_MODES)
def test_a_model_whose_output_shape_changes_from_call_to_call_gets_a_clear_error(pass_size, mode):
    calls = []

    def model(x):
        calls.append(1)
        return x.mean(dim=(2, 3)).repeat(1, len(calls))  # (B, 1), then (B, 2), ...

    engine = TTAEngine(model, "hflip", merge_mode=mode, pass_size=pass_size)
    with pytest.raises(ModelOutputError, match=r"view 'hflip' returned outputs of shape \(2,\) per image.*\(1,\)"):
        engine(torch.rand(2, 1, 4, 4))


class OneHot(nn.Module):
    """Probabilities that put everything on class 0 for the plain image and class 1 for its
    mirror image: with hflip the two views' votes and scores tie exactly in every row."""

    outputs = "probs"

    def forward(self, x):
        left = x[..., 0].mean(dim=(1, 2)) > x[..., -1].mean(dim=(1, 2))
        return torch.stack([left, ~left, torch.zeros_like(left)], 1).float()


@pytest.mark.parametrize("pass_size", PLANS)
def test_vote_ties_are_broken_per_image_not_per_batch(pass_size):
    x = torch.rand(40, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    engine = TTAEngine(OneHot(), "hflip", merge_mode="vote", pass_size=pass_size)
    whole = engine(x).argmax(1)
    assert set(whole.tolist()) == {0, 1}  # a pick among the tied classes, not always the first
    for batch in (1, 3, 7):
        assert torch.equal(_run(engine, x, batch)[0].argmax(1), whole)
    # With ids: a function of (seed, id) only, wherever the image sits in the batch.
    ids = torch.arange(40) * 7 + 3
    by_id = engine(x, ids=ids).argmax(1)
    order = torch.randperm(40, generator=torch.Generator().manual_seed(1))
    assert torch.equal(engine(x[order], ids=ids[order]).argmax(1), by_id[order])
    assert torch.equal(engine(x[:1], ids=[int(ids[5])]).argmax(1), by_id[5:6])  # a list of ints works too
    assert torch.equal(engine(x[5:6], ids=ids[5:6]).argmax(1), by_id[5:6])
    other_seed = TTAEngine(OneHot(), "hflip", merge_mode="vote", pass_size=pass_size, seed=1)
    assert not torch.equal(other_seed(x, ids=ids).argmax(1), by_id)


def test_without_ids_the_tie_break_follows_the_image_content():
    x = torch.rand(20, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    engine = TTAEngine(OneHot(), "hflip", merge_mode="vote")
    twice = torch.cat([x, x])  # the same image twice in one batch: the same pick
    picks = engine(twice).argmax(1)
    assert torch.equal(picks[:20], picks[20:])


@pytest.mark.parametrize(
    "ids, pattern",
    [
        ([1, 2], r"ids must hold one integer per image \(3\), got 2"),
        (torch.zeros(3, 2, dtype=torch.long), r"ids must be .*\(B,\).*got a tensor of shape \(3, 2\)"),
        (torch.zeros(3), r"ids must be .*integer.*got a tensor of dtype torch.float32"),
        (["a", "b", "c"], r"ids must be .*integers.*'a'"),
        ("abc", r"ids must be .*got str"),
    ],
)
def test_bad_ids_are_named(ids, pattern):
    with pytest.raises(InvalidInputError, match=pattern):
        TTAEngine(_model(), "hflip").run(torch.rand(3, 3, 6, 6), ids=ids)


def test_disagreement_is_measured_against_the_reported_class():
    """A matrix that swaps the two classes: every view says class 0, the engine reports class 1,
    so every view disagrees with the answer."""

    def model(x):
        return torch.stack([x.mean(dim=(1, 2, 3)) + 3.0, x.mean(dim=(1, 2, 3))], 1)

    swap = {"weight": [[0.0, 1.0], [1.0, 0.0]], "bias": [0.0, 0.0]}
    for pass_size in PLANS:
        out = TTAEngine(model, "hflip", matrix_scaling=swap, pass_size=pass_size).run(
            torch.rand(4, 1, 4, 4), return_uncertainty=True
        )
        assert (out.merged.argmax(1) == 1).all()
        assert torch.equal(out.uncertainty["disagreement"], torch.ones(4))


def test_the_default_plan_is_deterministic_and_auto_never_changes_an_answer():
    """The default plan does not depend on timing; pass_size='auto' picks a plan by timing (here a
    fake clock that makes stacked passes slow) and gives the same answers as the default."""
    x, model, policy = _images(2), _model(), _policy("vote", gate=False, scaled=True, class_weights=False)
    default = TTAEngine(model, policy, max_batch=MAX_BATCH)
    assert default.pass_tuner is None
    now = [0.0]

    class Slow(nn.Module):
        def forward(self, x):
            now[0] += 1.0 if x.shape[0] > 2 else 0.1  # stacked passes cost 10x
            return model(x)

    auto = TTAEngine(Slow(), policy, max_batch=MAX_BATCH, pass_size="auto")
    auto.pass_tuner = PassTuner(trials=2, clock=lambda: now[0])
    expected = default(x)
    for _ in range(8):
        assert torch.equal(auto(x), expected)
    assert auto.tuned_pass_sizes == {tuple(x.shape): 2}  # one view of both images per pass
    with pytest.raises(InvalidInputError, match=r"pass_size must be a positive integer.*'auto'.*got 'fast'"):
        TTAEngine(model, policy, pass_size="fast")


class SoftTie(nn.Module):
    """Like :class:`OneHot` but with probabilities 0.6 / 0.4 on images whose mean is below 0.5
    (0.95 / 0.05 above): under a gate at 0.9 only the unsure ones get the mirror view, and there
    the two views tie exactly."""

    outputs = "probs"

    def forward(self, x):
        left = x[..., 0].mean(dim=(1, 2)) > x[..., -1].mean(dim=(1, 2))
        high = torch.where(x.mean(dim=(1, 2, 3)) > 0.5, 0.95, 0.6)
        first = torch.where(left, high, 1 - high)
        return torch.stack([first, 1 - first, torch.zeros_like(first)], 1)


@pytest.mark.parametrize("pass_size", [1, 7, MAX_BATCH])
def test_vote_ties_under_the_gate_are_broken_per_image(pass_size):
    x = torch.rand(40, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    x[::3] += 0.3  # some confident images
    policy = Policy(get_policy("hflip").views, merge_mode="vote", gate_threshold=0.9)
    engine = TTAEngine(SoftTie(), policy, pass_size=pass_size)
    ids = torch.arange(40) + 500
    whole = engine.run(x, ids=ids)
    assert 0 < int(whole.gated.sum()) < 40
    assert set(whole.merged[whole.gated].argmax(1).tolist()) == {0, 1}
    for batch in (1, 3, 7):
        merged, gated, _, _ = _run(engine, x, batch, ids=ids)
        assert torch.equal(gated, whole.gated)
        assert torch.equal(merged.argmax(1), whole.merged.argmax(1))
    plain = engine(x)  # without ids: the image's pixels seed its pick, alike in every batch
    assert torch.equal(_run(engine, x, 3)[0].argmax(1), plain.argmax(1))


@pytest.mark.parametrize(
    ("batch", "passes"),
    [
        (1, [2]),  # both views of a small batch in one pass
        (8, [16]),
        (32, [32, 32]),
        (64, [64, 64]),  # 33..max_batch-1: one view of the whole batch per pass, as ttach
        (256, [32] * 16),  # max_batch and more: chunks of 32, one view per pass
    ],
)
def test_the_default_cpu_plan_follows_the_batch_size(batch, passes):
    seen = []

    class Recording(nn.Module):
        def forward(self, x):
            seen.append(x.shape[0])
            return x.mean(dim=(2, 3))

    TTAEngine(Recording(), "hflip", max_batch=256)(torch.rand(batch, 3, 4, 4))
    assert seen == passes
