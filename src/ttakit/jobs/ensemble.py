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
    (torch.Size([5, 3]), torch.Size([5]), 3.0)"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import metrics as M
from ..ensemble_vote import TieBreak, Vote, check_same_classes
from ..errors import InvalidInputError
from ..policy import check_policy_model
from ..report.ensemble_md import _format_rows
from ._ensemble_predict import (
    _apply_temperature,
    _check_members,
    _classes_of,
    _fit_temperature,
    _member_run,
    _recipe,
    _same_split,
    _scores,
    calibration_rows,
    combine,
    member_probs,
)
from ._policies import policy_for
from ._policy_eval import place_model

__all__ = [
    "MemberSpec",
    "calibration_rows",
    "check_same_classes",
    "ensemble_checkpoints",
    "evaluate_ensemble",
    "member_probs",
    "parse_member",
]



# --------------------------------------------------------------------------- validation


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
    device: str | torch.device | None = None,
    amp: bool = False,
) -> dict[str, Any]:
    """Each member plain and with its policy, the ensemble plain and with TTA, on ``images``.

    Members are calibrated (a temperature per member and mode, fitted on ``calibration``) when
    held-out data is given; the plain ensemble combines the members' plain probabilities, the
    TTA ensemble their policies' probabilities. Each ensemble row carries its accuracy lift and
    McNemar's test against the best member under any policy (plain or its own; "best" by
    accuracy on these images, which favours the member), named in ``vs``.

    Args:
        images: ``(N, C, H, W)`` held-out images; ``labels``: ``(N,)``.
        device, amp: where each member runs and whether under autocast (each member's
            :class:`~ttakit.engine.TTAEngine`; a member that is a module must be on ``device``).
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

    from ..aliases import get_policy

    plain = get_policy("none")
    rows, per_mode, passes, temperatures = _member_rows(members, resolved, names, plain, images, labels, calibration,
                                                        max_batch, progress, device, amp)
    widths = {p.shape[1] for p in per_mode["plain"]}
    if len(widths) > 1:
        raise InvalidInputError(
            f"ensemble members must predict the same classes: they return {sorted(widths)} outputs per image"
        )
    best, best_any = _ensemble_rows(rows, per_mode, passes, labels, resolved, plain, vote, w, tie_break, seed)
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


def _member_rows(members: Sequence[Any], resolved: Sequence[Any], names: Sequence[str], plain: Any,
                 images: torch.Tensor, labels: torch.Tensor, calibration: tuple[torch.Tensor, torch.Tensor] | None,
                 max_batch: int, progress: bool, device: str | torch.device | None, amp: bool,
                 ) -> tuple[list[dict[str, Any]], dict[str, list[torch.Tensor]], dict[str, list[float]],
                            dict[str, list[float | None]]]:
    """Each member plain and with its policy (temperature-scaled on ``calibration`` when given):
    ``(rows, probabilities per mode, passes per image per mode, temperatures per mode)``."""
    per_mode: dict[str, list[torch.Tensor]] = {"plain": [], "tta": []}
    passes: dict[str, list[float]] = {"plain": [], "tta": []}
    temperatures: dict[str, list[float | None]] = {"plain": [], "tta": []}
    rows: list[dict[str, Any]] = []
    for k, (predictor, policy) in enumerate(zip(members, resolved, strict=True)):
        for mode, pol in (("plain", plain), ("tta", policy)):
            started = time.perf_counter()
            desc = f"{names[k]} {pol.name}"
            probs, passes_each = _member_run(predictor, images, pol, max_batch=max_batch, progress=progress,
                                             desc=desc, device=device, amp=amp)
            per_image = float(passes_each.double().mean())
            temperature = None
            if calibration is not None and pol.temperature is None:
                cal_probs, _ = _member_run(predictor, calibration[0], pol, max_batch=max_batch, progress=progress,
                                           desc=f"{desc} (calibration)", device=device, amp=amp)
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
    return rows, per_mode, passes, temperatures


def _ensemble_rows(rows: list[dict[str, Any]], per_mode: dict[str, list[torch.Tensor]], passes: dict[str, list[float]],
                   labels: torch.Tensor, resolved: Sequence[Any], plain: Any, vote: Vote, w: torch.Tensor | None,
                   tie_break: TieBreak, seed: int) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Append the ensemble's rows, plain and with TTA, each against the best member under any
    policy; return the best member per mode and the best member row under any policy."""
    m = len(resolved)
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
    return best, best_any


# --------------------------------------------------------------------------- the command


@dataclass(frozen=True)
class MemberSpec:
    """``MODEL[:POLICY]`` from the command line."""

    model: str
    policy: str | None


def _looks_like_policy(text: str) -> bool:
    from ..aliases import list_policies

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
    from ..predictors import _IMPORT_SPEC

    if not isinstance(spec, str) or not spec.strip():
        raise InvalidInputError(f"an ensemble member must be MODEL or MODEL:POLICY, got {spec!r}")
    if os.path.exists(spec) or ":" not in spec:
        return MemberSpec(spec, None)
    from ..predictors import _FILE_SPEC

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


def _check_members_fit(predictors: Sequence[Any], metas: Sequence[Any], names: Sequence[str], dataset: Any,
                       split: str) -> None:
    """Every member takes the data's image shape, and none trained on the images scored."""
    from ..models import check_compatible

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


def _own_validation_split(meta: Any, name: str, data: str | None, data_dir: str | None) -> Any:
    """The validation split the first member held out at training time, or None when it has none.

    With ``--data OTHER`` the members are still calibrated on their own validation split: a
    temperature belongs to a model, other data has no validation split the members held out,
    and the rows scored (other data) are never the rows fitted.
    """
    from ..errors import TTAKitError
    from ._eval_data import load_eval_data

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
    from ..data.splits import _same_spec

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
    device: str | None = None,
    amp: bool = False,
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

    ``device`` (``--device``) is where every member runs (each moved there first), ``amp``
    (``--amp``) runs their forward passes under autocast.
    """
    from ..report.results import write_results
    from ..report.tables import format_table, plural
    from ._eval_data import load_eval_data

    _refuse_fitted_split(split)
    specs, predictors, names, policies, metas = _load_members(members, allow_other_model)
    dataset = load_eval_data(metas[0], data, split, data_dir, limit)
    _check_members_fit(predictors, metas, names, dataset, split)
    calibration, calibration_note = _member_calibration(calibrate, metas, names, policies, data, data_dir)
    if dataset.classes and _classes_of(predictors[0]) and len(dataset.classes) != len(_classes_of(predictors[0]) or []):
        raise InvalidInputError(
            f"the data have {len(dataset.classes)} classes but the members predict {len(_classes_of(predictors[0]) or [])}"
        )
    place_model(predictors, device)  # --device: each member runs there (the engine runs a model where it is)
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
        amp=amp,
    )
    data_name = data or (metas[0].extra.get("data") or {}).get("spec") or metas[0].dataset
    title = (f"ensemble of {plural(len(specs), 'member')} on {data_name}/{split} ({plural(len(dataset), 'image')}, "
             f"{vote} vote; {calibration_note})")
    display = _format_rows(result["rows"])
    table = format_table(display, title=title)
    out = Path(out_dir) if out_dir is not None else Path(names[0]) / "ensemble"
    result.update({"format": "ttakit-ensemble", "format_version": 1, "data": data_name, "split": split,
                   "calibration": calibration_note})
    markdown = _ensemble_markdown(result, display, data_name, split, len(dataset), vote, tie_break, calibration_note)
    write_results(out, result, markdown)
    result["table"] = table
    result["out_dir"] = str(out)
    return result


def _load_members(members: Sequence[str], allow_other_model: bool,
                  ) -> tuple[list[MemberSpec], list[Any], list[str], list[Any], list[Any]]:
    """Load each ``MODEL[:POLICY]`` with its policy (checked against it): ``(specs, predictors,
    names, policies, metas)``; the first member must be a ttakit checkpoint."""
    from ..predictors import load as load_predictor

    specs = [parse_member(s) for s in members]
    if len(specs) < 2:
        raise InvalidInputError(f"an ensemble needs at least two member models, got {len(specs)}: {list(members)}")
    predictors = [load_predictor(s.model) for s in specs]
    names = [s.model for s in specs]
    check_same_classes([_classes_of(p) for p in predictors], names)
    policies = [s.policy or _default_policy(s.model, p) for s, p in zip(specs, predictors, strict=True)]
    policies = [policy_for(spec, p) for spec, p in zip(policies, predictors, strict=True)]
    for pol, p in zip(policies, predictors, strict=True):
        check_policy_model(pol, p, allow_other_model=allow_other_model)  # fitted on this member?
    metas = [getattr(p, "meta", None) for p in predictors]
    if metas[0] is None:
        raise InvalidInputError(
            f"the first ensemble member {names[0]} must be a ttakit checkpoint (it names the data and "
            "its validation split); list a checkpoint first"
        )
    return specs, predictors, names, policies, metas


def _member_calibration(calibrate: bool, metas: Sequence[Any], names: Sequence[str], policies: Sequence[Any],
                        data: str | None, data_dir: str | None,
                        ) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, str]:
    """The members' temperature rows of the first member's validation split (or None), and the
    note that says how the members were calibrated."""
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
    return calibration, calibration_note


def _ensemble_markdown(result: dict[str, Any], display: list[dict[str, Any]], data_name: str, split: str,
                       n_images: int, vote: Vote, tie_break: TieBreak, calibration_note: str) -> str:
    """``ensemble.md``: the data, the vote and the calibration, then the table."""
    from ..report.tables import markdown_table, plural

    return "\n".join(
        [
            "# Ensemble evaluation",
            "",
            f"Data: {data_name} / {split}, {plural(n_images, 'image')}. {vote.capitalize()} vote"
            + (f", tie-break {tie_break}" if vote == "hard" else "")
            + (f", weights {result['weights']}" if result["weights"] else "")
            + f"; {calibration_note}.",
            "Accuracy is in percent. Each ensemble row is compared with the best member under any policy, plain or "
            "its own (named in the table): its lift in accuracy points, and McNemar's paired test.",
            "",
            markdown_table(display),
        ]
    )
