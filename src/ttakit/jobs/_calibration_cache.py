"""The temperatures ``ttakit predict`` fitted, cached in the checkpoint folder."""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._io import atomic_write_json
from ..policy import Policy
from ..predictors import Predictor
from ._predict_resume import _weights_digest, policy_fingerprint

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
