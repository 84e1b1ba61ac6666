"""Photometric transforms: they change pixel values only, so every target maps back unchanged."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from . import functional as F
from ._transform_base import ImageOnlyTransform, _check_numbers, _with_identity, register_transform


class _ValueTransform(ImageOnlyTransform):
    """Shared by the photometric transforms: a list of numbers with an identity value."""

    _label: ClassVar[str] = ""
    _positive: ClassVar[bool] = False

    def __init__(self, name, values):
        values = _check_numbers(self.param_arg, values, positive=self._positive)
        super().__init__(name, _with_identity(values, self.identity_param))

    def step_name(self, param):
        return None if param == self.identity_param else f"{self._label}{param:g}"


@register_transform
class Add(_ValueTransform):
    """Add a value to every pixel (0 is added if missing)."""

    identity_param = 0
    param_arg = "values"
    _label = "add"

    def __init__(self, values: Sequence[float]):
        super().__init__("value", values)

    def apply_aug_image(self, image, value=0, **kwargs):
        return image if value == self.identity_param else F.add(image, value)


@register_transform
class Multiply(_ValueTransform):
    """Multiply every pixel by a factor (1 is added if missing)."""

    identity_param = 1
    param_arg = "factors"
    _label = "mul"

    def __init__(self, factors: Sequence[float]):
        super().__init__("factor", factors)

    def apply_aug_image(self, image, factor=1, **kwargs):
        return image if factor == self.identity_param else F.multiply(image, factor)


@register_transform
class Brightness(_ValueTransform):
    """Add brightness ``deltas`` to images in ``[0, 1]``, clamping the result when ``clip``."""

    identity_param = 0
    param_arg = "deltas"
    _label = "bright"

    def __init__(self, deltas: Sequence[float], clip: bool = True):
        self.clip = bool(clip)
        super().__init__("delta", deltas)

    def apply_aug_image(self, image, delta=0, **kwargs):
        return image if delta == self.identity_param else F.brightness(image, delta, self.clip)

    def get_args(self):
        return {"clip": self.clip}


@register_transform
class Contrast(_ValueTransform):
    """Scale each image's contrast about its per-channel mean by ``factors``."""

    identity_param = 1
    param_arg = "factors"
    _label = "contrast"
    _positive = True

    def __init__(self, factors: Sequence[float], clip: bool = True):
        self.clip = bool(clip)
        super().__init__("factor", factors)

    def apply_aug_image(self, image, factor=1, **kwargs):
        return image if factor == self.identity_param else F.contrast(image, factor, self.clip)

    def get_args(self):
        return {"clip": self.clip}
