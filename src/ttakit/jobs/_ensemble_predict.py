"""Run ensemble members with TTA and vote: :func:`ensemble_predict` and the member temperatures."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import metrics as M
from ..ensemble_vote import (
    TIE_BREAKS,
    VOTES,
    TieBreak,
    Vote,
    _check_choice,
    _check_weights,
    check_same_classes,
    hard_vote,
    member_disagreement,
    soft_vote,
)
from ..errors import InvalidInputError
from ._policies import policy_for


def _classes_of(predictor: Any) -> list[str] | None:
    classes = getattr(predictor, "classes", None)
    if classes is None and getattr(predictor, "meta", None) is not None:
        classes = getattr(predictor.meta, "classes", None)
    return list(classes) if classes is not None else None


def _name_of(predictor: Any, index: int) -> str:
    source = getattr(predictor, "source", None)
    return str(source) if source else f"member {index + 1}"


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
    temperature): :func:`ttakit.jobs._policy_eval.predict_probs`.
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
    """``(probs (N, C), passes (N,))``: one engine run (:func:`ttakit.jobs._policy_eval.run_policy`) and
    the forward passes each image got (fewer under a gate)."""
    from ._policy_eval import run_policy

    policy = policy_for(policy, predictor)
    out = run_policy(predictor, images, policy, max_batch=max_batch, progress=progress, desc=desc, device=device,
                     amp=amp)
    return out.merged.float().cpu(), out.passes.cpu().to(torch.float64)


def _fit_temperature(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature minimising the NLL of ``softmax(log(probs) / T)`` on held-out ``labels``
    (:func:`ttakit.search.calibration.fit_probs_temperature`, the one fit of a member's temperature)."""
    from ..search.calibration import fit_probs_temperature

    return fit_probs_temperature(probs, labels)


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
    from ..data import stratified_indices
    from ..data.splits import dataset_sha256
    from ..errors import DataError
    from ..policy import unused_validation_rows
    from ._eval_data import CONFORMAL_HOLDOUT, HOLDOUT_SEED

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
    from ..merge import apply_temperature

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
    resolved = [policy_for(spec, p) for spec, p in zip(policies, members, strict=True)]
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


def _recipe(meta: Any) -> dict[str, Any]:
    return dict((getattr(meta, "extra", None) or {}).get("data") or {})


def _same_split(metas: Sequence[Any], split: str) -> bool:
    """Whether every checkpoint member holds out the same ``split`` of the same data (so no member
    trained on it): same data content, split seed and fractions, and the same recorded rows."""
    keys = {"val": ("spec", "sha256", "split_seed", "val_fraction", "test_fraction", "val_index", "test_index"),
            "test": ("spec", "sha256", "split_seed", "test_fraction", "test_index")}[split]
    recipes = [_recipe(m) for m in metas if m is not None]
    return all({k: r.get(k) for k in keys} == {k: recipes[0].get(k) for k in keys} for r in recipes[1:])
