"""Policy names and files resolved to policies: the one resolver every job uses."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..aliases import BASELINE, get_policy, list_policies, policy_from_augmentations
from ..errors import InvalidInputError, TTAKitError, UnknownNameError, unknown_name
from ..models import CheckpointMeta
from ..policy import Policy

# Plain inference is always evaluated: every lift is measured against it on the same images.


def resolve_policy(spec: str | Policy, meta: CheckpointMeta | None = None) -> Policy:
    """A policy from a registered name, ``train-aug`` (the checkpoint's training augmentations),
    or a path to a policy JSON file."""
    if isinstance(spec, Policy):
        return spec
    if spec == "train-aug":
        if meta is None:
            raise InvalidInputError("policy 'train-aug' needs a checkpoint that records its training augmentations")
        return policy_from_augmentations(meta.train_augmentations)
    if spec.endswith(".json") or os.path.sep in spec:
        return Policy.load(spec)
    try:
        return get_policy(spec)
    except UnknownNameError:
        raise unknown_name(
            "policy (or a policy .json path)", spec, [*list_policies(), "train-aug"]
        ) from None


def resolve_policies(specs: Sequence[str | Policy], meta: CheckpointMeta | None = None) -> list[Policy]:
    """Resolve each spec (comma-separated strings are split); duplicates by name are dropped."""
    flat: list[str | Policy] = []
    for spec in specs:
        flat.extend(s.strip() for s in spec.split(",") if s.strip()) if isinstance(spec, str) else flat.append(spec)
    policies, seen = [], set()
    for spec in flat:
        policy = resolve_policy(spec, meta)
        if policy.name not in seen:
            seen.add(policy.name)
            policies.append(policy)
    if not policies:
        raise InvalidInputError(f"give at least one policy, got {list(specs)!r}")
    return policies


def _flat_specs(specs: Sequence[str | Policy]) -> list[str | Policy]:
    if isinstance(specs, (str, Policy)):
        specs = [specs]
    flat: list[str | Policy] = []
    for spec in specs:
        if isinstance(spec, str):
            flat.extend(s.strip() for s in spec.split(",") if s.strip())
        elif isinstance(spec, Policy):
            flat.append(spec)
        else:
            raise InvalidInputError(
                f"policies must be names, policy .json paths or Policy objects, got {type(spec).__name__}: {spec!r}"
            )
    return flat


def _is_plain(policy: Policy) -> bool:
    return (
        len(policy) == 1
        and policy.views[0].is_identity
        and policy.temperature is None
        and policy.matrix_scaling is None
        and policy.gate_threshold is None
    )


def policy_fingerprint(policy: Policy) -> dict[str, Any]:
    """What a policy computes, as JSON: name, views, merge mode, weights, temperature, matrix
    scaling, gate (not its provenance ``meta`` nor the ttakit version). Equal fingerprints give
    equal results."""
    data = policy.to_json()
    keys = ("name", "merge_mode", "weights", "temperature", "matrix_scaling", "gate_threshold", "views")
    return {k: data[k] for k in keys}


def resolve_named_policies(specs: Sequence[str | Policy], meta: CheckpointMeta | None = None) -> list[Policy]:
    """Resolve policy specs (names, ``train-aug``, ``.json`` paths, :class:`Policy` objects;
    comma-separated strings are split) into policies with distinct names.

    A policy file whose name clashes with another policy, or that calls itself ``none`` without
    being plain inference, is named by its file stem instead. A clash that remains is refused,
    naming both sources: two different policies are never merged or dropped. The same spec
    given twice is evaluated once.

    Raises:
        InvalidInputError: no policy given, or two different policies with the same name.
    """
    flat = _flat_specs(specs)
    if not flat:
        raise InvalidInputError(f"give at least one policy, got {list(specs)!r}")
    resolved: list[tuple[Policy, str, bool]] = []  # (policy, where it came from, from a file)
    for spec in flat:
        policy = resolve_policy(spec, meta)
        from_file = isinstance(spec, str) and (spec.endswith(".json") or os.path.sep in spec)
        source = spec if isinstance(spec, str) else f"Policy object {policy.name!r}"
        resolved.append((replace(policy) if from_file else policy, source, from_file))
    # pass 1: a file whose name another, different policy also uses (or that calls itself
    # "none" without being plain inference) is named by its file stem
    by_name: dict[str, set[str]] = {}
    for policy, _, _ in resolved:
        by_name.setdefault(policy.name, set()).add(json.dumps(policy_fingerprint(policy), sort_keys=True))
    renamed: dict[str, str] = {}  # source -> the name its file gave
    for policy, source, from_file in resolved:
        if from_file and (len(by_name[policy.name]) > 1 or (policy.name == BASELINE and not _is_plain(policy))):
            renamed[source] = policy.name
            policy.name = Path(source).stem
    # pass 2: what still clashes is refused, naming both sources
    policies: list[Policy] = []
    sources: dict[str, str] = {}
    fingerprints: dict[str, dict[str, Any]] = {}
    for policy, source, _ in resolved:
        fingerprint = policy_fingerprint(policy)
        if policy.name in fingerprints:
            if fingerprints[policy.name] == fingerprint:
                continue  # the very same policy twice: one row
            first = sources[policy.name]
            named = {renamed[x] for x in (first, source) if x in renamed}
            via = f" (named {', '.join(repr(n) for n in sorted(named))} inside, so named by file stem)" if named else ""
            raise InvalidInputError(
                f"policies {first!r} and {source!r} both resolve to the name {policy.name!r}{via} "
                "but differ; give them distinct names (the \"name\" field, or distinct file names)"
            )
        if policy.name == BASELINE and not _is_plain(policy):
            raise InvalidInputError(
                f"policy {source!r} is named {BASELINE!r}, which is reserved for plain inference "
                f"(the identity view alone), but has views {policy.view_names}; rename it"
            )
        fingerprints[policy.name] = fingerprint
        sources[policy.name] = source
        policies.append(policy)
    return policies


def _probe_size(model: torch.nn.Module, channels: int, size: tuple[int, int]) -> bool:
    """Whether ``model`` accepts one ``channels`` x ``size`` image (a forward pass of one blank image)."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        with torch.inference_mode():
            model.eval()
            model(torch.zeros(1, channels, *size, device=device))
    except (RuntimeError, ValueError):
        return False
    return True


def _is_fixed_size(arch: str) -> bool:
    try:
        from ..models.registry import is_fixed_size
    except ImportError:  # a registry without size flags: probe every size instead
        return False
    try:
        return bool(is_fixed_size(arch))
    except TTAKitError:
        return False


def check_input_sizes(model: torch.nn.Module, meta: CheckpointMeta, policies: Sequence[Policy]) -> None:
    """Refuse, before any inference, a view that changes the image size when the model takes
    only the size it was trained on (e.g. ``multiscale`` on ``seed-cnn``, whose classifier is a
    fixed-size linear layer). Models that pool globally accept other sizes and pass.

    Raises:
        InvalidInputError: naming the policy, the view, the size it produces and the size the
            model takes.
    """
    channels = int(meta.in_channels)
    size = (int(meta.image_size[0]), int(meta.image_size[1]))
    blank = torch.zeros(1, channels, *size)
    fixed = _is_fixed_size(meta.arch)
    accepted: dict[tuple[int, int], bool] = {size: True}
    for policy in policies:
        for view in policy.views:
            try:
                out = tuple(int(d) for d in view.transformer().augment_image(blank).shape[-2:])
            except (RuntimeError, ValueError):
                continue  # the engine reports views that cannot run on this input itself
            if out not in accepted:
                # a registered fixed-size architecture takes no other size, even where its
                # pooling happens to round to the same feature count; others are probed
                accepted[out] = not fixed and _probe_size(model, channels, out)  # type: ignore[index]
            if not accepted[out]:
                raise InvalidInputError(
                    f"policy {policy.name!r}: view {view.name!r} turns the {size[0]}x{size[1]} images into "
                    f"{out[0]}x{out[1]}, but model {meta.arch} ({meta.source or 'checkpoint'}) takes only "
                    f"{size[0]}x{size[1]} images; drop that view, or use an architecture that pools globally (resnet20)"
                )


def policy_for(spec: Any, predictor: Any) -> Policy:
    """The one resolver every job uses for a policy run on ``predictor``: a :class:`Policy` as
    given; a name or policy file (``train-aug``: the augmentations the predictor's checkpoint or
    export records); anything else through :func:`ttakit.engine.as_policy`."""
    from ..engine import as_policy

    if isinstance(spec, Policy):
        return spec
    if not isinstance(spec, str):
        return as_policy(spec)
    meta = getattr(predictor, "meta", None)
    if spec == "train-aug" and meta is None:
        augmentations = getattr(predictor, "train_augmentations", None)
        if not augmentations and getattr(predictor, "kind", None) != "checkpoint":
            raise InvalidInputError(
                f"policy 'train-aug' needs a model that records its training augmentations (a ttakit checkpoint "
                f"or export); {getattr(predictor, 'source', 'this model')} does not"
            )
        return policy_from_augmentations(augmentations or ())
    return resolve_policy(spec, meta)
