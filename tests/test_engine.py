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
from ttakit.merge import merge
from ttakit.policy import Compose, Policy, Step, View

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
    out = TTAEngine(lambda x: x.mean(dim=(2, 3)), "d4", activation=None)(torch.rand(3, 2, 5, 7))
    assert out.shape == (3, 2)


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
    with pytest.raises(NotInvertibleError, match="FiveCrops cannot invert the 'mask' target"):
        TTAEngine(segmenter, Compose([T.FiveCrops(4, 4)]), target="mask")
    with pytest.raises(InvalidInputError, match="model must be callable.*got str"):
        TTAEngine("model", "hflip")


@pytest.mark.parametrize("max_batch", [1, 16])  # views run apart, or stacked in one pass
def test_nan_outputs_are_reported_with_the_view(max_batch):
    def model(x):  # NaN for every image whose top-left pixel is not 0.25: the flipped views
        out = x.mean(dim=(2, 3))
        return torch.where(x[:, :1, 0, 0] == 0.25, out, torch.full_like(out, torch.nan))

    x = torch.zeros(2, 1, 4, 4)
    x[:, 0, 0, 0] = 0.25
    bad = min(max_batch, 2)  # counted in the first chunk that has any
    with pytest.raises(ModelOutputError, match=f"returned {bad} NaN/inf values for view 'hflip'"):
        TTAEngine(model, "hflip", activation=None, max_batch=max_batch)(x)
    with pytest.raises(ModelOutputError, match=f"returned {bad} NaN/inf values for view 'vflip'"):
        TTAEngine(model, "flip", activation=None, max_batch=max_batch)(x)
    out = TTAEngine(model, "hflip", activation=None, check_outputs=False, max_batch=max_batch)(x)
    assert torch.isnan(out).all()


def test_outputs_of_inconsistent_shape_across_views_are_reported():
    flatten = lambda x: x.flatten(1)[:, : x.shape[-1]]  # noqa: E731 - shape follows the view's width
    with pytest.raises(ModelOutputError, match=r"view 'rot90' produced output of shape \(2, 4\).*produced \(2, 6\)"):
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
