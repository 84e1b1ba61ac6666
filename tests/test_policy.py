"""ttakit.policy: Compose as ttach's Cartesian product, Policy as an explicit list of views, JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import ttach

import ttakit
from ttakit import transforms as T
from ttakit.errors import InvalidInputError, NotInvertibleError, PolicyFormatError, UnknownNameError
from ttakit.policy import Compose, Policy, Step, Transformer, View

pytestmark = pytest.mark.usefixtures("single_thread")


def d4_pair():
    return (
        Compose([T.HorizontalFlip(), T.Rotate90([0, 90, 180, 270])]),
        ttach.Compose([ttach.HorizontalFlip(), ttach.Rotate90([0, 90, 180, 270])]),
    )


def test_compose_is_the_cartesian_product_in_ttach_order():
    ours, theirs = d4_pair()
    assert len(ours) == len(theirs) == 8
    assert ours.aug_transform_parameters == theirs.aug_transform_parameters
    assert ours.deaug_transform_parameters == theirs.deaug_transform_parameters
    x = torch.rand(2, 3, 5, 7)
    for a, b in zip(ours, theirs, strict=True):
        view = a.augment_image(x)
        assert torch.equal(view, b.augment_image(x))
        y = torch.rand_like(view)
        assert torch.equal(a.deaugment_mask(y), b.deaugment_mask(y))
        label = torch.rand(2, 4)
        assert torch.equal(a.deaugment_label(label), b.deaugment_label(label))


def test_iterating_yields_transformers_with_ttachs_methods():
    # flip_transform's 4 views in ttach's order: identity, vflip, hflip, hflip+vflip. Each method
    # is checked on values: the view, the mask and keypoints mapped back, the label untouched.
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    points = torch.tensor([[[0.1, 0.2], [0.7, 0.4]]]).repeat(2, 1, 1)
    label = torch.tensor([[0.2, 0.8], [0.6, 0.4]])
    expected_views = [x, x.flip(-2), x.flip(-1), x.flip(-1).flip(-2)]
    mirror = [(False, False), (False, True), (True, False), (True, True)]  # (x mirrored, y mirrored)
    transformers = list(ttakit.aliases.flip_transform())
    theirs = list(ttach.aliases.flip_transform())
    assert len(transformers) == len(theirs) == 4
    for t, their, view_expected, (mx, my) in zip(transformers, theirs, expected_views, mirror, strict=True):
        assert isinstance(t, Transformer)
        view = t.augment_image(x)
        assert torch.equal(view, view_expected) and torch.equal(view, their.augment_image(x))
        assert torch.equal(t.deaugment_mask(view), x)  # an identity "segmenter" maps back to the input
        assert torch.equal(t.deaugment_label(label), label)
        back = t.deaugment_keypoints(points)
        want = points.clone()
        if mx:
            want[..., 0] = 1 - points[..., 0]
        if my:
            want[..., 1] = 1 - points[..., 1]
        assert torch.allclose(back, want)
        assert torch.allclose(back, their.deaugment_keypoints(points))


def test_deaugmentation_runs_in_reverse_order():
    # A shift then a rotation of a non-square image do not commute: undoing them in the
    # forward order would shift along the wrong axis (and use the wrong size).
    compose = Compose([T.Shift([(2, 1)], "circular"), T.Rotate90([90])])
    x = torch.rand(1, 2, 5, 8)
    for t in compose:
        assert torch.equal(t.deaugment_mask(t.augment_image(x)), x)
    t = list(compose)[-1]  # shift (2, 1) then rot90
    view = t.augment_image(x)
    assert torch.equal(view, torch.rot90(torch.roll(x, (1, 2), (-2, -1)), 1, (-2, -1)))
    assert t.input_sizes == [(5, 8), (5, 8)]
    point = torch.tensor([[[0.3, 0.6]]])  # in the rotated view (8 rows, 5 columns)
    expected_unrot = torch.tensor([[[1 - 0.6, 0.3]]])  # undo rot90 first...
    expected = expected_unrot - torch.tensor([2 / 8, 1 / 5])  # ...then the shift, in the 5x8 frame
    assert torch.allclose(t.deaugment_keypoints(point), expected)


def test_transformer_records_input_sizes_per_step():
    t = View([Step(T.Scale([0.5]), 0.5), Step(T.Rotate90([90]), 90)]).transformer()
    view = t.augment_image(torch.rand(1, 1, 5, 9))
    assert view.shape[-2:] == (4, 2)  # 5x9 -> 2x4 -> rotated 4x2
    assert t.input_sizes == [(5, 9), (2, 4)]
    assert t.deaugment_mask(torch.rand(1, 3, 4, 2)).shape == (1, 3, 5, 9)


def test_view_names_are_readable():
    ours, _ = d4_pair()
    assert ours.to_policy().view_names == [
        "identity", "rot90", "rot180", "rot270", "hflip", "hflip+rot90", "hflip+rot180", "hflip+rot270"
    ]
    names = [
        View([Step(T.Scale([2]), 2)]).name,
        View([Step(T.Shift([(1, -2)]), (1, -2))]).name,
        View([Step(T.FiveCrops(2, 2), "lt")]).name,
        View([Step(T.TenCrops(2, 2), (True, "center"))]).name,
        View([Step(T.Resize([(4, 6)]), (4, 6))]).name,
        View([Step(T.Multiply([1.1]), 1.1), Step(T.VerticalFlip(), True)]).name,
        View([Step(T.Brightness([0.1]), 0.1), Step(T.Contrast([2]), 2), Step(T.Add([-1]), -1)]).name,
        View.identity().name,
    ]
    assert names == [
        "scale2", "shift(+1,-2)", "crop_lt", "hflip+crop_center", "resize4x6", "mul1.1+vflip",
        "bright0.1+contrast2+add-1", "identity",
    ]


def test_policy_json_round_trip(tmp_path):
    compose = Compose([T.HorizontalFlip(), T.Scale([0.5, 2], "bilinear", align_corners=False),
                       T.Shift([(1, 0), (0, -1)], "reflect"), T.Brightness([0.1], clip=False)])
    policy = compose.to_policy("mine", merge_mode="gmean", weights=list(range(1, len(compose) + 1)),
                               temperature=1.5, gate_threshold=0.9, meta={"found_by": "test"})
    extra = Policy([View([Step(T.TenCrops(3, 4), (True, "rb"))]), View([Step(T.Resize([(6, 7)], (5, 5)), (6, 7))]),
                    View([Step(T.Rotate90([270]), 270), Step(T.FiveCrops(3, 3), "center")])])
    for p in (policy, extra, Policy.identity()):
        path = tmp_path / f"{p.name}.json"
        p.save(path)
        loaded = Policy.load(path)
        assert loaded.to_json() == p.to_json()
        assert json.loads(path.read_text())["format"] == "ttakit-policy"
        x = torch.rand(1, 2, 9, 10)
        for a, b in zip(p, loaded, strict=True):  # the loaded views do the same thing
            assert torch.equal(a.augment_image(x), b.augment_image(x))
    loaded = Policy.load(tmp_path / "mine.json")
    assert loaded.weights == [float(w) for w in range(1, len(compose) + 1)]
    assert (loaded.merge_mode, loaded.temperature, loaded.gate_threshold) == ("gmean", 1.5, 0.9)
    step = loaded.views[-1].steps[1]
    assert isinstance(step.transform, T.Scale) and step.transform.interpolation == "bilinear"
    assert loaded.views[-1].steps[2].transform.padding_mode == "reflect"


def test_matrix_scaling_round_trips_and_only_its_files_say_format_version_2(tmp_path):
    policy = Compose([T.HorizontalFlip()]).to_policy("hflip", temperature=1.2)
    assert policy.to_json()["format_version"] == 1 and policy.to_json()["matrix_scaling"] is None
    policy.matrix_scaling = None
    scaled = Compose([T.HorizontalFlip()]).to_policy(
        "hflip", temperature=1.2, matrix_scaling={"weight": torch.eye(3) * 2, "bias": torch.tensor([0.5, 0, -0.5])}
    )
    assert scaled.matrix_scaling == {"weight": [[2, 0, 0], [0, 2, 0], [0, 0, 2]], "bias": [0.5, 0.0, -0.5]}
    scaled.save(tmp_path / "scaled.json")
    data = json.loads((tmp_path / "scaled.json").read_text())
    assert data["format_version"] == 2  # a version-1 reader refuses it instead of dropping the matrix
    loaded = Policy.load(tmp_path / "scaled.json")
    assert loaded.matrix_scaling == scaled.matrix_scaling and loaded.temperature == 1.2


def good_json():
    return Compose([T.HorizontalFlip()]).to_policy("hflip").to_json()


@pytest.mark.parametrize(
    "edit, pattern",
    [
        (lambda d: d.update(format="other"), 'not a ttakit policy'),
        (lambda d: d.update(format_version=99), "format version 99.*upgrade ttakit"),
        (lambda d: d.update(views=[]), "holds no views"),
        (lambda d: d["views"][1]["steps"][0].update(transform="Blur"), "unknown transform 'Blur'"),
        (lambda d: d["views"][1]["steps"][0].update(param="yes"), "parameter 'yes' is not valid for HorizontalFlip"),
        (lambda d: d["views"][1]["steps"][0].pop("transform"), 'a policy step must be an object with a "transform" name'),
        (lambda d: d.update(meta=5), 'field "meta" must be an object or null, got 5'),
        (lambda d: d.update(name=["x"]), r'field "name" must be a string, got \[\'x\'\]'),
        (lambda d: d.update(weights="11"), 'field "weights" must be a list of numbers or null'),
        (lambda d: d.update(temperature="2"), 'field "temperature" must be a positive number or null'),
        (lambda d: d.update(format_version=True), "format version True"),
        (lambda d: d["views"][1]["steps"][0].update(args=[1]), '"args" must be an object, got \\[1\\]'),
        (lambda d: d["views"][1].update(steps=[7]), 'a policy step must be an object with a "transform" name, got 7'),
        (lambda d: d["views"].append({"name": "x"}), "'steps' list"),
        (lambda d: d.update(merge_mode="median"), "unknown merge mode 'median'; expected one of: gmean, max"),
        (lambda d: d.update(weights=[1.0]), r"one value per view \(2\), got 1"),
        (lambda d: d.update(weights=[1.0, -1.0]), r"non-negative.*\[1.0, -1.0\]"),
        (lambda d: d.update(temperature=0), "temperature must be a positive number, got 0"),
        (lambda d: d.update(gate_threshold=1.5), r"gate_threshold must be a number in \[0, 1\], got 1.5"),
        (lambda d: d["views"][1]["steps"][0]["args"].update(bogus=1), "malformed"),
        (lambda d: d.update(matrix_scaling=[1]), 'field "matrix_scaling" must be an object'),
        (lambda d: d.update(matrix_scaling={"weight": [[1, 0], [0, 1]]}), 'matrix_scaling.*"bias"'),
        (lambda d: d.update(matrix_scaling={"weight": [[1, 0]], "bias": [0, 0]}), r"weight \(1, 2\) and bias \(2,\)"),
        (lambda d: d.update(matrix_scaling={"weight": [[1, 0], [0, "x"]], "bias": [0, 0]}), "hold numbers"),
        (lambda d: d.update(matrix_scaling={"weight": [[1, 0], [0, float("nan")]], "bias": [0, 0]}), "NaN/inf"),
    ],
)
def test_bad_policy_json_is_refused_naming_the_problem(edit, pattern):
    data = good_json()
    edit(data)
    with pytest.raises(PolicyFormatError, match=pattern):
        Policy.from_json(data)


def test_load_errors(tmp_path):
    with pytest.raises(PolicyFormatError, match="does not exist"):
        Policy.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PolicyFormatError, match="is not valid JSON"):
        Policy.load(tmp_path / "bad.json")


def test_unregistered_transforms_cannot_be_saved():
    class Mine(T.ImageOnlyTransform):
        identity_param = 0

        def __init__(self):
            super().__init__("v", [0, 1])

        def apply_aug_image(self, image, v=0, **kwargs):
            return image + v

    policy = Compose([Mine()]).to_policy()
    assert policy.view_names == ["identity", "Mine(v=1)"]
    with pytest.raises(PolicyFormatError, match="transform Mine is not registered.*register_transform"):
        policy.to_json()


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        ({"views": []}, InvalidInputError, "at least one view"),
        ({"merge_mode": "median"}, UnknownNameError, "unknown merge mode 'median'"),
        ({"weights": [1, 2, 3]}, InvalidInputError, r"one value per view \(2\), got 3"),
        ({"weights": [0, 0]}, InvalidInputError, "not all zero"),
        ({"weights": ["a", 1]}, InvalidInputError, r"list of numbers, got \['a', 1\]"),
        ({"temperature": -1.0}, InvalidInputError, "got -1.0"),
        ({"gate_threshold": -0.1}, InvalidInputError, "got -0.1"),
    ],
)
def test_policy_validates_its_settings(kwargs, error, pattern):
    args = {"views": [View.identity(), View([Step(T.HorizontalFlip(), True)])], **kwargs}
    with pytest.raises(error, match=pattern):
        Policy(**args)


def test_check_targets_fails_when_built():
    policy = Compose([T.HorizontalFlip(), T.Rotate([10])]).to_policy()
    policy.check_targets("label")
    policy.check_targets("keypoints")
    with pytest.raises(NotInvertibleError, match="Rotate cannot invert the 'mask' target"):
        policy.check_targets("mask")
    with pytest.raises(InvalidInputError, match="target must be one of.*got 'pixels'"):
        policy.check_targets("pixels")


def test_compose_rejects_non_transforms():
    with pytest.raises(InvalidInputError, match="list of transforms, got HorizontalFlip"):
        Compose(T.HorizontalFlip())
    with pytest.raises(InvalidInputError, match="transform protocol"):
        Compose([T.HorizontalFlip(), "hflip"])


def test_view_identity_and_targets():
    assert View.identity().is_identity and View([Step(T.HorizontalFlip(), False)]).is_identity
    crop_view = View([Step(T.HorizontalFlip(), True), Step(T.FiveCrops(2, 2), "lt")])
    assert {"mask", "label", "keypoints", "boxes"} <= crop_view.targets
    assert "label" not in View([Step(T.Tiles(2), "tiles")]).targets
    assert View([Step(T.HorizontalFlip(), True)]) == View([Step(T.HorizontalFlip(), True)])
    assert Policy.identity().view_names == ["identity"] and len(Policy.identity()) == 1


# --------------------------------------------------------------------------- a policy belongs to a model


class _Meta:
    def __init__(self, digest, source):
        self.weights_sha256, self.source = digest, source


def test_check_policy_model_refuses_fitted_policies_on_another_model():
    from ttakit.policy import check_policy_model, fitted_parameters

    a, b = "a" * 64, "b" * 64
    fitted = Policy([View.identity()], name="searched", temperature=1.5, meta={"weights_sha256": a, "checkpoint": "runs/a"})
    assert fitted_parameters(fitted) == ["temperature"]
    assert check_policy_model(fitted, _Meta(a, "runs/a")) is None
    with pytest.raises(InvalidInputError) as err:
        check_policy_model(fitted, _Meta(b, "runs/b"))
    text = str(err.value)
    assert "runs/a" in text and "runs/b" in text and "aaaaaaaaaaaa" in text and "bbbbbbbbbbbb" in text
    assert "--allow-other-model" in text and "\n" not in text
    with pytest.warns(UserWarning, match="allowed by --allow-other-model"):
        check_policy_model(fitted, _Meta(b, "runs/b"), allow_other_model=True)
    with pytest.raises(InvalidInputError, match="no recorded weights hash"):
        check_policy_model(fitted, None)  # a model that cannot say which weights it holds
    # views only: any model
    views = Policy([View.identity(), View([(T.HorizontalFlip(), True)])], meta={"weights_sha256": a})
    assert check_policy_model(views, _Meta(b, "runs/b")) is None
    # an old file that records no model: allowed, with a warning saying so
    old = Policy([View.identity()], name="old", weights=[1.0], temperature=1.2)
    with pytest.warns(UserWarning, match="does not record the model"):
        assert check_policy_model(old, _Meta(b, "runs/b")) is not None


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """Two tiny checkpoints of one recipe (seeds 0 and 1) and a policy searched on the first."""
    from ttakit.cli import main

    from ._fixtures import write_halves_npz

    root = tmp_path_factory.mktemp("policy-model")
    data = write_halves_npz(root / "halves.npz", n=240)
    for seed, name in ((0, "a"), (1, "b")):
        assert main(["--no-progress", "train", "--data", str(data), "--epochs", "1", "--batch-size", "32",
                     "--val-fraction", "0.3", "--seed", str(seed), "--out", str(root / name)]) == 0
    assert main(["--no-progress", "search", str(root / "a"), "--budget", "2"]) == 0
    policy = json.loads((root / "a" / "policy.json").read_text())
    assert policy["temperature"] is not None  # fitted: it belongs to model a
    return root, data


def _refused(capsys, argv, *fragments):
    from ttakit.cli import main

    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


def test_a_searched_policy_records_its_model_and_is_refused_on_another(two_models, capsys, tmp_path):
    from ttakit.cli import main
    from ttakit.models import read_checkpoint_meta

    root, data = two_models
    policy = json.loads((root / "a" / "policy.json").read_text())
    assert policy["meta"]["weights_sha256"] == read_checkpoint_meta(root / "a").weights_sha256
    assert policy["meta"]["checkpoint"] == str(root / "a")
    pol = str(root / "a" / "policy.json")
    both = (str(root / "a"), str(root / "b"), "--allow-other-model")
    _refused(capsys, ["--no-progress", "evaluate", str(root / "b"), "--policy", f"none,{pol}", "--out", str(tmp_path / "e")],
             *both)
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    for i, x in enumerate(np.load(data)["x"][:3]):
        Image.fromarray((x * 255).astype(np.uint8)).save(images / f"{i}.png")
    _refused(capsys, ["--no-progress", "predict", str(root / "b"), str(images), "--policy", pol,
                      "--out", str(tmp_path / "p.csv")], *both)
    _refused(capsys, ["--no-progress", "ensemble", f"{root / 'a'}:{pol}", f"{root / 'b'}:{pol}",
                      "--out", str(tmp_path / "ens")], *both)
    # asked for: allowed; and on its own model: no flag needed
    assert main(["--no-progress", "evaluate", str(root / "b"), "--policy", f"none,{pol}", "--allow-other-model",
                 "--no-plots", "--no-uncertainty", "--out", str(tmp_path / "e2")]) == 0
    assert main(["--no-progress", "predict", str(root / "b"), str(images), "--policy", pol, "--allow-other-model",
                 "--out", str(tmp_path / "p2.csv")]) == 0
    assert main(["--no-progress", "predict", str(root / "a"), str(images), "--policy", pol,
                 "--out", str(tmp_path / "p3.csv")]) == 0
    # views only: fine on any model
    views_only = {**policy, "temperature": None, "weights": None, "gate_threshold": None, "matrix_scaling": None}
    (tmp_path / "views.json").write_text(json.dumps(views_only))
    assert main(["--no-progress", "evaluate", str(root / "b"), "--policy", f"none,{tmp_path / 'views.json'}",
                 "--no-plots", "--no-uncertainty", "--out", str(tmp_path / "e3")]) == 0
