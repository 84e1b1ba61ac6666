"""Ensembles of models, each with its own TTA policy: soft vote or hard (majority) vote.

Every member is a :class:`ttakit.predictors.Predictor` (or any callable on ``(B, C, H, W)``
images returning ``(B, classes)`` logits, or probabilities when it has
``outputs == "probs"``) and every prediction runs through :class:`ttakit.TTAEngine` with the
member's policy. Combining:

* **soft vote** (:func:`soft_vote`): the (weighted) mean of the members' probabilities, each
  calibrated first (temperature scaling fitted on held-out data, when given);
* **hard vote** (:func:`hard_vote`): the class most members pick (weighted votes); ties go to
  the class with the higher mean probability, then to a seeded random pick
  (``tie_break="mean"``), or straight to the seeded random pick (``tie_break="random"``).

:func:`ensemble_predict` is the library call (``ttakit predict`` with several models uses it);
:func:`evaluate_ensemble` reports each member plain and with its policy, the ensemble plain and
with TTA, with McNemar's test against the best member; :func:`ensemble_checkpoints` is the job
behind ``ttakit ensemble``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> members = [nn.Sequential(nn.Flatten(), nn.Linear(16, 3)) for _ in range(2)]
    >>> out = ensemble_predict(members, torch.rand(5, 1, 4, 4), policies=["hflip", "none"])
    >>> out.probs.shape, out.labels.shape, out.passes_per_image
    (torch.Size([5, 3]), torch.Size([5]), 3.0)
"""

from __future__ import annotations

import numbers
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from . import metrics as M
from .errors import InvalidInputError, unknown_name
from .policy import check_policy_model

__all__ = [
    "EnsembleOutput",
    "MemberSpec",
    "TIE_BREAKS",
    "VOTES",
    "calibration_rows",
    "check_same_classes",
    "ensemble_checkpoints",
    "ensemble_predict",
    "evaluate_ensemble",
    "hard_vote",
    "member_disagreement",
    "member_probs",
    "parse_member",
    "soft_vote",
]

VOTES = ("soft", "hard")
TIE_BREAKS = ("mean", "random")
Vote = Literal["soft", "hard"]
TieBreak = Literal["mean", "random"]


# --------------------------------------------------------------------------- validation


def _check_choice(kind: str, value: object, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise unknown_name(kind, value, choices)
    return value


def _check_stack(member_probs: object) -> torch.Tensor:
    if not isinstance(member_probs, torch.Tensor) or member_probs.ndim != 3 or not member_probs.is_floating_point():
        shape = tuple(member_probs.shape) if isinstance(member_probs, torch.Tensor) else type(member_probs).__name__
        raise InvalidInputError(
            f"Expected argument `member_probs` to be a float tensor of shape (M, N, C) "
            f"(members, images, classes), but got {shape}"
        )
    if 0 in member_probs.shape:
        raise InvalidInputError(f"Expected argument `member_probs` to be non-empty, but got shape {tuple(member_probs.shape)}")
    if not torch.isfinite(member_probs).all():
        raise InvalidInputError("Expected argument `member_probs` to be finite, but it contains NaN or inf")
    return member_probs


def _check_weights(weights: object, n_members: int) -> torch.Tensor | None:
    if weights is None:
        return None
    try:
        values = [float(w) for w in weights]  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise InvalidInputError(
            f"Expected argument `weights` to be a list of {n_members} non-negative numbers, one per member, "
            f"but got {weights!r}"
        ) from None
    if len(values) != n_members:
        raise InvalidInputError(
            f"Expected argument `weights` to hold one number per member ({n_members}), but got {len(values)}: {values}"
        )
    if any(not (w >= 0) or w == float("inf") for w in values) or sum(values) <= 0:
        raise InvalidInputError(
            f"Expected argument `weights` to be finite, non-negative and not all zero, but got {values}"
        )
    return torch.tensor(values, dtype=torch.float64)


def check_same_classes(classes: Sequence[Sequence[str] | None], names: Sequence[str]) -> list[str] | None:
    """The members' shared class list; :class:`InvalidInputError` naming the first member that differs.

    Members whose classes are unknown (None) are not compared; their output width is checked
    when they run.
    """
    reference, ref_name = None, ""
    for cls, name in zip(classes, names, strict=True):
        if cls is None:
            continue
        if reference is None:
            reference, ref_name = list(cls), name
        elif list(cls) != reference:
            raise InvalidInputError(
                f"ensemble members must predict the same classes in the same order: {ref_name} has "
                f"{_short(reference)} but {name} has {_short(list(cls))}"
            )
    return reference


def _short(classes: list[str]) -> str:
    shown = ", ".join(classes[:6])
    return f"{len(classes)} classes [{shown}{', ...' if len(classes) > 6 else ''}]"


# --------------------------------------------------------------------------- combining


def soft_vote(member_probs: torch.Tensor, weights: Sequence[float] | None = None) -> torch.Tensor:
    """The (weighted) mean of the members' probabilities.

    Args:
        member_probs: ``(M, N, C)`` each member's class probabilities.
        weights: ``M`` non-negative weights (normalised to sum to 1); default equal.

    Returns:
        ``(N, C)`` probabilities.

    Example:
        >>> soft_vote(torch.tensor([[[0.9, 0.1]], [[0.3, 0.7]]]), weights=[1, 3])
        tensor([[0.4500, 0.5500]])
    """
    stack = _check_stack(member_probs)
    w = _check_weights(weights, stack.shape[0])
    if w is None:
        return stack.mean(dim=0)
    w = (w / w.sum()).to(stack.dtype)
    return torch.einsum("m,mnc->nc", w, stack)


def hard_vote(
    member_probs: torch.Tensor,
    weights: Sequence[float] | None = None,
    tie_break: TieBreak = "mean",
    seed: int = 0,
    row_seeds: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Majority vote over the members' predicted classes.

    Args:
        member_probs: ``(M, N, C)`` each member's class probabilities.
        weights: ``M`` non-negative vote weights; default one vote each.
        tie_break: ``"mean"``: among the classes with the most votes, the one with the higher
            (weighted) mean probability, and only if that ties too a seeded random pick;
            ``"random"``: a seeded random pick among the classes with the most votes.
        seed: seeds the random pick (same seed and input, same result).
        row_seeds: ``(N,)`` integers: each tied row draws its random pick from its own stream,
            seeded by ``(seed, row_seeds[i])``, so an image's pick does not depend on the batch it
            came in (``ttakit predict`` passes a hash of each file's path). Default: one stream
            for the whole batch.

    Returns:
        ``(labels, shares)``: ``labels`` ``(N,)`` the winning classes; ``shares`` ``(N, C)`` the
        (weighted) fraction of votes each class got.

    Example:
        >>> probs = torch.tensor([[[0.6, 0.4]], [[0.2, 0.8]]])  # one vote each: a tie
        >>> hard_vote(probs)[0]  # class 1 has the higher mean probability
        tensor([1])
    """
    stack = _check_stack(member_probs)
    tie_break = _check_choice("tie-break", tie_break, TIE_BREAKS)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise InvalidInputError(f"Expected argument `seed` to be an integer, but got {seed!r}")
    m, n, c = stack.shape
    w = _check_weights(weights, m)
    w = torch.ones(m, dtype=torch.float64) if w is None else w
    picks = stack.argmax(dim=2)  # (M, N)
    votes = torch.zeros(n, c, dtype=torch.float64)
    for k in range(m):
        votes.scatter_add_(1, picks[k][:, None], w[k].expand(n, 1))
    shares = votes / w.sum()
    tol = 1e-9 * float(w.sum())
    tied = votes >= votes.amax(dim=1, keepdim=True) - tol  # (N, C) classes with the most votes
    if tie_break == "mean":
        mean = torch.einsum("m,mnc->nc", w / w.sum(), stack.double())
        masked = torch.where(tied, mean, torch.full_like(mean, -torch.inf))
        tied &= masked >= masked.amax(dim=1, keepdim=True) - 1e-12
    if row_seeds is None:
        noise = torch.rand(n, c, generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float64)
    else:
        if not isinstance(row_seeds, torch.Tensor) or row_seeds.shape != (n,):
            raise InvalidInputError(f"Expected argument `row_seeds` to be a tensor of shape ({n},), but got {row_seeds!r}")
        noise = torch.zeros(n, c, dtype=torch.float64)
        for i in torch.nonzero(tied.sum(dim=1) > 1).flatten().tolist():  # only real ties need a draw
            stream = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(row_seeds[i])) % (2**63))
            noise[i] = torch.rand(c, generator=stream, dtype=torch.float64)
    labels = torch.where(tied, noise, torch.full_like(noise, -1.0)).argmax(dim=1)
    return labels, shares


# --------------------------------------------------------------------------- running members


def _classes_of(predictor: Any) -> list[str] | None:
    classes = getattr(predictor, "classes", None)
    if classes is None and getattr(predictor, "meta", None) is not None:
        classes = getattr(predictor.meta, "classes", None)
    return list(classes) if classes is not None else None


def _name_of(predictor: Any, index: int) -> str:
    source = getattr(predictor, "source", None)
    return str(source) if source else f"member {index + 1}"


def _resolve_policy(spec: Any, predictor: Any):
    from .engine import as_policy
    from .evaluate import resolve_policy
    from .policy import Policy

    if isinstance(spec, Policy):
        return spec
    if isinstance(spec, str):
        return resolve_policy(spec, getattr(predictor, "meta", None))
    return as_policy(spec)


def member_probs(
    predictor: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    policy: Any = "none",
    *,
    max_batch: int = 256,
    progress: bool = False,
    desc: str | None = None,
) -> tuple[torch.Tensor, float]:
    """One member's class probabilities ``(N, C)`` under ``policy`` and its forward passes per image.

    Runs through the engine with everything the policy stores (views, merge, weights, gate,
    temperature): :func:`ttakit.evaluate.predict_probs`.
    """
    probs, passes = _member_run(predictor, images, policy, max_batch=max_batch, progress=progress, desc=desc)
    return probs, float(passes.double().mean())


def _member_run(
    predictor: Any,
    images: torch.Tensor,
    policy: Any,
    *,
    max_batch: int = 256,
    progress: bool = False,
    desc: str | None = None,
    device: Any = None,
    amp: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(probs (N, C), passes (N,))``: one engine run (:func:`ttakit.evaluate.run_policy`) and
    the forward passes each image got (fewer under a gate)."""
    from .evaluate import run_policy

    policy = _resolve_policy(policy, predictor)
    out = run_policy(predictor, images, policy, max_batch=max_batch, progress=progress, desc=desc, device=device,
                     amp=amp)
    return out.merged.float().cpu(), out.passes.cpu().to(torch.float64)


def _fit_temperature(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature minimising the NLL of ``softmax(log(probs) / T)`` on held-out ``labels``."""
    from .merge import PROB_FLOOR
    from .search import fit_temperature

    return float(fit_temperature(torch.log(probs.double().clamp_min(PROB_FLOOR)), labels))


def calibration_rows(val: Any, policies: Sequence[Any], *, strict: bool = False) -> tuple[list[int], list[int]]:
    """Split the members' shared validation split ``val`` into ``(temperature rows, conformal rows)``:
    disjoint, sorted, together every row, so conformal sets never calibrate on a row that fitted a
    member's temperature (nor anything in its policy).

    Conformal rows: the rows no member's policy was fitted on, as the policies record them
    (``meta["validation_rows"]``, :func:`ttakit.policy.unused_validation_rows`); when none records
    any (views-only policies such as ``none`` or ``hflip``), the seeded, stratified share
    ``ttakit search`` keeps unseen by default (``CONFORMAL_HOLDOUT`` of the rows, ``HOLDOUT_SEED``).
    Temperature rows: the rest (the rows the members' searches used). The same rows whether or not
    conformal sets are asked for, so a member's temperature does not depend on ``--conformal``.

    Args:
        strict: raise when a fitted policy records no unseen validation rows (conformal sets were
            asked for); else such a policy is passed over.

    Raises:
        InvalidInputError: ``strict`` and a policy as above, or policies leaving no row unseen by all.
    """
    from .data import stratified_indices
    from .data.splits import dataset_sha256
    from .errors import DataError
    from .experiment import CONFORMAL_HOLDOUT, HOLDOUT_SEED
    from .policy import unused_validation_rows

    n = len(val)
    unseen: set[int] | None = None
    digest = None
    for policy in policies:
        if digest is None and (policy.meta or {}).get("validation_rows"):
            digest = dataset_sha256(val)
        try:
            unused = unused_validation_rows(policy, n, digest)
        except InvalidInputError:
            if strict:
                raise
            continue
        if unused is not None:
            unseen = set(unused) if unseen is None else unseen & set(unused)
    if unseen is None:
        try:
            _, held = stratified_indices(val.labels, CONFORMAL_HOLDOUT, HOLDOUT_SEED, name="the conformal holdout")
        except DataError:
            if strict:
                raise InvalidInputError(
                    f"the members' validation split has {n} images, too few to keep {CONFORMAL_HOLDOUT:g} of each "
                    "class for conformal calibration apart from the rows their temperatures are fitted on; retrain "
                    "with a larger --val-fraction"
                ) from None
            return list(range(n)), []
        unseen = set(held.tolist())
    if not unseen and strict:
        raise InvalidInputError(
            "the members' policies were fitted on different validation rows and leave no row that none of them saw "
            "for conformal calibration; search them with the same --conformal-holdout on the same data"
        )
    return [r for r in range(n) if r not in unseen], sorted(unseen)


def _apply_temperature(probs: torch.Tensor, temperature: float | None) -> torch.Tensor:
    from .merge import apply_temperature

    return probs if temperature is None else apply_temperature(probs, temperature).float()


@dataclass
class EnsembleOutput:
    """What :func:`ensemble_predict` returns.

    Attributes:
        probs: ``(N, C)`` soft vote: the weighted mean of calibrated member probabilities;
            hard vote: the (weighted) share of votes of each class.
        labels: ``(N,)`` predicted classes (hard vote: after the tie-break).
        member_probs: ``(M, N, C)`` each member's calibrated probabilities.
        passes_per_image: forward passes per image, summed over members.
        passes: ``(N,)`` forward passes each image got, summed over members (fewer under a gate).
        disagreement: ``(N,)`` the (weighted) share of members whose class differs from
            ``labels``: 0 when every member agrees with the ensemble.
        temperatures: per member, the temperature applied (None: none).
        classes: the shared class names, when the members know them.
        vote, tie_break, weights: how they were combined.
    """

    probs: torch.Tensor
    labels: torch.Tensor
    member_probs: torch.Tensor
    passes_per_image: float
    temperatures: list[float | None]
    classes: list[str] | None
    vote: str
    tie_break: str
    weights: list[float] | None = None
    member_names: list[str] = field(default_factory=list)
    passes: torch.Tensor | None = None
    disagreement: torch.Tensor | None = None


def combine(
    stack: torch.Tensor,
    vote: Vote = "soft",
    weights: Sequence[float] | None = None,
    tie_break: TieBreak = "mean",
    seed: int = 0,
    row_seeds: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(probs (N, C), labels (N,))`` of members' probabilities ``stack`` ``(M, N, C)`` by ``vote``."""
    vote = _check_choice("vote", vote, VOTES)
    if vote == "soft":
        probs = soft_vote(stack, weights)
        return probs, probs.argmax(dim=1)
    labels, shares = hard_vote(stack, weights, tie_break, seed, row_seeds)
    return shares.float(), labels


def member_disagreement(stack: torch.Tensor, labels: torch.Tensor, weights: Sequence[float] | None = None) -> torch.Tensor:
    """``(N,)`` the (weighted) share of members whose top class differs from ``labels`` ``(N,)``.

    Args:
        stack: ``(M, N, C)`` the members' probabilities.

    Example:
        >>> member_disagreement(torch.tensor([[[0.9, 0.1]], [[0.2, 0.8]], [[0.6, 0.4]]]), torch.tensor([0]))
        tensor([0.3333], dtype=torch.float64)
    """
    stack = _check_stack(stack)
    w = _check_weights(weights, stack.shape[0])
    w = torch.ones(stack.shape[0], dtype=torch.float64) if w is None else w
    differs = (stack.argmax(dim=2) != labels[None, :]).to(torch.float64)  # (M, N)
    return (w[:, None] * differs).sum(dim=0) / w.sum()


def _check_members(members: list, names, policies, vote, tie_break, weights):
    """The checks every ensemble entry point makes: at least one member, one class list, a known
    vote and tie-break, ``M`` weights and one policy per member (default ``"none"``). Returns
    ``(names, classes, vote, tie_break, weights, resolved policies)``."""
    if not members:
        raise InvalidInputError("an ensemble needs at least one member model, got none")
    m = len(members)
    names = list(names) if names is not None else [_name_of(p, i) for i, p in enumerate(members)]
    classes = check_same_classes([_classes_of(p) for p in members], names)
    vote = _check_choice("vote", vote, VOTES)
    tie_break = _check_choice("tie-break", tie_break, TIE_BREAKS)
    w = _check_weights(weights, m)
    policies = list(policies) if policies is not None else ["none"] * m
    if len(policies) != m:
        raise InvalidInputError(f"give one policy per member: {m} members but {len(policies)} policies")
    resolved = [_resolve_policy(spec, p) for spec, p in zip(policies, members, strict=True)]
    return names, classes, vote, tie_break, w, resolved


def ensemble_predict(
    predictors: Sequence[Callable[[torch.Tensor], torch.Tensor]],
    images: torch.Tensor,
    *,
    policies: Sequence[Any] | None = None,
    vote: Vote = "soft",
    weights: Sequence[float] | None = None,
    tie_break: TieBreak = "mean",
    seed: int = 0,
    temperatures: Sequence[float | None] | None = None,
    calibration: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_batch: int = 256,
    progress: bool = False,
    device: str | torch.device | None = None,
    amp: bool = False,
    row_seeds: torch.Tensor | None = None,
) -> EnsembleOutput:
    """Predict ``images`` ``(N, C, H, W)`` with every member under its policy and combine.

    Args:
        predictors: ``M >= 1`` models (Predictors, ``nn.Module``s or callables).
        policies: one policy per member (a name, a ``.json`` path, a :class:`~ttakit.Policy`);
            default ``"none"`` (plain inference) for every member.
        vote: ``"soft"`` (mean of probabilities) or ``"hard"`` (majority vote).
        weights: ``M`` non-negative member weights.
        tie_break: hard vote only: ``"mean"`` or ``"random"`` (see :func:`hard_vote`).
        seed: seeds the hard vote's random pick.
        temperatures: per member, a temperature applied to its merged probabilities
            (``softmax(log p / T)``), e.g. fitted earlier; None entries leave a member as is.
        calibration: ``(images (n, C, H, W), labels (n,))`` held-out data to fit each member's
            temperature on (ignored for members with a given temperature).
        max_batch: most images per forward pass.
        device, amp: passed to each member's :class:`~ttakit.engine.TTAEngine`.
        row_seeds: hard vote only: per-image seeds of the random tie-break (see :func:`hard_vote`).

    Raises:
        InvalidInputError: no members; members with different class lists; a wrong number of
            policies, weights or temperatures; an unknown vote or tie-break.
    """
    members = list(predictors)
    names, classes, vote, tie_break, w, resolved = _check_members(members, None, policies, vote, tie_break, weights)
    m = len(members)
    temps: list[float | None] = list(temperatures) if temperatures is not None else [None] * m
    if len(temps) != m:
        raise InvalidInputError(f"give one temperature per member: {m} members but {len(temps)} temperatures")

    outputs, passes = [], torch.zeros(images.shape[0], dtype=torch.float64)
    for k, (predictor, policy) in enumerate(zip(members, resolved, strict=True)):
        desc = f"member {k + 1}/{m} {policy.name}"
        probs, per_row = _member_run(predictor, images, policy, max_batch=max_batch, progress=progress, desc=desc,
                                     device=device, amp=amp)
        if temps[k] is None and calibration is not None and policy.temperature is None:
            cal_probs, _ = _member_run(predictor, calibration[0], policy, max_batch=max_batch, progress=progress,
                                       desc=f"{desc} (calibration)", device=device, amp=amp)
            temps[k] = _fit_temperature(cal_probs, calibration[1])
        outputs.append(_apply_temperature(probs, temps[k]))
        passes += per_row
    widths = {o.shape[1] for o in outputs}
    if len(widths) > 1:
        raise InvalidInputError(
            f"ensemble members must predict the same classes: they return {sorted(widths)} outputs per image"
        )
    stack = torch.stack(outputs)
    weight_list = None if w is None else w.tolist()
    probs, labels = combine(stack, vote, weight_list, tie_break, seed, row_seeds)
    return EnsembleOutput(
        probs=probs,
        labels=labels,
        member_probs=stack,
        passes_per_image=float(passes.mean()),
        passes=passes,
        disagreement=member_disagreement(stack, labels, weight_list),
        temperatures=temps,
        classes=classes,
        vote=vote,
        tie_break=tie_break,
        weights=None if w is None else w.tolist(),
        member_names=names,
    )


# --------------------------------------------------------------------------- evaluation


def _scores(probs: torch.Tensor, labels_pred: torch.Tensor, labels: torch.Tensor, calibrated: bool) -> dict[str, Any]:
    correct = labels_pred == labels
    row: dict[str, Any] = {"accuracy": float(correct.double().mean())}
    if calibrated:  # probabilities: NLL and ECE mean something
        row["nll"] = M.nll(probs, labels)
        row["ece"] = M.expected_calibration_error(probs, labels)
    else:  # vote shares of a hard vote are not probabilities of the label
        row["nll"] = None
        row["ece"] = None
    return row


def evaluate_ensemble(
    predictors: Sequence[Callable[[torch.Tensor], torch.Tensor]],
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    policies: Sequence[Any] | None = None,
    names: Sequence[str] | None = None,
    vote: Vote = "soft",
    weights: Sequence[float] | None = None,
    tie_break: TieBreak = "mean",
    seed: int = 0,
    calibration: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_batch: int = 256,
    progress: bool = False,
) -> dict[str, Any]:
    """Each member plain and with its policy, the ensemble plain and with TTA, on ``images``.

    Members are calibrated (a temperature per member and mode, fitted on ``calibration``) when
    held-out data is given; the plain ensemble combines the members' plain probabilities, the
    TTA ensemble their policies' probabilities. Each ensemble row carries its accuracy lift and
    McNemar's test against the best member under any policy (plain or its own; "best" by
    accuracy on these images, which favours the member), named in ``vs``.

    Args:
        images: ``(N, C, H, W)`` held-out images; ``labels``: ``(N,)``.
        others: as :func:`ensemble_predict`.

    Returns:
        ``{"rows": [...], "best_member": {...}, "temperatures": {...}, ...}``; each row has
        ``model``, ``policy``, ``accuracy``, ``nll``, ``ece``, ``passes_per_image``,
        ``seconds`` and for ensemble rows ``lift_accuracy`` and ``mcnemar_p``.
    """
    members = list(predictors)
    names, _, vote, tie_break, w, resolved = _check_members(members, names, policies, vote, tie_break, weights)
    m = len(members)
    if not isinstance(labels, torch.Tensor) or labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise InvalidInputError(f"labels must be a (N,) tensor with N = {images.shape[0]} (one per image)")

    from .aliases import get_policy

    plain = get_policy("none")
    per_mode: dict[str, list[torch.Tensor]] = {"plain": [], "tta": []}
    passes: dict[str, list[float]] = {"plain": [], "tta": []}
    temperatures: dict[str, list[float | None]] = {"plain": [], "tta": []}
    rows: list[dict[str, Any]] = []
    for k, (predictor, policy) in enumerate(zip(members, resolved, strict=True)):
        for mode, pol in (("plain", plain), ("tta", policy)):
            started = time.perf_counter()
            desc = f"{names[k]} {pol.name}"
            probs, per_image = member_probs(predictor, images, pol, max_batch=max_batch, progress=progress, desc=desc)
            temperature = None
            if calibration is not None and pol.temperature is None:
                cal_probs, _ = member_probs(predictor, calibration[0], pol, max_batch=max_batch, progress=progress,
                                            desc=f"{desc} (calibration)")
                temperature = _fit_temperature(cal_probs, calibration[1])
                probs = _apply_temperature(probs, temperature)
            seconds = time.perf_counter() - started
            per_mode[mode].append(probs)
            passes[mode].append(per_image)
            temperatures[mode].append(temperature)
            row = {"model": names[k], "policy": pol.name, "mode": mode, "member": k}
            row.update(_scores(probs, probs.argmax(1), labels, True))
            row.update({"passes_per_image": per_image, "seconds": seconds})
            rows.append(row)
    widths = {p.shape[1] for p in per_mode["plain"]}
    if len(widths) > 1:
        raise InvalidInputError(
            f"ensemble members must predict the same classes: they return {sorted(widths)} outputs per image"
        )

    best: dict[str, dict[str, Any]] = {}
    # Every ensemble row is compared with the best member under ANY policy (plain or its own):
    # an ensemble that only beats the members' TTA rows while a plain member scores higher is
    # no gain. Ties go to the first row (member order, plain first).
    member_rows_all = [r for r in rows if "member" in r]
    best_any = max(member_rows_all, key=lambda r: r["accuracy"])
    best_any_correct = per_mode[best_any["mode"]][best_any["member"]].argmax(1) == labels
    for mode in ("plain", "tta"):
        member_rows = [r for r in rows if r["mode"] == mode]
        best_row = max(member_rows, key=lambda r: r["accuracy"])
        best[mode] = {"model": best_row["model"], "policy": best_row["policy"], "accuracy": best_row["accuracy"]}
        probs, predicted = combine(torch.stack(per_mode[mode]), vote, None if w is None else w.tolist(), tie_break, seed)
        correct = predicted == labels
        test = M.mcnemar_test(best_any_correct, correct)
        member_policies = [p.name for p in (resolved if mode == "tta" else [plain] * m)]
        # the members' policies in member order ("hflip+none" for a:hflip b:none); one name if all agree
        policy_label = member_policies[0] if len(set(member_policies)) == 1 else "+".join(member_policies)
        row = {"model": f"ensemble ({vote} vote, {m} members)", "policy": policy_label, "mode": mode}
        row.update(_scores(probs, predicted, labels, vote == "soft"))
        row.update(
            {
                "passes_per_image": sum(passes[mode]),
                "seconds": sum(r["seconds"] for r in member_rows),
                "lift_accuracy": row["accuracy"] - best_any["accuracy"],
                "mcnemar_p": test.p_value,
                "vs": f"{best_any['model']} {best_any['policy']}",
            }
        )
        rows.append(row)
    best["any"] = {"model": best_any["model"], "policy": best_any["policy"], "accuracy": best_any["accuracy"]}
    return {
        "rows": rows,
        "best_member": best,
        "temperatures": temperatures,
        "calibrated": calibration is not None,
        "vote": vote,
        "tie_break": tie_break,
        "weights": None if w is None else w.tolist(),
        "n_images": int(images.shape[0]),
        "members": names,
        "policies": {names[k]: resolved[k].view_names for k in range(m)},
    }


# --------------------------------------------------------------------------- the command


@dataclass(frozen=True)
class MemberSpec:
    """``MODEL[:POLICY]`` from the command line."""

    model: str
    policy: str | None


def _looks_like_policy(text: str) -> bool:
    from .aliases import list_policies

    return text == "train-aug" or text in list_policies() or text.lower().endswith(".json")


def parse_member(spec: str) -> MemberSpec:
    """Split ``MODEL[:POLICY]``.

    A path that exists as given is a model without a policy. Otherwise the text after the last
    colon is the policy when it is a policy name, ``train-aug`` or a ``.json`` path, or when the
    text before it is an existing path (an unknown policy name is then reported as such). A
    NumPy callable ``package.module:function`` stays whole (``pkg.mod:fn:hflip`` gives it a
    policy).

    Example:
        >>> parse_member("runs/a:hflip")
        MemberSpec(model='runs/a', policy='hflip')
        >>> parse_member("mypkg.models:predict")
        MemberSpec(model='mypkg.models:predict', policy=None)
    """
    from .predictors import _IMPORT_SPEC

    if not isinstance(spec, str) or not spec.strip():
        raise InvalidInputError(f"an ensemble member must be MODEL or MODEL:POLICY, got {spec!r}")
    if os.path.exists(spec) or ":" not in spec:
        return MemberSpec(spec, None)
    from .predictors import _FILE_SPEC

    file_spec = _FILE_SPEC.match(spec)
    if file_spec and (os.path.isfile(file_spec["file"]) or not _looks_like_policy(file_spec["attribute"])):
        return MemberSpec(spec, None)  # path/to/file.py:function (file.py:function:POLICY gives it a policy)
    model, policy = spec.rsplit(":", 1)
    if not model or not policy:
        raise InvalidInputError(f"an ensemble member must be MODEL or MODEL:POLICY, got {spec!r}")
    if not _looks_like_policy(policy) and not os.path.exists(model) and _IMPORT_SPEC.match(spec):
        return MemberSpec(spec, None)  # package.module:function
    return MemberSpec(model, policy)


def _default_policy(model_path: str, predictor: Any) -> str:
    """The member's own searched policy (``MODEL/policy.json``), else its training augmentations,
    else plain inference."""
    path = Path(model_path)
    if path.is_dir() and (path / "policy.json").is_file():
        return str(path / "policy.json")
    if getattr(predictor, "train_augmentations", None):
        return "train-aug"
    return "none"


def _recipe(meta: Any) -> dict[str, Any]:
    return dict((getattr(meta, "extra", None) or {}).get("data") or {})


def _same_split(metas: Sequence[Any], split: str) -> bool:
    """Whether every checkpoint member holds out the same ``split`` of the same data (so no member
    trained on it): same data content, split seed and fractions, and the same recorded rows."""
    keys = {"val": ("spec", "sha256", "split_seed", "val_fraction", "test_fraction", "val_index", "test_index"),
            "test": ("spec", "sha256", "split_seed", "test_fraction", "test_index")}[split]
    recipes = [_recipe(m) for m in metas if m is not None]
    return all({k: r.get(k) for k in keys} == {k: recipes[0].get(k) for k in keys} for r in recipes[1:])


def _check_members_fit(predictors: Sequence[Any], metas: Sequence[Any], names: Sequence[str], dataset: Any,
                       split: str) -> None:
    """Every member takes the data's image shape, and none trained on the images scored."""
    from .models import check_compatible

    for predictor, meta, name in zip(predictors, metas, names, strict=True):
        if meta is not None:
            check_compatible(meta, dataset.channels, dataset.image_size, source=name)
        else:
            size = getattr(predictor, "input_size", None)
            channels = getattr(predictor, "channels", None)
            if (size is not None and tuple(size) != tuple(dataset.image_size)) or (
                channels is not None and channels != dataset.channels
            ):
                raise InvalidInputError(
                    f"ensemble member {name} takes {channels}-channel {size} images but the data has "
                    f"{dataset.channels}-channel {dataset.image_size} images"
                )
    if split == "test":
        own = all(_recipe(m).get("test_source") in (None, "own") for m in metas if m is not None)
        if not own and not _same_split(metas, "test"):
            raise InvalidInputError(
                "the ensemble members hold out different test splits of their data, so some member may have "
                "trained on images the others are scored on; train the members on the same data with "
                "ttakit train (the splits are seeded), or score other data with --data"
            )


def _format_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        out.append(
            {
                "model": r["model"],
                "policy": r["policy"],
                "accuracy %": f"{100 * r['accuracy']:.2f}",
                "vs best member (pts)": f"{100 * r['lift_accuracy']:+.2f}" if "lift_accuracy" in r else "",
                "best member (any policy)": r.get("vs", ""),
                "p (McNemar)": (f"{r['mcnemar_p']:.3g}" if r["mcnemar_p"] >= 1e-300 else "< 1e-300")
                if "mcnemar_p" in r
                else "",
                "NLL": f"{r['nll']:.4f}" if r.get("nll") is not None else "-",
                "ECE": f"{r['ece']:.4f}" if r.get("ece") is not None else "-",
                "passes/img": f"{r['passes_per_image']:.2f}",
            }
        )
    return out


def _own_validation_split(meta: Any, name: str, data: str | None, data_dir: str | None) -> Any:
    """The validation split the first member held out at training time, or None when it has none.

    With ``--data OTHER`` the members are still calibrated on their own validation split: a
    temperature belongs to a model, other data has no validation split the members held out,
    and the rows scored (other data) are never the rows fitted.
    """
    from .errors import TTAKitError
    from .experiment import load_eval_data

    recorded = _recipe(meta).get("spec")
    own = data is None or (recorded is not None and _same_data(str(data), str(recorded)))
    try:
        return load_eval_data(meta, data if own else None, "val", data_dir if own else None)
    except InvalidInputError:
        return None  # trained without a validation split
    except TTAKitError as err:
        if own:
            raise
        raise InvalidInputError(
            f"ensemble --data {data}: the members are temperature-scaled on their own validation split "
            f"(that of {name}, from {recorded}), which could not be loaded ({err}); restore that data, "
            "or pass --no-calibrate"
        ) from None


def _same_data(a: str, b: str) -> bool:
    from .data.splits import _same_spec

    return _same_spec(a, b)


def _refuse_fitted_split(split: str) -> None:
    """Refuse the splits an ensemble's members were fitted on: ``train`` (their weights) and
    ``val`` (their temperatures, and the policies ``ttakit search`` chose for them)."""
    if split == "train":
        raise InvalidInputError(
            "ensemble --split train: the members trained on those images, so their score there says nothing "
            "about held-out accuracy; use --split test (the default)"
        )
    if split == "val":
        raise InvalidInputError(
            "ensemble --split val: the validation split is where each member's temperature is fitted and its "
            "searched policy (policy.json) was chosen, so it would be scored on what it was fitted on; "
            "use --split test (the default)"
        )


def ensemble_checkpoints(
    members: Sequence[str],
    *,
    data: str | None = None,
    data_dir: str | None = None,
    split: str = "test",
    limit: int | None = None,
    vote: Vote = "soft",
    weights: Sequence[float] | None = None,
    tie_break: TieBreak = "mean",
    seed: int = 0,
    calibrate: bool = True,
    max_batch: int = 256,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
    allow_other_model: bool = False,
) -> dict[str, Any]:
    """``ttakit ensemble``: load each ``MODEL[:POLICY]``, evaluate on held-out data, write results.

    A member's policy holding fitted parameters must have been fitted on that member
    (:func:`ttakit.policy.check_policy_model`; ``allow_other_model`` allows another).

    A member's default policy is its ``policy.json`` (from ``ttakit search``), else its
    training augmentations (``train-aug``), else none. Data default to the first member's own
    data set; members that are ttakit checkpoints with a validation split are calibrated on it
    (the first member's split: every member must not have trained on it, which holds for
    checkpoints trained by ``ttakit train`` on the same data, whose validation split is fixed),
    also when ``data`` is other data (which has no validation split the members held out). Member
    temperatures are fitted on the temperature rows of :func:`calibration_rows` only, the same
    rows ``ttakit predict`` fits them on, leaving the conformal rows unseen.
    """
    from .experiment import load_eval_data
    from .predictors import load as load_predictor
    from .report import format_table, markdown_table, write_results

    _refuse_fitted_split(split)
    specs = [parse_member(s) for s in members]
    if len(specs) < 2:
        raise InvalidInputError(f"an ensemble needs at least two member models, got {len(specs)}: {list(members)}")
    predictors = [load_predictor(s.model) for s in specs]
    names = [s.model for s in specs]
    check_same_classes([_classes_of(p) for p in predictors], names)
    policies = [s.policy or _default_policy(s.model, p) for s, p in zip(specs, predictors, strict=True)]
    policies = [_resolve_policy(spec, p) for spec, p in zip(policies, predictors, strict=True)]
    for pol, p in zip(policies, predictors, strict=True):
        check_policy_model(pol, p, allow_other_model=allow_other_model)  # fitted on this member?
    metas = [getattr(p, "meta", None) for p in predictors]
    if metas[0] is None:
        raise InvalidInputError(
            f"the first ensemble member {names[0]} must be a ttakit checkpoint (it names the data and "
            "its validation split); list a checkpoint first"
        )
    dataset = load_eval_data(metas[0], data, split, data_dir, limit)
    _check_members_fit(predictors, metas, names, dataset, split)
    calibration = None
    calibration_note = "members not calibrated (no validation split)"
    if calibrate and not _same_split(metas, "val"):
        calibration_note = "members not calibrated (their validation splits differ)"
    elif calibrate:
        val = _own_validation_split(metas[0], names[0], data, data_dir)
        if val is not None:
            fit_rows, _ = calibration_rows(val, policies)
            calibration = (val.images[fit_rows], val.labels[fit_rows])
            calibration_note = (
                f"members temperature-scaled on the validation split ({len(fit_rows)} of its {len(val)} images: "
                "the rest are kept for conformal calibration)"
            )
    if dataset.classes and _classes_of(predictors[0]) and len(dataset.classes) != len(_classes_of(predictors[0]) or []):
        raise InvalidInputError(
            f"the data have {len(dataset.classes)} classes but the members predict {len(_classes_of(predictors[0]) or [])}"
        )
    result = evaluate_ensemble(
        predictors,
        dataset.images,
        dataset.labels,
        policies=policies,
        names=names,
        vote=vote,
        weights=weights,
        tie_break=tie_break,
        seed=seed,
        calibration=calibration,
        max_batch=max_batch,
        progress=progress,
    )
    data_name = data or (metas[0].extra.get("data") or {}).get("spec") or metas[0].dataset
    title = f"ensemble of {len(specs)} on {data_name}/{split} ({len(dataset)} images, {vote} vote; {calibration_note})"
    display = _format_rows(result["rows"])
    table = format_table(display, title=title)
    out = Path(out_dir) if out_dir is not None else Path(names[0]) / "ensemble"
    result.update({"format": "ttakit-ensemble", "format_version": 1, "data": data_name, "split": split,
                   "calibration": calibration_note})
    markdown = "\n".join(
        [
            "# Ensemble evaluation",
            "",
            f"Data: {data_name} / {split}, {len(dataset)} images. {vote.capitalize()} vote"
            + (f", tie-break {tie_break}" if vote == "hard" else "")
            + (f", weights {result['weights']}" if result["weights"] else "")
            + f"; {calibration_note}.",
            "Each ensemble row is compared with the best member under any policy, plain or its own (named in the "
            "table; McNemar's paired test).",
            "",
            markdown_table(display),
        ]
    )
    write_results(out, result, markdown)
    result["table"] = table
    result["out_dir"] = str(out)
    return result
