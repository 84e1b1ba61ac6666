"""Policies: ordered lists of views, each view an invertible chain of (transform, parameter) steps.

* :class:`Compose` is ttach's: the Cartesian product of its transforms' parameters, iterated as
  :class:`Transformer` objects with ``augment_image`` / ``deaugment_*`` methods.
* :class:`Policy` is an explicit list of :class:`View` records with readable names, merge settings
  (mode, per-view weights, temperature, gate threshold) and a JSON round-trip. Search builds
  policies view by view; ``evaluate`` and ``predict`` load them from JSON.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ._io import atomic_write_json, read_json
from ._version import __version__
from .errors import InvalidInputError, NotInvertibleError, PolicyFormatError, UnknownNameError
from .functional import check_points
from .merge import check_matrix_scaling, check_merge_mode, check_weights
from .transforms import (
    TARGETS,
    BaseTransform,
    get_transform_class,
    params_from_json,
    params_to_json,
)

__all__ = [
    "Step",
    "View",
    "Transformer",
    "Compose",
    "Policy",
    "POLICY_FORMAT",
    "POLICY_FORMAT_VERSION",
    "check_policy_model",
    "fitted_on_labelled_data",
    "fitted_parameters",
    "unused_validation_rows",
]

POLICY_FORMAT = "ttakit-policy"
POLICY_FORMAT_VERSION = 2  # 2: matrix scaling (files without it are still written as 1)
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

    def _deaugment(self, method: str, target: str, x):
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
            x = getattr(transform, method)(x, **kwargs)
        return x

    def deaugment_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """``mask: (B, C, H', W')`` predicted on the view -> ``(B, C, H, W)`` in the input's frame."""
        return self._deaugment("apply_deaug_mask", "mask", _check_spatial(mask, "mask"))

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


class Compose:
    """ttach's composition: one view per combination of the transforms' parameters.

    Augmentation applies transforms in order; de-augmentation in reverse order.

    Example:
        >>> from ttakit.transforms import HorizontalFlip, Rotate90
        >>> len(Compose([HorizontalFlip(), Rotate90([90, 180, 270])]))
        8
    """

    def __init__(self, transforms: Sequence[BaseTransform]):
        if isinstance(transforms, BaseTransform) or not isinstance(transforms, Sequence):
            raise InvalidInputError(f"transforms must be a list of transforms, got {type(transforms).__name__}")
        for t in transforms:
            if not all(hasattr(t, attr) for attr in ("params", "pname", "apply_aug_image")):
                raise InvalidInputError(
                    f"transforms must follow the transform protocol (params, pname, apply_aug_image), got {t!r}"
                )
        self.aug_transforms = list(transforms)
        self.aug_transform_parameters = list(itertools.product(*[t.params for t in self.aug_transforms]))
        self.deaug_transforms = self.aug_transforms[::-1]
        self.deaug_transform_parameters = [p[::-1] for p in self.aug_transform_parameters]

    @property
    def views(self) -> list[View]:
        return [View(zip(self.aug_transforms, params, strict=True)) for params in self.aug_transform_parameters]

    def __iter__(self) -> Iterator[Transformer]:
        for view in self.views:
            yield view.transformer()

    def __len__(self) -> int:
        return len(self.aug_transform_parameters)

    def to_policy(self, name: str = "compose", **merge_settings: Any) -> Policy:
        """The explicit :class:`Policy` holding the same views in the same order."""
        return Policy(self.views, name=name, **merge_settings)


@dataclass
class Policy:
    """An explicit, ordered list of views plus how to merge them.

    Args:
        views: the views, identity included if wanted (``View.identity()``).
        name: a label for reports.
        merge_mode: a :mod:`ttakit.merge` mode.
        weights: optional per-view weights (``K`` numbers, one per view), or class-by-view weights
            (``K`` lists of ``C`` numbers, ClassTTA; merge mode ``"mean"`` only): the merge is then
            ``p_c ~ sum_k W[k][c] p_kc`` renormalised over classes. Learned on validation data.
        temperature: optional temperature the merged logits/probabilities are calibrated with.
        gate_threshold: optional confidence below which the extra views run (gated TTA).
        meta: free-form provenance (how the policy was found, validation scores).
        matrix_scaling: optional ``{"weight": C lists of C numbers, "bias": C numbers}`` applied to the
            merged output after the temperature: ``softmax(W log(p) + b)`` (Guo et al. 2017). Fitted
            on validation by the search, which keeps it only on enough rows and when it wins under
            cross-validation (:func:`ttakit.search.compare_matrix_scaling`);
            under a gate it applies, like the temperature, to the gated rows only.

    Example:
        >>> from ttakit.transforms import HorizontalFlip
        >>> policy = Compose([HorizontalFlip()]).to_policy("hflip")
        >>> policy.view_names
        ['identity', 'hflip']
    """

    views: list[View]
    name: str = "custom"
    merge_mode: str = "mean"
    weights: list[float] | list[list[float]] | None = None
    temperature: float | None = None
    gate_threshold: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    matrix_scaling: dict[str, list] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.views, (str, bytes, dict, View)) or not isinstance(self.views, Iterable):
            raise InvalidInputError(
                f"views must be a list of View objects (or lists of steps), got {_short(self.views)} "
                f"({type(self.views).__name__})"
            )
        views = []
        for v in self.views:
            if not isinstance(v, View):
                if isinstance(v, (str, bytes, dict, Step)) or not isinstance(v, Iterable):
                    raise InvalidInputError(
                        f"views must hold View objects (or lists of steps), got {_short(v)} ({type(v).__name__})"
                    )
                v = View(v)
            views.append(v)
        self.views = views
        if not self.views:
            raise InvalidInputError("a policy needs at least one view, got an empty list")
        if not isinstance(self.name, str):
            raise InvalidInputError(f"name must be a string, got {_short(self.name)}")
        if not isinstance(self.merge_mode, str):
            raise InvalidInputError(f"merge_mode must be a string such as 'mean', got {_short(self.merge_mode)}")
        check_merge_mode(self.merge_mode)
        if self.meta is None:
            self.meta = {}
        if not isinstance(self.meta, dict):
            raise InvalidInputError(f"meta must be a dict (JSON object), got {_short(self.meta)}")
        if self.weights is not None and _is_nested(self.weights):
            # Class-by-view weights: K lists of C numbers (merge "mean" of probabilities only).
            self.weights = check_weights(self.weights, len(self.views), self.merge_mode).tolist()
        elif self.weights is not None:
            given = self.weights
            if isinstance(given, torch.Tensor):
                given = given.detach().cpu().tolist()
            bad = isinstance(given, (str, bytes, dict)) or not isinstance(given, Iterable)
            try:
                values = [] if bad else list(given)
                bad = bad or any(isinstance(w, (str, bytes, bool)) for w in values)
                floats = [] if bad else [float(w) for w in values]
            except (TypeError, ValueError, OverflowError):
                bad = True
            if bad:
                raise InvalidInputError(f"weights must be a list of numbers, got {_short(given)}") from None
            self.weights = floats
            if len(self.weights) != len(self.views):
                raise InvalidInputError(
                    f"weights must hold one value per view ({len(self.views)}), got {len(self.weights)}"
                )
            if not all(math.isfinite(w) and w >= 0 for w in self.weights) or sum(self.weights) <= 0:
                raise InvalidInputError(f"weights must be finite, non-negative and not all zero, got {self.weights}")
        if self.temperature is not None and not (_is_number(self.temperature) and self.temperature > 0):
            raise InvalidInputError(f"temperature must be a positive number, got {self.temperature!r}")
        if self.gate_threshold is not None and not (_is_number(self.gate_threshold) and 0 <= self.gate_threshold <= 1):
            raise InvalidInputError(f"gate_threshold must be a number in [0, 1], got {self.gate_threshold!r}")
        self.matrix_scaling = check_matrix_scaling(self.matrix_scaling)

    @property
    def class_weights(self) -> bool:
        """Whether :attr:`weights` are class-by-view (``K`` lists of ``C`` numbers)."""
        return bool(self.weights) and isinstance(self.weights[0], list)

    @classmethod
    def identity(cls) -> Policy:
        """No TTA: the single identity view."""
        return cls([View.identity()], name="none")

    def __len__(self) -> int:
        return len(self.views)

    def __iter__(self) -> Iterator[Transformer]:
        for view in self.views:
            yield view.transformer()

    @property
    def view_names(self) -> list[str]:
        return [v.name for v in self.views]

    def check_targets(self, target: str) -> None:
        """Raise :class:`NotInvertibleError` now if some view cannot map ``target`` back."""
        if target not in TARGETS:
            raise InvalidInputError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
        for view in self.views:
            for step in view.steps:
                if target not in _targets_of(step.transform):
                    transform = step.transform
                    raise transform.refuse(target) if hasattr(transform, "refuse") else NotInvertibleError(
                        f"{type(transform).__name__} in view {view.name!r} cannot invert the {target!r} target"
                    )

    # -- JSON ---------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "format": POLICY_FORMAT,
            # Version 1 readers would silently drop matrix scaling: only such files say 2.
            "format_version": 2 if self.matrix_scaling is not None else 1,
            "ttakit_version": __version__,
            "name": self.name,
            "merge_mode": self.merge_mode,
            "weights": self.weights,
            "temperature": self.temperature,
            "gate_threshold": self.gate_threshold,
            "matrix_scaling": self.matrix_scaling,
            "views": [v.to_json() for v in self.views],
            "meta": self.meta,
        }

    @classmethod
    def from_json(cls, data: Any, source: str = "policy") -> Policy:
        """Build a policy from :meth:`to_json`'s dict, checking every field's type.

        Raises :class:`~ttakit.errors.PolicyFormatError` naming ``source``, the field and the value.
        """
        if not isinstance(data, dict) or data.get("format") != POLICY_FORMAT:
            raise PolicyFormatError(f"{source} is not a ttakit policy (expected \"format\": \"{POLICY_FORMAT}\")")
        version = data.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= POLICY_FORMAT_VERSION:
            raise PolicyFormatError(
                f"{source} has policy format version {_short(version)}; this ttakit reads versions 1 to "
                f"{POLICY_FORMAT_VERSION}" + (": upgrade ttakit" if _is_number(version) and version > POLICY_FORMAT_VERSION else "")
            )
        views = data.get("views")
        if not isinstance(views, list) or not views:
            raise PolicyFormatError(f'{source} holds no views (expected "views": a non-empty list)')
        expected = {
            "name": (str, "a string"),
            "merge_mode": (str, "a string such as \"mean\""),
            "weights": (list, "a list of numbers or null"),
            "temperature": ((int, float), "a positive number or null"),
            "gate_threshold": ((int, float), "a number in [0, 1] or null"),
            "matrix_scaling": (dict, 'an object {"weight": [[...]], "bias": [...]} or null'),
            "meta": (dict, "an object or null"),
        }
        for key, (types, what) in expected.items():
            value = data.get(key)
            if value is not None and (not isinstance(value, types) or isinstance(value, bool)):
                raise PolicyFormatError(f'{source}: field "{key}" must be {what}, got {_short(value)}')
        try:
            return cls(
                views=[View.from_json(v) for v in views],
                name=data.get("name") or "custom",
                merge_mode=data.get("merge_mode") or "mean",
                weights=data.get("weights"),
                temperature=data.get("temperature"),
                gate_threshold=data.get("gate_threshold"),
                meta=dict(data.get("meta") or {}),
                matrix_scaling=data.get("matrix_scaling"),
            )
        except PolicyFormatError as err:
            raise PolicyFormatError(f"{source}: {err}") from None
        except (InvalidInputError, UnknownNameError) as err:
            raise PolicyFormatError(f"{source}: {err}") from None

    def save(self, path: str | os.PathLike) -> None:
        """Write the policy as JSON, atomically."""
        atomic_write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Policy:
        """Read a policy written by :meth:`save`.

        Raises :class:`~ttakit.errors.InvalidInputError` when ``path`` is not a path, and
        :class:`~ttakit.errors.PolicyFormatError` for a missing, unreadable or malformed file.
        """
        if not isinstance(path, (str, os.PathLike)):
            raise InvalidInputError(f"path must be a str or os.PathLike to a policy .json file, got {_short(path)}")
        try:
            data = read_json(path)
        except FileNotFoundError:
            raise PolicyFormatError(f"policy file {os.fspath(path)!r} does not exist") from None
        except IsADirectoryError:
            raise PolicyFormatError(f"policy file {os.fspath(path)!r} is a folder; expected a .json file") from None
        except (OSError, ValueError, RecursionError) as err:
            raise PolicyFormatError(
                f"policy file {os.fspath(path)!r} is not valid JSON: {_short(str(err), 200)}"
            ) from None
        return cls.from_json(data, source=f"policy file {os.fspath(path)!r}")


# --------------------------------------------------------------------------- provenance: what a policy was fitted on

# Policy meta kinds that say the views themselves were chosen on labelled data (by ttakit search).
SEARCH_KINDS = frozenset({"greedy-search", "search-control", "refit"})
# meta["validation_rows"]: which rows of a checkpoint's validation split a search fitted on.
ROWS_KEY = "validation_rows"


def fitted_parameters(policy: Policy) -> list[str]:
    """What ``policy`` holds that was fitted to one model's outputs: any of ``"weights"``,
    ``"temperature"``, ``"gate"``, ``"matrix scaling"`` (empty for a views-only policy).

    Example:
        >>> fitted_parameters(Policy([View.identity()], temperature=1.3))
        ['temperature']
    """
    found = []
    if policy.weights is not None:
        found.append("weights")
    if policy.temperature is not None:
        found.append("temperature")
    if policy.gate_threshold is not None:
        found.append("gate")
    if policy.matrix_scaling is not None:
        found.append("matrix scaling")
    return found


def fitted_on_labelled_data(policy: Policy) -> bool:
    """Whether anything in ``policy`` was chosen on labelled rows: fitted parameters
    (:func:`fitted_parameters`), or views selected by a search (its ``meta`` says so). Named
    policies such as ``hflip`` or ``none`` were not."""
    meta = policy.meta or {}
    return bool(fitted_parameters(policy)) or meta.get("kind") in SEARCH_KINDS or ROWS_KEY in meta


def unused_validation_rows(policy: Policy, n_rows: int, sha256: str | None = None) -> list[int] | None:
    """The rows of the validation split (positions ``0..n_rows-1``) that fitting ``policy`` never
    used, or None when all of them may be used (nothing in it was fitted on validation rows).

    Raises:
        InvalidInputError: the policy was fitted on labelled rows but records none
            (``meta["validation_rows"]``), records all of them, or records another validation
            split (another size or content hash ``sha256``), with the way to get such rows.
    """
    if not fitted_on_labelled_data(policy):
        return None
    record = (policy.meta or {}).get(ROWS_KEY)
    how = (
        "search again with ttakit search (it keeps --conformal-holdout 0.2 of the validation rows for conformal "
        "calibration by default), or calibrate a policy with nothing fitted (e.g. none, hflip)"
    )
    if not isinstance(record, dict):
        raise InvalidInputError(
            f"policy {policy.name!r} was fitted on labelled images ({', '.join(fitted_parameters(policy)) or 'views searched'}) "
            f"but does not record which, so no validation row is proven unseen for conformal calibration; {how}"
        )
    if record.get("split") not in (None, "val"):  # searched on another split: every validation row is unseen
        return None
    rows = record.get("held_out")
    if (
        not isinstance(rows, list)
        or record.get("n") != n_rows
        or (sha256 is not None and record.get("sha256") not in (None, sha256))
        or not all(isinstance(r, int) and not isinstance(r, bool) and 0 <= r < n_rows for r in rows)
    ):
        raise InvalidInputError(
            f"policy {policy.name!r} records validation rows of another validation split ({record.get('n')!r} rows, "
            f"this one has {n_rows}), so no row is proven unseen for conformal calibration; {how}"
        )
    if not rows:
        raise InvalidInputError(
            f"policy {policy.name!r} was fitted on all {n_rows} validation rows (searched with --conformal-holdout 0), "
            f"so none is left for conformal calibration; {how}"
        )
    return sorted(set(rows))


def _model_of(model: Any) -> tuple[str | None, str]:
    """``(weights sha256 or None, a name)`` of a checkpoint meta, a predictor holding one, or None."""
    meta = getattr(model, "meta", None) or model
    digest = getattr(meta, "weights_sha256", None)
    name = getattr(meta, "source", None) or getattr(model, "source", None) or "this model"
    return (digest if isinstance(digest, str) else None), str(name)


def check_policy_model(policy: Policy, model: Any, *, allow_other_model: bool = False) -> str | None:
    """Refuse a policy whose fitted parameters (weights, temperature, gate, matrix scaling) were
    fitted on another model than ``model`` (a :class:`~ttakit.models.CheckpointMeta`, or a
    predictor with ``.meta``; None or a model without a weights hash counts as unknown).

    A policy records its model as ``meta["weights_sha256"]`` (and ``meta["checkpoint"]``), as
    ``ttakit search`` writes it. Views-only policies run on any model. A fitted policy that records
    no model (written before ttakit recorded it) is allowed with a warning: refusing it would break
    every policy searched before, and most were searched on the model they are used with.

    Returns:
        None, or the warning text (also issued as a :class:`UserWarning`) for a fitted policy
        that records no model, or one used on another model with ``allow_other_model``.

    Raises:
        InvalidInputError: naming both models and the flag that allows it.
    """
    import warnings

    fitted = fitted_parameters(policy)
    if not fitted:
        return None
    meta = policy.meta or {}
    recorded = meta.get("weights_sha256")
    digest, name = _model_of(model)
    if not isinstance(recorded, str):
        message = (
            f"policy {policy.name!r} holds fitted {', '.join(fitted)} but does not record the model it was fitted on "
            f"(written before ttakit recorded it); using it with {name} as given: search again to record it"
        )
        warnings.warn(message, UserWarning, stacklevel=2)
        return message
    if digest == recorded:
        return None
    where = meta.get("checkpoint") or "another checkpoint"
    found = f"weights sha256 {digest[:12]}..." if digest else "no recorded weights hash"
    message = (
        f"policy {policy.name!r} holds {', '.join(fitted)} fitted on {where} (weights sha256 {recorded[:12]}...), "
        f"but the model is {name} ({found})"
    )
    if not allow_other_model:
        raise InvalidInputError(
            f"{message}; search a policy for this model (ttakit search), use a views-only policy, "
            "or pass --allow-other-model (allow_other_model=True) to use it anyway"
        )
    warnings.warn(message + " (allowed by --allow-other-model)", UserWarning, stacklevel=2)
    return message
