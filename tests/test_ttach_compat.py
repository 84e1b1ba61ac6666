"""The compatibility guarantee: for every alias and every merge mode, ttakit's wrappers give
ttach's output within 1e-5 on the same model and input, wherever ttach is right. Where ttach is
wrong the case says which ttach bug it is, and ttakit is checked against an independent
reference instead (hand-computed per-view outputs, or a keypoint model whose answer is known).

A new alias must be added to EXPECT below, or ``test_every_alias_has_expectations`` fails.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF
import ttach

import ttakit
from ttakit.errors import InvalidInputError

pytestmark = pytest.mark.usefixtures("single_thread")

ALIASES = sorted(n for n in ttakit.aliases.__all__ if n.endswith("_transform") and n != "vlip_transform")
ARGS = {"multiscale_transform": ([0.5, 2],), "five_crop_transform": (5, 6), "ten_crop_transform": (5, 6)}
TTACH_NAME = {"vflip_transform": "vlip_transform"}
TTACH_MODES = ["mean", "gmean", "sum", "max", "min", "tsharpen"]
ALL_MODES = [*TTACH_MODES, "vote"]
assert set(ALL_MODES) == set(ttakit.MERGE_MODES)
ATOL = 1e-5

# Crops for masks: ttach refuses them at run time; ttakit pastes each crop's mask into the frame and
# merges each pixel over the crops that saw it (on 8x8 images 5x6 crops cover every pixel).
PER_PIXEL = "ttach refuses crops for masks at run time"
# What ttach does per task and alias: "equal", or the ttach bug / limitation that makes it differ.
EXPECT = {
    "segmentation": {
        "flip_transform": "equal", "hflip_transform": "equal", "vflip_transform": "equal", "d4_transform": "equal",
        "multiscale_transform": "equal",  # on 8x8 images: 8 * 0.5 = 4 and 4 / 0.5 = 8 round-trip
        "five_crop_transform": PER_PIXEL, "ten_crop_transform": PER_PIXEL,
    },
    "keypoints-square": {
        "flip_transform": "equal", "hflip_transform": "equal", "vflip_transform": "equal", "d4_transform": "equal",
        "multiscale_transform": "ttach normalises pixel outputs by the input size, not the scaled view's",
        "five_crop_transform": "ttach refuses crops for keypoints", "ten_crop_transform": "ttach refuses crops",
    },
}


def alias(name: str, library=ttakit):
    fn = getattr(library.aliases, TTACH_NAME.get(name, name) if library is ttach else name)
    return fn(*ARGS.get(name, ()))


def test_every_alias_has_expectations():
    for table in EXPECT.values():
        assert set(ALIASES) == set(table), set(ALIASES) ^ set(table)


def ttach_views(model, name, x, deaugment="label"):
    """Per-view outputs by hand through ttach's transformers (ttach's augment/deaugment are
    right for labels and masks on round-tripping sizes)."""
    outs = []
    for t in alias(name, ttach):
        y = model(t.augment_image(x))
        outs.append(t.deaugment_label(y) if deaugment == "label" else t.deaugment_mask(y))
    return torch.stack(outs)


def reference_vote(views: torch.Tensor, class_dim: int = 1) -> torch.Tensor:
    """Majority vote written out plainly: count argmax votes; among classes with the most votes
    the larger summed score wins and gets the 1e-6 nudge."""
    k = views.shape[0]
    dim = class_dim + 1
    votes = TF.one_hot(views.argmax(dim=dim), views.shape[dim]).movedim(-1, dim).sum(0).double()
    scores = views.double().sum(0)
    best = votes.amax(dim=class_dim, keepdim=True)
    winner = torch.where(votes == best, scores, torch.full_like(scores, -torch.inf)).argmax(dim=class_dim, keepdim=True)
    return (votes / k).scatter_add(class_dim, winner, torch.full(winner.shape, 1e-6, dtype=torch.double))


# --------------------------------------------------------------------------- classification


@pytest.mark.parametrize("mode", TTACH_MODES)
@pytest.mark.parametrize("name", ALIASES)
def test_classification_equals_ttach(softmax_classifier, images, name, mode):
    # Softmax outputs are non-negative, so ttach's gmean and tsharpen are defined.
    ours = ttakit.ClassificationTTAWrapper(softmax_classifier, alias(name), mode)(images)
    theirs = ttach.ClassificationTTAWrapper(softmax_classifier, alias(name, ttach), mode)(images)
    assert ours.shape == theirs.shape == (3, 5)
    assert torch.allclose(ours, theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ALIASES)
def test_classification_vote_against_a_plain_reference(softmax_classifier, images, name):
    # ttach has no vote; the reference is a majority vote over ttach's own per-view outputs.
    ours = ttakit.ClassificationTTAWrapper(softmax_classifier, alias(name), "vote")(images)
    expected = reference_vote(ttach_views(softmax_classifier, name, images))
    assert torch.allclose(ours.double(), expected, atol=ATOL)


@pytest.mark.parametrize("mode", ["mean", "sum", "max", "min"])
@pytest.mark.parametrize("name", ALIASES)
def test_logits_classification_equals_ttach(logits_classifier, images, name, mode):
    ours = ttakit.ClassificationTTAWrapper(logits_classifier, alias(name), mode)(images)
    theirs = ttach.ClassificationTTAWrapper(logits_classifier, alias(name, ttach), mode)(images)
    assert torch.allclose(ours, theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize("mode", ["gmean", "tsharpen"])
@pytest.mark.parametrize("name", ALIASES)
def test_logits_gmean_tsharpen_raise_where_ttach_gives_garbage(logits_classifier, images, name, mode):
    # ttach's bug: prod(x) ** (1/n) and x ** 0.5 on negative logits give NaN (or, for an even
    # number of negative factors, a number that is no geometric mean of anything).
    with pytest.raises(InvalidInputError, match=f"merge mode '{mode}' needs non-negative values"):
        ttakit.ClassificationTTAWrapper(logits_classifier, alias(name), mode)(images)
    # With activation="softmax" the merge is over probabilities: check against a hand computation.
    ours = ttakit.ClassificationTTAWrapper(logits_classifier, alias(name), mode, activation="softmax")(images)
    probs = torch.softmax(ttach_views(logits_classifier, name, images), dim=2)
    if mode == "gmean":
        g = probs.log().mean(0).exp()
        expected = g / g.sum(dim=1, keepdim=True)
    else:
        expected = probs.sqrt().mean(0)
    assert torch.allclose(ours, expected, atol=ATOL)


def test_ttach_gmean_on_logits_is_nan(logits_classifier, images):
    theirs = ttach.ClassificationTTAWrapper(logits_classifier, ttach.aliases.d4_transform(), "gmean")(images)
    assert torch.isnan(theirs).any()  # the bug the test above guards against


# --------------------------------------------------------------------------- segmentation

# Top-left corners of ttach's 5x6 crops of an 8x8 image, in its order: lt, lb, rb, rt, centre
# (8 // 2 - 5 // 2, 8 // 2 - 6 // 2).
CROP_ORIGINS = [(0, 0), (3, 0), (3, 2), (0, 2), (2, 1)]


def crop_views_by_hand(model, name, x):
    """``x: (B, C, 8, 8)`` -> per-view outputs pasted into the frame ``(K, B, C', 8, 8)`` and the
    pixels each view saw ``(K, 1, 1, 8, 8)``, written out plainly; each view's input is checked
    against ttach's own augmented image for that view."""
    flips = (False, True) if name == "ten_crop_transform" else (False,)
    plans = [(flip, top, left) for flip in flips for top, left in CROP_ORIGINS]
    theirs = list(alias(name, ttach))
    assert len(theirs) == len(plans)
    outs, seen = [], []
    for (flip, top, left), t in zip(plans, theirs, strict=True):
        source = x.flip(-1) if flip else x
        view = source[..., top : top + 5, left : left + 6]
        assert torch.equal(view, t.augment_image(x))
        y = model(view)
        frame = torch.zeros(*y.shape[:2], 8, 8)
        frame[..., top : top + 5, left : left + 6] = y
        saw = torch.zeros(1, 1, 8, 8)
        saw[..., top : top + 5, left : left + 6] = 1.0
        outs.append(frame.flip(-1) if flip else frame)
        seen.append(saw.flip(-1) if flip else saw)
    return torch.stack(outs), torch.stack(seen)


def per_pixel_reference(views: torch.Tensor, seen: torch.Tensor, mode: str) -> torch.Tensor:
    """Each pixel merged over the views that saw it: ``views (K, B, C, H, W)``, ``seen (K, 1, 1, H, W)``."""
    views, seen = views.double(), seen.double()
    count = seen.sum(0)
    if mode == "mean":
        return (views * seen).sum(0) / count
    if mode == "gmean":  # log 0 outside a crop: only the pixels a view saw enter its sum
        return torch.exp(torch.where(seen > 0, views.log() * seen, 0.0).sum(0) / count)
    if mode == "tsharpen":
        return (views.sqrt() * seen).sum(0) / count
    if mode == "max":
        return torch.where(seen > 0, views, torch.tensor(-torch.inf, dtype=views.dtype)).amax(0)
    if mode == "min":
        return torch.where(seen > 0, views, torch.tensor(torch.inf, dtype=views.dtype)).amin(0)
    assert mode == "vote"
    # As reference_vote, over the covering views: among classes with the most votes the larger
    # summed score wins and gets the 1e-6 nudge.
    votes = (TF.one_hot(views.argmax(dim=2), views.shape[2]).movedim(-1, 2) * seen).sum(0)
    scores = (views * seen).sum(0)
    best = votes.amax(dim=1, keepdim=True)
    winner = torch.where(votes == best, scores, torch.full_like(scores, -torch.inf)).argmax(dim=1, keepdim=True)
    return (votes / count).scatter_add(1, winner, torch.full(winner.shape, 1e-6, dtype=torch.double))


@pytest.mark.parametrize("mode", ALL_MODES)
@pytest.mark.parametrize("name", ALIASES)
def test_segmentation(segmenter, images, name, mode):
    expect = EXPECT["segmentation"][name]
    if expect == PER_PIXEL:
        if mode in TTACH_MODES:  # ttach fails at run time, halfway through
            with pytest.raises(ValueError, match="not suitable for mask"):
                ttach.SegmentationTTAWrapper(segmenter, alias(name, ttach), mode)(images)
        if mode == "sum":  # a sum over different numbers of views per pixel: refused when built
            with pytest.raises(InvalidInputError, match="merge mode 'sum' cannot merge views that see different pixels"):
                ttakit.SegmentationTTAWrapper(segmenter, alias(name), mode)
            return
        ours = ttakit.SegmentationTTAWrapper(segmenter, alias(name), mode)(images)
        assert ours.shape == (3, 2, 8, 8)
        with torch.no_grad():
            views, seen = crop_views_by_hand(segmenter, name, images)
        assert bool((seen.sum(0) > 0).all())  # 5x6 crops cover the 8x8 image
        assert torch.allclose(ours.double(), per_pixel_reference(views, seen, mode), atol=ATOL, rtol=0)
        return
    ours = ttakit.SegmentationTTAWrapper(segmenter, alias(name), mode)(images)
    assert ours.shape == (3, 2, 8, 8)
    if mode == "vote":
        expected = reference_vote(ttach_views(segmenter, name, images, "mask"))
        assert torch.allclose(ours.double(), expected, atol=ATOL)
        return
    theirs = ttach.SegmentationTTAWrapper(segmenter, alias(name, ttach), mode)(images)
    assert torch.allclose(ours, theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize("mode", ["mean", "max", "vote"])
def test_multiscale_odd_size_where_ttach_breaks(segmenter, mode):
    # ttach's bug: Scale maps a 5x5 mask back with 1/s: int(5 * 0.5) = 2 -> 4x4, and the merge
    # of 5x5 and 4x4 masks fails. ttakit restores the recorded 5x5; the reference resizes each
    # view's output back to 5x5 by hand.
    x = torch.rand(2, 3, 5, 5, generator=torch.Generator().manual_seed(5))
    with pytest.raises(RuntimeError, match="size of tensor"):
        ttach.SegmentationTTAWrapper(segmenter, ttach.aliases.multiscale_transform([0.5, 2]), "mean")(x)
    ours = ttakit.SegmentationTTAWrapper(segmenter, ttakit.aliases.multiscale_transform([0.5, 2]), mode)(x)
    views = []
    for s in (1, 0.5, 2):
        view = x if s == 1 else TF.interpolate(x, size=(int(5 * s), int(5 * s)), mode="nearest")
        views.append(TF.interpolate(segmenter(view), size=(5, 5), mode="nearest"))
    views = torch.stack(views)
    expected = {"mean": views.mean(0), "max": views.amax(0), "vote": None}[mode]
    if mode == "vote":
        assert torch.allclose(ours.double(), reference_vote(views), atol=ATOL)
    else:
        assert torch.allclose(ours, expected, atol=ATOL)


def test_segmentation_logits_gmean_raises(seg_logits_model, images):
    with pytest.raises(InvalidInputError, match="'gmean' needs non-negative values"):
        ttakit.SegmentationTTAWrapper(seg_logits_model, ttakit.aliases.d4_transform(), "gmean")(images)


# --------------------------------------------------------------------------- keypoints


def merged_truth(truth: torch.Tensor, mode: str, k: int, h: int, w: int) -> torch.Tensor:
    """The merge of K views that all found the true keypoints (merged in normalised units)."""
    size = torch.tensor([w, h] * (truth.shape[1] // 2), dtype=truth.dtype)
    if mode == "sum":
        return truth * k
    if mode == "tsharpen":
        return (truth / size).sqrt() * size
    return truth  # mean, gmean, max, min of equal values


@pytest.mark.parametrize("mode", ALL_MODES)
@pytest.mark.parametrize("name", ALIASES)
def test_keypoints_square(make_keypoint_model, keypoint_truth, name, mode):
    model = make_keypoint_model()
    # Extreme pixels where every 5x6 crop of a 9x9 image holds them: row 4, columns 3 to 5.
    x = torch.full((2, 1, 9, 9), 0.5)
    x[0, 0, 4, 3], x[0, 0, 4, 5] = 1.0, 0.0
    x[1, 0, 4, 4], x[1, 0, 4, 3] = 1.0, 0.0
    truth = keypoint_truth(x)
    if mode == "vote":
        with pytest.raises(InvalidInputError, match="'vote' needs class scores"):
            ttakit.KeypointsTTAWrapper(model, alias(name), mode)
        return
    ours = ttakit.KeypointsTTAWrapper(model, alias(name), mode)(x)
    expect = EXPECT["keypoints-square"][name]
    if name == "multiscale_transform":
        # ttach's bug: a pixel keypoint found on a 2x view is divided by the 1x size. Checked
        # with integer scales (the extreme pixels survive nearest up-scaling exactly).
        ours = ttakit.KeypointsTTAWrapper(model, ttakit.aliases.multiscale_transform([2, 3]), mode)(x)
        theirs = ttach.KeypointsTTAWrapper(model, ttach.aliases.multiscale_transform([2, 3]), mode)(x)
        if mode != "min":  # with min, the identity view's (right, smaller) values win
            assert not torch.allclose(theirs, merged_truth(truth, mode, 3, 9, 9), atol=0.5), expect
        assert torch.allclose(ours, merged_truth(truth, mode, 3, 9, 9), atol=ATOL)
        scaled = make_keypoint_model(scaled=True)  # with normalised outputs ttach is right
        ours = ttakit.KeypointsTTAWrapper(scaled, ttakit.aliases.multiscale_transform([2, 3]), mode, scaled=True)(x)
        theirs = ttach.KeypointsTTAWrapper(scaled, ttach.aliases.multiscale_transform([2, 3]), mode, scaled=True)(x)
        assert torch.allclose(ours, theirs, atol=ATOL, rtol=0)
        return
    assert torch.allclose(ours, merged_truth(truth, mode, len(alias(name)), 9, 9), atol=ATOL)
    if expect == "equal":
        theirs = ttach.KeypointsTTAWrapper(model, alias(name, ttach), mode)(x)
        assert torch.allclose(ours, theirs, atol=ATOL, rtol=0)
    else:  # ttach's FiveCrops refuses keypoints
        with pytest.raises(ValueError, match="not suitable for keypoints"):
            ttach.KeypointsTTAWrapper(model, alias(name, ttach), mode)(x)


@pytest.mark.parametrize("mode", TTACH_MODES)
@pytest.mark.parametrize("name", ["flip_transform", "hflip_transform", "vflip_transform", "d4_transform"])
def test_keypoints_non_square(make_keypoint_model, keypoint_truth, name, mode):
    model = make_keypoint_model()
    x = torch.rand(3, 2, 6, 10, generator=torch.Generator().manual_seed(3))
    truth = keypoint_truth(x)
    ours = ttakit.KeypointsTTAWrapper(model, alias(name), mode)(x)
    theirs = ttach.KeypointsTTAWrapper(model, alias(name, ttach), mode)(x)
    assert torch.allclose(ours, merged_truth(truth, mode, len(alias(name)), 6, 10), atol=ATOL)
    if name == "d4_transform":
        # ttach's bug: after a quarter turn the 6x10 image is 10x6, but ttach divides the pixel
        # x by 10 and y by 6 (the input's sides) before mapping back.
        # Wrong by pixels, or NaN (tsharpen of a point pushed outside the image).
        assert not torch.allclose(theirs, merged_truth(truth, mode, 8, 6, 10), atol=0.5)
    else:
        assert torch.allclose(ours, theirs, atol=ATOL, rtol=0)


# --------------------------------------------------------------------------- ttach's README


def transpose_class(base):
    """A custom transform written as ttach's protocol asks, on either library's base class."""

    class Transpose(base):
        identity_param = False

        def __init__(self):
            super().__init__("apply", [False, True])

        def apply_aug_image(self, image, apply=False, **kwargs):
            return image.transpose(2, 3) if apply else image

        def apply_deaug_mask(self, mask, apply=False, **kwargs):
            return mask.transpose(2, 3) if apply else mask

        def apply_deaug_label(self, label, apply=False, **kwargs):
            return label

        def apply_deaug_keypoints(self, keypoints, apply=False, **kwargs):
            return keypoints.flip(-1) if apply else keypoints

    return Transpose


def gamma_class(base):
    class Gamma(base):
        identity_param = 1

        def __init__(self, gammas):
            if self.identity_param not in gammas:
                gammas = [self.identity_param] + list(gammas)
            super().__init__("gamma", gammas)

        def apply_aug_image(self, image, gamma=1, **kwargs):
            return image**gamma

    return Gamma


@pytest.mark.parametrize("task", ["classification", "segmentation", "keypoints"])
def test_custom_transforms_written_for_ttach_give_ttachs_result(softmax_classifier, segmenter,
                                                                make_keypoint_model, images, task):
    def compose(lib, base_dual, base_image):
        return lib.Compose([transpose_class(base_dual)(), lib.HorizontalFlip(), gamma_class(base_image)([0.5, 2])])

    ours = compose(ttakit, ttakit.DualTransform, ttakit.ImageOnlyTransform)
    mixed = ttakit.Compose(compose(ttach, ttach.base.DualTransform, ttach.base.ImageOnlyTransform).aug_transforms)
    theirs = compose(ttach, ttach.base.DualTransform, ttach.base.ImageOnlyTransform)
    assert len(ours) == len(theirs) == 12
    model, ours_cls, theirs_cls = {
        "classification": (softmax_classifier, ttakit.ClassificationTTAWrapper, ttach.ClassificationTTAWrapper),
        "segmentation": (segmenter, ttakit.SegmentationTTAWrapper, ttach.SegmentationTTAWrapper),
        "keypoints": (make_keypoint_model(), ttakit.KeypointsTTAWrapper, ttach.KeypointsTTAWrapper),
    }[task]
    expected = theirs_cls(model, theirs, "gmean")(images)
    for transforms in (ours, mixed):
        assert torch.allclose(ours_cls(model, transforms, "gmean")(images), expected, atol=ATOL, rtol=0)


def test_readme_36_view_compose(segmenter, images):
    def readme(tta):
        return tta.Compose([tta.HorizontalFlip(), tta.Rotate90(angles=[0, 180]), tta.Scale(scales=[1, 2, 4]),
                            tta.Multiply(factors=[0.9, 1, 1.1])])

    assert len(readme(ttakit)) == len(readme(ttach)) == 36
    ours = ttakit.SegmentationTTAWrapper(segmenter, readme(ttakit))(images)
    theirs = ttach.SegmentationTTAWrapper(segmenter, readme(ttach))(images)
    assert torch.allclose(ours, theirs, atol=ATOL, rtol=0)


def test_readme_custom_model_loop(segmenter, softmax_classifier, images):
    def model(x, another_input_data):
        return {"mask": segmenter(x) * another_input_data, "label": softmax_classifier(x)}

    def loop(transforms):
        labels, masks = [], []
        for transformer in transforms:
            augmented_image = transformer.augment_image(images)
            model_output = model(augmented_image, 2.0)
            masks.append(transformer.deaugment_mask(model_output["mask"]))
            labels.append(transformer.deaugment_label(model_output["label"]))
        return torch.stack(labels).mean(0), torch.stack(masks).mean(0)

    for ours, theirs in zip(loop(ttakit.aliases.d4_transform()), loop(ttach.aliases.d4_transform()), strict=True):
        assert torch.allclose(ours, theirs, atol=ATOL, rtol=0)
