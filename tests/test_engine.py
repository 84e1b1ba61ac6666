"""ttakit.engine: stacking and chunking (bounded memory), per-view outputs, devices, dict
outputs, extra arguments, and errors for bad inputs and bad model outputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ttakit
from ttakit import transforms as T
from ttakit.engine import TTAEngine, as_policy
from ttakit.errors import InvalidInputError, ModelOutputError, NotInvertibleError, UnknownNameError
from ttakit.jobs._policy_eval import evaluate_policies, predict_probs
from ttakit.merge import apply_matrix_scaling, apply_temperature, merge
from ttakit.policy import Compose, Policy, Step, View
from ttakit.uncertainty import view_uncertainty

pytestmark = pytest.mark.usefixtures("single_thread")


class Recorder(nn.Module):
    """Wraps a model and records the batch size and grad mode of every forward pass."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.batches: list[int] = []
        self.inference: list[bool] = []

    def forward(self, x, *args):
        self.batches.append(x.shape[0])
        self.inference.append(torch.is_inference_mode_enabled())
        return self.model(x, *args)


def manual_views(model, policy, x, target="label"):
    """Each view run on its own, de-augmented by hand: the reference for the engine."""
    outs = []
    for t in as_policy(policy):
        y = model(t.augment_image(x))
        outs.append(t.deaugment_label(y) if target == "label" else t.deaugment_mask(y))
    return torch.stack(outs)


@pytest.mark.parametrize("batch, max_batch", [(10, 4), (10, 1), (7, 16), (2, 16), (3, 8), (256, 64)])
def test_forward_passes_never_exceed_max_batch(softmax_classifier, batch, max_batch):
    model = Recorder(softmax_classifier)
    x = torch.rand(batch, 3, 6, 6)
    engine = TTAEngine(model, "d4", max_batch=max_batch)
    engine(x)
    assert max(model.batches) <= max_batch
    assert sum(model.batches) == 8 * batch  # every view of every image exactly once
    if batch <= max_batch:
        # Views of a small batch share forward passes: as many per pass as fit.
        per_pass = min(8, max_batch // batch)
        assert len(model.batches) == -(-8 // per_pass)


def test_small_batch_views_are_stacked_into_one_pass(softmax_classifier):
    model = Recorder(softmax_classifier)
    TTAEngine(model, "d4", max_batch=16)(torch.rand(2, 3, 6, 6))
    assert model.batches == [16]


def test_last_partial_chunk_stacks_its_views(softmax_classifier):
    model = Recorder(softmax_classifier)
    TTAEngine(model, "hflip", max_batch=8)(torch.rand(11, 3, 6, 6))
    assert model.batches == [8, 8, 6]  # 8 images x 1 view, twice; then 3 images x 2 views


def test_chunking_does_not_change_the_result(softmax_classifier):
    x = torch.rand(9, 3, 6, 6)
    reference = manual_views(softmax_classifier, "d4", x)
    for max_batch in (1, 3, 9, 20, 256):
        out = TTAEngine(softmax_classifier, "d4", activation=None, max_batch=max_batch).run(x, return_views=True)
        assert torch.allclose(out.views, reference, atol=1e-6)
        assert torch.allclose(out.merged, reference.mean(0), atol=1e-6)


def test_per_view_outputs_and_names(logits_classifier):
    x = torch.rand(4, 3, 6, 6)
    engine = TTAEngine(logits_classifier, "flip", merge_mode="gmean", max_batch=5)
    out = engine.run(x, return_views=True)
    assert out.views.shape == (4, 4, 5)  # (K, B, classes)
    assert out.view_names == ["identity", "vflip", "hflip", "hflip+vflip"] == engine.view_names
    reference = manual_views(logits_classifier, "flip", x)
    assert torch.allclose(out.views, reference, atol=1e-6)  # raw outputs, before activation
    # The engine's own API merges probabilities by default ("auto" -> softmax for labels).
    assert torch.allclose(out.merged, merge(reference, "gmean", activation="softmax"), atol=1e-6)
    assert engine.run(x).views is None


def test_segmentation_masks_and_mixed_view_sizes(segmenter):
    model = Recorder(segmenter)
    policy = Compose([T.HorizontalFlip(), T.Scale([0.5, 2])])
    x = torch.rand(2, 3, 8, 8)
    out = TTAEngine(model, policy, target="mask", max_batch=64).run(x, return_views=True)
    # Views of different sizes cannot share a batch: one pass per size, both flips together.
    assert sorted(model.batches) == [4, 4, 4] and len(model.batches) == 3
    assert out.merged.shape == (2, 2, 8, 8) and out.views.shape == (6, 2, 2, 8, 8)
    assert torch.allclose(out.views, manual_views(segmenter, policy, x, "mask"), atol=1e-6)


def test_runs_under_inference_mode_and_returns_ordinary_tensors(softmax_classifier):
    model = Recorder(softmax_classifier)
    out = TTAEngine(model, "hflip")(torch.rand(2, 3, 6, 6))
    assert model.inference == [True]
    assert not out.is_inference()
    out[out < 0.5] = 0  # callers may write into the result, as with ttach
    TTAEngine(model, "hflip", inference_mode=False)(torch.rand(2, 3, 6, 6))
    assert model.inference[-1] is False


def test_gradients_flow_without_inference_mode(softmax_classifier):
    x = torch.rand(2, 3, 6, 6, requires_grad=True)
    TTAEngine(softmax_classifier, "d4", inference_mode=False)(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_runs_on_the_models_device(softmax_classifier):
    seen = []

    class DeviceProbe(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = softmax_classifier.double()

        def forward(self, x):
            seen.append((x.device, x.dtype))
            return self.inner(x.double())

    out = TTAEngine(DeviceProbe(), "hflip", device="cpu")(torch.rand(2, 3, 6, 6))
    assert seen == [(torch.device("cpu"), torch.float32)] and out.dtype == torch.float64
    if torch.cuda.is_available():  # pragma: no cover - exercised on GPU machines
        model = Recorder(softmax_classifier.float().cuda())
        assert TTAEngine(model, "hflip")(torch.rand(2, 3, 6, 6)).device.type == "cuda"


def test_plain_functions_work_as_models():
    calls = []

    def top_left(x):  # a plain function, not an nn.Module: each image's top-left pixel per channel
        calls.append(x.shape[0])
        return x[:, :, 0, 0]

    x = torch.rand(3, 2, 5, 7)
    out = TTAEngine(top_left, "hflip", activation=None)(x)
    # By hand: the identity sees the top-left pixel, the flipped view the top-right one.
    assert torch.allclose(out, (x[:, :, 0, 0] + x[:, :, 0, -1]) / 2, atol=1e-7)
    assert calls == [6]  # both views of the 3 images in one call
    out = TTAEngine(top_left, "vflip", activation="softmax")(x)
    expected = (torch.softmax(x[:, :, 0, 0], 1) + torch.softmax(x[:, :, -1, 0], 1)) / 2
    assert torch.allclose(out, expected, atol=1e-6)


def test_dict_outputs_and_output_key(softmax_classifier):
    model = lambda x: {"label": softmax_classifier(x), "aux": x}  # noqa: E731
    x = torch.rand(2, 3, 6, 6)
    out = TTAEngine(model, "hflip", output_key="label", activation=None)(x)
    assert torch.allclose(out, manual_views(softmax_classifier, "hflip", x).mean(0), atol=1e-6)
    with pytest.raises(ModelOutputError, match=r"mapping with keys \['aux', 'label'\]; name the output"):
        TTAEngine(model, "hflip")(x)
    with pytest.raises(ModelOutputError, match=r"output_key 'logits' is not among.*\['aux', 'label'\]"):
        TTAEngine(model, "hflip", output_key="logits")(x)
    with pytest.raises(ModelOutputError, match="output_key='label' was given but the model returned Tensor"):
        TTAEngine(softmax_classifier, "hflip", output_key="label")(x)


def test_extra_positional_arguments_reach_every_view():
    calls = []

    def model(x, bias, scale):
        calls.append(x.shape[0])
        return x.mean(dim=(1, 2, 3)).unsqueeze(1) * scale + bias

    x = torch.rand(3, 1, 4, 4)
    bias = torch.tensor([[1.0], [2.0], [3.0]])  # per-sample: views cannot be stacked
    out = TTAEngine(model, "d4", activation=None, max_batch=64)(x, bias, 2.0)
    assert calls == [3] * 8
    assert torch.allclose(out, x.mean(dim=(1, 2, 3)).unsqueeze(1) * 2 + bias)


def test_weights_come_from_the_policy_unless_given(logits_classifier):
    x = torch.rand(2, 3, 6, 6)
    policy = ttakit.get_policy("hflip")
    policy.weights = [3.0, 1.0]
    views = manual_views(logits_classifier, policy, x)
    out = TTAEngine(logits_classifier, policy, activation=None)(x)
    assert torch.allclose(out, (3 * views[0] + views[1]) / 4, atol=1e-6)
    out = TTAEngine(logits_classifier, policy, activation=None, weights=[0, 1])(x)
    assert torch.allclose(out, views[1], atol=1e-6)


def test_amp_runs_and_returns_float32(softmax_classifier):
    x = torch.rand(2, 3, 6, 6)
    out = TTAEngine(softmax_classifier, "hflip", amp=True, activation=None)(x)
    assert out.dtype == torch.float32
    assert torch.allclose(out, manual_views(softmax_classifier, "hflip", x).mean(0), atol=3e-2)


def test_as_policy_accepts_the_usual_spellings():
    import ttach

    assert as_policy("d4").view_names == ttakit.get_policy("d4").view_names
    assert len(as_policy(ttach.aliases.d4_transform())) == 8
    assert as_policy([View.identity(), View([Step(T.VerticalFlip(), True)])]).view_names == ["identity", "vflip"]
    with pytest.raises(InvalidInputError, match="policy must be a ttakit.Policy.*got int"):
        as_policy(3)
    with pytest.raises(UnknownNameError, match="unknown policy 'd8'; expected one of: .*d4"):
        as_policy("d8")


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "x, pattern",
    [
        (torch.rand(3, 6, 6), r"images must have shape \(B, C, H, W\), got 3-D shape \(3, 6, 6\)"),
        (torch.rand(2, 28, 28, 1), r"images looks channels-last \(NHWC\) with shape \(2, 28, 28, 1\)"),
        (torch.zeros(2, 3, 6, 6, dtype=torch.uint8), "floating-point tensor, got dtype torch.uint8"),
        (torch.rand(0, 3, 6, 6), r"empty batch of shape \(0, 3, 6, 6\)"),
        ([[0.0]], "images must be a torch.Tensor.*got list"),
    ],
)
def test_bad_images_are_refused(softmax_classifier, x, pattern):
    with pytest.raises(InvalidInputError, match=pattern):
        TTAEngine(softmax_classifier, "hflip")(x)


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        ({"max_batch": 0}, InvalidInputError, "max_batch must be a positive integer number of images, got 0"),
        ({"max_batch": 2.5}, InvalidInputError, "got 2.5"),
        ({"merge_mode": "median"}, UnknownNameError, "unknown merge mode 'median'; expected one of"),
        ({"activation": "tanh"}, InvalidInputError, "got 'tanh'"),
        ({"target": "keypoints"}, InvalidInputError, "target 'keypoints' needs a deaugment hook"),
        ({"target": "pixels"}, InvalidInputError, "target must be one of.*got 'pixels'"),
    ],
)
def test_bad_settings_are_refused(softmax_classifier, kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        TTAEngine(softmax_classifier, "hflip", **kwargs)


def test_non_invertible_views_fail_when_the_engine_is_built(segmenter):
    with pytest.raises(NotInvertibleError, match="Rotate cannot invert the 'mask' target"):
        TTAEngine(segmenter, Compose([T.Rotate([10])]), target="mask")
    with pytest.raises(InvalidInputError, match="model must be callable.*got str"):
        TTAEngine("model", "hflip")


@pytest.mark.parametrize("max_batch", [1, 16])  # views run apart, or stacked in one pass
def test_nan_outputs_are_reported_with_the_view(max_batch):
    def model(x):  # NaN for every image whose top-left pixel is not 0.25: the flipped views
        out = x.mean(dim=(2, 3))
        return torch.where(x[:, :1, 0, 0] == 0.25, out, torch.full_like(out, torch.nan))

    x = torch.zeros(2, 1, 4, 4)
    x[:, 0, 0, 0] = 0.25
    # The first image with a NaN/inf output and every view that gave one, whatever the plan.
    with pytest.raises(ModelOutputError, match=r"NaN/inf for image 0 of the batch under view\(s\) 'hflip';"):
        TTAEngine(model, "hflip", activation=None, max_batch=max_batch)(x)
    with pytest.raises(ModelOutputError, match=r"NaN/inf for image 0 of the batch under view\(s\) 'vflip', 'hflip', 'hflip\+vflip';"):
        TTAEngine(model, "flip", activation=None, max_batch=max_batch)(x)
    with pytest.raises(ModelOutputError, match=r"NaN/inf for the image with id 7 under view\(s\) 'hflip';"):
        TTAEngine(model, "hflip", activation=None, max_batch=max_batch)(x, ids=[7, 8])
    out = TTAEngine(model, "hflip", activation=None, check_outputs=False, max_batch=max_batch)(x)
    assert torch.isnan(out).all()


def test_outputs_of_inconsistent_shape_across_views_are_reported():
    flatten = lambda x: x.flatten(1)[:, : x.shape[-1]]  # noqa: E731 - shape follows the view's width
    with pytest.raises(ModelOutputError, match=r"view 'rot90' returned outputs of shape \(4,\) per image.*view 'identity' returned \(6,\)"):
        TTAEngine(flatten, "d4", activation=None, max_batch=2)(torch.rand(2, 1, 4, 6))


@pytest.mark.parametrize(
    "model, pattern",
    [
        (lambda x: x.mean(), r"returned shape \(\) for a batch of 2 images"),
        (lambda x: x[:1].mean(dim=(2, 3)), r"returned shape \(1, 3\) for a batch of 2 images"),
        (lambda x: [x], "must return a tensor.*got list"),
    ],
)
def test_outputs_without_the_batch_dimension_are_reported(model, pattern):
    with pytest.raises(ModelOutputError, match=pattern):
        TTAEngine(model, "hflip", activation=None, max_batch=2)(torch.rand(2, 3, 6, 6))


def test_segmentation_outputs_must_be_masks():
    with pytest.raises(ModelOutputError, match=r"masks of shape \(B, C, H, W\), got shape \(2, 3\)"):
        TTAEngine(lambda x: x.mean(dim=(2, 3)), "hflip", target="mask")(torch.rand(2, 3, 6, 6))


def test_identity_policy_is_plain_inference(softmax_classifier):
    x = torch.rand(3, 3, 6, 6)
    engine = TTAEngine(softmax_classifier, Policy.identity(), activation=None)
    assert len(engine) == 1 and torch.allclose(engine(x), softmax_classifier(x))


# --------------------------------------------------------------------------- one policy, one path


class Counter(nn.Module):
    """Counts the model's calls and the images it sees."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.calls = 0
        self.images = 0

    def forward(self, x):
        self.calls += 1
        self.images += x.shape[0]
        return self.model(x)


SHIFT = View([Step(T.Shift([(1, 0)]), (1, 0))])


def _policy(gate=None, temperature=None, weights=(2.0, 1.0, 0.5)):
    hflip = Compose([T.HorizontalFlip()]).views[1]
    return Policy([hflip, View.identity(), SHIFT], name="searched", weights=list(weights),
                  temperature=temperature, gate_threshold=gate)


def _by_hand(model, policy, x):
    """The policy computed view by view: (plain softmax, merged softmax with weights, confidence)."""
    views = torch.stack([model(t.augment_image(x)) for t in policy]).detach()
    probs = torch.softmax(views, dim=2)
    w = torch.tensor(policy.weights)[:, None, None]
    merged = (probs * w).sum(0) / w.sum()
    plain = probs[1]  # the identity is the second view
    return plain, merged, plain.max(1).values


def _matrix(classes: int = 5, seed: int = 0) -> dict[str, list]:
    g = torch.Generator().manual_seed(seed)
    weight = torch.eye(classes) + 0.3 * torch.randn(classes, classes, generator=g)
    return {"weight": weight.tolist(), "bias": torch.randn(classes, generator=g).tolist()}


@pytest.mark.parametrize("scaled", [False, True], ids=["temperature", "temperature+matrix"])
def test_engine_wrapper_and_evaluate_agree_on_a_full_policy(logits_classifier, scaled):
    x = torch.rand(40, 3, 6, 6, generator=torch.Generator().manual_seed(3))
    plain, merged, conf = _by_hand(logits_classifier, _policy(), x)
    gate = float(conf.median())
    policy = _policy(gate=gate, temperature=1.7)
    matrix = _matrix() if scaled else None
    policy.matrix_scaling = matrix
    gated = conf < gate
    assert 0 < int(gated.sum()) < 40
    # By hand: gated rows get the weighted merge, temperature-scaled (then matrix-scaled); the
    # others the plain softmax.
    expected = plain.clone()
    expected[gated] = apply_temperature(merged[gated], 1.7)
    if scaled:
        expected[gated] = apply_matrix_scaling(expected[gated], matrix["weight"], matrix["bias"])
        assert not torch.equal(expected.argmax(1), apply_temperature(merged, 1.7).where(gated[:, None], plain).argmax(1))
    engine = TTAEngine(logits_classifier, policy, max_batch=16).run(x)
    wrapper = ttakit.ClassificationTTAWrapper(logits_classifier, policy, activation="softmax", max_batch=16)(x)
    probs, passes = predict_probs(logits_classifier, x, policy, max_batch=16)
    data = ttakit.data.ImageDataset(x, torch.arange(40) % 5, list("abcde"))
    evaluated = evaluate_policies(logits_classifier, data, [policy], progress=False, bootstrap_resamples=10)[1]
    assert evaluated.name == "searched"
    for got in (engine.merged, wrapper, probs, evaluated.probs):
        assert torch.allclose(got, expected, atol=1e-6)
    assert torch.equal(engine.gated, gated)
    assert engine.passes_per_image == pytest.approx(1 + 2 * int(gated.sum()) / 40)
    assert passes == evaluated.forward_passes_per_image == pytest.approx(engine.passes_per_image)
    assert engine.passes.tolist() == [3 if g else 1 for g in gated.tolist()]


def test_matrix_scaling_follows_the_temperature_on_every_path(logits_classifier):
    """Without a gate, run(), repeated plain calls (the short path) and raw logits all apply the
    temperature and then the matrix; sigmoid outputs refuse a matrix."""
    x = torch.rand(6, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    matrix = _matrix()
    policy = _policy(temperature=2.0)
    policy.matrix_scaling = matrix
    _, merged, _ = _by_hand(logits_classifier, policy, x)
    expected = apply_matrix_scaling(apply_temperature(merged, 2.0), matrix["weight"], matrix["bias"])
    engine = TTAEngine(logits_classifier, policy)
    assert torch.allclose(engine.run(x).merged, expected, atol=1e-6)
    for _ in range(3):
        assert torch.allclose(engine(x), expected, atol=1e-6)
    raw = TTAEngine(logits_classifier, policy, activation=None)(x)
    views = manual_views(logits_classifier, policy, x)
    w = torch.tensor([2.0, 1.0, 0.5])[:, None, None]
    z = (views * w).sum(0) / w.sum() / 2.0
    assert torch.allclose(raw, z @ torch.tensor(matrix["weight"]).T + torch.tensor(matrix["bias"]), atol=1e-5)
    off = TTAEngine(logits_classifier, policy, matrix_scaling=None)(x)
    assert torch.allclose(off, apply_temperature(merged, 2.0), atol=1e-6)
    with pytest.raises(InvalidInputError, match="matrix_scaling.*sigmoid"):
        TTAEngine(logits_classifier, policy, activation="sigmoid")
    policy.matrix_scaling = _matrix(classes=3)
    with pytest.raises(InvalidInputError, match="3-class weights, but the merged output has 5 classes"):
        TTAEngine(logits_classifier, policy)(x)


def test_gate_zero_runs_only_the_identity(logits_classifier):
    model = Counter(logits_classifier)
    x = torch.rand(10, 3, 6, 6)
    out = TTAEngine(model, _policy(gate=0.0, temperature=3.0), max_batch=4).run(x)
    assert model.images == 10 and model.calls == 3  # chunks of 4, 4, 2: one pass each
    assert out.passes_per_image == 1.0 and not out.gated.any()
    # Plain softmax, no temperature (it was fitted to the merge, not to plain predictions).
    assert torch.allclose(out.merged, torch.softmax(logits_classifier(x), 1), atol=1e-6)


def test_gate_one_runs_every_view_on_every_image(logits_classifier):
    model = Counter(logits_classifier)
    x = torch.rand(10, 3, 6, 6)
    policy = _policy(gate=1.0)
    out = TTAEngine(model, policy, max_batch=64).run(x)
    assert model.images == 30  # identity first (10), then the other 2 views of all 10 stacked
    assert model.calls == 2
    assert out.passes_per_image == 3.0 and out.gated.all()
    _, merged, _ = _by_hand(logits_classifier, policy, x)
    assert torch.allclose(out.merged, merged, atol=1e-6)


def test_gate_runs_the_other_views_only_on_unsure_images(logits_classifier):
    x = torch.rand(20, 3, 6, 6, generator=torch.Generator().manual_seed(5))
    _, _, conf = _by_hand(logits_classifier, _policy(), x)
    gate = float(conf.sort().values[7])  # exactly the 7 least confident images
    model = Counter(logits_classifier)
    out = TTAEngine(model, _policy(gate=gate), max_batch=256).run(x)
    assert int(out.gated.sum()) == 7
    assert model.images == 20 + 2 * 7 and model.calls == 2
    assert out.passes_per_image == pytest.approx(1 + 2 * 7 / 20)


def test_temperature_100_flattens_and_keeps_the_argmax(logits_classifier):
    x = torch.rand(6, 3, 6, 6)
    sharp = TTAEngine(logits_classifier, _policy()).run(x).merged
    flat = TTAEngine(logits_classifier, _policy(temperature=100.0)).run(x).merged
    assert torch.equal(sharp.argmax(1), flat.argmax(1))
    assert (sharp.max(1).values - sharp.min(1).values).min() > 0.05
    assert (flat.max(1).values - flat.min(1).values).max() < 0.02  # nearly uniform over 5 classes
    assert torch.allclose(flat.sum(1), torch.ones(6), atol=1e-6)
    raw = TTAEngine(logits_classifier, _policy(), activation=None, temperature=4.0).run(x).merged
    views = manual_views(logits_classifier, _policy(), x)
    w = torch.tensor([2.0, 1.0, 0.5])[:, None, None]
    assert torch.allclose(raw, (views * w).sum(0) / w.sum() / 4.0, atol=1e-6)  # logits: z / T


def test_a_ttach_compose_has_no_temperature_or_gate(logits_classifier):
    engine = TTAEngine(logits_classifier, ttakit.aliases.d4_transform(), activation=None)
    assert engine.temperature is None and engine.gate_threshold is None
    out = engine.run(torch.rand(2, 3, 6, 6))
    assert out.gated is None and out.passes_per_image == 8.0


@pytest.mark.parametrize("mode", ["mean", "gmean", "vote"])
def test_models_that_return_probabilities_are_not_softmaxed_again(logits_classifier, mode):
    class Probs(nn.Module):
        outputs = "probs"

        def forward(self, x):
            return torch.softmax(logits_classifier(x), dim=1)

    x = torch.rand(9, 3, 6, 6)
    policy = _policy(gate=0.6, temperature=2.0)
    policy.merge_mode = mode
    ours = TTAEngine(Probs(), policy).run(x, return_uncertainty=True)
    reference = TTAEngine(logits_classifier, policy).run(x, return_uncertainty=True)
    assert torch.equal(ours.gated, reference.gated)
    assert torch.allclose(ours.merged, reference.merged, atol=1e-6)
    for key, value in reference.uncertainty.items():
        assert torch.allclose(ours.uncertainty[key], value, atol=1e-5), key
    with pytest.raises(InvalidInputError, match="declares outputs='scores'; expected 'logits' or 'probs'"):
        Probs.outputs = "scores"
        TTAEngine(Probs(), "hflip")


def test_uncertainty_of_the_views(logits_classifier):
    x = torch.rand(8, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    policy = _policy()
    out = TTAEngine(logits_classifier, policy, max_batch=5).run(x, return_uncertainty=True, return_views=True)
    probs = torch.softmax(manual_views(logits_classifier, policy, x), dim=2)
    merged = out.merged
    expected = view_uncertainty(probs, merged, policy.weights)
    assert set(out.uncertainty) == set(expected)
    for key, value in expected.items():
        assert torch.allclose(out.uncertainty[key], value, atol=1e-6), key
    assert out.uncertainty["std"].shape == (8, 5) and (out.uncertainty["std"] > 0).all()


def test_uncertainty_is_zero_where_only_the_identity_ran(logits_classifier):
    x = torch.rand(20, 3, 6, 6, generator=torch.Generator().manual_seed(5))
    _, _, conf = _by_hand(logits_classifier, _policy(), x)
    out = TTAEngine(logits_classifier, _policy(gate=float(conf.median())), max_batch=7).run(
        x, return_uncertainty=True, return_views=True
    )
    plain = ~out.gated
    u = out.uncertainty
    for key in ("std", "mutual_information", "disagreement"):
        assert (u[key][plain] == 0).all(), key
    assert (u["std"][out.gated] > 0).all()
    assert torch.allclose(u["expected_entropy"][plain], u["predictive_entropy"][plain])
    plain_probs = torch.softmax(logits_classifier(x), 1).detach()
    entropy = -(plain_probs * plain_probs.log()).sum(1)
    assert torch.allclose(u["predictive_entropy"][plain], entropy[plain], atol=1e-5)
    # the per-view outputs of plain rows repeat the identity's (the other views did not run there)
    assert torch.equal(out.views[0][plain], out.views[1][plain])


def test_extra_arguments_are_chunked_to_max_batch():
    calls = []

    def model(x, bias, scale):
        calls.append(x.shape[0])
        return x.mean(dim=(1, 2, 3)).unsqueeze(1) * scale + bias

    x = torch.rand(5, 1, 4, 4)
    bias = torch.arange(5.0).unsqueeze(1)  # per-sample: sliced along with the images
    out = TTAEngine(model, "hflip", activation=None, max_batch=2)(x, bias, 3.0)
    assert max(calls) <= 2 and sum(calls) == 2 * 5
    assert torch.allclose(out, x.mean(dim=(1, 2, 3)).unsqueeze(1) * 3 + bias, atol=1e-6)


def test_probabilities_of_float64_models_stay_float64(softmax_classifier):
    model = softmax_classifier.double()
    out = TTAEngine(model, _policy(gate=1.0, temperature=2.0)).run(torch.rand(3, 3, 6, 6, dtype=torch.float64))
    assert out.merged.dtype == torch.float64


def test_the_models_own_output_is_never_returned_or_written(logits_classifier):
    stored = torch.rand(8, 5)

    def cached(x):  # e.g. a lookup of stored predictions
        return stored[: x.shape[0]]

    before = stored.clone()
    x = torch.rand(2, 3, 6, 6)
    for policy, mode, gate in [(Policy.identity(), "mean", None), (Policy.identity(), "sum", None),
                               (Policy.identity(), "max", None), (_policy(gate=0.0), "mean", 0.0)]:
        for max_batch in (1, 64):  # several chunks, or one pass
            out = TTAEngine(cached, policy, activation=None, merge_mode=mode, gate_threshold=gate,
                            weights=None, max_batch=max_batch).run(x)
            assert torch.equal(out.merged, stored[:2] if max_batch == 64 else stored[[0, 0]])
            out.merged.zero_()
            assert torch.equal(stored, before), (policy.name, mode, max_batch)


# --------------------------------------------------------------------------- build-time errors


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"device": "gpu"}, r"device must be one of 'cpu', 'cuda', 'cuda:N' \(N = 0, 1, \.\.\.\), 'mps'.*got 'gpu'"),
        ({"device": 3}, r"device must be one of .*got int 3"),
        ({"device": "tpu"}, r"device must be one of .*got 'tpu'"),
        ({"weights": "ab"}, r"weights must be a list of 2 numbers \(one per view\), got str 'ab'"),
        ({"weights": [1, "x"]}, r"not a number: 'x'"),
        ({"weights": [1, 2, 3]}, r"one value per view \(2\), got 3: \[1, 2, 3\]"),
        ({"weights": torch.ones(2, 2, 2)}, r"2 numbers \(one per view\) or 2 lists of C numbers.*shape \(2, 2, 2\)"),
        ({"weights": torch.ones(3, 4)}, r"class-by-view weights must have shape \(2, C\).*got shape \(3, 4\)"),
        ({"merge_mode": "max", "weights": [1, 2]}, r"weights do not apply to merge mode 'max' \(got weights=\[1, 2\]\)"),
        ({"class_dim": 0}, r"class_dim must be a non-zero integer.*got 0"),
        ({"class_dim": "1"}, r"class_dim must be a non-zero integer.*got '1'"),
        ({"temperature": 0}, r"`temperature` to be a positive number.*got 0"),
        ({"temperature": float("nan")}, r"`temperature` to be a positive number.*got nan"),
        ({"gate_threshold": 1.5}, r"gate_threshold must be a number in \[0, 1\].*got 1.5"),
        ({"amp": "yes"}, r"amp must be True or False, got 'yes'"),
    ],
)
def test_bad_engine_arguments_are_refused_when_built(softmax_classifier, kwargs, pattern):
    with pytest.raises(InvalidInputError, match=pattern):
        TTAEngine(softmax_classifier, "hflip", **kwargs)
    if not {"device", "amp", "class_dim"} & set(kwargs):
        with pytest.raises(InvalidInputError, match=pattern):
            ttakit.ClassificationTTAWrapper(softmax_classifier, ttakit.aliases.hflip_transform(), **kwargs)


def test_unavailable_accelerators_are_named():
    if not torch.cuda.is_available():
        with pytest.raises(InvalidInputError, match="device 'cuda': CUDA is not available on this machine"):
            TTAEngine(nn.Identity(), "hflip", device="cuda")
        with pytest.raises(InvalidInputError, match="device 'cuda:1': CUDA is not available"):
            TTAEngine(nn.Identity(), "hflip", device="cuda:1")
    if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        with pytest.raises(InvalidInputError, match="device 'mps': MPS .* is not available"):
            TTAEngine(nn.Identity(), "hflip", device="mps")
    assert TTAEngine(nn.Identity(), "hflip", device="cpu").device == torch.device("cpu")


def test_gate_needs_the_identity_and_class_scores(segmenter, softmax_classifier):
    no_identity = Policy([Compose([T.HorizontalFlip()]).views[1], SHIFT], gate_threshold=0.5)
    with pytest.raises(InvalidInputError, match=r"holds the identity view .* holds only \['hflip', 'shift"):
        TTAEngine(softmax_classifier, no_identity)
    assert TTAEngine(softmax_classifier, no_identity, gate_threshold=None).gate_threshold is None
    with pytest.raises(InvalidInputError, match="needs class scores \\(target 'label'\\), got target 'mask'"):
        TTAEngine(segmenter, "hflip", target="mask", gate_threshold=0.5)


def test_class_dim_that_does_not_fit_the_output_is_named(softmax_classifier):
    with pytest.raises(InvalidInputError, match=r"class_dim=5 does not fit the model's output of shape \(2, 5\)"):
        TTAEngine(softmax_classifier, "hflip", class_dim=5)(torch.rand(2, 3, 6, 6))
    with pytest.raises(InvalidInputError, match=r"class_dim=2 does not fit .* shape \(3, 5\)"):
        TTAEngine(softmax_classifier, _policy(gate=0.5), class_dim=2)(torch.rand(3, 3, 6, 6))


def test_progress_is_called_per_chunk(softmax_classifier):
    done = []
    TTAEngine(softmax_classifier, "hflip", max_batch=4).run(torch.rand(10, 3, 6, 6), progress=done.append)
    assert done == [4, 4, 2]
    TTAEngine(softmax_classifier, "hflip", max_batch=64).run(torch.rand(3, 3, 6, 6), progress=done.append)
    assert done[-1] == 3


def test_extra_per_sample_arguments_follow_the_gated_rows(logits_classifier):
    seen = []

    def model(x, offset):
        seen.append((x.shape[0], offset.shape[0]))
        return logits_classifier(x) + offset

    x = torch.rand(6, 3, 6, 6, generator=torch.Generator().manual_seed(4))
    offset = torch.zeros(6, 5)
    offset[:3, 0] = 50.0  # the first 3 images are sure of class 0: never gated
    out = TTAEngine(model, _policy(gate=0.99), max_batch=4).run(x, offset)
    assert out.gated.tolist() == [False] * 3 + [True] * 3
    assert all(n == m for n, m in seen) and max(n for n, _ in seen) <= 4
    plain, merged, _ = _by_hand(lambda v: logits_classifier(v) + offset, _policy(), x)
    assert torch.allclose(out.merged[:3], plain[:3], atol=1e-6)
    assert torch.allclose(out.merged[3:], merged[3:], atol=1e-6)


def test_device_must_be_where_the_model_is(softmax_classifier):
    from ttakit.engine import _same_device

    d = torch.device
    assert _same_device(d("cpu"), d("cpu")) and _same_device(d("mps:0"), d("mps"))
    assert not _same_device(d("cpu"), d("meta")) and not _same_device(d("cuda:0"), d("cuda:1"))
    assert TTAEngine(softmax_classifier, "hflip", device="cpu").device == d("cpu")
    if torch.cuda.is_available():  # pragma: no cover - exercised on GPU machines
        with pytest.raises(InvalidInputError, match=r"device='cuda' but the model's parameters are on cpu; move"):
            TTAEngine(softmax_classifier, "hflip", device="cuda")


def test_amp_with_gate_and_uncertainty_merges_in_float32(logits_classifier):
    x = torch.rand(6, 3, 6, 6, generator=torch.Generator().manual_seed(7))
    policy = _policy(gate=1.0, temperature=1.5)
    out = TTAEngine(logits_classifier, policy, amp=True).run(x, return_uncertainty=True)
    ref = TTAEngine(logits_classifier, policy).run(x, return_uncertainty=True)
    assert out.merged.dtype == torch.float32 and out.uncertainty["std"].dtype == torch.float32
    assert torch.allclose(out.merged, ref.merged, atol=3e-2)  # bfloat16 forward passes on CPU


class CountingFlip(T.HorizontalFlip):
    """A ttakit flip that counts the images it is asked to augment, by parameter."""

    def __init__(self):
        super().__init__()
        self.calls: list[bool] = []

    def apply_aug_image(self, image, apply=False, **kwargs):
        self.calls.append(apply)
        return super().apply_aug_image(image, apply=apply, **kwargs)


def test_identity_steps_are_skipped_but_the_output_is_unchanged():
    # A ttakit step at its identity parameter is not called on the fast path (it would return
    # its input); the merged output still equals each view run by hand.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 6 * 6, 4)).eval()
    flip = CountingFlip()
    policy = Compose([flip, T.Shift([(1, 0)])])
    x = torch.rand(3, 2, 6, 6)
    engine = TTAEngine(model, policy, activation=None, pass_size=64)
    merged = engine(x)
    assert flip.calls == [True, True]  # two mirrored views; the two unmirrored ones skip the flip
    expected = manual_views(model, policy, x).mean(0).detach()
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-6)


def test_repeated_calls_run_the_same_fixed_plan_with_the_same_result():
    # The default plan does not depend on timing: every call of a shape runs the same passes and
    # returns the same numbers (the temperature included), as ordinary tensors.
    torch.manual_seed(0)
    model = Recorder(nn.Sequential(nn.Flatten(), nn.Linear(2 * 6 * 6, 4)).eval())
    policy = Policy(Compose([T.HorizontalFlip(), T.VerticalFlip()]).views, temperature=1.7)
    engine = TTAEngine(model, policy)
    x = torch.rand(3, 2, 6, 6)
    first = engine(x)
    for _ in range(3):
        model.batches.clear()
        again = engine(x)
        assert model.batches == [12]  # the four views of 3 images, stacked in one pass
        torch.testing.assert_close(again, first, rtol=0, atol=0)
        assert not again.is_inference()
    torch.testing.assert_close(engine.run(x).merged, first, rtol=0, atol=0)
    assert engine.pass_tuner is None and engine.tuned_pass_sizes == {}
    with pytest.raises(ModelOutputError, match="NaN"):
        engine(torch.full((3, 2, 6, 6), float("nan")))


@pytest.mark.parametrize("merge_mode", ["mean", "sum"])
@pytest.mark.parametrize("weights", [None, [2.0, 1.0, 0.5, 0.25]])
@pytest.mark.parametrize("activation", [None, "softmax"])
def test_one_view_per_pass_merges_as_a_running_sum(merge_mode, weights, activation):
    # With one view per forward pass (ttach's plan) a linear merge gives the views merged by hand,
    # call after call, and the model's own output tensor is never handed back or written to.
    torch.manual_seed(0)
    model = Recorder(nn.Sequential(nn.Flatten(), nn.Linear(2 * 6 * 6, 4)).eval())
    policy = Policy(Compose([T.HorizontalFlip(), T.VerticalFlip()]).views, weights=weights)
    engine = TTAEngine(model, policy, merge_mode=merge_mode, activation=activation, pass_size=3)
    x = torch.rand(3, 2, 6, 6)
    views = manual_views(model, policy, x)
    if activation == "softmax":
        views = torch.softmax(views, dim=2)
    w = torch.tensor(weights or [1.0] * 4)[:, None, None]
    expected = (views * w).sum(0) / (w.sum() if merge_mode == "mean" else 1)
    model.batches.clear()
    for _ in range(3):
        out = engine(x)
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
        assert not out.is_inference()
    assert model.batches == [3] * 12  # one view of 3 images per pass, every call
    with pytest.raises(ModelOutputError, match=r"NaN/inf for image 0 of the batch under view\(s\) 'identity', 'vflip', 'hflip', 'hflip\+vflip';"):
        engine(torch.full((3, 2, 6, 6), float("nan")))


def test_integer_scores_still_merge_one_view_per_pass():
    def model(x):
        return (x.flatten(1)[:, :3] * 10).long()

    x = torch.rand(2, 1, 4, 4)
    views = torch.stack([model(x), model(x.flip(-1))])
    mean = TTAEngine(model, "hflip", activation=None, pass_size=2)(x)
    torch.testing.assert_close(mean, views.float().mean(0))
    summed = TTAEngine(model, "hflip", activation=None, merge_mode="sum", pass_size=2)(x)
    assert torch.equal(summed, views.sum(0))


@pytest.mark.parametrize("merge_mode", ["mean", "max"])
def test_huge_finite_outputs_are_not_reported_as_nan(merge_mode):
    # Sums of float32 values near their maximum overflow; the check then looks at each value
    # and finds none that is NaN/inf, so nothing is raised (the merged mean may itself overflow).
    def model(x):
        return torch.full((x.shape[0], 3), 3e38)

    engine = TTAEngine(model, "flip", activation=None, merge_mode=merge_mode, max_batch=16)
    out = engine(torch.rand(2, 1, 4, 4))
    assert out.shape == (2, 3)
    if merge_mode == "max":
        assert torch.isfinite(out).all()


# --------------------------------------------------------------------------- tiles and partial views (masks)


@pytest.mark.parametrize("batch, max_batch, pass_size", [(3, 4, None), (5, 2, None), (2, 64, 5), (1, 1, None), (4, 16, "auto")])
def test_tiled_views_run_in_passes_of_at_most_max_batch(segmenter, batch, max_batch, pass_size):
    # 9x10 images in 4x4 tiles at overlap 0.5: rows start at 0, 2, 4, 5 and columns at 0, 2, 4, 6 (16 tiles).
    model = Recorder(segmenter)
    policy = Compose([T.Tiles(4, 0.5, full_image=True), T.VerticalFlip()])
    x = torch.rand(batch, 3, 9, 10)
    engine = TTAEngine(model, policy, target="mask", max_batch=max_batch, pass_size=pass_size)
    for _ in range(3 if pass_size == "auto" else 1):
        out = engine.run(x, return_views=True)
    assert max(model.batches) <= max_batch
    assert out.passes_per_image == 2 + 2 * 16  # two whole-image views, 16 tiles in each of two views
    assert out.views.shape == (4, batch, 2, 9, 10)
    torch.testing.assert_close(out.views, manual_views(segmenter, policy, x, "mask"), rtol=0, atol=1e-6)
    torch.testing.assert_close(out.merged, out.views.mean(0), rtol=0, atol=1e-6)


def test_crop_views_of_masks_are_pasted_and_merged_where_seen(segmenter):
    # Four 5x6 corner crops of a 9x10 image: the centre row and column are seen by 2 or 4 crops,
    # the rest by one; each pixel is the mean over the crops that saw it.
    model = Recorder(segmenter)
    policy = Policy(Compose([T.FiveCrops(5, 6)]).views[:4])
    x = torch.rand(2, 3, 9, 10)
    out = TTAEngine(model, policy, target="mask").run(x, return_views=True)
    seen = torch.zeros(1, 1, 9, 10)
    for top, left in [(0, 0), (4, 0), (4, 4), (0, 4)]:
        seen[..., top : top + 5, left : left + 6] += 1
    torch.testing.assert_close(out.merged, out.views.sum(0) / seen, rtol=0, atol=1e-6)  # views are 0 where unseen
    assert model.batches == [8]  # the four views of the two images in one pass
