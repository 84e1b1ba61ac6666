"""What every loader shares: merging what a file says with the caller's options into a
:class:`~ttakit.predictors.Predictor`, ttakit export metadata, layout guessing from an input
shape, and silencing torch's loaders while they try a file."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from collections.abc import Sequence
from typing import Any

from ..errors import CheckpointError, InvalidInputError, TTAKitError
from ._options import EXPORT_FORMAT, METADATA_KEY, TASKS, _choice, parse_input_size
from .predictor import Predictor


def _name_of(source: Any) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__


def _build(backend, kind: str, source: Any, options: dict[str, Any], found: dict[str, Any]) -> Predictor:
    """Merge what the file says (``found``) with the caller's options (which win) and build."""
    name = _name_of(source)
    if options.get("mean") is not None and found.get("normalization") == "model":
        # Applying the caller's mean/std as well would normalize every image twice.
        raise InvalidInputError(
            f"mean/std (--mean/--std) {options['mean']}/{options['std']} given for {kind} model {name}, which "
            f"normalizes its inputs itself (mean {found.get('mean')}, std {found.get('std')} inside the model); "
            "applying them too would normalize twice: drop --mean/--std for this model"
        )
    _check_contradictions(kind, name, options, found)
    settings = {k: v for k, v in found.items() if v is not None}
    settings.update({k: v for k, v in options.items() if v is not None})
    if options.get("mean") is not None:
        settings["normalization"] = "predictor"  # the caller asked for it: apply it here
    if settings.get("outputs") is None and settings.get("task") in ("detection", "keypoints"):
        settings["outputs"] = "logits"  # boxes and points are merged as they are: no softmax to decide on
    if settings.get("outputs") is None:
        raise InvalidInputError(
            f"say whether {kind} model {name} returns logits or probabilities: outputs='logits' or 'probs' "
            "(--outputs logits|probs); a second softmax over probabilities would be wrong"
        )
    return Predictor(
        backend,
        kind=kind,
        source=name,
        outputs=settings["outputs"],
        input_size=settings.get("input_size"),
        channels=settings.get("channels"),
        layout=settings.get("layout", "nchw"),
        pixel_range=settings.get("pixel_range", "0-1"),
        mean=settings.get("mean"),
        std=settings.get("std"),
        normalization=settings.get("normalization", "predictor"),
        classes=settings.get("classes"),
        train_augmentations=settings.get("train_augmentations", ()),
        fixed_batch=settings.get("fixed_batch"),
        task=settings.get("task") or "classification",
    )


def _check_contradictions(kind: str, name: str, options: dict[str, Any], found: dict[str, Any]) -> None:
    """Refuse --input-size / --channels that contradict what the model file records: the model
    would fail on the first batch with a raw shape error (or worse, run on resized garbage)."""
    what = "checkpoint" if kind == "checkpoint" else f"{kind} model"
    size, recorded_size = options.get("input_size"), found.get("input_size")
    if size is not None and recorded_size is not None and tuple(size) != tuple(recorded_size):
        raise InvalidInputError(
            f"input_size (--input-size) {size[0]}x{size[1]} contradicts {what} {name}, which takes "
            f"{recorded_size[0]}x{recorded_size[1]} images; drop --input-size (predict resizes images to "
            f"{recorded_size[0]}x{recorded_size[1]} itself)"
        )
    task, recorded_task = options.get("task"), found.get("task")
    if task is not None and recorded_task is not None and task != recorded_task:
        raise InvalidInputError(
            f"task (--task) {task} contradicts {what} {name}, which records the task {recorded_task}; "
            f"drop --task or pass --task {recorded_task}"
        )
    channels, recorded_channels = options.get("channels"), found.get("channels")
    if channels is not None and recorded_channels is not None and int(channels) != int(recorded_channels):
        raise InvalidInputError(
            f"channels (--channels) {channels} contradicts {what} {name}, which takes {recorded_channels}-channel "
            f"images; drop --channels (predict converts images to {recorded_channels} channel(s) itself)"
        )


def _from_metadata(meta: dict[str, Any] | None, source: str) -> dict[str, Any]:
    """Settings recorded by ``ttakit export`` (see :mod:`ttakit.jobs.export`)."""
    if not meta:
        return {}
    if meta.get("format") != EXPORT_FORMAT:
        return {}
    try:
        return {
            "classes": meta.get("classes"),
            "input_size": parse_input_size(meta.get("input_size")),
            "channels": meta.get("channels"),
            "layout": meta.get("layout"),
            "pixel_range": meta.get("pixel_range"),
            "mean": meta.get("mean"),
            "std": meta.get("std"),
            "normalization": meta.get("normalization"),
            "outputs": meta.get("outputs"),
            "train_augmentations": meta.get("train_augmentations") or (),
            "task": _choice("task", meta.get("task"), TASKS),
        }
    except TTAKitError as exc:
        raise CheckpointError(f"{source}: its ttakit metadata is invalid ({exc})") from exc


def _parse_metadata(text: Any, source: str) -> dict[str, Any] | None:
    if text in (None, "", b""):
        return None
    try:
        data = json.loads(text.decode("utf-8") if isinstance(text, bytes) else text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{source}: its {METADATA_KEY} metadata is not valid JSON ({exc})") from exc
    return data if isinstance(data, dict) else None


@contextlib.contextmanager
def _quiet_loader():
    """Silence what torch's loaders log and warn while they try a file (torch.export logs a
    13-line traceback for a file that is not its archive): the one-line error that follows says
    what went wrong. The loggers' levels are restored afterwards."""
    loggers = [logging.getLogger(name) for name in ("torch", "torch.export", "torch._export", "torch.jit",
                                                    "torch.export.pt2_archive")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _guess_layout(dims: list[Any]) -> str | None:
    """NCHW or NHWC from a 4-d shape: the channel axis holds 1, 3 or 4 and the other two agree."""
    first, last = dims[1] in (1, 3, 4), dims[3] in (1, 3, 4)
    if first != last:
        return "nchw" if first else "nhwc"
    if not first:
        return None
    if dims[2] == dims[3] and dims[1] != dims[2]:
        return "nchw"  # (C, S, S)
    if dims[1] == dims[2] and dims[3] != dims[1]:
        return "nhwc"  # (S, S, C)
    if dims[1] != dims[3]:
        return "nchw" if dims[1] < dims[3] else "nhwc"
    return None


def _shape_settings(shape: Sequence[Any], layout: str | None) -> dict[str, Any]:
    """Layout, channels and input size from a 4-d input shape whose unknown dims are None."""
    dims = list(shape)
    if layout is None:
        layout = _guess_layout(dims)
        if layout is None:
            return {}
    channels, height, width = (dims[1], dims[2], dims[3]) if layout == "nchw" else (dims[3], dims[1], dims[2])
    settings: dict[str, Any] = {"layout": layout, "channels": channels}
    if height is not None and width is not None:
        settings["input_size"] = (int(height), int(width))
    return settings
