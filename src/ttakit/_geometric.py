"""Geometric transforms computed exactly (no resampling): flips, quarter-turns, size changes, crops and integer shifts."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import functional as F
from ._transform_base import (
    _ALL_TARGETS,
    DualTransform,
    _check_numbers,
    _check_sequence,
    _require_size,
    _with_identity,
    register_transform,
)
from .errors import InvalidInputError, NotInvertibleError


@register_transform
class HorizontalFlip(DualTransform):
    """Flip images left-right. Views: ``[False, True]``."""

    identity_param = False
    targets = _ALL_TARGETS

    def __init__(self):
        super().__init__("apply", [False, True])

    def apply_aug_image(self, image, apply=False, **kwargs):
        return F.hflip(image) if apply else image

    def apply_deaug_mask(self, mask, apply=False, **kwargs):
        return F.hflip(mask) if apply else mask

    def apply_deaug_label(self, label, apply=False, **kwargs):
        return label

    def apply_deaug_keypoints(self, keypoints, apply=False, **kwargs):
        return F.keypoints_hflip(keypoints) if apply else keypoints

    def apply_deaug_boxes(self, boxes, apply=False, **kwargs):
        return F.boxes_hflip(boxes) if apply else boxes

    def step_name(self, param):
        return "hflip" if param else None


@register_transform
class VerticalFlip(DualTransform):
    """Flip images top-bottom. Views: ``[False, True]``."""

    identity_param = False
    targets = _ALL_TARGETS

    def __init__(self):
        super().__init__("apply", [False, True])

    def apply_aug_image(self, image, apply=False, **kwargs):
        return F.vflip(image) if apply else image

    def apply_deaug_mask(self, mask, apply=False, **kwargs):
        return F.vflip(mask) if apply else mask

    def apply_deaug_label(self, label, apply=False, **kwargs):
        return label

    def apply_deaug_keypoints(self, keypoints, apply=False, **kwargs):
        return F.keypoints_vflip(keypoints) if apply else keypoints

    def apply_deaug_boxes(self, boxes, apply=False, **kwargs):
        return F.boxes_vflip(boxes) if apply else boxes

    def step_name(self, param):
        return "vflip" if param else None


@register_transform
class Rotate90(DualTransform):
    """Rotate images by multiples of 90 degrees (counter-clockwise on screen, as ``torch.rot90``).

    Args:
        angles: angles in degrees, each a multiple of 90 (0 is added if missing).
    """

    identity_param = 0
    targets = _ALL_TARGETS
    param_arg = "angles"

    def __init__(self, angles: Sequence[int]):
        angles = _check_numbers("angles", angles)
        bad = [a for a in angles if a % 90 != 0]
        if bad:
            raise InvalidInputError(f"angles must be multiples of 90 degrees, got {bad} in {angles}")
        super().__init__("angle", _with_identity([int(a) for a in angles], self.identity_param))

    @staticmethod
    def _quarters(angle: int) -> int:
        # The methods may be called directly (ttach's protocol), so the angle is checked here too.
        if isinstance(angle, bool) or not isinstance(angle, (int, float)) or angle % 90 != 0:
            raise InvalidInputError(f"angle must be a multiple of 90 degrees, got {angle!r}")
        return (int(angle) // 90) % 4

    def apply_aug_image(self, image, angle=0, **kwargs):
        return F.rot90(image, self._quarters(angle))

    def apply_deaug_mask(self, mask, angle=0, **kwargs):
        return F.rot90(mask, -self._quarters(angle))

    def apply_deaug_label(self, label, angle=0, **kwargs):
        return label

    def apply_deaug_keypoints(self, keypoints, angle=0, **kwargs):
        return F.keypoints_rot90(keypoints, -self._quarters(angle))

    def apply_deaug_boxes(self, boxes, angle=0, **kwargs):
        return F.boxes_rot90(boxes, -self._quarters(angle))

    def is_identity(self, param):
        return self._quarters(param) == 0

    def step_name(self, param):
        return None if self.is_identity(param) else f"rot{90 * self._quarters(param)}"


class _Resampling(DualTransform):
    """Shared by Scale and Resize: interpolation settings and the size-restoring inverse."""

    targets = _ALL_TARGETS  # normalised keypoints and boxes do not move under a resize
    uses_input_size = True

    def __init__(self, name, params, interpolation, align_corners):
        F.normalize_interpolation(interpolation, align_corners)
        self.interpolation = interpolation
        self.align_corners = align_corners
        super().__init__(name, params)

    def _resize(self, x, size):
        return F.resize(x, size, self.interpolation, self.align_corners)

    def apply_deaug_label(self, label, *args, **kwargs):
        return label

    def apply_deaug_keypoints(self, keypoints, *args, **kwargs):
        return keypoints

    def apply_deaug_boxes(self, boxes, *args, **kwargs):
        return boxes

    def get_args(self):
        return {"interpolation": self.interpolation, "align_corners": self.align_corners}


@register_transform
class Scale(_Resampling):
    """Scale images by factors (1 is added if missing).

    Unlike ttach, a mask is mapped back to the *recorded* input size, so sizes that do not
    round-trip through ``int(h * s)`` and ``1 / s`` (h=5, s=0.5) come back right.

    Args:
        scales: positive scale factors.
        interpolation: ``nearest``, ``nearest-exact``, ``bilinear`` (``linear``), ``bicubic`` or ``area``.
        align_corners: as in ``torch.nn.functional.interpolate``.
    """

    identity_param = 1
    param_arg = "scales"

    def __init__(self, scales: Sequence[float], interpolation: str = "nearest", align_corners: bool | None = None):
        scales = _check_numbers("scales", scales, positive=True)
        super().__init__("scale", _with_identity(scales, self.identity_param), interpolation, align_corners)

    def apply_aug_image(self, image, scale=1, **kwargs):
        if scale == self.identity_param:
            return image
        return F.scale(image, scale, self.interpolation, self.align_corners)

    def apply_deaug_mask(self, mask, scale=1, input_size=None, **kwargs):
        """``mask: (B, C, H', W')`` -> ``(B, C, H, W)``.

        Through a :class:`~ttakit.policy.Transformer` ``input_size`` is the recorded ``(H, W)``
        and the mask comes back to exactly that size. Called on the transform itself, as ttach's
        code does, there is no record and ttach's rule applies: scale by ``1 / scale``
        (:func:`ttakit.functional.unscale`), exact only when ``H * scale`` was whole.
        """
        if input_size is not None:
            return self._resize(mask, input_size)
        if scale == self.identity_param:
            return mask
        return F.unscale(mask, scale, self.interpolation, self.align_corners)

    def step_name(self, param):
        return None if param == self.identity_param else f"scale{param:g}"


@register_transform
class Resize(_Resampling):
    """Resize images to fixed sizes.

    Args:
        sizes: ``(height, width)`` pairs.
        original_size: the size of the input images, if known; it is then one of the views.
            Not needed to invert masks: the input size is recorded during augmentation.
        interpolation, align_corners: as for :class:`Scale`.
    """

    param_arg = "sizes"

    def __init__(
        self,
        sizes: Sequence[tuple[int, int]],
        original_size: tuple[int, int] | None = None,
        interpolation: str = "nearest",
        align_corners: bool | None = None,
    ):
        sizes = [_check_size("sizes", s) for s in _check_sequence("sizes", sizes)]
        if original_size is not None:
            original_size = _check_size("original_size", original_size)
            sizes = _with_identity(sizes, original_size)
        self.original_size = original_size
        super().__init__("size", sizes, interpolation, align_corners)

    def is_identity(self, param):
        return self.original_size is not None and tuple(param) == self.original_size

    def apply_aug_image(self, image, size=None, **kwargs):
        return image if self.is_identity(size) else self._resize(image, size)

    def apply_deaug_mask(self, mask, size=None, input_size=None, **kwargs):
        """``mask: (B, C, H', W')`` -> ``(B, C, H, W)``.

        Through a :class:`~ttakit.policy.Transformer` ``input_size`` is the recorded ``(H, W)``.
        Called on the transform itself, as ttach's code does, ttach's rule applies: back to
        ``original_size``, which must then have been given.
        """
        if input_size is not None:
            return self._resize(mask, input_size)
        if self.original_size is None:
            raise NotInvertibleError(
                "Resize needs original_size=(height, width) to invert a mask on its own; pass "
                "original_size, or augment the image through a Transformer, which records the input size"
            )
        return mask if self.is_identity(size) else self._resize(mask, self.original_size)

    def step_name(self, param):
        return None if self.is_identity(param) else f"resize{param[0]}x{param[1]}"

    def get_args(self):
        original = list(self.original_size) if self.original_size is not None else None
        return {"original_size": original, **super().get_args()}


def _check_size(name: str, size: object) -> tuple[int, int]:
    if (
        not isinstance(size, Sequence)
        or len(size) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)
    ):
        raise InvalidInputError(f"{name} must hold (height, width) pairs of positive integers, got {size!r}")
    return int(size[0]), int(size[1])


def _check_crop(crop_height: object, crop_width: object) -> tuple[int, int]:
    for name, value in (("crop_height", crop_height), ("crop_width", crop_width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidInputError(f"{name} must be a positive integer number of pixels, got {value!r}")
    return int(crop_height), int(crop_width)


class _Crops(DualTransform):
    """Shared by FiveCrops and TenCrops: labels pass through, keypoints and boxes map back exactly,
    and a mask is pasted into the full frame (pixels outside the crop get weight 0 in the merge)."""

    targets = _ALL_TARGETS
    uses_input_size = True
    loses_pixels = True  # the merge averages each pixel over the views that saw it

    def __init__(self, crop_height, crop_width, params):
        self.crop_height, self.crop_width = _check_crop(crop_height, crop_width)
        super().__init__("crop", params)

    @property
    def crop_size(self) -> tuple[int, int]:
        return self.crop_height, self.crop_width

    def _crop(self, image, position):
        top, left = F.crop_origin(tuple(image.shape[-2:]), self.crop_size, position)
        return F.crop(image, top, left, self.crop_height, self.crop_width)

    def _uncrop(self, fn, targets, position, input_size):
        if input_size is None:
            raise NotInvertibleError(f"{type(self).__name__} needs the recorded input size; augment first")
        top, left = F.crop_origin(tuple(input_size), self.crop_size, position)
        return fn(targets, top, left, self.crop_size, tuple(input_size))

    def _paste(self, mask, weight, position, input_size, flip):
        """``mask: (B, C, ch, cw)`` on the crop -> ``(values (B, C, H, W), weight (1, 1, H, W))``:
        values pasted at the crop (zero elsewhere), weight the crop's (or the incoming ``weight``'s)."""
        if input_size is None:
            raise NotInvertibleError(f"{type(self).__name__} needs the recorded input size; augment first")
        size = tuple(input_size)
        top, left = F.crop_origin(size, self.crop_size, position)
        if weight is None:
            weight = mask.new_ones(1, 1, *mask.shape[-2:], dtype=mask.dtype if mask.is_floating_point() else torch.float32)
        values, weight = F.uncrop_mask(mask, top, left, size), F.uncrop_mask(weight, top, left, size)
        return (F.hflip(values), F.hflip(weight)) if flip else (values, weight)

    def apply_deaug_label(self, label, *args, **kwargs):
        return label

    def get_args(self):
        return {"crop_height": self.crop_height, "crop_width": self.crop_width}


@register_transform
class FiveCrops(_Crops):
    """Four corner crops and a centre crop, as ttach. Views: ``lt``, ``lb``, ``rb``, ``rt``, ``center``.

    There is no identity view. Keypoints and boxes map back exactly; a mask is pasted into the
    full frame, and the engine's merge averages each pixel over the views that saw it (a policy
    leaving some pixel unseen by every view is refused before any forward pass).
    """

    def __init__(self, crop_height: int, crop_width: int):
        super().__init__(crop_height, crop_width, list(F.CROP_POSITIONS))

    def apply_aug_image(self, image, crop="center", **kwargs):
        return self._crop(image, crop)

    def apply_deaug_mask_weighted(self, mask, weight=None, crop="center", input_size=None, **kwargs):
        """``mask: (B, C, ch, cw)`` -> ``(values (B, C, H, W), weight (1, 1, H, W))``: pasted at the crop."""
        return self._paste(mask, weight, crop, input_size, flip=False)

    def apply_deaug_mask(self, mask, crop="center", input_size=None, **kwargs):
        """``mask: (B, C, ch, cw)`` -> ``(B, C, H, W)``, zero outside the crop (which the view never saw)."""
        return self.apply_deaug_mask_weighted(mask, None, crop=crop, input_size=input_size)[0]

    def apply_deaug_keypoints(self, keypoints, crop="center", input_size=None, **kwargs):
        return self._uncrop(F.keypoints_uncrop, keypoints, crop, input_size)

    def apply_deaug_boxes(self, boxes, crop="center", input_size=None, **kwargs):
        return self._uncrop(F.boxes_uncrop, boxes, crop, input_size)

    def step_name(self, param):
        return f"crop_{param}"


@register_transform
class TenCrops(_Crops):
    """Five crops of the image and five of its mirror image, in ttach's ``ten_crop_transform`` order.

    Views are ``(flip, position)`` pairs: the image is flipped first, then cropped.
    """

    def __init__(self, crop_height: int, crop_width: int):
        params = [(flip, pos) for flip in (False, True) for pos in F.CROP_POSITIONS]
        super().__init__(crop_height, crop_width, params)

    def apply_aug_image(self, image, crop=(False, "center"), **kwargs):
        flip, position = crop
        return self._crop(F.hflip(image) if flip else image, position)

    def apply_deaug_mask_weighted(self, mask, weight=None, crop=(False, "center"), input_size=None, **kwargs):
        """``mask: (B, C, ch, cw)`` -> ``(values (B, C, H, W), weight (1, 1, H, W))``: pasted, then unflipped."""
        flip, position = crop
        return self._paste(mask, weight, position, input_size, flip=flip)

    def apply_deaug_mask(self, mask, crop=(False, "center"), input_size=None, **kwargs):
        """``mask: (B, C, ch, cw)`` -> ``(B, C, H, W)``, zero outside the crop."""
        return self.apply_deaug_mask_weighted(mask, None, crop=crop, input_size=input_size)[0]

    def apply_deaug_keypoints(self, keypoints, crop=(False, "center"), input_size=None, **kwargs):
        flip, position = crop
        keypoints = self._uncrop(F.keypoints_uncrop, keypoints, position, input_size)
        return F.keypoints_hflip(keypoints) if flip else keypoints

    def apply_deaug_boxes(self, boxes, crop=(False, "center"), input_size=None, **kwargs):
        flip, position = crop
        boxes = self._uncrop(F.boxes_uncrop, boxes, position, input_size)
        return F.boxes_hflip(boxes) if flip else boxes

    def step_name(self, param):
        flip, position = param
        return f"hflip+crop_{position}" if flip else f"crop_{position}"


@register_transform
class Shift(DualTransform):
    """Translate images by whole pixels: each shift is ``(dx, dy)`` (right, down). ``(0, 0)`` is added.

    Invertible for masks (exact wherever the view saw the pixel; see
    :func:`ttakit.functional.unshift_mask`; the engine's merge leaves the strip a view never
    saw out of that view's average), keypoints and boxes.

    Args:
        shifts: ``(dx, dy)`` integer pairs.
        padding_mode: how to fill the uncovered border: ``constant`` (zeros), ``reflect``,
            ``replicate`` or ``circular``.
    """

    identity_param = (0, 0)
    targets = _ALL_TARGETS
    uses_input_size = True
    param_arg = "shifts"

    def __init__(self, shifts: Sequence[tuple[int, int]], padding_mode: str = "constant"):
        shifts = [_check_shift(s) for s in _check_sequence("shifts", shifts)]
        if padding_mode not in F.PADDING_MODES:
            raise InvalidInputError(f"padding_mode must be one of {', '.join(F.PADDING_MODES)}, got {padding_mode!r}")
        self.padding_mode = padding_mode
        # The shifted-out border comes back as padding, which the view never saw (circular wraps).
        self.loses_pixels = padding_mode != "circular"
        super().__init__("shift", _with_identity(shifts, self.identity_param))

    @classmethod
    def around(cls, distances: Sequence[int] = (1,), directions: int = 8, padding_mode: str = "constant") -> Shift:
        """Shifts by each distance in 4 (axis) or 8 (axis and diagonal) directions.

        Args:
            distances: a list of positive whole pixel distances, e.g. ``(1,)`` or ``(1, 2)``.
        """
        if (
            isinstance(distances, (str, bytes))
            or not isinstance(distances, Sequence)
            or not distances
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in distances)
        ):
            raise InvalidInputError(
                f"distances must be a non-empty list of positive whole pixel distances such as (1,) or (1, 2), "
                f"got {distances!r}"
            )
        if isinstance(directions, bool) or directions not in (4, 8):
            raise InvalidInputError(f"directions must be 4 or 8, got {directions!r}")
        unit = [(1, 0), (-1, 0), (0, 1), (0, -1)]
        if directions == 8:
            unit += [(1, 1), (1, -1), (-1, 1), (-1, -1)]
        return cls([(d * ux, d * uy) for d in distances for ux, uy in unit], padding_mode)

    def apply_aug_image(self, image, shift=(0, 0), **kwargs):
        return F.shift(image, shift[0], shift[1], self.padding_mode)

    def apply_deaug_mask(self, mask, shift=(0, 0), **kwargs):
        return F.unshift_mask(mask, shift[0], shift[1], self.padding_mode)

    def apply_deaug_mask_weighted(self, mask, weight=None, shift=(0, 0), **kwargs):
        """``mask: (B, C, H, W)`` -> ``(values, weight (1, 1, H, W) or None)``: the strip the
        shifted view never saw gets weight 0 (``circular``: it saw every pixel, weight None)."""
        dx, dy = shift
        values = F.unshift_mask(mask, dx, dy, self.padding_mode)
        if (dx, dy) == (0, 0) or (weight is None and not self.loses_pixels):
            return values, weight
        if weight is None:
            weight = mask.new_ones(1, 1, *mask.shape[-2:])
        return values, F.shift_coverage(weight, dx, dy, self.padding_mode)

    def apply_deaug_label(self, label, shift=(0, 0), **kwargs):
        return label

    def apply_deaug_keypoints(self, keypoints, shift=(0, 0), input_size=None, **kwargs):
        return F.keypoints_shift(keypoints, -shift[0], -shift[1], _require_size(self, input_size))

    def apply_deaug_boxes(self, boxes, shift=(0, 0), input_size=None, **kwargs):
        return F.boxes_shift(boxes, -shift[0], -shift[1], _require_size(self, input_size))

    def is_identity(self, param):
        return tuple(param) == (0, 0)

    def step_name(self, param):
        return None if self.is_identity(param) else f"shift({param[0]:+d},{param[1]:+d})"

    def get_args(self):
        return {"padding_mode": self.padding_mode}


def _check_shift(value: object) -> tuple[int, int]:
    if (
        not isinstance(value, Sequence)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise InvalidInputError(f"shifts must hold (dx, dy) pairs of integers, got {value!r}")
    return int(value[0]), int(value[1])
