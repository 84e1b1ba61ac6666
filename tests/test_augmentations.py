"""Tests for ttakit.augmentations: the one vocabulary of training augmentations that train,
aliases and search share."""

from __future__ import annotations

import pytest

from ttakit.aliases import policy_from_augmentations
from ttakit.augmentations import (
    AUGMENTATIONS,
    Geometry,
    aligned_views,
    geometry,
    make_records,
    parse_augment_names,
    parse_augmentations,
)
from ttakit.errors import InvalidInputError, UnknownNameError
from ttakit.search import default_pool, random_copy_views
from ttakit.training.config import AUGMENTATIONS as TRAIN_AUGMENTATIONS
from ttakit.training.config import TrainConfig


def test_train_search_and_aliases_share_one_vocabulary() -> None:
    assert set(TRAIN_AUGMENTATIONS) == set(AUGMENTATIONS) == {"flip", "shift", "crop", "mixup"}
    for name in AUGMENTATIONS:
        # every name the trainer accepts is understood downstream, with the trainer's records
        records = TrainConfig(augment=(name,)).augmentation_records()
        assert parse_augmentations(records) == records
        policy_from_augmentations(records)
        default_pool((28, 28), records)


def test_records_fill_defaults_and_keep_order() -> None:
    assert parse_augmentations(["shift", "flip"]) == [
        {"name": "shift", "max_pixels": 2},
        {"name": "flip", "p": 0.5},
    ]
    # a padded crop shifts by up to its padding unless told otherwise
    assert parse_augmentations([{"name": "crop", "padding": 3}]) == [{"name": "crop", "padding": 3, "max_pixels": 3}]
    assert make_records(("flip", "mixup"), mixup_alpha=0.4) == [{"name": "flip", "p": 0.5}, {"name": "mixup", "alpha": 0.4}]
    assert TrainConfig(augment="crop", crop_padding=3).augmentation_records() == [
        {"name": "crop", "padding": 3, "max_pixels": 3}
    ]


def test_geometry_adds_shift_and_crop() -> None:
    assert geometry([]) == Geometry(0.0, 0)
    assert geometry(["mixup"]) == Geometry(0.0, 0)
    assert geometry([{"name": "flip", "p": 0.25}, {"name": "shift", "max_pixels": 1}, {"name": "crop", "padding": 2}]) == Geometry(0.25, 3)


def test_aligned_views_follow_training() -> None:
    assert [v.name for v in aligned_views([])] == ["identity"]
    assert [v.name for v in aligned_views(["mixup"])] == ["identity"]
    assert [v.name for v in aligned_views(["flip"])] == ["identity", "hflip"]
    names = [v.name for v in aligned_views(["shift"], max_shift=2)]
    assert names == ["identity", "shift(+1,+0)", "shift(-1,+0)", "shift(+0,+1)", "shift(+0,-1)",
                     "shift(+2,+0)", "shift(-2,+0)", "shift(+0,+2)", "shift(+0,-2)"]
    # never further than the model was trained to shift
    assert len(aligned_views([{"name": "shift", "max_pixels": 1}], max_shift=3)) == 5
    assert [v.name for v in aligned_views([{"name": "flip", "p": 0.0}])] == ["identity"]


def test_policy_from_augmentations_refuses_unknown_names() -> None:
    # it used to return the identity silently for a name it did not know
    with pytest.raises(UnknownNameError, match="unknown augmentation 'rotate'; expected one of: crop, flip, mixup, shift"):
        policy_from_augmentations(["rotate"])
    with pytest.raises(UnknownNameError, match="'cutout'"):
        policy_from_augmentations([{"name": "cutout"}])
    policy = policy_from_augmentations([{"name": "flip", "p": 0.5}, {"name": "crop", "padding": 2, "max_pixels": 2}])
    assert policy.name == "train-aug" and len(policy) == 10 and "hflip+shift(+0,-1)" in policy.view_names


@pytest.mark.parametrize(
    ("records", "error", "match"),
    [
        ("flip", InvalidInputError, r"`train_augmentations` to be a list of dicts"),
        ([{"p": 0.5}], InvalidInputError, "a dict with a 'name' or a name"),
        ([3], InvalidInputError, "a dict with a 'name' or a name, but got 3"),
        ([{"name": "flip", "prob": 0.5}], InvalidInputError, "unknown setting 'prob'; flip takes: p"),
        ([{"name": "flip", "p": 2}], InvalidInputError, r"p must be a number in \[0, 1\], got 2"),
        ([{"name": "flip", "p": True}], InvalidInputError, r"p must be a number in \[0, 1\], got True"),
        ([{"name": "shift", "max_pixels": 1.5}], InvalidInputError, "max_pixels must be an integer >= 0, got 1.5"),
        ([{"name": "crop", "padding": -1}], InvalidInputError, "padding must be an integer >= 0, got -1"),
        ([{"name": "mixup", "alpha": 0}], InvalidInputError, "alpha must be a number > 0, got 0"),
        (["flip", "flip"], InvalidInputError, "'flip' appears twice"),
        (["cutout"], UnknownNameError, "unknown augmentation 'cutout'; expected one of: crop, flip, mixup, shift"),
    ],
)
def test_malformed_records(records, error, match) -> None:
    with pytest.raises(error, match=match) as err:
        parse_augmentations(records)
    assert "\n" not in str(err.value)
    # the search pool and the random copies read the same vocabulary
    with pytest.raises(error, match=match):
        random_copy_views(records, 2)


def test_augment_names() -> None:
    assert parse_augment_names("flip, shift") == ("flip", "shift")
    assert parse_augment_names(["mixup"]) == ("mixup",)
    assert parse_augment_names("") == ()
    with pytest.raises(UnknownNameError, match="unknown augmentation 'rotate'"):
        parse_augment_names("flip,rotate")
    with pytest.raises(InvalidInputError, match="twice"):
        parse_augment_names(("flip", "flip"))
    with pytest.raises(InvalidInputError, match="tuple of augmentation names"):
        parse_augment_names(3)
