"""Views: invertible chains of (transform, parameter) steps. :class:`Step` is one step, :class:`View` a named
chain, :class:`Transformer` runs a chain forwards on images and backwards on outputs (:class:`Compose`, in
:mod:`ttakit.policy`, iterates ttach-style transformers)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import InvalidInputError, NotInvertibleError, PolicyFormatError, UnknownNameError
from .functional import check_points
from .transforms import (
    TARGETS,
    BaseTransform,
    get_transform_class,
    params_from_json,
    params_to_json,
)

_DEFAULT_TARGETS = frozenset({"image", "mask", "label", "keypoints"})


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_nested(weights: object) -> bool:
    """Whether ``weights`` look like class-by-view weights (a 2-D tensor or a list holding lists)."""
    if isinstance(weights, torch.Tensor):
        return weights.ndim == 2
    if isinstance(weights, (str, bytes, dict)) or not isinstance(weights, Sequence):
        return False
    return any(isinstance(w, (Sequence, torch.Tensor)) and not isinstance(w, (str, bytes)) for w in weights)


def _short(value: object, limit: int = 120) -> str:
    """``repr(value)`` cut to ``limit`` characters, for one-line error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_transform(value: object) -> bool:
    """Whether ``value`` follows the transform protocol (ttach's or ours)."""
    return not isinstance(value, type) and all(hasattr(value, a) for a in ("params", "pname", "apply_aug_image"))


def _check_spatial(x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.ndim < 3:
        shape = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise InvalidInputError(f"{name} must be a torch.Tensor of shape (B, C, H, W), got {shape}")
    return x


def _targets_of(transform: Any) -> frozenset[str]:
    # Objects following ttach's protocol without our `targets` promise what ttach promises.
    return getattr(transform, "targets", _DEFAULT_TARGETS)


@dataclass(frozen=True)
class Step:
    """One transform at one parameter value."""

    transform: BaseTransform
    param: Any

    def __post_init__(self) -> None:
        if not _is_transform(self.transform):
            raise InvalidInputError(
                f"Step transform must be a transform object (with params, pname and apply_aug_image), "
                f"got {_short(self.transform)} ({type(self.transform).__name__})"
            )

    @property
    def name(self) -> str | None:
        namer = getattr(self.transform, "step_name", None)
        if namer is None:  # a ttach transform object
            if self.param == getattr(self.transform, "identity_param", object()):
                return None
            return f"{type(self.transform).__name__}({self.transform.pname}={self.param!r})"
        return namer(self.param)

    def to_json(self) -> dict[str, Any]:
        cls_name = type(self.transform).__name__
        try:
            registered = get_transform_class(cls_name)
        except UnknownNameError:
            registered = None
        if registered is not type(self.transform):
            raise PolicyFormatError(
                f"transform {cls_name} is not registered, so a policy holding it cannot be saved; "
                "decorate its class with ttakit.register_transform"
            )
        return {"transform": cls_name, "param": params_to_json(self.param), "args": self.transform.get_args()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Step:
        if not isinstance(data, dict) or not isinstance(data.get("transform"), str):
            raise PolicyFormatError(
                f'a policy step must be an object with a "transform" name, got {_short(data)}'
            )
        args = data.get("args")
        if args is not None and not isinstance(args, dict):
            raise PolicyFormatError(f'policy step {_short(data)}: "args" must be an object, got {_short(args)}')
        try:
            transform_cls = get_transform_class(data["transform"])
            param = params_from_json(data.get("param"))
            args = dict(args or {})
            if transform_cls.param_arg is not None:
                args[transform_cls.param_arg] = [param]
            transform = transform_cls(**args)
            valid = param in transform.params
        except UnknownNameError as err:
            raise PolicyFormatError(f"policy step {_short(data)}: {err}") from None
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as err:
            raise PolicyFormatError(f"policy step {_short(data)} is malformed: {_short(str(err), 200)}") from None
        if not valid:
            raise PolicyFormatError(
                f"policy step {_short(data)}: parameter {_short(param)} is not valid for {data['transform']}"
            )
        return cls(transform, param)


class Transformer:
    """One view, applied: ``augment_image`` then the ``deaugment_*`` method for the task's target.

    ``augment_image`` records the size of the image each step received, so inverses restore
    stored sizes (ttach recomputes them, which breaks ``Scale`` on odd sizes). A transformer is
    therefore stateful: augment, then de-augment, one batch at a time.
    """

    def __init__(self, steps: Sequence[Step]):
        self.steps = tuple(steps)
        self.input_sizes: list[tuple[int, int]] | None = None

    def augment_image(self, image: torch.Tensor) -> torch.Tensor:
        """``image: (B, C, H, W)`` -> the augmented view ``(B, C, H', W')``."""
        _check_spatial(image, "image")
        sizes = []
        for step in self.steps:
            sizes.append((int(image.shape[-2]), int(image.shape[-1])))
            image = step.transform.apply_aug_image(image, **{step.transform.pname: step.param})
        self.input_sizes = sizes
        return image

    def _steps_back(self, target: str):
        """``(transform, kwargs)`` of each step, last first, for de-augmenting ``target``."""
        sizes = self.input_sizes or [None] * len(self.steps)
        for step, size in zip(reversed(self.steps), reversed(sizes), strict=True):
            transform = step.transform
            if target not in _targets_of(transform):
                raise transform.refuse(target) if hasattr(transform, "refuse") else NotInvertibleError(
                    f"{type(transform).__name__} cannot invert the {target!r} target"
                )
            kwargs = {transform.pname: step.param}
            if getattr(transform, "uses_input_size", False):
                if size is None and target != "label":
                    # Never fall back to a transform's own guess (ttach's 1/scale): the size is recorded.
                    raise NotInvertibleError(
                        f"deaugment_{target} was called before augment_image, so the input size "
                        f"{type(transform).__name__} must restore is unknown; augment the image "
                        "through this transformer first"
                    )
                kwargs["input_size"] = size
            yield transform, kwargs

    def _deaugment(self, method: str, target: str, x):
        for transform, kwargs in self._steps_back(target):
            x = getattr(transform, method)(x, **kwargs)
        return x

    def deaugment_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """``mask: (B', C, H', W')`` predicted on the view -> ``(B, C, H, W)`` in the input's frame
        (``B' = B`` except after views that cut an image into several, such as tiles).

        Pixels the view never saw (outside a crop, the strip a shift pushed out) hold a filler
        value; :meth:`deaugment_mask_weighted` says which pixels those are.
        """
        return self.deaugment_mask_weighted(mask)[0]

    def deaugment_mask_weighted(self, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``mask: (B', C, H', W')`` -> ``(values (B, C, H, W), weight)``: ``weight`` is None when
        the view saw every pixel of the input, else ``(1, 1, H, W)``: how much of each pixel the
        view saw (0: never; crops and shifts give 0 or 1, tiles over a crop fractions).

        Steps with an ``apply_deaug_mask_weighted(mask, weight, **params)`` method map both; the
        others (flips, quarter-turns, resizes, photometric and ttach transforms) map the weight
        as they map a mask.
        """
        x, weight = _check_spatial(mask, "mask"), None
        for transform, kwargs in self._steps_back("mask"):
            weighted = getattr(transform, "apply_deaug_mask_weighted", None)
            if weighted is not None:
                x, weight = weighted(x, weight, **kwargs)
            else:
                x = transform.apply_deaug_mask(x, **kwargs)
                if weight is not None:
                    weight = transform.apply_deaug_mask(weight, **kwargs)
        return x, weight

    def deaugment_label(self, label: torch.Tensor) -> torch.Tensor:
        """Class scores ``(B, C)``; every transform here leaves them unchanged."""
        return self._deaugment("apply_deaug_label", "label", label)

    def deaugment_keypoints(self, keypoints: torch.Tensor) -> torch.Tensor:
        """``keypoints: (B, N, 2)`` normalised to the view -> normalised to the input image."""
        return self._deaugment("apply_deaug_keypoints", "keypoints", check_points(keypoints, 2, "keypoints"))

    def deaugment_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """``boxes: (B, N, 4)`` normalised xyxy on the view -> normalised on the input image."""
        return self._deaugment("apply_deaug_boxes", "boxes", check_points(boxes, 4, "boxes"))


class View:
    """One augmented copy of the input: an ordered chain of :class:`Step` records.

    Example:
        >>> from ttakit.transforms import HorizontalFlip, Rotate90
        >>> View([Step(HorizontalFlip(), True), Step(Rotate90([90]), 90)]).name
        'hflip+rot90'
    """

    def __init__(self, steps: Iterable[Step | tuple[BaseTransform, Any]] = ()):
        if isinstance(steps, (str, bytes, dict)) or not isinstance(steps, Iterable):
            raise InvalidInputError(
                f"View steps must be a list of Step or (transform, parameter) pairs, got {_short(steps)}"
            )
        checked = []
        for s in steps:
            if not isinstance(s, Step):
                if isinstance(s, (str, bytes)) or not isinstance(s, Sequence) or len(s) != 2:
                    raise InvalidInputError(
                        f"View steps must be Step objects or (transform, parameter) pairs, "
                        f"got {_short(s)} ({type(s).__name__})"
                    )
                s = Step(s[0], s[1])
            checked.append(s)
        self.steps = tuple(checked)

    @classmethod
    def identity(cls) -> View:
        return cls(())

    @property
    def name(self) -> str:
        names = [n for n in (s.name for s in self.steps) if n]
        return "+".join(names) if names else "identity"

    @property
    def is_identity(self) -> bool:
        return self.name == "identity"

    @property
    def targets(self) -> frozenset[str]:
        out = frozenset(TARGETS)
        for step in self.steps:
            out &= _targets_of(step.transform) | {"image"}
        return out

    def transformer(self) -> Transformer:
        return Transformer(self.steps)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "steps": [s.to_json() for s in self.steps]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> View:
        if not isinstance(data, dict) or not isinstance(data.get("steps"), list):
            raise PolicyFormatError(f"a policy view must be an object with a 'steps' list, got {data!r}")
        return cls(Step.from_json(s) for s in data["steps"])

    def __repr__(self) -> str:
        return f"View({self.name})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, View) and self.name == other.name

    def __hash__(self) -> int:
        return hash(self.name)
