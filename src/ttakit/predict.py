"""``ttakit predict``: TTA predictions for a folder of image files, from any model.

Files are decoded in DataLoader worker processes (so decoding overlaps inference), each batch
goes through :class:`ttakit.engine.TTAEngine` once, and its rows are written and flushed at
once: one row per image with the top-k classes and probabilities, the predictive entropy, the
fraction of views that disagree with the merged class, and the forward passes spent (a gated
policy spends one on confident images).

Crash safety: each batch's rows are written with one write and flushed, so a killed run leaves
whole rows (a torn last line, possible only if the kill lands inside that write, is dropped by
``resume``); ``resume=True`` keeps the rows already there and predicts only the missing files,
so the output ends with exactly one row per image. Files that cannot be decoded are listed with
the reason in ``<out>.errors.csv`` and the run goes on (``retry_errors`` tries them again on a
resume). What the rows depend on (a digest of each model's weights, its input settings, the
policies and every option that changes an answer) is recorded in ``<out>.settings.json`` when an
output is started; a resume with anything else that changes an answer is refused, naming it.

Several models: pass a list of models (and one policy each, or one for all) and each row holds
the ENSEMBLE prediction (:func:`ttakit.ensemble.ensemble_predict`, the function behind
``ttakit ensemble``): soft vote (the weighted mean of the members' probabilities, each
temperature-scaled on the validation split the members hold out, when they are ttakit
checkpoints that share one) or hard vote (``prob_k`` columns are then vote shares), with the
same tie-break rules. ``disagreement`` is then the (weighted) share of members whose class
differs from the ensemble's, ``forward_passes`` the sum over members.

Example:
    >>> summary = predict_images("runs/cnn", "photos/", out="preds.csv", policy="hflip")  # doctest: +SKIP
    >>> summary["n_predicted"]
    120
    >>> predict_images(["runs/a", "runs/b"], "photos/", out="ens.csv", policy=["hflip", "d4"])  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ._io import atomic_write_json, atomic_write_text, check_output_file
from .data.decode import (
    RESIZE_MODES,
    ImageFiles,
    check_channels,
    check_resize,
    collate_decoded,
    list_images,
)
from .engine import TTAEngine
from .errors import InvalidInputError
from .policy import Policy, check_policy_model
from .predictors import Predictor, load

__all__ = ["predict_images", "errors_path", "settings_path", "read_done", "default_workers", "output_columns",
           "check_resume_settings", "model_fingerprint", "policy_fingerprint"]

ERROR_COLUMNS = ["path", "reason"]


def errors_path(out: str | os.PathLike) -> Path:
    """Where unreadable files are listed: ``<out>.errors.csv``."""
    out = Path(out)
    return out.with_name(out.name + ".errors.csv")


def output_columns(top_k: int, conformal: bool = False) -> list[str]:
    """CSV header: path, class_1, prob_1, ..., class_k, prob_k, entropy, disagreement, forward_passes
    (and ``set``, the conformal prediction set, with ``conformal``)."""
    ranked = [name for i in range(1, top_k + 1) for name in (f"class_{i}", f"prob_{i}")]
    return ["path", *ranked, "entropy", "disagreement", "forward_passes", *(["set"] if conformal else [])]


def default_workers() -> int:
    """Decoding workers: 1 on machines with up to 4 cores (inference needs the rest), else 2-4."""
    cores = os.cpu_count() or 1
    return 1 if cores <= 4 else min(4, cores // 4)


def _output_format(out: Path, format: str | None) -> str:
    if format is None:
        return "jsonl" if out.suffix.lower() in (".jsonl", ".ndjson") else "csv"
    if format not in ("csv", "jsonl"):
        raise InvalidInputError(f"format must be 'csv' or 'jsonl', got {format!r}")
    return format


def _resolve_policy(spec: str | Policy, predictor: Predictor) -> Policy:
    from .aliases import policy_from_augmentations
    from .evaluate import resolve_policy

    if isinstance(spec, str) and spec == "train-aug":
        if not predictor.train_augmentations and predictor.kind not in ("checkpoint",):
            raise InvalidInputError(
                f"policy 'train-aug' needs a model that records its training augmentations (a ttakit checkpoint "
                f"or export); {predictor.source} does not"
            )
        return policy_from_augmentations(predictor.train_augmentations)
    return resolve_policy(spec)


# --------------------------------------------------------------------------- reading what exists


def _truncate_torn_tail(path: Path) -> None:
    """Drop a last line without its newline (a write cut short by a kill)."""
    with open(path, "rb+") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        if size == 0:
            return
        back = min(size, 1 << 20)
        while True:
            handle.seek(size - back)
            tail = handle.read(back)
            cut = tail.rfind(b"\n")
            if cut >= 0 or back == size:
                break
            back = min(size, back * 2)
        keep = size - back + cut + 1 if cut >= 0 else 0
        if keep != size:
            handle.truncate(keep)


def read_done(out: str | os.PathLike, format: str, columns: list[str] | None = None) -> set[str]:
    """Paths already in ``out`` (a torn last line is removed first).

    Raises:
        InvalidInputError: the file was written with other columns (another ``--top-k``) or is
            not a ttakit predictions file.
    """
    path = Path(out)
    if not path.exists():
        return set()
    _truncate_torn_tail(path)
    done: set[str] = set()
    with open(path, encoding="utf-8", newline="") as handle:
        if format == "jsonl":
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    done.add(json.loads(line)["path"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise InvalidInputError(
                        f"--resume: line {number} of {path} is not a ttakit prediction row; use another --out"
                    ) from None
            return done
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            return done
        if columns is not None and header != columns:
            raise InvalidInputError(
                f"--resume: {path} has the columns {','.join(header)} but this run writes {','.join(columns)}; "
                "use the same --top-k and --conformal as the first run, or another --out"
            )
        for row in reader:
            if len(row) == len(header):
                done.add(row[0])
    return done


def _read_error_rows(path: Path) -> list[list[str]]:
    if not path.exists():
        return []
    _truncate_torn_tail(path)
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        next(reader, None)
        return [row for row in reader if row]


# --------------------------------------------------------------------------- what the answers depend on

SETTINGS_FORMAT = "ttakit-predict-settings"
# What each setting is called on the command line, for the message naming what differs.
_SETTING_NAMES = {
    "top_k": "--top-k", "format": "output format", "conformal": "--conformal", "conformal_method": "--conformal-method",
    "amp": "--amp", "vote": "--vote", "weights": "--weights", "tie_break": "--tie-break", "seed": "--seed",
    "calibrate": "--no-calibrate", "resize": "--resize",
}


def settings_path(out: str | os.PathLike) -> Path:
    """Where ``predict`` records what its rows depend on (for ``resume``): ``<out>.settings.json``."""
    out = Path(out)
    return out.with_name(out.name + ".settings.json")


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def _weights_digest(predictor: Predictor) -> str:
    """SHA-256 of what the model computes with: its weights and buffers (torch models), its file
    (ONNX, Keras) or its code (a Python callable)."""
    digest = hashlib.sha256()
    module = predictor._modules.get("model")
    if module is not None:
        digest.update(f"{type(module).__module__}.{type(module).__qualname__}".encode())
        for name, tensor in sorted(module.state_dict().items()):
            if isinstance(tensor, torch.Tensor):
                digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
                digest.update(_tensor_bytes(tensor))
        return digest.hexdigest()
    source = Path(predictor.source) if predictor.source else None
    if source is not None and source.is_file():
        with open(source, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    backend = getattr(predictor, "_backend", None)
    function = getattr(backend, "function", backend)
    code = getattr(function, "__code__", None)
    digest.update(f"{getattr(function, '__module__', '')}.{getattr(function, '__qualname__', type(function).__name__)}".encode())
    if code is not None:
        digest.update(code.co_code)
        digest.update(repr(code.co_consts).encode())
    return digest.hexdigest()


def model_fingerprint(predictor: Predictor) -> dict[str, Any]:
    """What a model's answers depend on: a digest of its weights (or file, or code) and the
    settings it is read with (input size, channels, layout, pixel range, mean/std, classes,
    outputs). Its path is kept for messages only: the same model named another way matches."""
    described = predictor.describe()
    name = described.pop("source", "") or predictor.kind
    return {"name": name, "weights": _weights_digest(predictor), "settings": described}


def policy_fingerprint(policy: Policy) -> dict[str, Any]:
    """A policy's views and merge settings (its name and provenance are kept for messages only)."""
    data = policy.to_json()
    for key in ("format", "format_version", "ttakit_version", "meta"):
        data.pop(key, None)
    return data


def _settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(_comparable(settings), sort_keys=True).encode("utf-8")).hexdigest()


def _comparable(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` without the names kept for messages (model paths, policy names)."""
    out = dict(settings)
    for key in ("models", "policies"):
        if isinstance(out.get(key), list):
            out[key] = [{k: v for k, v in item.items() if k != "name"} if isinstance(item, dict) else item
                        for item in out[key]]
    return out


def _short(value: Any, limit: int = 60) -> str:
    text = "on" if value is True else "off" if value is False else "none" if value is None else json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two runs' settings, named as the user knows it."""
    found = []
    old_models, new_models = old.get("models", []), new.get("models", [])
    if len(old_models) != len(new_models):
        found.append(f"the number of models ({len(old_models)} then, {len(new_models)} now)")
    else:
        for i, (a, b) in enumerate(zip(old_models, new_models, strict=True)):
            which = "the model" if len(new_models) == 1 else f"model {i + 1}"
            if a.get("weights") != b.get("weights"):
                found.append(f"{which} (weights of {a.get('name')} then, {b.get('name')} now)")
            for key in sorted(set(a.get("settings", {})) | set(b.get("settings", {}))):
                x, y = a.get("settings", {}).get(key), b.get("settings", {}).get(key)
                if x != y:
                    found.append(f"{which}'s {key} ({_short(x)} then, {_short(y)} now)")
    old_policies, new_policies = old.get("policies", []), new.get("policies", [])
    for i, (a, b) in enumerate(zip(old_policies, new_policies, strict=False)):
        if {k: v for k, v in a.items() if k != "name"} != {k: v for k, v in b.items() if k != "name"}:
            which = "the policy" if len(new_policies) == 1 else f"the policy of model {i + 1}"
            found.append(f"{which} ({a.get('name')} then, {b.get('name')} now)"
                         if a.get("name") != b.get("name") else f"{which} {b.get('name')} (its views or merge settings)")
    for key in sorted((set(old) | set(new)) - {"models", "policies"}):
        if old.get(key) != new.get(key):
            found.append(f"{_SETTING_NAMES.get(key, key)} ({_short(old.get(key))} then, {_short(new.get(key))} now)")
    return found


def check_resume_settings(out: str | os.PathLike, settings: dict[str, Any]) -> None:
    """Refuse to resume ``out`` unless it was written with these ``settings`` (read from
    :func:`settings_path`, written when the output was started).

    Raises:
        InvalidInputError: the settings file is missing or unreadable while ``out`` holds rows,
            or the model, policy or an option that changes an answer differs (named).
    """
    out = Path(out)
    side = settings_path(out)
    if not side.exists():
        if out.exists() and out.stat().st_size > 0:
            raise InvalidInputError(
                f"--resume: cannot check that {out} was made with this model, policy and options: {side.name} "
                "is missing beside it; start over without --resume, or use another --out"
            )
        return
    try:
        recorded = json.loads(side.read_text(encoding="utf-8"))
        if not isinstance(recorded, dict) or recorded.get("format") != SETTINGS_FORMAT:
            raise ValueError("not a ttakit predict settings file")
        old = recorded["settings"]
        if not isinstance(old, dict):
            raise ValueError("no settings")
    except (OSError, UnicodeDecodeError, ValueError, KeyError) as exc:
        raise InvalidInputError(
            f"--resume: {side} is not a readable ttakit predict settings file ({exc}); start over without --resume, "
            "or use another --out"
        ) from None
    if recorded.get("sha256") == _settings_hash(settings):
        return
    found = _differences(old, settings) or ["settings recorded by another ttakit version"]
    raise InvalidInputError(
        f"--resume: {out} was made with other settings: {'; '.join(found)}; resume with the same model, policy and options, "
        "or start over without --resume (or use another --out)"
    )


def _write_settings(out: Path, settings: dict[str, Any]) -> None:
    atomic_write_json(settings_path(out), {"format": SETTINGS_FORMAT, "format_version": 1,
                                           "sha256": _settings_hash(settings), "settings": settings})


# --------------------------------------------------------------------------- rows


def _format_rows(
    paths: Sequence[str],
    probs: torch.Tensor,
    entropy: torch.Tensor,
    disagreement: torch.Tensor,
    passes: torch.Tensor,
    classes: Sequence[str],
    top_k: int,
    format: str,
    sets: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
) -> str:
    if labels is None:
        values, indices = probs.topk(top_k, dim=1)
    else:  # the predicted class first (a hard vote's tie-break winner), then by probability
        boost = torch.zeros_like(probs).scatter_(1, labels[:, None].long(), 2.0)
        indices = (probs + boost).topk(top_k, dim=1).indices
        values = probs.gather(1, indices)
    values, indices = values.tolist(), indices.tolist()
    entropy, disagreement, passes = entropy.tolist(), disagreement.tolist(), passes.tolist()
    if format == "jsonl":
        lines = []
        for i, path in enumerate(paths):
            row = {
                "path": path,
                "top_k": [{"class": classes[c], "prob": round(p, 6)} for c, p in zip(indices[i], values[i], strict=True)],
                "entropy": round(entropy[i], 6),
                "disagreement": round(disagreement[i], 6),
                "forward_passes": int(passes[i]),
            }
            if sets is not None:
                row["set"] = [classes[c] for c in torch.nonzero(sets[i]).flatten().tolist()]
            lines.append(json.dumps(row) + "\n")
        return "".join(lines)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    for i, path in enumerate(paths):
        ranked = [item for c, p in zip(indices[i], values[i], strict=True) for item in (classes[c], f"{p:.6f}")]
        extra = ["|".join(classes[c] for c in torch.nonzero(sets[i]).flatten().tolist())] if sets is not None else []
        writer.writerow([path, *ranked, f"{entropy[i]:.6f}", f"{disagreement[i]:.6f}", int(passes[i]), *extra])
    return buffer.getvalue()


def _csv_line(values: Sequence[Any]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(values)
    return buffer.getvalue()


# --------------------------------------------------------------------------- one model or several


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
        return recorded, "as the checkpoint's training images"
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
    from .engine import check_device

    checked_device = check_device(device)  # a bad --device fails before the model is loaded
    predictor = load(model, **model_options)
    channels = _check_input(predictor)
    resize_mode, resize_source = resolve_resize(resize, predictor)
    resolved = _resolve_policy(policy, predictor)
    check_policy_model(resolved, predictor, allow_other_model=allow_other_model)  # fitted on this model?
    check_settings({"models": [model_fingerprint(predictor)], "policies": [policy_fingerprint(resolved)],
                    "resize": resize_mode})
    if checked_device is not None:
        predictor.to(checked_device)  # before the engine, which refuses a device the model is not on
    engine = TTAEngine(predictor, resolved, max_batch=max_batch, device=checked_device, amp=amp)
    calibration = None
    if conformal is not None:
        from .conformal import calibrate_predictor

        calibration = calibrate_predictor(
            predictor, resolved, conformal, conformal_method, max_batch=max_batch, device=device, amp=amp
        )

    def run(batch: torch.Tensor, paths: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        result = engine.run(batch, return_uncertainty=True)
        probs = result.merged.float().cpu()
        disagreement = result.uncertainty["disagreement"].float().cpu()
        return probs, disagreement, _passes_per_row(result, len(resolved), probs.shape[0]), None

    return _Runner(run, predictor.classes, channels, predictor.input_size, calibration, resolved.name,
                   resolved.view_names, predictor.describe(), {}, engine.device, resize_mode, resize_source)


CALIBRATION_CACHE = "calibration_cache.json"  # in each checkpoint folder
_CACHE_FORMAT = "ttakit-calibration-cache"
_CACHE_ENTRIES = 64  # the most recent fits kept per checkpoint


def _calibration_key(predictor: Predictor, policy: Policy, val: Any, rows: Sequence[int], amp: bool) -> str:
    """What a member's temperature depends on: its weights, its policy (views, merge settings),
    the validation data (content hash of its recipe) and the rows it is fitted on, and amp."""
    meta = getattr(predictor, "meta", None)
    recipe = ((getattr(meta, "extra", None) or {}).get("data") or {})
    payload = {
        "weights": _weights_digest(predictor),
        "policy": policy_fingerprint(policy),
        "data": {k: recipe.get(k) for k in ("spec", "sha256", "split_seed", "val_fraction", "test_fraction")},
        "n_val": len(val),
        "rows": hashlib.sha256(json.dumps(list(map(int, rows))).encode()).hexdigest(),
        "amp": bool(amp),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def calibration_cache_path(predictor: Predictor) -> Path | None:
    """``CHECKPOINT/calibration_cache.json`` for a ttakit checkpoint folder, else None."""
    source = Path(predictor.source) if predictor.source else None
    if source is None or getattr(predictor, "meta", None) is None:
        return None
    folder = source if source.is_dir() else source.parent
    return folder / CALIBRATION_CACHE


def _read_cache_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != _CACHE_FORMAT or not isinstance(data.get("entries"), dict):
        return {}
    return data["entries"]


def _read_calibration_cache(predictor: Predictor, key: str) -> float | None:
    path = calibration_cache_path(predictor)
    if path is None or not path.is_file():
        return None
    value = _read_cache_file(path).get(key)
    temperature = value.get("temperature") if isinstance(value, dict) else None
    if isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and math.isfinite(temperature) \
            and temperature > 0:
        return float(temperature)
    return None  # a damaged entry is fitted again


def _write_calibration_cache(predictor: Predictor, key: str | None, temperature: float | None) -> None:
    """Remember a member's fitted temperature (atomically; a folder we cannot write to just
    means no cache)."""
    path = calibration_cache_path(predictor)
    if path is None or key is None or temperature is None:
        return
    entries = _read_cache_file(path) if path.is_file() else {}
    entries.pop(key, None)
    entries[key] = {"temperature": float(temperature), "fitted": time.strftime("%Y-%m-%dT%H:%M:%S")}
    entries = dict(list(entries.items())[-_CACHE_ENTRIES:])
    try:
        atomic_write_json(path, {"format": _CACHE_FORMAT, "format_version": 1, "entries": entries})
    except OSError:
        pass


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
    from . import ensemble as E
    from .engine import check_device
    from .progress import note

    checked_device = check_device(device)  # a bad --device fails before any model runs
    vote = E._check_choice("vote", vote, E.VOTES)
    tie_break = E._check_choice("tie-break", tie_break, E.TIE_BREAKS)
    weight_list = None if weights is None else E._check_weights(weights, len(models)).tolist()
    predictors = [load(m, **model_options) for m in models]
    names = [p.source or f"member {i + 1}" for i, p in enumerate(predictors)]
    classes = E.check_same_classes([p.classes for p in predictors], names)
    channels = [_check_input(p) for p in predictors]
    for p, c, name in zip(predictors, channels, names, strict=True):
        if (c, tuple(p.input_size)) != (channels[0], tuple(predictors[0].input_size)):
            raise InvalidInputError(
                f"ensemble members must take the same images: {names[0]} takes {channels[0]}-channel "
                f"{tuple(predictors[0].input_size)} images but {name} takes {c}-channel {tuple(p.input_size)} images"
            )
    resolved = [_resolve_policy(spec, p) for spec, p in zip(policies, predictors, strict=True)]
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

    # Calibration data: the validation split every member held out (ttakit checkpoints trained on
    # the same data share it), cut in two disjoint parts (ttakit.ensemble.calibration_rows): soft
    # vote temperature-scales each member on the rows the searches used; --conformal calibrates the
    # ensemble's sets on the rows nothing was fitted on, temperatures included.
    from .experiment import load_eval_data

    metas = [getattr(p, "meta", None) for p in predictors]
    shared_val = all(m is not None and E._recipe(m).get("spec") for m in metas) and E._same_split(metas, "val")
    val = None
    if conformal is not None:
        from .conformal import check_alpha, conformal_split, min_calibration_size

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
    fit_rows, conformal_rows = E.calibration_rows(val, resolved, strict=conformal is not None) if val is not None \
        else ([], [])
    if conformal is not None and len(conformal_rows) < min_calibration_size(alpha):
        raise InvalidInputError(
            f"--conformal {alpha:g}: {len(conformal_rows)} of the members' {len(val)} validation rows are kept apart "
            f"from their temperatures and policies, too few for alpha={alpha:g} (split conformal needs at least "
            f"{min_calibration_size(alpha)}); use a larger alpha or retrain with a larger --val-fraction"
        )
    temperatures: list[float | None] = [None] * len(predictors)
    calibration = None
    n_cached = 0
    if val is not None:
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
            probs, _ = E._member_run(p, val.images, pol, max_batch=max_batch, device=device, amp=amp,
                                     progress=progress, desc=f"calibrate {names[k]}")
            if wants_temperature:
                temperatures[k] = E._fit_temperature(probs[fit_rows], val.labels[fit_rows])
                _write_calibration_cache(p, key, temperatures[k])
            stack.append(E._apply_temperature(probs[conformal_rows], temperatures[k]))
        if conformal is not None:
            from .conformal import calibrate as conformal_calibrate

            val_probs, _ = E.combine(torch.stack(stack), vote, weight_list, tie_break, seed)
            calibration = conformal_calibrate(val_probs, val.labels[conformal_rows], conformal, conformal_method)
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
        out = E.ensemble_predict(
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


# --------------------------------------------------------------------------- the job


def predict_images(
    model: Any,
    images: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    out: str | os.PathLike,
    policy: str | Policy = "none",
    top_k: int = 5,
    workers: int | None = None,
    batch_size: int | None = None,
    resume: bool = False,
    device: str | torch.device | None = None,
    amp: bool = False,
    max_batch: int = 256,
    format: str | None = None,
    progress: bool = True,
    model_options: dict[str, Any] | None = None,
    conformal: float | None = None,
    conformal_method: str = "lac",
    vote: str = "soft",
    weights: Sequence[float] | None = None,
    tie_break: str = "mean",
    seed: int = 0,
    calibrate: bool = True,
    retry_errors: bool = False,
    allow_other_model: bool = False,
    overwrite: bool = False,
    resize: str | None = None,
) -> dict[str, Any]:
    """Predict every image ``images`` names with ``policy`` and write one row per image to ``out``.

    Args:
        model: anything :func:`ttakit.predictors.load` takes (a checkpoint folder, a model
            file, an ``nn.Module``, a NumPy callable) or a :class:`Predictor`; or a list or
            tuple of them: an ensemble, whose combined prediction each row holds.
        images: a folder (recursive), a glob, a text file listing paths, or a list of paths.
        out: the CSV (default) or ``.jsonl`` file to write.
        policy: a policy name, ``train-aug``, a policy JSON file or a :class:`Policy`; with
            several models, one for all or a list with one per model.
        top_k: classes (with probabilities) per row.
        workers: decoding worker processes (0 decodes in this process); default
            :func:`default_workers`.
        batch_size: images decoded and predicted per step (rows are flushed per step);
            default ``max_batch``.
        resume: keep the rows already in ``out`` and predict only the missing files (and not
            the files listed in the errors file). Refused, naming what differs, unless the
            model(s), the policies and every option that changes an answer (top-k, output
            format, conformal settings, amp, model options such as mean/std or input size, and
            for several models vote, weights, tie-break, seed, calibration) are those ``out``
            was started with (recorded in :func:`settings_path`); batch size, workers, device
            and ``max_batch`` may change.
        resize: ``"stretch"`` (to the model's size), ``"fit"`` (letterbox: keep the aspect
            ratio, pad with black) or ``"crop"`` (resize the short side, cut the centre); default:
            what the checkpoint records for its training images, else ``stretch``
            (:func:`resolve_resize`; the summary's ``resize`` and ``resize_source`` say which).
            Part of the settings ``resume`` checks.
        overwrite: start ``out`` over when it already holds rows (refused otherwise, unless
            ``resume``: an earlier run's predictions are never replaced silently).
        retry_errors: with ``resume``, try the files listed in the errors file again; those
            that now decode leave it.
        device, amp, max_batch: passed to :class:`TTAEngine`.
        format: ``"csv"`` or ``"jsonl"``; default from the suffix of ``out``.
        model_options: options for :func:`ttakit.predictors.load` (layout, input_size, ...).
        conformal: ``ALPHA``: add each image's split-conformal prediction set (covering
            ``1 - ALPHA``), calibrated with the same policy on the validation split a ttakit
            checkpoint held out (:func:`ttakit.conformal.calibrate_predictor`).
        conformal_method: ``"lac"`` (smallest sets) or ``"aps"``.
        allow_other_model: use a policy whose fitted parameters were fitted on another model
            (refused by default: :func:`ttakit.policy.check_policy_model`).
        vote, weights, tie_break, seed: several models only: how they are combined
            (``"soft"``/``"hard"``, one non-negative weight per model, ``"mean"``/``"random"``,
            the random tie-break's seed; see :func:`ttakit.ensemble.hard_vote`).
        calibrate: several models only: temperature-scale each member on the validation split
            they share (ttakit checkpoints trained on the same data) before combining.

    Returns:
        A summary dict: counts (images, predicted, skipped as done, errors), seconds (the whole
        call: loading and calibration included; ``seconds_predicting`` the image loop,
        ``seconds_preparing`` the rest), images/s (while predicting),
        forward passes per image, the policy's views, and the output and errors paths.

    Raises:
        DataError: no images found. InvalidInputError: a bad output path, option or model
        that images cannot be fed to.
    """
    wall_started = time.perf_counter()  # the summary's seconds: loading and calibration included
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise InvalidInputError(f"top_k must be a positive integer, got {top_k!r}")
    out = check_output_file(out)
    fmt = _output_format(out, format)
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    if not models:
        raise InvalidInputError("give at least one model to predict with, got none")
    policies = list(policy) if isinstance(policy, (list, tuple)) else [policy] * len(models)
    if len(policies) != len(models):
        raise InvalidInputError(f"give one policy for all models or one per model: {len(models)} models but "
                                f"{len(policies)} policies")
    if resume and overwrite:
        raise InvalidInputError("--resume keeps the rows already in --out and --overwrite replaces them: give one")
    if out.exists() and out.stat().st_size > 0 and not resume and not overwrite:
        raise InvalidInputError(
            f"--out {out} already exists ({out.stat().st_size} bytes); add --resume to keep its rows and predict "
            "the rest, --overwrite to replace it, or choose another --out"
        )
    if retry_errors and not resume:
        raise InvalidInputError(
            "retry_errors (--retry-errors) retries the files in the errors file of a run being resumed; add --resume"
        )
    options = dict(model_options or {})
    settings: dict[str, Any] = {}

    def check_settings(found: dict[str, Any]) -> None:
        """Called once the models are loaded and the policies resolved, before any calibration."""
        settings.update(found)
        settings.update(top_k=top_k, format=fmt, conformal=conformal,
                        conformal_method=conformal_method if conformal is not None else None, amp=bool(amp))
        if resume and out.exists():
            check_resume_settings(out, settings)

    if len(models) == 1:
        runner = _single_runner(models[0], policies[0], model_options=options, device=device, amp=amp,
                                max_batch=max_batch, conformal=conformal, conformal_method=conformal_method,
                                check_settings=check_settings, allow_other_model=allow_other_model,
                                resize=resize)
    else:
        runner = _ensemble_runner(models, policies, model_options=options, device=device, amp=amp,
                                  max_batch=max_batch, conformal=conformal, conformal_method=conformal_method,
                                  vote=vote, weights=weights, tie_break=tie_break, seed=seed, calibrate=calibrate,
                                  progress=progress, check_settings=check_settings,
                                  allow_other_model=allow_other_model, resize=resize)
    channels, calibration = runner.channels, runner.calibration
    paths = list_images(images)
    workers = default_workers() if workers is None else workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise InvalidInputError(f"workers must be 0 or a positive integer, got {workers!r}")
    batch_size = batch_size or max_batch
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidInputError(f"batch_size must be a positive integer, got {batch_size!r}")

    errors_file = errors_path(out)
    names = [str(p) for p in paths]
    if len(set(names)) != len(names):
        names = list(dict.fromkeys(names))  # a list file naming a file twice: predict it once
    classes = runner.classes
    width_known = classes is not None
    with_sets = calibration is not None
    columns = output_columns(min(top_k, len(classes)), with_sets) if width_known else None
    done: set[str] = set()
    n_retried = 0
    if resume and out.exists():
        done = read_done(out, fmt, columns)
        error_rows = _read_error_rows(errors_file)
        if retry_errors:
            # Listed files of this run that have no row go again: they leave the errors file now
            # and come back only if they fail again.
            wanted = {os.path.abspath(n) for n in names} - {os.path.abspath(p) for p in done}
            kept = [row for row in error_rows if os.path.abspath(row[0]) not in wanted]
            n_retried = len(error_rows) - len(kept)
            if n_retried:
                atomic_write_text(errors_file, "".join(_csv_line(row) for row in [ERROR_COLUMNS, *kept]))
            error_rows = kept
        done |= {row[0] for row in error_rows}
    else:
        _write_settings(out, settings)  # a new output: record what its rows depend on
    # Compare absolute paths: a resumed run may name the same folder another way (./imgs, imgs/).
    done_abs = {os.path.abspath(p) for p in done}
    todo = [n for n in names if os.path.abspath(n) not in done_abs]

    started = time.perf_counter()
    n_predicted = n_errors = 0
    passes_total = 0.0
    opened_mode = "a" if resume and out.exists() else "w"
    output = open(out, opened_mode, encoding="utf-8", newline="")
    error_output = open(errors_file, "a" if resume and errors_file.exists() else "w", encoding="utf-8", newline="")
    try:
        if error_output.tell() == 0:
            error_output.write(_csv_line(ERROR_COLUMNS))
            error_output.flush()
        loader = [] if not todo else torch.utils.data.DataLoader(
            ImageFiles(todo, channels, runner.input_size, runner.resize),
            batch_size=batch_size,
            shuffle=False,
            num_workers=workers,
            collate_fn=collate_decoded,
            pin_memory=runner.device is not None and runner.device.type == "cuda",
            prefetch_factor=4 if workers else None,
        )  # nothing to do (a finished run resumed): no worker processes to start
        from .progress import progress as progress_bar

        with progress_bar(total=len(todo), desc="predict", unit="img", enabled=progress) as bar:
            for indices, batch, failures in loader:
                if failures:
                    error_output.write("".join(_csv_line([todo[i], reason]) for i, reason in failures))
                    error_output.flush()
                    n_errors += len(failures)
                if batch is not None:
                    batch_paths = [todo[i] for i in indices]
                    probs, disagreement, passes, labels = runner.run(batch.float().div_(255.0), batch_paths)
                    if classes is None:
                        classes = [str(c) for c in range(probs.shape[1])]
                    k = min(top_k, probs.shape[1])
                    if columns is None:
                        columns = output_columns(k, with_sets)
                        if resume and fmt == "csv" and out.stat().st_size:
                            read_done(out, fmt, columns)  # the header must match before appending
                    if fmt == "csv" and output.tell() == 0:
                        output.write(_csv_line(columns))
                    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(dim=1) + 0.0  # + 0.0: no "-0.0"
                    sets = calibration.predict_sets(probs, _path_seeds(batch_paths)) if calibration is not None else None
                    output.write(
                        _format_rows(batch_paths, probs, entropy, disagreement, passes, classes, k, fmt, sets, labels)
                    )
                    output.flush()
                    n_predicted += len(indices)
                    passes_total += float(passes.sum())
                bar.update(len(indices) + len(failures))
                elapsed = time.perf_counter() - started
                bar.set_postfix(img_s=f"{(n_predicted + n_errors) / max(elapsed, 1e-9):.0f}", errors=n_errors)
        if fmt == "csv" and output.tell() == 0 and columns is not None:
            output.write(_csv_line(columns))  # nothing left to predict: still a valid file
    finally:
        output.close()
        error_output.close()
    seconds = time.perf_counter() - started
    wall_seconds = time.perf_counter() - wall_started
    if n_errors == 0 and errors_file.exists() and errors_file.stat().st_size <= len(_csv_line(ERROR_COLUMNS)):
        errors_file.unlink()  # no errors ever: no errors file
    return {
        "out": str(out),
        "errors": str(errors_file) if errors_file.exists() else None,
        "format": fmt,
        "n_images": len(names),
        "n_done_before": len(names) - len(todo),
        "n_retried": n_retried,
        "n_predicted": n_predicted,
        "n_errors": n_errors,
        "seconds": wall_seconds,
        "seconds_predicting": seconds,
        "seconds_preparing": wall_seconds - seconds,
        "images_per_second": n_predicted / seconds if seconds > 0 else math.inf,
        "passes_per_image": passes_total / n_predicted if n_predicted else 0.0,
        "policy": runner.name,
        "views": runner.views,
        "model": runner.model,
        "ensemble": runner.extra or None,
        "workers": workers,
        "batch_size": batch_size,
        "conformal": calibration.to_json() if calibration is not None else None,
        "resize": runner.resize,
        "resize_source": runner.resize_source,
    }


def _passes_per_row(result: Any, n_views: int, rows: int) -> torch.Tensor:
    """Forward passes each image got: every view, or under the gate 1 for images kept plain."""
    gated = getattr(result, "gated", None)
    if gated is None:
        return torch.full((rows,), float(n_views))
    return torch.where(gated.cpu(), float(n_views), 1.0)

