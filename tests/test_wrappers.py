"""ttakit.wrappers: ttach's constructor signatures, dict outputs, extra arguments, keypoints."""

from __future__ import annotations

import inspect

import pytest
import torch
import ttach
from torch import nn

import ttakit
from ttakit import transforms as T
from ttakit.errors import InvalidInputError, ModelOutputError, NotInvertibleError
from ttakit.policy import Compose

pytestmark = pytest.mark.usefixtures("single_thread")

WRAPPERS = ["ClassificationTTAWrapper", "SegmentationTTAWrapper", "KeypointsTTAWrapper"]


@pytest.mark.parametrize("name", WRAPPERS)
def test_constructor_signature_matches_ttach(name):
    ours = inspect.signature(getattr(ttakit, name)).parameters
    theirs = inspect.signature(getattr(ttach, name)).parameters
    assert list(ours)[: len(theirs)] == list(theirs)
    for arg, p in theirs.items():
        assert ours[arg].default == p.default, (name, arg)
        assert ours[arg].kind == p.kind


def test_wrappers_are_modules_holding_the_model(softmax_classifier):
    wrapped = ttakit.ClassificationTTAWrapper(softmax_classifier, ttakit.aliases.hflip_transform())
    assert isinstance(wrapped, nn.Module)
    assert set(wrapped.state_dict()) == {f"model.{k}" for k in softmax_classifier.state_dict()}
    assert wrapped.merge_mode == "mean" and wrapped.output_key is None


def test_classification_merges_raw_outputs_like_ttach(logits_classifier):
    x = torch.rand(3, 3, 6, 6)
    wrapped = ttakit.ClassificationTTAWrapper(logits_classifier, ttakit.aliases.d4_transform())
    views = torch.stack([logits_classifier(t.augment_image(x)) for t in ttakit.aliases.d4_transform()])
    assert torch.allclose(wrapped(x), views.mean(0), atol=1e-6)
    soft = ttakit.ClassificationTTAWrapper(logits_classifier, ttakit.aliases.d4_transform(), activation="softmax")
    assert torch.allclose(soft(x), torch.softmax(views, dim=2).mean(0), atol=1e-6)


def test_dict_outputs_in_and_out(softmax_classifier, segmenter):
    x = torch.rand(2, 3, 6, 6)
    cls = lambda x: {"label": softmax_classifier(x), "features": x}  # noqa: E731
    out = ttakit.ClassificationTTAWrapper(cls, ttakit.aliases.hflip_transform(), output_label_key="label")(x)
    assert set(out) == {"label"}
    assert torch.allclose(out["label"], (softmax_classifier(x) + softmax_classifier(x.flip(-1))) / 2, atol=1e-6)
    seg = lambda x: {"mask": segmenter(x)}  # noqa: E731
    out = ttakit.SegmentationTTAWrapper(seg, ttakit.aliases.vflip_transform(), output_mask_key="mask")(x)
    assert torch.allclose(out["mask"], (segmenter(x) + segmenter(x.flip(-2)).flip(-2)) / 2, atol=1e-6)


def test_extra_positional_model_arguments(softmax_classifier):
    class TwoInputs(nn.Module):
        def forward(self, x, offset, *, unused=None):
            return softmax_classifier(x) + offset

    x = torch.rand(2, 3, 6, 6)
    offset = torch.tensor([[1.0], [-1.0]])
    ours = ttakit.ClassificationTTAWrapper(TwoInputs(), ttakit.aliases.flip_transform())(x, offset)
    theirs = ttach.ClassificationTTAWrapper(TwoInputs(), ttach.aliases.flip_transform())(x, offset)
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_segmentation_refuses_free_rotations_when_built(segmenter):
    with pytest.raises(NotInvertibleError, match="Rotate cannot invert the 'mask' target"):
        ttakit.SegmentationTTAWrapper(segmenter, Compose([T.Rotate([10])]))


@pytest.mark.parametrize("transform", ["identity", "hflip"])
@pytest.mark.parametrize("mode", ["mean", "sum", "max"])
def test_wrapper_output_can_be_modified_in_place(softmax_classifier, transform, mode):
    # A model that hands out its own stored tensor (a cache of predictions): writing into the
    # wrapper's output must neither fail (inference tensors refuse in-place writes) nor reach it.
    stored = torch.rand(8, 5, generator=torch.Generator().manual_seed(0))
    before = stored.clone()

    def cached(x):
        return stored[: x.shape[0]]

    transforms = ttakit.Compose([ttakit.HorizontalFlip()] if transform == "hflip" else [])
    x = torch.rand(2, 3, 6, 6)
    out = ttakit.ClassificationTTAWrapper(cached, transforms, mode)(x)
    # By hand: each view's output is stored[:2] (or stored[:4] split for two stacked views).
    views = [stored[:2]] if transform == "identity" else [stored[:2], stored[2:4]]
    expected = {"mean": sum(views) / len(views), "sum": sum(views), "max": torch.stack(views).amax(0)}[mode]
    assert torch.allclose(out, expected, atol=1e-7)
    assert not out.is_inference()
    out[out < 0.5] = 0.0
    out.mul_(2)
    assert torch.equal(stored, before)  # the model's own buffer is untouched
    assert torch.equal(out, torch.where(expected < 0.5, torch.zeros(()), expected) * 2)


def test_a_policy_runs_with_its_merge_mode_weights_temperature_and_gate(logits_classifier):
    policy = ttakit.get_policy("flip")
    policy.merge_mode, policy.weights, policy.temperature, policy.gate_threshold = "gmean", [1, 2, 3, 4], 2.5, 1.0
    x = torch.rand(3, 3, 6, 6)
    engine = ttakit.TTAEngine(logits_classifier, policy)(x)
    wrapped = ttakit.ClassificationTTAWrapper(logits_classifier, policy, activation="softmax")
    assert wrapped.merge_mode == "gmean"  # ttach's default "mean" leaves the policy's mode in charge
    assert torch.allclose(wrapped(x), engine, atol=1e-6)
    summed = ttakit.ClassificationTTAWrapper(logits_classifier, policy, "sum", activation="softmax")
    assert summed.merge_mode == "sum"  # another explicit mode wins
    assert torch.allclose(summed(x), ttakit.TTAEngine(logits_classifier, policy, merge_mode="sum")(x), atol=1e-6)


def test_policy_objects_and_names_are_accepted(softmax_classifier):
    x = torch.rand(2, 3, 6, 6)
    a = ttakit.ClassificationTTAWrapper(softmax_classifier, ttakit.get_policy("d4"))(x)
    b = ttakit.ClassificationTTAWrapper(softmax_classifier, "d4")(x)
    c = ttakit.ClassificationTTAWrapper(softmax_classifier, ttakit.aliases.d4_transform())(x)
    assert torch.allclose(a, b) and torch.allclose(a, c)


def test_run_returns_per_view_outputs(softmax_classifier):
    wrapped = ttakit.ClassificationTTAWrapper(softmax_classifier, ttakit.aliases.flip_transform(), merge_mode="max")
    out = wrapped.run(torch.rand(2, 3, 6, 6), return_views=True)
    assert out.views.shape == (4, 2, 5)
    assert torch.equal(out.merged, out.views.amax(0))


# --------------------------------------------------------------------------- keypoints


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("size", [(6, 9), (8, 8), (7, 4)])
def test_keypoints_recover_the_truth_under_d4(make_keypoint_model, keypoint_truth, scaled, size):
    x = torch.rand(3, 2, *size, generator=torch.Generator().manual_seed(sum(size)))
    wrapped = ttakit.KeypointsTTAWrapper(make_keypoint_model(scaled), ttakit.aliases.d4_transform(), scaled=scaled)
    out = wrapped(x)
    assert out.shape == (3, 4)
    assert torch.allclose(out, keypoint_truth(x, scaled), atol=1e-5)


def test_keypoints_through_shifts_and_crops(make_keypoint_model, keypoint_truth):
    # Put both extreme pixels in the middle, where every crop and every shifted view sees them
    # (the minimum is below the zeros that constant padding brings in).
    x = torch.full((2, 1, 9, 10), 0.5)
    x[0, 0, 4, 5], x[0, 0, 5, 4] = 1.0, -1.0
    x[1, 0, 3, 6], x[1, 0, 5, 5] = 1.0, -1.0
    policy = Compose([T.HorizontalFlip(), T.Shift.around((1, 2), 8), T.Rotate90([90])])
    for transforms in (policy, ttakit.aliases.ten_crop_transform(7, 8), Compose([T.TenCrops(6, 7)])):
        out = ttakit.KeypointsTTAWrapper(make_keypoint_model(), transforms, merge_mode="max")(x)
        assert torch.allclose(out, keypoint_truth(x), atol=1e-5)


def test_keypoint_outputs_are_never_modified_in_place():
    stored = torch.tensor([[2.0, 3.0, 4.0, 1.0]])

    class Fixed(nn.Module):
        def forward(self, x):
            return stored  # e.g. a cached prediction

    x = torch.rand(1, 1, 8, 8)
    ttakit.KeypointsTTAWrapper(Fixed(), ttakit.aliases.hflip_transform(), inference_mode=False, max_batch=1)(x)
    assert stored.tolist() == [[2.0, 3.0, 4.0, 1.0]]
    ttach.KeypointsTTAWrapper(Fixed(), ttach.aliases.hflip_transform())(x)
    assert stored.tolist() != [[2.0, 3.0, 4.0, 1.0]]  # ttach's bug: divided by the size in place


def test_keypoints_accept_n_by_2_outputs_and_run_returns_views(make_keypoint_model, keypoint_truth):
    model = make_keypoint_model()
    x = torch.rand(2, 1, 5, 7)
    wrapped = ttakit.KeypointsTTAWrapper(lambda x: model(x).view(-1, 2, 2), ttakit.aliases.flip_transform())
    assert torch.allclose(wrapped(x), keypoint_truth(x), atol=1e-5)
    out = wrapped.run(x, return_views=True)
    assert out.views.shape == (4, 2, 4)
    assert torch.allclose(out.views, keypoint_truth(x).expand(4, 2, 4), atol=1e-5)  # each view de-augmented
    assert torch.allclose(out.merged, keypoint_truth(x), atol=1e-5)


def test_keypoint_errors(make_keypoint_model):
    with pytest.raises(InvalidInputError, match="merge_mode 'vote' needs class scores"):
        ttakit.KeypointsTTAWrapper(make_keypoint_model(), ttakit.aliases.hflip_transform(), "vote")
    bad = ttakit.KeypointsTTAWrapper(lambda x: x.mean(dim=(2, 3)), ttakit.aliases.hflip_transform())
    with pytest.raises(ModelOutputError, match=r"\(B, 2N\).*got shape \(2, 3\)"):
        bad(torch.rand(2, 3, 5, 5))


def test_keypoints_dict_output(make_keypoint_model, keypoint_truth):
    model = make_keypoint_model()
    x = torch.rand(2, 1, 6, 5)
    wrapped = ttakit.KeypointsTTAWrapper(lambda x: {"kp": model(x)}, ttakit.aliases.d4_transform(),
                                         output_keypoints_key="kp")
    out = wrapped(x)
    assert set(out) == {"kp"} and torch.allclose(out["kp"], keypoint_truth(x), atol=1e-5)
