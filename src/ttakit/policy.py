"""Policies: ordered lists of views, each view an invertible chain of (transform, parameter) steps.

* :class:`Compose` is ttach's: the Cartesian product of its transforms' parameters, iterated as
  :class:`Transformer` objects with ``augment_image`` / ``deaugment_*`` methods.
* :class:`Policy` is an explicit list of :class:`View` records with readable names, merge settings
  (mode, per-view weights, temperature, gate threshold) and a JSON round-trip. Search builds
  policies view by view; ``evaluate`` and ``predict`` load them from JSON.

This module holds :class:`Compose`, :class:`Policy` and its file format; :mod:`ttakit._view` holds
the steps and views, :mod:`ttakit._provenance` what a policy was fitted on and which model may use it.
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
from ._provenance import (
    ROWS_KEY,  # noqa: F401
    SEARCH_KINDS,  # noqa: F401
    check_policy_model,
    fitted_on_labelled_data,
    fitted_parameters,
    unused_validation_rows,
)
from ._version import __version__
from ._view import Step, Transformer, View, _is_nested, _is_number, _short, _targets_of
from .errors import InvalidInputError, NotInvertibleError, PolicyFormatError, UnknownNameError
from .merge import check_matrix_scaling, check_merge_mode, check_weights
from .transforms import (
    TARGETS,
    BaseTransform,
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
