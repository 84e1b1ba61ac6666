"""Resuming ``ttakit predict``: the rows already written and the settings they were written with."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._io import atomic_write_json, atomic_write_text
from ..errors import InvalidInputError
from ..policy import Policy
from ..predictors import Predictor

ERROR_COLUMNS = ["path", "reason"]


def csv_line(values: Sequence[Any]) -> str:
    """One CSV row, ``\\n``-terminated."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(values)
    return buffer.getvalue()


def default_workers() -> int:
    """Decoding workers: 1 on machines with up to 4 cores (inference needs the rest), else 2-4."""
    cores = os.cpu_count() or 1
    return 1 if cores <= 4 else min(4, cores // 4)


def check_loader(workers: int | None, batch_size: int | None, max_batch: int) -> tuple[int, int]:
    """Decoding workers (default :func:`default_workers`) and images per step (default ``max_batch``), checked."""
    workers = default_workers() if workers is None else workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise InvalidInputError(f"workers must be 0 or a positive integer, got {workers!r}")
    batch_size = batch_size or max_batch
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidInputError(f"batch_size must be a positive integer, got {batch_size!r}")
    return workers, batch_size


def errors_to_skip(errors_file: Path, names: Sequence[str], done: set[str], retry_errors: bool,
                   rewrite: bool = True) -> tuple[set[str], int]:
    """The files a resumed run skips as listed unreadable, and how many leave the list to be retried.

    With ``retry_errors``, listed files of this run that have no row go again: they leave the
    errors file now (rewritten when ``rewrite``) and come back only if they fail again.
    """
    error_rows = _read_error_rows(errors_file)
    n_retried = 0
    if retry_errors:
        wanted = {os.path.abspath(n) for n in names} - {os.path.abspath(p) for p in done}
        kept = [row for row in error_rows if os.path.abspath(row[0]) not in wanted]
        n_retried = len(error_rows) - len(kept)
        if n_retried and rewrite:
            atomic_write_text(errors_file, "".join(csv_line(row) for row in [ERROR_COLUMNS, *kept]))
        error_rows = kept
    return {row[0] for row in error_rows}, n_retried


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
    # predict --task (jobs/predict_dense.py)
    "task": "--task", "probs": "--probs", "detection": "the detection merge (--merge, --iou-thr, --match, "
    "--conf-type, --skip-box-thr, --max-detections)", "flip_pairs": "--flip-pairs", "keypoint_names": "--keypoint-names",
    "scaled": "--scaled",
}


def settings_path(out: str | os.PathLike) -> Path:
    """Where ``predict`` records what its rows depend on (for ``resume``): ``<out>.settings.json``."""
    out = Path(out)
    return out.with_name(out.name + ".settings.json")


def _weights_digest(predictor: Predictor) -> str:
    """SHA-256 of what the model computes with (:meth:`ttakit.predictors.Predictor.weights_digest`)."""
    return predictor.weights_digest()


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


# --------------------------------------------------------------------------- part files (torchrun)


def part_path(path: str | os.PathLike, rank: int, world: int) -> Path:
    """Where rank ``rank`` of ``world`` writes its rows of ``path``: ``<path>.part-R-of-W``."""
    path = Path(path)
    return path.with_name(f"{path.name}.part-{rank}-of-{world}")


def part_files(path: str | os.PathLike) -> list[Path]:
    """The part files of ``path`` left by any world size (a finished run leaves none)."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    prefix = f"{path.name}.part-"
    return sorted(p for p in path.parent.iterdir() if p.name.startswith(prefix) and p.is_file())


def has_output(out: str | os.PathLike) -> bool:
    """Whether ``out`` was started: the file holds something, or a distributed run left part files."""
    out = Path(out)
    return (out.exists() and out.stat().st_size > 0) or bool(part_files(out))


def _read_rows(path: Path, format: str) -> tuple[str | None, list[tuple[str, str]]]:
    """``(header line or None, [(path, row text)])`` of a predictions or errors file (CSV or
    JSON Lines), a torn last line dropped first. CSV rows are written back as ttakit wrote them."""
    if not path.exists():
        return None, []
    _truncate_torn_tail(path)
    with open(path, encoding="utf-8", newline="") as handle:
        if format == "jsonl":
            rows = []
            for line in handle:
                if line.strip():
                    try:
                        rows.append((json.loads(line)["path"], line if line.endswith("\n") else line + "\n"))
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise InvalidInputError(f"{path} holds a line that is not a ttakit prediction row; "
                                                "use another --out") from None
            return None, rows
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            return None, []
        return _csv_text(header), [(row[0], _csv_text(row)) for row in reader if len(row) == len(header)]


def _csv_text(values: list[str]) -> str:
    import io

    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(values)
    return buffer.getvalue()


def merge_parts(path: str | os.PathLike, format: str, names: list[str]) -> int:
    """Merge ``path`` and its part files into ``path`` (atomically), rows in the order of ``names``
    (rows of paths not in ``names``, from an earlier run over other images, first, as they were),
    each path once; the part files are removed. Returns the rows written (0 and nothing touched
    when there are no part files)."""
    path = Path(path)
    parts = part_files(path)
    if not parts:
        return 0
    header, rows = _read_rows(path, format)
    for part in parts:
        part_header, part_rows = _read_rows(part, format)
        header = header or part_header
        rows += part_rows
    order = {name: k for k, name in enumerate(names)}
    order_abs = {os.path.abspath(name): k for k, name in enumerate(names)}
    seen: set[str] = set()
    kept = []
    for key, text in rows:
        if key not in seen:
            seen.add(key)
            kept.append((order.get(key, order_abs.get(os.path.abspath(key), -1)), text))
    kept.sort(key=lambda item: item[0])  # stable: rows of other images keep their order, first
    atomic_write_text(path, (header or "") + "".join(text for _, text in kept))
    for part in parts:
        part.unlink(missing_ok=True)
    return len(kept)


# --------------------------------------------------------------------------- rows
