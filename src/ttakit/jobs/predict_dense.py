"""``ttakit predict --task segmentation|keypoints|detection``: TTA predictions of a dense model for a
folder of image files, written in the forms those users expect.

* ``segmentation``: ``OUT/`` holds one palette PNG label map per image (``<name>.png``, the
  pixel value is the class index, at the image file's size), ``labels.json`` (class names and
  colours), with ``probs`` the merged probabilities ``probs/<name>.npz`` (float16, compressed,
  at the model's input size) and the index ``index.csv`` (one row per image).
* ``keypoints``: ``OUT/`` holds one JSON per image (``<name>.json``: named points in pixels of
  the image file, with their spread across the views) and ``index.csv``.
* ``detection``: ``OUT`` is a COCO results list (``.json``: ``image_id`` = the image's index in
  the input list, ``category_id``, ``bbox`` ``[x, y, w, h]`` in pixels of the image file,
  ``score``, and per fused box ``n_views``, ``box_std``, ``score_std``: how many views found it
  and the spread of its coordinates and score), with the file-name map ``<stem>.images.json``
  and a CSV ``<stem>.csv`` beside it; the run appends one line per image to
  ``<stem>.images.jsonl`` as it goes, and the three files are written from it atomically.

Decoding, resume and errors work as for classification (:mod:`ttakit.jobs.predict`): files are
decoded in worker processes (:mod:`ttakit.data.decode`); an image's files are written before its
index row (or stream line), so ``resume`` skips exactly the images already written; unreadable
files are listed once in the errors file (``index.csv.errors.csv``, or ``OUT.errors.csv`` for
detection) and the run goes on; what the outputs depend on is recorded in a settings file and a
resume with anything else is refused, naming it.

Example:
    >>> summary = predict_dense("runs/unet", "photos/", task="segmentation", out="masks/")  # doctest: +SKIP
    >>> summary["n_predicted"]  # doctest: +SKIP
    120
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._io import check_output_file
from ..data.decode import ImageFiles, collate_decoded, list_images
from ..detection import Detections, DetectionTTAWrapper
from ..errors import InvalidInputError, ModelOutputError
from ..policy import Policy, check_policy_model
from ..predictors import Predictor, load
from ..search.dense import detection_settings
from . import _dense_outputs as outputs
from ._distributed import detect
from ._policies import policy_for
from ._predict_resume import (
    ERROR_COLUMNS,
    _write_settings,
    check_loader,
    check_resume_settings,
    csv_line,
    errors_to_skip,
    model_fingerprint,
    policy_fingerprint,
    read_done,
    settings_path,
)
from ._predict_runners import _check_input, resolve_resize

__all__ = ["predict_dense", "DENSE_TASKS"]

DENSE_TASKS = ("segmentation", "keypoints", "detection")
@dataclass
class _Task:
    """One dense task's part of the loop: ``run(batch) -> per-image results`` and
    ``write(path, result, size) -> the index row or stream record``."""

    run: Callable[[torch.Tensor], list[Any]]
    write: Callable[[str, Any, tuple[int, int]], Any]
    settings: dict[str, Any]
    classes: list[str] | None


def predict_dense(
    model: Any,
    images: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    task: str,
    out: str | os.PathLike,
    policy: str | Policy = "none",
    probs: bool = False,
    resume: bool = False,
    overwrite: bool = False,
    retry_errors: bool = False,
    device: str | torch.device | None = None,
    amp: bool = False,
    max_batch: int = 256,
    batch_size: int | None = None,
    workers: int | None = None,
    model_options: dict[str, Any] | None = None,
    merge: str | None = None,
    iou_thr: float | None = None,
    skip_box_thr: float | None = None,
    conf_type: str | None = None,
    match: str | None = None,
    max_detections: int = 100,
    flip_pairs: Sequence[tuple[int, int]] | None = None,
    keypoint_names: Sequence[str] | None = None,
    scaled: bool = False,
    resize: str | None = None,
    allow_other_model: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Predict every image ``images`` names with a dense model and ``policy``; write what ``task`` writes.

    Args:
        model: anything :func:`ttakit.predictors.load` takes (a checkpoint folder, ``.pt2``,
            TorchScript, ONNX, an ``nn.Module``) or a :class:`Predictor`; loaded with ``task``.
        images: a folder (recursive), a glob, a text file listing paths, or a list of paths.
        task: ``"segmentation"``, ``"keypoints"`` or ``"detection"``.
        out: a folder (segmentation, keypoints) or a ``.json`` file (detection).
        policy: a policy name, ``train-aug``, a policy JSON file or a :class:`Policy`. A policy
            searched for detection records its merge settings, used where none are given here.
        probs: segmentation: also write the merged probabilities (``probs/<name>.npz``).
        resume, overwrite, retry_errors: as :func:`ttakit.jobs.predict.predict_images`: keep
            what is written and predict the rest (refused, naming what differs, if the model,
            policy or an option that changes an output differs); start over (the index, stream,
            errors and settings files and ``probs/`` are removed first, per-image files are
            replaced as they are written); or retry the files in the errors file.
        device, amp, max_batch: where and how the model runs (:class:`ttakit.engine.TTAEngine`).
        batch_size: images decoded and predicted per step (default ``max_batch``).
        workers: decoding worker processes (0 decodes in this process; default 1).
        model_options: options for :func:`ttakit.predictors.load` (layout, input_size, ...).
        merge, iou_thr, skip_box_thr, conf_type, match, max_detections: detection: how the
            views' boxes are fused (:class:`ttakit.detection.DetectionTTAWrapper`); default the
            policy's recorded settings, else :data:`ttakit.search.dense.DETECTION_DEFAULTS`
            (:func:`ttakit.search.dense.detection_settings`).
        flip_pairs: keypoints: ``(left, right)`` index pairs swapped after a mirroring view.
        keypoint_names: keypoints: one name per point (default ``kp0``, ``kp1``, ...).
        scaled: keypoints: the model returns coordinates normalised to ``[0, 1]``.
        resize: how images reach the model's size (``stretch``, ``fit``, ``crop``; crop is
            refused for segmentation); outputs are mapped back to each file's own size.
        allow_other_model: use a policy fitted on another model.

    Returns:
        A summary dict: counts (images, predicted, skipped as done, errors), seconds, images/s,
        the policy and its views, the task's settings and the output paths.

    Raises:
        InvalidInputError: a bad task, output path or option. DataError: no images found.
        ModelOutputError: the model's output does not fit the task.
    """
    started = time.perf_counter()
    task = _check_task(task)
    if detect().world > 1:  # every rank would write the same files: sharding covers classification only
        raise InvalidInputError(
            f"predict --task {task} runs in one process; start it without torchrun (sharded prediction covers "
            "classification)"
        )
    out, anchor = _check_out(task, out, resume, overwrite, retry_errors)
    workers, batch_size = check_loader(workers, batch_size, max_batch)
    from ..engine import check_device

    checked_device = check_device(device)  # a bad --device fails before the model is loaded
    predictor = load(model, task=task, **dict(model_options or {}))
    if predictor.task != task:  # a Predictor passed in is used as it is
        raise InvalidInputError(
            f"task (--task) {task} but the predictor given was loaded for {predictor.task}; load it with task={task!r}"
        )
    channels = _check_input(predictor)
    resize_mode, resize_source = resolve_resize(resize, predictor)
    resolved = policy_for(policy, predictor)
    check_policy_model(resolved, predictor, allow_other_model=allow_other_model)
    if checked_device is not None:
        predictor.to(checked_device)
    engine_options = {"max_batch": max_batch, "device": checked_device, "amp": amp}
    if task == "segmentation":
        outputs.check_mask_resize(resize_mode)
        job = _segmentation(predictor, resolved, out, probs, resize_mode, engine_options)
    elif task == "keypoints":
        job = _keypoints(predictor, resolved, out, flip_pairs, keypoint_names, scaled, resize_mode, engine_options)
    else:
        merge_settings = detection_settings(resolved, merge=merge, iou_thr=iou_thr, skip_box_thr=skip_box_thr,
                                            conf_type=conf_type, match=match)
        job = _detection(predictor, resolved, merge_settings, max_detections, resize_mode, engine_options)
    settings = {"models": [model_fingerprint(predictor)], "policies": [policy_fingerprint(resolved)],
                "resize": resize_mode, "task": task, "amp": bool(amp), **job.settings}

    names = list(dict.fromkeys(str(p) for p in list_images(images)))  # a file listed twice: once
    errors_file = anchor.with_name(anchor.name + ".errors.csv")
    fmt = "jsonl" if task == "detection" else "csv"
    rows_file = outputs.detection_stream(out) if task == "detection" else anchor
    columns = None if task == "detection" else \
        (outputs.SEGMENTATION_COLUMNS if task == "segmentation" else outputs.KEYPOINT_COLUMNS)
    if resume:
        _check_resumable(anchor, rows_file, settings)
    if task != "detection":
        Path(out).mkdir(parents=True, exist_ok=True)
        if task == "segmentation" and job.classes is not None:
            outputs.write_labels_file(out, job.classes)
    todo, n_retried = _files_to_do(names, anchor, rows_file, fmt, columns, errors_file, settings, resume,
                                   retry_errors)
    if task == "segmentation" or task == "keypoints":
        suffix = ".png" if task == "segmentation" else ".json"
        file_names = outputs.output_names(names, images, suffix)
    else:
        file_names = {name: str(i) for i, name in enumerate(names)}  # detection: the image_id
    counts = _predict(job, todo, file_names, rows_file, fmt, columns, errors_file, channels, predictor, resize_mode,
                      workers, batch_size, progress)
    extra: dict[str, Any] = {}
    if task == "detection":
        ids = {name: i for i, name in enumerate(names)}
        extra = outputs.write_detection_outputs(out, outputs.read_jsonl(rows_file), ids, job.classes)
    if counts["n_errors"] == 0 and errors_file.exists() \
            and errors_file.stat().st_size <= len(csv_line(ERROR_COLUMNS)):
        errors_file.unlink()  # no errors ever: no errors file
    seconds = counts["seconds"]
    return {
        "task": task,
        "out": str(out),
        "index": str(rows_file),
        "errors": str(errors_file) if errors_file.exists() else None,
        "n_images": len(names),
        "n_done_before": len(names) - len(todo),
        "n_retried": n_retried,
        "n_predicted": counts["n_predicted"],
        "n_errors": counts["n_errors"],
        "seconds": time.perf_counter() - started,
        "seconds_predicting": seconds,
        "images_per_second": counts["n_predicted"] / seconds if seconds > 0 else math.inf,
        "policy": resolved.name,
        "views": resolved.view_names,
        "model": predictor.describe(),
        "settings": job.settings,
        "resize": resize_mode,
        "resize_source": resize_source,
        "workers": workers,
        "batch_size": batch_size,
        **extra,
    }


# --------------------------------------------------------------------------- checks


def _check_task(task: Any) -> str:
    if task not in DENSE_TASKS:
        raise InvalidInputError(
            f"task (--task) must be one of {', '.join(DENSE_TASKS)}, got {task!r} (classification: ttakit predict "
            "without --task)"
        )
    return str(task)


def _check_out(task: str, out: Any, resume: bool, overwrite: bool, retry_errors: bool) -> tuple[Path, Path]:
    """``(out, anchor)``: the output and the file its settings and errors file are named after
    (``OUT/index.csv`` for a folder, ``OUT`` itself for detection). Existing outputs are kept
    unless ``resume`` or ``overwrite`` says what to do with them."""
    if resume and overwrite:
        raise InvalidInputError("--resume keeps what --out already holds and --overwrite replaces it: give one")
    if retry_errors and not resume:
        raise InvalidInputError(
            "retry_errors (--retry-errors) retries the files in the errors file of a run being resumed; add --resume"
        )
    if task == "detection":
        path = check_output_file(out)
        if path.suffix.lower() != ".json":
            raise InvalidInputError(
                f"--out {path}: --task detection writes COCO results, a .json file (like preds.json), got {path.name!r}"
            )
        anchor, started = path, [path, outputs.detection_stream(path)]
    else:
        path = Path(out)
        if path.exists() and not path.is_dir():
            raise InvalidInputError(f"--out {path} is a file; --task {task} writes a folder (one file per image)")
        if not path.exists() and not path.absolute().parent.is_dir():
            raise InvalidInputError(f"--out {path}: folder {path.absolute().parent} does not exist; create it first")
        anchor = path / "index.csv"
        started = [anchor]
    held = [p for p in started if p.exists() and p.stat().st_size > 0]
    if held and not resume and not overwrite:
        raise InvalidInputError(
            f"--out {path} already holds predictions ({held[0].name}); add --resume to keep them and predict the "
            "rest, --overwrite to start over, or choose another --out"
        )
    if overwrite:
        for stale in [*started, anchor.with_name(anchor.name + ".errors.csv"), settings_path(anchor)]:
            stale.unlink(missing_ok=True)
        if task == "segmentation" and (path / "probs").is_dir():
            shutil.rmtree(path / "probs")
    return path, anchor


def _check_resumable(anchor: Path, rows_file: Path, settings: dict[str, Any]) -> None:
    """Refuse to resume outputs made with other settings, or whose settings file is gone."""
    if not settings_path(anchor).exists() and rows_file.exists() and rows_file.stat().st_size > 0:
        raise InvalidInputError(
            f"--resume: cannot check that {rows_file} was made with this model, policy and options: "
            f"{settings_path(anchor).name} is missing; start over with --overwrite, or use another --out"
        )
    check_resume_settings(anchor, settings)




def _files_to_do(names: list[str], anchor: Path, rows_file: Path, fmt: str, columns: list[str] | None,
                 errors_file: Path, settings: dict[str, Any], resume: bool,
                 retry_errors: bool) -> tuple[list[str], int]:
    """The files still to predict and how many leave the errors file to be retried (as
    classification predict does); a new output records its settings first."""
    done: set[str] = set()
    n_retried = 0
    if resume and rows_file.exists():
        done = read_done(rows_file, fmt, columns)
        skipped, n_retried = errors_to_skip(errors_file, names, done, retry_errors)
        done |= skipped
    if not (resume and settings_path(anchor).exists()):
        _write_settings(anchor, settings)  # a new output: record what it depends on
    done_abs = {os.path.abspath(p) for p in done}
    return [n for n in names if os.path.abspath(n) not in done_abs], n_retried


# --------------------------------------------------------------------------- the loop


def _predict(job: _Task, todo: list[str], file_names: dict[str, str], rows_file: Path, fmt: str,
             columns: list[str] | None, errors_file: Path, channels: int, predictor: Predictor, resize: str,
             workers: int, batch_size: int, progress: bool) -> dict[str, Any]:
    """Decode ``todo`` in worker processes, run each batch, write each image's files, then its
    index row (or stream line), flushed per batch; unreadable files go to ``errors_file``."""
    import json

    from ..progress import progress as progress_bar

    started = time.perf_counter()
    n_predicted = n_errors = 0
    rows = open(rows_file, "a", encoding="utf-8", newline="")
    errors = open(errors_file, "a", encoding="utf-8", newline="")
    try:
        if errors.tell() == 0:
            errors.write(csv_line(ERROR_COLUMNS))
            errors.flush()
        if columns is not None and rows.tell() == 0:
            rows.write(csv_line(columns))
            rows.flush()
        loader = [] if not todo else torch.utils.data.DataLoader(
            ImageFiles(todo, channels, predictor.input_size, resize), batch_size=batch_size, shuffle=False,
            num_workers=workers, collate_fn=collate_decoded, prefetch_factor=4 if workers else None,
        )
        with progress_bar(total=len(todo), desc="predict", unit="img", enabled=progress) as bar:
            for indices, batch, failures in loader:
                if failures:
                    errors.write("".join(csv_line([todo[i], reason]) for i, reason in failures))
                    errors.flush()
                    n_errors += len(failures)
                if batch is not None:
                    results = job.run(batch.float().div_(255.0))
                    lines = []
                    for i, result in zip(indices, results, strict=True):
                        path = todo[i]
                        record = job.write(path, result, (file_names[path], outputs.source_size(path)))
                        lines.append(json.dumps(record) + "\n" if fmt == "jsonl" else csv_line(record))
                    rows.write("".join(lines))
                    rows.flush()
                    n_predicted += len(indices)
                bar.update(len(indices) + len(failures))
    finally:
        rows.close()
        errors.close()
    return {"n_predicted": n_predicted, "n_errors": n_errors, "seconds": time.perf_counter() - started}


# --------------------------------------------------------------------------- the tasks


def _segmentation(predictor: Predictor, policy: Policy, out: Path, probs: bool, resize: str,
                  engine_options: dict[str, Any]) -> _Task:
    from ..engine import TTAEngine

    engine = TTAEngine(predictor, policy, target="mask", activation="softmax", **engine_options)
    model_size = tuple(predictor.input_size)
    if predictor.classes is not None:
        outputs.check_palette_classes(len(predictor.classes))

    def run(batch: torch.Tensor) -> list[torch.Tensor]:
        merged = engine.run(batch).merged.float().cpu()  # (B, classes, h, w) probabilities
        outputs.check_palette_classes(merged.shape[1])
        return list(merged)

    def write(path: str, merged: torch.Tensor, where: tuple[str, tuple[int, int]]) -> list[Any]:
        name, size = where
        labels = outputs.probs_to_source(merged, model_size, size, resize).argmax(dim=0)
        outputs.write_label_png(out / name, labels)
        probs_name = ""
        if probs:
            probs_name = "probs/" + name[: -len(".png")] + ".npz"
            outputs.write_probs(out / probs_name, merged)
        return [path, name, probs_name, size[0], size[1]]

    return _Task(run, write, {"probs": bool(probs)}, predictor.classes)


def _keypoints(predictor: Predictor, policy: Policy, out: Path, flip_pairs: Sequence[tuple[int, int]] | None,
               keypoint_names: Sequence[str] | None, scaled: bool, resize: str,
               engine_options: dict[str, Any]) -> _Task:
    from ..wrappers import KeypointsTTAWrapper

    options = dict(engine_options)
    if flip_pairs:
        options["flip_pairs"] = [tuple(int(i) for i in pair) for pair in flip_pairs]
    wrapper = KeypointsTTAWrapper(predictor, policy, scaled=bool(scaled), **options)
    model_size = tuple(predictor.input_size)
    names = list(keypoint_names) if keypoint_names else None
    if names is not None and len(set(names)) != len(names):
        raise InvalidInputError(f"keypoint_names (--keypoint-names) must be distinct, got {','.join(names)}")

    def run(batch: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        result = wrapper.run(batch, return_views=True)
        rows = batch.shape[0]
        points = result.merged.float().cpu().reshape(rows, -1, 2)
        views = result.views.float().cpu().reshape(-1, rows, points.shape[1], 2) if result.views is not None else None
        if scaled:  # normalised to the model's input: to its pixels
            h, w = model_size
            points = points * points.new_tensor([w, h])
            views = views * views.new_tensor([w, h]) if views is not None else None
        if names is not None and points.shape[1] != len(names):
            raise ModelOutputError(
                f"the model returns {points.shape[1]} keypoints per image but {len(names)} keypoint names were given "
                f"({','.join(names)})"
            )
        spread = views.std(dim=0, unbiased=False) if views is not None and views.shape[0] > 1 else None
        return [(points[i], spread[i] if spread is not None else None) for i in range(rows)]

    def write(path: str, result: tuple[torch.Tensor, torch.Tensor | None],
              where: tuple[str, tuple[int, int]]) -> list[Any]:
        name, size = where
        points, spread = result
        points = outputs.points_to_source(points, model_size, size, resize)
        if spread is not None:
            sx, sy, _, _ = outputs._fit_geometry(model_size, size, resize)
            spread = spread / spread.new_tensor([sx, sy])
        point_names = names or [f"kp{i}" for i in range(points.shape[0])]
        outputs.write_json(out / name, outputs.keypoint_record(path, points, spread, point_names, size))
        return [path, name, size[0], size[1]]

    settings = {"flip_pairs": [list(map(int, p)) for p in flip_pairs] if flip_pairs else None,
                "keypoint_names": names, "scaled": bool(scaled)}
    return _Task(run, write, settings, None)


def _detection(predictor: Predictor, policy: Policy, merge_settings: dict[str, Any], max_detections: int,
               resize: str, engine_options: dict[str, Any]) -> _Task:
    wrapper = DetectionTTAWrapper(predictor, policy, max_detections=max_detections, **merge_settings,
                                  **engine_options)
    model_size = tuple(predictor.input_size)

    def run(batch: torch.Tensor) -> list[Any]:
        return list(wrapper.run(batch).detections)

    def write(path: str, found: Detections, where: tuple[str, tuple[int, int]]) -> dict[str, Any]:
        image_id, size = where
        return outputs.detection_record(
            path, int(image_id), size, outputs.boxes_to_source(found.boxes.float().cpu(), model_size, size, resize),
            found.scores.float().cpu(), found.labels.cpu(), found.n_views.cpu(),
            outputs.spread_to_source(found.box_std.float().cpu(), model_size, size, resize), found.score_std.cpu(),
        )

    settings = {"detection": {**merge_settings, "max_detections": int(max_detections)}}
    return _Task(run, write, settings, predictor.classes)
