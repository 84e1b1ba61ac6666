"""ttakit.aliases: ttach's alias functions and the registry of named policies."""

from __future__ import annotations

import json

import pytest
import torch
import ttach

import ttakit
from ttakit import aliases
from ttakit.errors import UnknownNameError
from ttakit.policy import Compose, Policy

pytestmark = pytest.mark.usefixtures("single_thread")

# alias -> (arguments, number of views, view names)
ALIASES = {
    "flip_transform": ((), 4, ["identity", "vflip", "hflip", "hflip+vflip"]),
    "hflip_transform": ((), 2, ["identity", "hflip"]),
    "vflip_transform": ((), 2, ["identity", "vflip"]),
    "d4_transform": ((), 8, ["identity", "rot90", "rot180", "rot270", "hflip", "hflip+rot90", "hflip+rot180",
                             "hflip+rot270"]),
    "multiscale_transform": (([0.5, 2],), 3, ["identity", "scale0.5", "scale2"]),
    "five_crop_transform": ((4, 5), 5, ["crop_lt", "crop_lb", "crop_rb", "crop_rt", "crop_center"]),
    "ten_crop_transform": ((4, 5), 10, ["crop_lt", "crop_lb", "crop_rb", "crop_rt", "crop_center", "hflip+crop_lt",
                                        "hflip+crop_lb", "hflip+crop_rb", "hflip+crop_rt", "hflip+crop_center"]),
}
TTACH_NAME = {"vflip_transform": "vlip_transform"}  # ttach's spelling


def test_every_alias_is_listed():
    assert set(ALIASES) | {"vlip_transform"} <= set(aliases.__all__)
    assert aliases.vlip_transform is aliases.vflip_transform


@pytest.mark.parametrize("name", ALIASES)
def test_alias_views_equal_ttachs(name):
    args, n, names = ALIASES[name]
    ours = getattr(aliases, name)(*args)
    theirs = getattr(ttach.aliases, TTACH_NAME.get(name, name))(*args)
    assert isinstance(ours, Compose) and len(ours) == len(theirs) == n
    assert ours.to_policy().view_names == names
    x = torch.rand(2, 3, 9, 8)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a.augment_image(x), b.augment_image(x))


def test_multiscale_interpolation_argument():
    compose = aliases.multiscale_transform([2], interpolation="linear")
    x = torch.rand(1, 1, 3, 3)
    view = list(compose)[1].augment_image(x)
    assert torch.allclose(view, torch.nn.functional.interpolate(x, size=(6, 6), mode="bilinear"))


def test_named_policies():
    assert {"none", "hflip", "vflip", "flip", "d4", "shift", "hflip-shift"} <= set(ttakit.list_policies())
    sizes = {"none": 1, "hflip": 2, "vflip": 2, "flip": 4, "d4": 8, "shift": 5, "hflip-shift": 10}
    for name, n in sizes.items():
        policy = ttakit.get_policy(name)
        assert isinstance(policy, Policy) and policy.name == name and len(policy) == n
        assert len(set(policy.view_names)) == n  # readable and distinct
        assert Policy.from_json(policy.to_json()).to_json() == policy.to_json()
    assert ttakit.get_policy("hflip-shift").view_names[:6] == [
        "identity", "shift(+1,+0)", "shift(-1,+0)", "shift(+0,+1)", "shift(+0,-1)", "hflip"
    ]
    assert ttakit.get_policy("d4") is not ttakit.get_policy("d4")  # fresh each time


def test_every_registered_policy_builds_and_round_trips():
    # zip(strict=True): a loaded policy with a view fewer fails here instead of passing silently.
    x = torch.rand(1, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    for name in ttakit.list_policies():
        policy = ttakit.get_policy(name)
        loaded = Policy.from_json(json.loads(json.dumps(policy.to_json())))
        assert loaded.view_names == policy.view_names and len(loaded) == len(policy) >= 1, name
        assert (loaded.merge_mode, loaded.weights, loaded.temperature) == (
            policy.merge_mode, policy.weights, policy.temperature
        )
        views = []
        for a, b in zip(policy, loaded, strict=True):
            view = a.augment_image(x)
            assert torch.equal(view, b.augment_image(x)), name
            assert torch.equal(b.deaugment_mask(view), a.deaugment_mask(view)), name  # and inverts alike
            views.append(view)
        # The views really differ from each other: a policy of copies would pass the checks above.
        assert all(not torch.equal(views[i], views[j]) for i in range(len(views)) for j in range(i)), name


def test_unknown_policy_lists_the_choices():
    with pytest.raises(UnknownNameError, match="unknown policy 'd5'; expected one of: d4, flip, hflip"):
        ttakit.get_policy("d5")


def test_register_policy():
    @ttakit.register_policy("test-vflip-rot")
    def _factory():
        return Compose([ttakit.VerticalFlip(), ttakit.Rotate90([180])])

    try:
        policy = ttakit.get_policy("test-vflip-rot")
        assert policy.name == "test-vflip-rot" and policy.view_names == ["identity", "rot180", "vflip", "vflip+rot180"]
    finally:
        aliases._POLICIES.pop("test-vflip-rot")


@pytest.mark.parametrize(
    "augmentations, names",
    [
        ([], ["identity"]),
        (["mixup"], ["identity"]),
        ([{"name": "flip"}], ["identity", "hflip"]),
        (["shift"], ["identity", "shift(+1,+0)", "shift(-1,+0)", "shift(+0,+1)", "shift(+0,-1)"]),
        ([{"name": "flip"}, {"name": "crop", "padding": 2}], None),
    ],
)
def test_policy_from_augmentations(augmentations, names):
    policy = aliases.policy_from_augmentations(augmentations)
    assert policy.name == "train-aug"
    if names is None:
        assert policy.view_names == ttakit.get_policy("hflip-shift").view_names
    else:
        assert policy.view_names == names
