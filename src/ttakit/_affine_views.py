"""Size-keeping geometric views for policy search, resampled bilinearly through grid_sample
(:func:`ttakit.functional.affine`). Labels map back exactly (a class does not move); keypoints map
back exactly through the inverse affine map; masks are not declared (resampling twice blurs)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from . import functional as F
from ._transform_base import (
    DualTransform,
    _check_numbers,
    _check_sequence,
    _require_size,
    _with_identity,
    register_transform,
)
from .errors import InvalidInputError


def _check_finite_pairs(name: str, values: object) -> list[tuple[float, float]]:
    out = []
    for value in _check_sequence(name, values):
        if (
            not isinstance(value, Sequence)
            or isinstance(value, (str, bytes))
            or len(value) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
        ):
            raise InvalidInputError(f"{name} must hold (dx, dy) pairs of finite numbers, got {value!r}")
        out.append((float(value[0]), float(value[1])))
    return out


class _AffineView(DualTransform):
    """Shared by Translate, Rotate and Zoom: one affine map per parameter, exact inverses for
    labels and keypoints."""

    uses_input_size = True
    targets = frozenset({"image", "label", "keypoints"})

    def _affine(self, param) -> tuple[float, float, float, float]:  # (angle, scale, dx, dy)
        raise NotImplementedError

    def apply_aug_image(self, image, *args, **kwargs):
        param = kwargs.get(self.pname, self.identity_param)
        return image if self.is_identity(param) else F.affine(image, *self._affine(param))

    def apply_deaug_label(self, label, *args, **kwargs):
        return label

    def apply_deaug_mask(self, mask, *args, **kwargs):
        raise self.refuse("mask")

    def apply_deaug_keypoints(self, keypoints, *args, input_size=None, **kwargs):
        param = kwargs.get(self.pname, self.identity_param)
        if self.is_identity(param):
            return keypoints
        return F.keypoints_unaffine(keypoints, *self._affine(param), _require_size(self, input_size))

    def apply_deaug_boxes(self, boxes, *args, input_size=None, **kwargs):
        param = kwargs.get(self.pname, self.identity_param)
        if "boxes" not in self.targets:
            raise self.refuse("boxes")
        if self.is_identity(param):
            return boxes
        angle, scale, dx, dy = self._affine(param)
        return F.boxes_unaffine(boxes, scale, dx, dy, _require_size(self, input_size))


@register_transform
class Translate(_AffineView):
    """Translate images by ``(dx, dy)`` pixels that may be fractional (sub-pixel shifts), bilinear,
    zero fill. ``(0, 0)`` is added. Inverts labels, keypoints and boxes exactly.

    Args:
        shifts: ``(dx, dy)`` pairs of numbers (content moves right and down).

    Example:
        >>> Translate([(0.5, 0.0)]).step_name((0.5, 0.0))
        'tshift(+0.5,+0)'
    """

    identity_param = (0.0, 0.0)
    targets = frozenset({"image", "label", "keypoints", "boxes"})
    param_arg = "shifts"

    def __init__(self, shifts: Sequence[tuple[float, float]]):
        super().__init__("shift", _with_identity(_check_finite_pairs("shifts", shifts), self.identity_param))

    def is_identity(self, param):
        return tuple(param) == (0.0, 0.0)

    def _affine(self, param):
        return 0.0, 1.0, float(param[0]), float(param[1])

    def step_name(self, param):
        return None if self.is_identity(param) else f"tshift({param[0]:+g},{param[1]:+g})"


@register_transform
class Rotate(_AffineView):
    """Rotate images about their centre by small angles in degrees (counter-clockwise on screen),
    bilinear, zero fill, same size. 0 is added. Inverts labels and keypoints exactly (a rotated
    box is not a box, so boxes are refused).

    Args:
        angles: finite angles in degrees.

    Example:
        >>> Rotate([-10, 10]).params
        [0.0, -10.0, 10.0]
    """

    identity_param = 0.0
    param_arg = "angles"

    def __init__(self, angles: Sequence[float]):
        super().__init__("angle", _with_identity([float(a) for a in _check_numbers("angles", angles)], self.identity_param))

    def is_identity(self, param):
        return float(param) == 0.0

    def _affine(self, param):
        return float(param), 1.0, 0.0, 0.0

    def step_name(self, param):
        return None if self.is_identity(param) else f"rotate{param:+g}"


@register_transform
class Zoom(_AffineView):
    """Zoom images about their centre, keeping their size: ``scale > 1`` magnifies (the border
    falls outside), ``scale < 1`` shrinks (zero fill around). Bilinear. 1 is added. Inverts
    labels, keypoints and boxes exactly.

    Args:
        scales: positive factors.

    Example:
        >>> Zoom([0.9, 1.1]).step_name(1.1)
        'zoom1.1'
    """

    identity_param = 1.0
    targets = frozenset({"image", "label", "keypoints", "boxes"})
    param_arg = "scales"

    def __init__(self, scales: Sequence[float]):
        super().__init__("scale", _with_identity([float(s) for s in _check_numbers("scales", scales, positive=True)], self.identity_param))

    def is_identity(self, param):
        return float(param) == 1.0

    def _affine(self, param):
        return 0.0, float(param), 0.0, 0.0

    def step_name(self, param):
        return None if self.is_identity(param) else f"zoom{param:g}"
