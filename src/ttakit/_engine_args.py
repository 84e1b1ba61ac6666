"""The engine's argument checks: each names the argument, what it expects and the value it got."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch

from .errors import InvalidInputError
from .policy import Compose, Policy, View

_MODEL_OUTPUTS = ("logits", "probs")


def as_policy(policy: Policy | Compose | Sequence[View] | str) -> Policy:
    """Accept a :class:`Policy`, a ttach-style :class:`Compose`, a list of views or a policy name."""
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, Compose):
        return policy.to_policy()
    if isinstance(policy, str):
        # Imported here: aliases builds on this module's callers, not on the engine.
        from .aliases import get_policy

        return get_policy(policy)
    if isinstance(policy, Sequence) and policy and all(isinstance(v, View) for v in policy):
        return Policy(list(policy))
    # A ttach.Compose: rebuild it from its transforms, which follow the same protocol.
    if hasattr(policy, "aug_transforms") and hasattr(policy, "aug_transform_parameters"):
        return Compose(policy.aug_transforms).to_policy()
    raise InvalidInputError(
        f"policy must be a ttakit.Policy, a Compose, a list of View or a policy name, got {type(policy).__name__}"
    )


def _model_output_kind(model: Any) -> str:
    kind = getattr(model, "outputs", None)
    if not isinstance(kind, str):  # no declaration (or e.g. a sub-module called "outputs")
        return "logits"
    if kind not in _MODEL_OUTPUTS:
        raise InvalidInputError(
            f"the model declares outputs={kind!r}; expected 'logits' or 'probs' (probabilities, not softmaxed again)"
        )
    return kind


def _check_flag(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidInputError(f"{name} must be True or False, got {value!r}")
    return value


def _check_model(model: object) -> Any:
    if not callable(model):
        raise InvalidInputError(f"model must be callable (an nn.Module or a function), got {type(model).__name__}")
    return model


def _check_max_batch(max_batch: object) -> int:
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise InvalidInputError(f"max_batch must be a positive integer number of images, got {max_batch!r}")
    return max_batch


def _check_pass_size(pass_size: object) -> int | str | None:
    if pass_size is not None and pass_size != "auto" and (
        isinstance(pass_size, bool) or not isinstance(pass_size, int) or pass_size < 1
    ):
        raise InvalidInputError(
            "pass_size must be a positive integer number of images, 'auto' (chosen by timing the first calls) "
            f"or None (the default plan), got {pass_size!r}"
        )
    return pass_size


def _check_output_key(output_key: object) -> str | None:
    if output_key is not None and not isinstance(output_key, str):
        raise InvalidInputError(f"output_key must be a string key of the model's output mapping, got {output_key!r}")
    return output_key


def _check_class_dim(class_dim: object) -> int:
    if isinstance(class_dim, bool) or not isinstance(class_dim, int) or class_dim == 0:
        raise InvalidInputError(
            f"class_dim must be a non-zero integer (the class dimension of one output, e.g. 1 for (B, C); "
            f"0 is the batch), got {class_dim!r}"
        )
    return class_dim


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise InvalidInputError(f"seed must be an integer, got {seed!r}")
    return int(seed)


_IDS_FORMS = "a (B,) integer tensor or a list of B integers (one per image)"


def _check_ids(ids: object, total: int) -> torch.Tensor | None:
    """``None`` or the images' ids as a CPU int64 tensor of ``total`` values."""
    if ids is None:
        return None
    if isinstance(ids, torch.Tensor):
        if ids.ndim != 1:
            raise InvalidInputError(f"ids must be {_IDS_FORMS}, got a tensor of shape {tuple(ids.shape)}")
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise InvalidInputError(f"ids must be {_IDS_FORMS}, got a tensor of dtype {ids.dtype}")
        checked = ids.detach().to("cpu", torch.int64)
    elif isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise InvalidInputError(f"ids must be {_IDS_FORMS}, got {type(ids).__name__}")
    else:
        wrong = [v for v in ids if isinstance(v, bool) or not isinstance(v, numbers.Integral)]
        if wrong:
            raise InvalidInputError(f"ids must be {_IDS_FORMS}, got {_show(ids)} (not an integer: {wrong[0]!r})")
        try:
            checked = torch.tensor([int(v) for v in ids], dtype=torch.int64)
        except (OverflowError, RuntimeError):
            raise InvalidInputError(f"ids must be {_IDS_FORMS} that fit in int64, got {_show(ids)}") from None
    if checked.numel() != total:
        raise InvalidInputError(f"ids must hold one integer per image ({total}), got {checked.numel()}")
    return checked


def _show(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_gate(threshold: object, target: str, policy: Policy) -> float | None:
    if threshold is None:
        return None
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, numbers.Real)
        or not math.isfinite(threshold)
        or not 0 <= threshold <= 1
    ):
        raise InvalidInputError(
            f"gate_threshold must be a number in [0, 1] (0 never runs the extra views, 1 runs them on "
            f"every image) or None for no gate, got {threshold!r}"
        )
    if target != "label":
        raise InvalidInputError(
            f"the gate (gate_threshold={threshold}) needs class scores (target 'label'), got target "
            f"{target!r}; pass gate_threshold=None"
        )
    if not any(v.is_identity for v in policy.views):
        raise InvalidInputError(
            f"the gate needs a policy that holds the identity view (its plain prediction is reused and decides "
            f"which images get the others), but policy {policy.name!r} holds only {policy.view_names}"
        )
    return float(threshold)
