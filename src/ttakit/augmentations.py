"""The training-augmentation vocabulary shared by :mod:`ttakit.training`, :mod:`ttakit.aliases` and
:mod:`ttakit.search`.

A checkpoint records its train-time augmentations as records like ``{"name": "flip", "p": 0.5}``
(``CheckpointMeta.train_augmentations``). This module is the one place that knows the names,
their settings and defaults, how to validate a record, and what geometry each implies for
test-time views:

========  ==========================================  ======================================
name      settings (default)                          test-time views it suggests
========  ==========================================  ======================================
flip      ``p`` (0.5): probability of a left-right    horizontal flip
          mirror
shift     ``max_pixels`` (2): random integer shift    shifts of up to ``max_pixels`` pixels
          in ``[-max_pixels, max_pixels]^2``, zeros
crop      ``padding`` (2), ``max_pixels``             a zero-padded random crop is a shift by
          (= ``padding``)                             up to ``padding`` pixels
mixup     ``alpha`` (0.2): Beta(alpha, alpha) mixing  none (no geometry)
========  ==========================================  ======================================

Example:
    >>> parse_augmentations(["flip", {"name": "shift", "max_pixels": 3}])
    [{'name': 'flip', 'p': 0.5}, {'name': 'shift', 'max_pixels': 3}]
    >>> geometry(["flip", "shift"])
    Geometry(flip_p=0.5, max_shift=2)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import InvalidInputError, unknown_name

__all__ = [
    "AUGMENTATIONS",
    "AugmentationSpec",
    "Geometry",
    "parse_augment_names",
    "parse_augmentations",
    "make_records",
    "geometry",
    "aligned_views",
]


@dataclass(frozen=True)
class AugmentationSpec:
    """One training augmentation: its settings with defaults and kinds.

    Attributes:
        name: the name in ``TrainConfig.augment`` and in checkpoints.
        settings: setting -> (kind, default); kind is ``"probability"`` (a number in [0, 1]),
            ``"pixels"`` (an integer >= 0) or ``"positive"`` (a finite number > 0).
        geometric: whether it moves pixels (and so suggests test-time views).
        doc: one line for users.
    """

    name: str
    settings: Mapping[str, tuple[str, float]]
    geometric: bool
    doc: str


AUGMENTATIONS: dict[str, AugmentationSpec] = {
    spec.name: spec
    for spec in (
        AugmentationSpec("flip", {"p": ("probability", 0.5)}, True, "left-right mirror with probability p"),
        AugmentationSpec("shift", {"max_pixels": ("pixels", 2)}, True, "random integer shift, zero fill"),
        AugmentationSpec(
            "crop",
            {"padding": ("pixels", 2), "max_pixels": ("pixels", 2)},
            True,
            "zero-pad by `padding` and crop back (a shift by up to `max_pixels` = padding)",
        ),
        AugmentationSpec("mixup", {"alpha": ("positive", 0.2)}, False, "mixup of image pairs, Beta(alpha, alpha)"),
    )
}


@dataclass(frozen=True)
class Geometry:
    """What a set of training augmentations did to the geometry of the images.

    Attributes:
        flip_p: probability of a horizontal flip (0: never flipped).
        max_shift: the largest shift in pixels along each axis (shift and crop add up).
    """

    flip_p: float
    max_shift: int


def parse_augment_names(augment: object, argument: str = "augment") -> tuple[str, ...]:
    """Names of training augmentations from a tuple or a comma-separated string.

    Raises :class:`~ttakit.errors.UnknownNameError` listing the valid names, and
    :class:`~ttakit.errors.InvalidInputError` for a repeated name or a value of the wrong type.

    Example:
        >>> parse_augment_names("flip, shift")
        ('flip', 'shift')
    """
    if isinstance(augment, str):
        augment = tuple(a.strip() for a in augment.split(",") if a.strip())
    if not isinstance(augment, (tuple, list)) or not all(isinstance(a, str) for a in augment):
        raise InvalidInputError(
            f"Expected argument `{argument}` to be a tuple of augmentation names like ('flip', 'shift') "
            f"or a string 'flip,shift', but got {augment!r}"
        )
    for name in augment:
        if name not in AUGMENTATIONS:
            raise unknown_name("augmentation", name, AUGMENTATIONS)
    if len(set(augment)) != len(augment):
        raise InvalidInputError(
            f"Expected argument `{argument}` to name each augmentation once, but it names one twice: {tuple(augment)}"
        )
    return tuple(augment)


def _check_setting(record: Mapping[str, Any], key: str, kind: str) -> float | int:
    value = record[key]
    bad = isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
    if kind == "probability" and (bad or not 0 <= value <= 1):
        expected = "a number in [0, 1]"
    elif kind == "pixels" and (bad or not isinstance(value, numbers.Integral) or value < 0):
        expected = "an integer >= 0"
    elif kind == "positive" and (bad or not value > 0):
        expected = "a number > 0"
    else:
        return int(value) if kind == "pixels" else float(value)
    raise InvalidInputError(
        f"training augmentation {dict(record)!r}: {key} must be {expected}, got {value!r}"
    )


def parse_augmentations(records: object, argument: str = "train_augmentations") -> list[dict[str, Any]]:
    """Validate training-augmentation records and fill in defaults.

    Args:
        records: a checkpoint's ``train_augmentations``: dicts with a ``"name"`` and settings,
            or bare names.

    Returns:
        One dict per record with every setting present, in input order.

    Raises:
        UnknownNameError: an unknown name (the message lists the valid ones).
        InvalidInputError: not a list, a record without a name, an unknown setting (the message
            lists the valid settings), a bad value, or a name given twice.
    """
    if isinstance(records, (str, bytes)) or not isinstance(records, Sequence):
        raise InvalidInputError(
            f"Expected argument `{argument}` to be a list of dicts like {{'name': 'flip', 'p': 0.5}} "
            f"(a checkpoint's train_augmentations), but got {records!r}"
        )
    out: list[dict[str, Any]] = []
    for item in records:
        record = {"name": item} if isinstance(item, str) else item
        if not isinstance(record, Mapping) or not isinstance(record.get("name"), str):
            raise InvalidInputError(
                f"Expected each training augmentation to be a dict with a 'name' or a name, but got {item!r}"
            )
        spec = AUGMENTATIONS.get(record["name"])
        if spec is None:
            raise unknown_name("augmentation", record["name"], AUGMENTATIONS)
        extra = sorted(set(record) - {"name"} - set(spec.settings))
        if extra:
            raise InvalidInputError(
                f"training augmentation {dict(record)!r}: unknown setting {extra[0]!r}; "
                f"{spec.name} takes: {', '.join(spec.settings) or 'nothing'}"
            )
        full: dict[str, Any] = {"name": spec.name}
        for key, (kind, default) in spec.settings.items():
            if key in record:
                full[key] = _check_setting(record, key, kind)
            elif spec.name == "crop" and key == "max_pixels" and "padding" in record:
                full[key] = full["padding"]  # a padded crop shifts by up to its padding
            else:
                full[key] = int(default) if kind == "pixels" else float(default)
        if any(r["name"] == spec.name for r in out):
            raise InvalidInputError(f"Expected each training augmentation once, but {spec.name!r} appears twice in {records!r}")
        out.append(full)
    return out


def make_records(
    names: Sequence[str], *, flip_p: float = 0.5, max_shift: int = 2, crop_padding: int = 2, mixup_alpha: float = 0.2
) -> list[dict[str, Any]]:
    """The records a trainer stores for ``names`` with its settings (validated).

    Example:
        >>> make_records(("flip", "crop"), crop_padding=3)
        [{'name': 'flip', 'p': 0.5}, {'name': 'crop', 'padding': 3, 'max_pixels': 3}]
    """
    settings = {
        "flip": {"p": flip_p},
        "shift": {"max_pixels": max_shift},
        "crop": {"padding": crop_padding, "max_pixels": crop_padding},
        "mixup": {"alpha": mixup_alpha},
    }
    names = parse_augment_names(tuple(names), "names")
    return parse_augmentations([{"name": n, **settings[n]} for n in names])


def geometry(records: object) -> Geometry:
    """The flip probability and the largest shift (pixels) of training augmentations."""
    flip_p, max_shift = 0.0, 0
    for record in parse_augmentations(records):
        if record["name"] == "flip":
            flip_p = record["p"]
        elif record["name"] in ("shift", "crop"):
            max_shift += record["max_pixels"]
    return Geometry(float(flip_p), int(max_shift))


def aligned_views(records: object, max_shift: int = 1) -> list[Any]:
    """The test-time views aligned with training augmentations, identity first.

    A trained flip adds the horizontal flip; a trained shift or crop adds shifts by up to
    ``min(max_shift, trained shift)`` pixels in the four axis directions; both together give
    every combination. Non-geometric augmentations (mixup) add nothing, so a model trained
    without geometric augmentation gets the identity alone.

    Returns:
        ``list[ttakit.View]``.
    """
    from . import transforms as T  # the vocabulary itself does not need the transforms
    from .policy import Compose, View

    geo = geometry(records)
    steps: list[T.BaseTransform] = []
    if geo.flip_p > 0:
        steps.append(T.HorizontalFlip())
    distance = min(int(max_shift), geo.max_shift)
    if distance > 0:
        steps.append(T.Shift.around(tuple(range(1, distance + 1)), directions=4))
    return Compose(steps).views if steps else [View.identity()]
