"""The transform protocol (ttach's, extended with targets), the transform registry and the argument checks the transforms share."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from .errors import InvalidInputError, NotInvertibleError, unknown_name

TARGETS = ("image", "mask", "label", "keypoints", "boxes")


_ALL_TARGETS = frozenset(TARGETS)


_REGISTRY: dict[str, type[BaseTransform]] = {}


def register_transform(cls: type[BaseTransform]) -> type[BaseTransform]:
    """Class decorator: make a transform known by its class name, so policies holding it load from JSON."""
    _REGISTRY[cls.__name__] = cls
    return cls


def list_transforms() -> list[str]:
    """Names of the registered transform classes."""
    return sorted(_REGISTRY)


def get_transform_class(name: str) -> type[BaseTransform]:
    """The registered transform class called ``name``."""
    if name not in _REGISTRY:
        raise unknown_name("transform", name, _REGISTRY)
    return _REGISTRY[name]


class BaseTransform:
    """ttach's transform protocol, plus declared targets.

    Args:
        name: the keyword (``pname``) under which each parameter reaches the ``apply_*`` methods.
        params: one parameter value per view.
    """

    identity_param: Any = None
    # A transform written for ttach promises these four; ours declare exactly what they invert.
    targets: ClassVar[frozenset[str]] = frozenset({"image", "mask", "label", "keypoints"})
    uses_input_size: ClassVar[bool] = False
    # Constructor argument holding the list of parameters (None: the constructor takes no list).
    param_arg: ClassVar[str | None] = None

    def __init__(self, name: str, params: Sequence[Any]):
        self.params = params
        self.pname = name

    def apply_aug_image(self, image, *args, **params):
        raise NotImplementedError

    def apply_deaug_mask(self, mask, *args, **params):
        raise NotImplementedError

    def apply_deaug_label(self, label, *args, **params):
        raise NotImplementedError

    def apply_deaug_keypoints(self, keypoints, *args, **params):
        raise NotImplementedError

    def apply_deaug_boxes(self, boxes, *args, **params):
        raise NotImplementedError

    # -- ttakit additions -----------------------------------------------------------------

    def is_identity(self, param: Any) -> bool:
        """Whether ``param`` leaves the image unchanged."""
        return self.identity_param is not None and param == self.identity_param

    def step_name(self, param: Any) -> str | None:
        """A short readable name for this transform at ``param``; None for the identity."""
        if self.is_identity(param):
            return None
        return f"{type(self).__name__}({self.pname}={param!r})"

    def get_args(self) -> dict[str, Any]:
        """Constructor arguments other than the parameter list, as JSON values."""
        return {}

    def refuse(self, target: str) -> NotInvertibleError:
        """The error for a target this transform cannot map back."""
        return NotInvertibleError(
            f"{type(self).__name__} cannot invert the {target!r} target exactly "
            f"(it can invert: {', '.join(t for t in TARGETS if t in self.targets)}); "
            f"remove it from the policy for this task"
        )


class ImageOnlyTransform(BaseTransform):
    """A transform that changes pixel values only: every target maps back unchanged."""

    targets: ClassVar[frozenset[str]] = _ALL_TARGETS

    def apply_deaug_mask(self, mask, *args, **params):
        return mask

    def apply_deaug_label(self, label, *args, **params):
        return label

    def apply_deaug_keypoints(self, keypoints, *args, **params):
        return keypoints

    def apply_deaug_boxes(self, boxes, *args, **params):
        return boxes


class DualTransform(BaseTransform):
    """A transform that moves pixels: masks, keypoints and boxes need an inverse."""


def _with_identity(values: Sequence[Any], identity: Any) -> list[Any]:
    # ttach semantics: the identity is always one of the views, and comes first.
    values = list(values)
    return values if identity in values else [identity, *values]


def _check_sequence(name: str, values: object) -> list[Any]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
        raise InvalidInputError(f"{name} must be a non-empty list, got {values!r}")
    return list(values)


def _check_numbers(name: str, values: object, positive: bool = False) -> list[float]:
    values = _check_sequence(name, values)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (positive and v <= 0):
            kind = "positive finite numbers" if positive else "finite numbers"
            raise InvalidInputError(f"{name} must be {kind}, got {values}")
    return values


def _require_size(transform: BaseTransform, input_size) -> tuple[int, int]:
    if input_size is None:
        raise NotInvertibleError(f"{type(transform).__name__} needs the recorded input size; augment first")
    return tuple(input_size)


def params_to_json(value: Any) -> Any:
    """A parameter as a JSON value (tuples become lists, tensors numbers)."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (tuple, list)):
        return [params_to_json(v) for v in value]
    return value


def params_from_json(value: Any) -> Any:
    """Undo :func:`params_to_json`: lists become tuples, so parameters compare as the originals."""
    if isinstance(value, list):
        return tuple(params_from_json(v) for v in value)
    return value
