"""What runs a batch in ``ttakit predict``: one model, or an ensemble of them."""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..data.decode import (
    RESIZE_MODES,
    check_channels,
    check_resize,
)
from ..engine import TTAEngine
from ..errors import InvalidInputError
from ..policy import Policy, check_policy_model
from ..predictors import Predictor, load
from ._calibration_cache import _calibration_key, _read_calibration_cache, _write_calibration_cache
from ._policies import policy_for
from ._predict_resume import model_fingerprint, policy_fingerprint


@dataclass
class _Runner:
    """What the prediction loop needs from one model or an ensemble of several.

    ``run(batch, paths) -> (probs (B, C), disagreement (B,), passes (B,), labels (B,) or None)``;
    ``labels``: the predicted class when it need not be the most probable one (a hard vote's
    tie-break), listed first in the row.
    """

    run: Callable[[torch.Tensor, Sequence[str]], tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]]
    classes: list[str] | None
    channels: int
    input_size: tuple[int, int]
    calibration: Any
    name: str
    views: list[str]
    model: Any
    extra: dict[str, Any]
    device: Any
    resize: str = "stretch"
    resize_source: str = ""
    policy: Policy | None = None  # one model: its resolved policy (what Ray workers run)


def resolve_resize(resize: str | None, predictor: Predictor) -> tuple[str, str]:
    """How images are brought to the model's size: ``(mode, why)``. ``resize`` when given; else
    the mode the checkpoint records for its training images (``resize`` in its metadata or its
    data recipe); else ``stretch`` (bilinear to the size, as ttakit's own image-folder loader
    trains)."""
    if resize is not None:
        return check_resize(resize), "--resize"
    meta = getattr(predictor, "meta", None)
    extra = getattr(meta, "extra", None) or {}
    recorded = extra.get("resize") or (extra.get("data") or {}).get("resize")
    if recorded in RESIZE_MODES:
        return recorded, "as the model was trained"
    return "stretch", "the default: the model does not record how its training images were resized"


def _check_input(predictor: Predictor) -> int:
    channels = check_channels(predictor.channels, f"model {predictor.source}")
    if predictor.input_size is None:
        raise InvalidInputError(
            f"model {predictor.source} does not say what image size it takes; pass input_size (--input-size HxW)"
        )
    return channels


def _single_runner(model: Any, policy: str | Policy, *, model_options: dict[str, Any], device: Any, amp: bool,
                   max_batch: int, conformal: float | None, conformal_method: str,
                   check_settings: Callable[[dict[str, Any]], None] = lambda settings: None,
                   allow_other_model: bool = False, resize: str | None = None) -> _Runner:
    from ..engine import check_device

    checked_device = check_device(device)  # a bad --device fails before the model is loaded
    predictor = load(model, **model_options)
    channels = _check_input(predictor)
    resize_mode, resize_source = resolve_resize(resize, predictor)
    resolved = policy_for(policy, predictor)
    check_policy_model(resolved, predictor, allow_other_model=allow_other_model)  # fitted on this model?
    check_settings({"models": [model_fingerprint(predictor)], "policies": [policy_fingerprint(resolved)],
                    "resize": resize_mode})
    if checked_device is not None:
        predictor.to(checked_device)  # before the engine, which refuses a device the model is not on
    engine = TTAEngine(predictor, resolved, max_batch=max_batch, device=checked_device, amp=amp)
    calibration = None
    if conformal is not None:
        from ._conformal import calibrate_predictor

        calibration = calibrate_predictor(
            predictor, resolved, conformal, conformal_method, max_batch=max_batch, device=device, amp=amp
        )

    def run(batch: torch.Tensor, paths: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        result = engine.run(batch, return_uncertainty=True)
        probs = result.merged.float().cpu()
        disagreement = result.uncertainty["disagreement"].float().cpu()
        return probs, disagreement, _passes_per_row(result, len(resolved), probs.shape[0]), None

    return _Runner(run, predictor.classes, channels, predictor.input_size, calibration, resolved.name,
                   resolved.view_names, predictor.describe(), {}, engine.device, resize_mode, resize_source, resolved)


def _path_seeds(paths: Sequence[str]) -> torch.Tensor:
    """A stable integer per file (CRC-32 of its absolute path): the hard vote's per-image tie-break
    stream, so an image gets the same pick whatever batch it comes in (and after ``--resume``)."""
    return torch.tensor([zlib.crc32(os.path.abspath(p).encode("utf-8")) for p in paths], dtype=torch.long)


def _ensemble_runner(models: Sequence[Any], policies: Sequence[str | Policy], *, model_options: dict[str, Any],
                     device: Any, amp: bool, max_batch: int, conformal: float | None, conformal_method: str,
                     vote: str, weights: Sequence[float] | None, tie_break: str, seed: int, calibrate: bool,
                     progress: bool,
                     check_settings: Callable[[dict[str, Any]], None] = lambda settings: None,
                     allow_other_model: bool = False, resize: str | None = None) -> _Runner:
    from ..engine import check_device
    from ..ensemble_vote import TIE_BREAKS, VOTES, _check_choice, _check_weights
    from ._ensemble_predict import ensemble_predict

    checked_device = check_device(device)  # a bad --device fails before any model runs
    vote = _check_choice("vote", vote, VOTES)
    tie_break = _check_choice("tie-break", tie_break, TIE_BREAKS)
    weight_list = None if weights is None else _check_weights(weights, len(models)).tolist()
    predictors, names, classes, channels = _load_members(models, model_options)
    resolved = [policy_for(spec, p) for spec, p in zip(policies, predictors, strict=True)]
    for pol, p in zip(resolved, predictors, strict=True):
        check_policy_model(pol, p, allow_other_model=allow_other_model)  # fitted on this member?
    resize_mode, resize_source = resolve_resize(resize, predictors[0])
    check_settings({
        "resize": resize_mode,
        "models": [model_fingerprint(p) for p in predictors],
        "policies": [policy_fingerprint(pol) for pol in resolved],
        "vote": vote, "weights": weight_list, "tie_break": tie_break, "seed": seed, "calibrate": bool(calibrate),
    })
    if device is not None:
        for p in predictors:
            p.to(device)
    val, fit_rows, conformal_rows = _validation_rows(predictors, names, resolved, conformal, calibrate)
    temperatures: list[float | None] = [None] * len(predictors)
    calibration = None
    n_cached = 0
    if val is not None:
        temperatures, calibration, n_cached = _calibrate_members(
            predictors, names, resolved, val, fit_rows, conformal_rows, calibrate=calibrate, conformal=conformal,
            conformal_method=conformal_method, vote=vote, weights=weight_list, tie_break=tie_break, seed=seed,
            max_batch=max_batch, device=device, amp=amp, progress=progress,
        )
    if not calibrate:
        calibration_note = "members not calibrated (asked)"
    elif val is not None:
        calibration_note = (
            f"members temperature-scaled on the shared validation split ({len(fit_rows)} of its {len(val)} images"
            + (f"; conformal sets calibrated on the other {len(conformal_rows)})" if conformal is not None else ")")
            + (f"; {n_cached} of {len(predictors)} temperatures from the calibration cache" if n_cached else "")
        )
    else:
        calibration_note = "members not calibrated (not ttakit checkpoints holding out the same validation split)"

    def run(batch: torch.Tensor, paths: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]:
        out = ensemble_predict(
            predictors, batch, policies=resolved, vote=vote, weights=weight_list, tie_break=tie_break, seed=seed,
            temperatures=temperatures, max_batch=max_batch, device=device, amp=amp,
            row_seeds=_path_seeds(paths) if vote == "hard" else None,
        )
        labels = out.labels.cpu() if vote == "hard" else None  # the tie-break's winner goes first
        return out.probs.float().cpu(), out.disagreement.float().cpu(), out.passes.float(), labels

    member_names = [f"{n}:{pol.name}" for n, pol in zip(names, resolved, strict=True)]
    name = f"ensemble ({vote} vote: {' + '.join(member_names)})"
    extra = {
        "members": [{"model": n, "policy": pol.name, "views": pol.view_names, "temperature": t}
                    for n, pol, t in zip(names, resolved, temperatures, strict=True)],
        "vote": vote,
        "tie_break": tie_break,
        "weights": weight_list,
        "calibration": calibration_note,
    }
    views = [f"{n}:{v}" for n, pol in zip(names, resolved, strict=True) for v in pol.view_names]
    return _Runner(run, classes, channels[0], tuple(predictors[0].input_size), calibration, name, views,
                   [p.describe() for p in predictors], extra, checked_device, resize_mode, resize_source)


def _load_members(models: Sequence[Any], model_options: dict[str, Any]) -> tuple[list[Predictor], list[str], Any,
                                                                                   list[int]]:
    """The members loaded: ``(predictors, names, classes, channels)``; they must share their
    classes, channels and input size."""
    from ..ensemble_vote import check_same_classes

    predictors = [load(m, **model_options) for m in models]
    names = [p.source or f"member {i + 1}" for i, p in enumerate(predictors)]
    classes = check_same_classes([p.classes for p in predictors], names)
    channels = [_check_input(p) for p in predictors]
    for p, c, name in zip(predictors, channels, names, strict=True):
        if (c, tuple(p.input_size)) != (channels[0], tuple(predictors[0].input_size)):
            raise InvalidInputError(
                f"ensemble members must take the same images: {names[0]} takes {channels[0]}-channel "
                f"{tuple(predictors[0].input_size)} images but {name} takes {c}-channel {tuple(p.input_size)} images"
            )
    return predictors, names, classes, channels


def _validation_rows(predictors: Sequence[Predictor], names: Sequence[str], resolved: Sequence[Policy],
                     conformal: float | None, calibrate: bool) -> tuple[Any, list[int], list[int]]:
    """Calibration data: ``(val, fit_rows, conformal_rows)``, the validation split every member
    held out (ttakit checkpoints trained on the same data share it), cut in two disjoint parts
    (:func:`calibration_rows`): soft vote temperature-scales each member on the rows the searches
    used; --conformal calibrates the ensemble's sets on the rows nothing was fitted on,
    temperatures included. ``val`` is None when the members share no validation split."""
    from ._ensemble_predict import _recipe, _same_split, calibration_rows
    from ._eval_data import load_eval_data

    metas = [getattr(p, "meta", None) for p in predictors]
    shared_val = all(m is not None and _recipe(m).get("spec") for m in metas) and _same_split(metas, "val")
    val = None
    if conformal is not None:
        from ..conformal import check_alpha, min_calibration_size
        from ._conformal import conformal_split

        alpha = check_alpha(conformal)
        if not shared_val:
            raise InvalidInputError(
                f"--conformal {alpha:g} with several models calibrates the ensemble's sets on the validation split "
                "they all held out, so every member must be a ttakit checkpoint trained on the same data and split "
                f"({', '.join(n for n, m in zip(names, metas, strict=True) if m is None) or 'their splits differ'})"
            )
        conformal_split(metas[0], None, None, alpha, policies=resolved)  # refuses policies fitted on every row
        val = load_eval_data(metas[0], None, "val", None)
    elif calibrate and shared_val:
        try:
            val = load_eval_data(metas[0], None, "val", None)
        except InvalidInputError:
            val = None
    fit_rows, conformal_rows = calibration_rows(val, resolved, strict=conformal is not None) if val is not None \
        else ([], [])
    if conformal is not None and len(conformal_rows) < min_calibration_size(alpha):
        raise InvalidInputError(
            f"--conformal {alpha:g}: {len(conformal_rows)} of the members' {len(val)} validation rows are kept apart "
            f"from their temperatures and policies, too few for alpha={alpha:g} (split conformal needs at least "
            f"{min_calibration_size(alpha)}); use a larger alpha or retrain with a larger --val-fraction"
        )
    return val, fit_rows, conformal_rows


def _calibrate_members(predictors: Sequence[Predictor], names: Sequence[str], resolved: Sequence[Policy], val: Any,
                       fit_rows: list[int], conformal_rows: list[int], *, calibrate: bool, conformal: float | None,
                       conformal_method: str, vote: str, weights: list[float] | None, tie_break: str, seed: int,
                       max_batch: int, device: Any, amp: bool, progress: bool) -> tuple[list[float | None], Any, int]:
    """Each member's temperature (fitted on ``fit_rows``, or read from the calibration cache) and,
    with ``conformal``, the ensemble's conformal calibration on ``conformal_rows``:
    ``(temperatures, calibration or None, temperatures read from the cache)``."""
    from ..progress import note
    from ._ensemble_predict import _apply_temperature, _fit_temperature, _member_run, combine

    temperatures: list[float | None] = [None] * len(predictors)
    n_cached = 0
    stack = []
    for k, (p, pol) in enumerate(zip(predictors, resolved, strict=True)):
        wants_temperature = calibrate and pol.temperature is None and bool(fit_rows)
        key = _calibration_key(p, pol, val, fit_rows, amp) if wants_temperature else None
        cached = _read_calibration_cache(p, key) if key is not None and conformal is None else None
        if cached is not None:  # fitted by an earlier run on the same weights, policy and rows
            temperatures[k] = cached
            n_cached += 1
            continue
        note(f"calibrating {names[k]}:{pol.name} on {len(val)} validation images (member {k + 1} of "
             f"{len(predictors)}; cached for the next run)" if wants_temperature else
             f"running {names[k]}:{pol.name} on {len(val)} validation images for the conformal sets",
             enabled=progress)
        probs, _ = _member_run(p, val.images, pol, max_batch=max_batch, device=device, amp=amp,
                               progress=progress, desc=f"calibrate {names[k]}")
        if wants_temperature:
            temperatures[k] = _fit_temperature(probs[fit_rows], val.labels[fit_rows])
            _write_calibration_cache(p, key, temperatures[k])
        stack.append(_apply_temperature(probs[conformal_rows], temperatures[k]))
    calibration = None
    if conformal is not None:
        from ..conformal import calibrate as conformal_calibrate

        val_probs, _ = combine(torch.stack(stack), vote, weights, tie_break, seed)
        calibration = conformal_calibrate(val_probs, val.labels[conformal_rows], conformal, conformal_method)
    return temperatures, calibration, n_cached


def _passes_per_row(result: Any, n_views: int, rows: int) -> torch.Tensor:
    """Forward passes each image got: every view, or under the gate 1 for images kept plain."""
    gated = getattr(result, "gated", None)
    if gated is None:
        return torch.full((rows,), float(n_views))
    return torch.where(gated.cpu(), float(n_views), 1.0)
