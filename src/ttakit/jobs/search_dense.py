"""The job behind ``ttakit search --task segmentation|detection``: select a dense model's views (and
for detection its box-fusion settings) on validation canvases, write the policy and a report.

The model is read by :func:`ttakit.predictors.load` (a ttakit checkpoint trained on
``fashion-canvases`` records its task and size; other models say ``--task`` and take canvases of
their input size). The search runs on validation canvases (items from Fashion-MNIST training rows
the model never trained on, :func:`ttakit.data.canvases.load_fashion_canvases`) and never sees the
test canvases; those are used afterwards, to report the searched policy beside no TTA, ``hflip``
and multi-scale on images the search did not see (the lift on the test canvases).

Writes ``policy.json`` (the views; for detection the merge settings in ``meta["detection"]``,
which ``ttakit predict --task detection`` reads back) and ``search-<task>.md`` / ``.json``.

Example:
    >>> results = search_dense_checkpoint("runs/unet", task="segmentation")  # doctest: +SKIP
    >>> results["views"]  # doctest: +SKIP
    ['identity', 'hflip']
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_write_json, atomic_write_text
from ..errors import InvalidInputError
from ..policy import Policy, Step, View
from ..predictors import Predictor, load
from ..progress import note

__all__ = ["search_dense_checkpoint", "SEARCH_TASKS"]

SEARCH_TASKS = ("segmentation", "detection")


def _canvases(predictor: Predictor, split: str, n: int, seed: int, data_dir: Any) -> Any:
    from ..data.canvases import load_fashion_canvases

    if predictor.input_size is None or predictor.input_size[0] != predictor.input_size[1]:
        raise InvalidInputError(
            f"the search's canvases are square; model {predictor.source} takes {predictor.input_size} images "
            "(pass --input-size S for a model that takes any size)"
        )
    if predictor.channels not in (None, 1):
        raise InvalidInputError(
            f"the search's canvases are grayscale (1 channel); model {predictor.source} takes {predictor.channels}"
        )
    size = int(predictor.input_size[0])
    # Items of 20-44 px on 96 px canvases: the same proportions on canvases of another size.
    options = {} if size == 96 else {"scales": (max(2, min(size, round(20 * size / 96))),
                                                max(2, min(size, round(44 * size / 96))))}
    return load_fashion_canvases(split, n, seed=seed, size=size, data_dir=data_dir, **options)


def _baselines() -> dict[str, list[View]]:
    """The policies users pick by hand, reported beside the searched one: hflip and multi-scale."""
    flip = View([Step(_hflip(), True)])
    scales = [View([Step(_scale(s), s)]) for s in (0.75, 1.25)]
    return {"hflip": [View.identity(), flip], "multiscale": [View.identity(), *scales]}


def _hflip() -> Any:
    from ..transforms import HorizontalFlip

    return HorizontalFlip()


def _scale(s: float) -> Any:
    from ..transforms import Scale

    return Scale([s], interpolation="bilinear")


def search_dense_checkpoint(
    checkpoint: Any,
    *,
    task: str | None = None,
    out: str | os.PathLike | None = None,
    limit: int = 128,
    test_limit: int = 256,
    budget: int = 4,
    objective: str | None = None,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    max_detections: int = 100,
    max_batch: int = 256,
    device: str | torch.device | None = None,
    amp: bool = False,
    progress: bool = True,
    model_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Search a dense model's policy on validation canvases; report it on test canvases.

    Args:
        checkpoint: a ttakit checkpoint folder or any model :func:`ttakit.predictors.load` reads.
        task: ``"segmentation"`` or ``"detection"``; default the task the checkpoint records.
        out: a folder for ``policy.json`` and the report, or a ``.json`` path for the policy
            (the report beside it); default the checkpoint folder (where ``predict`` finds
            ``policy.json``), else the current folder.
        limit: validation canvases searched on (the per-view cache is bounded by it: float16
            probabilities for segmentation).
        test_limit: test canvases the searched policy is reported on beside no TTA, hflip and
            multi-scale (0: none).
        budget: most views in the policy.
        objective: ``"miou"`` (segmentation), ``"map"`` or ``"map50"`` (detection).
        seed: the canvases' seed.
        max_detections: detection: boxes kept per view and image before fusion.

    Returns:
        ``{"policy": path, "report": path, "views", "settings", "task", "objective", "validation":
        {...}, "test": [rows], "table": text}``.
    """
    from ..engine import check_device
    from ..search.dense import default_dense_pool, dense_search

    started = time.perf_counter()
    checked_device = check_device(device)
    predictor = load(checkpoint, **({"task": task} if task else {}), **dict(model_options or {}))
    task = task or predictor.task
    if task not in SEARCH_TASKS:
        raise InvalidInputError(
            f"task (--task) must be one of {', '.join(SEARCH_TASKS)} for a dense search, got {task!r} (classification: "
            "ttakit search without --task)"
        )
    for name, value, low in (("limit", limit, 1), ("test_limit", test_limit, 0), ("budget", budget, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InvalidInputError(f"{name} must be an integer >= {low}, got {value!r}")
    policy_file, report_dir = _outputs(checkpoint, out, task)
    if checked_device is not None:
        predictor.to(checked_device)
    val = _canvases(predictor, "val", limit, seed, data_dir)
    note(f"searching {task} views on {len(val)} validation canvases", enabled=progress)
    targets = val.masks if task == "segmentation" else val.targets()
    result = dense_search(predictor, val.images, targets, task=task, views=default_dense_pool(), budget=budget,
                          objective=objective, num_classes=_num_classes(predictor, task),
                          max_detections=max_detections, max_batch=max_batch, device=checked_device, amp=amp)
    policy = result.policy
    policy.meta.update(_provenance(predictor, checkpoint))
    policy.save(policy_file)
    test_rows = []
    if test_limit:
        test = _canvases(predictor, "test", test_limit, seed, data_dir)
        note(f"reporting on {len(test)} test canvases (not searched on)", enabled=progress)
        test_rows = _test_rows(predictor, test, task, policy, result.objective, max_detections, max_batch,
                               checked_device, amp)
    summary = {
        "task": task, "objective": result.objective, "views": policy.view_names, "settings": result.settings,
        "policy": str(policy_file), "validation": result.to_json(), "test": test_rows,
        "seconds": time.perf_counter() - started,
    }
    summary["table"] = _table(summary)
    json_file = report_dir / f"search-{task}.json"
    md_file = report_dir / f"search-{task}.md"
    atomic_write_json(json_file, {k: v for k, v in summary.items() if k != "table"})
    atomic_write_text(md_file, _markdown(summary))
    summary["report"] = str(md_file)
    return summary


def _num_classes(predictor: Predictor, task: str) -> int | None:
    return len(predictor.classes) if task == "segmentation" and predictor.classes else None


def _outputs(checkpoint: Any, out: Any, task: str) -> tuple[Path, Path]:
    """``(policy file, report folder)``."""
    if out is not None:
        path = Path(out)
        if path.suffix.lower() == ".json":
            path.parent.mkdir(parents=True, exist_ok=True)
            return path, path.parent
        if path.exists() and not path.is_dir():
            raise InvalidInputError(f"--out {path} is a file; give a folder or a .json policy path")
        path.mkdir(parents=True, exist_ok=True)
        return path / "policy.json", path
    folder = Path(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) and Path(checkpoint).is_dir() else Path(".")
    return folder / "policy.json", folder / "search"


def _provenance(predictor: Predictor, checkpoint: Any) -> dict[str, Any]:
    meta = getattr(predictor, "meta", None)
    found: dict[str, Any] = {"kind": "dense-search"}
    if isinstance(checkpoint, (str, os.PathLike)):
        found["checkpoint"] = str(checkpoint)
    digest = getattr(meta, "weights_sha256", None)
    if digest:
        found["weights_sha256"] = digest
    return found


def _test_rows(predictor: Predictor, test: Any, task: str, searched: Policy, objective: str, max_detections: int,
               max_batch: int, device: Any, amp: bool) -> list[dict[str, Any]]:
    """No TTA, hflip, multi-scale and the searched policy on the test canvases: score, lift, time."""
    from ..dense_metrics import detection_map, mean_iou

    policies = {"none": (Policy.identity(), None)}
    for name, views in _baselines().items():
        policies[name] = (Policy(views, name=name), None)
    policies["searched"] = (searched, searched.meta.get("detection"))
    rows = []
    for name, (policy, settings) in policies.items():
        started = time.perf_counter()
        if task == "segmentation":
            from ..engine import TTAEngine

            engine = TTAEngine(predictor, policy, target="mask", activation="softmax", max_batch=max_batch,
                               device=device, amp=amp)
            merged = torch.cat([engine.run(test.images[i:i + 32]).merged.argmax(1).cpu()
                                for i in range(0, len(test), 32)])
            seconds = time.perf_counter() - started
            score = mean_iou(merged, test.masks, _num_classes(predictor, task) or int(test.masks.max()) + 1)["miou"]
        else:
            from ..detection import DetectionTTAWrapper
            from ..search.dense import detection_settings

            chosen = detection_settings(policy) if settings is None else detection_settings(policy, **settings)
            if name == "none":  # plain inference: the detector's own boxes
                from ..search.dense import PLAIN_SETTINGS

                chosen = {**chosen, **PLAIN_SETTINGS}
            wrapper = DetectionTTAWrapper(predictor, policy, max_detections=max_detections, max_batch=max_batch,
                                          device=device, amp=amp, **chosen)
            found = []
            for i in range(0, len(test), 32):
                found += [{"boxes": d.boxes, "scores": d.scores, "labels": d.labels}
                          for d in wrapper.run(test.images[i:i + 32]).detections]
            seconds = time.perf_counter() - started
            score = detection_map(found, test.targets())[objective]
            settings = chosen
        rows.append({"policy": name, "views": len(policy), "score": score, "ms_per_image": 1000 * seconds / len(test),
                     "settings": _settings_text(settings) if task == "detection" else ""})
    plain = rows[0]["score"]
    for row in rows:
        row["lift_points"] = 100 * (row["score"] - plain)
        row["time_ratio"] = row["ms_per_image"] / rows[0]["ms_per_image"] if rows[0]["ms_per_image"] else None
    return rows


def _settings_text(settings: dict[str, Any] | None) -> str:
    if not settings:
        return ""
    text = f"{settings['merge']} {settings['match']}>={settings['iou_thr']:g}"
    return text + (f" {settings['conf_type']}" if settings["merge"] == "wbf" else "")


def _table(summary: dict[str, Any]) -> str:
    from ..report.tables import format_table

    metric = summary["objective"]
    val = summary["validation"]
    lines = [f"validation ({val['n_images']} canvases): {metric} {val['baseline']:.4f} without TTA -> "
             f"{val['score']:.4f} with {', '.join(summary['views'])}"
             + (f" ({_settings_text(summary['settings'])})" if summary["settings"] else "")]
    if summary["test"]:
        columns = ["policy", "views", "score", "lift_points", "ms_per_image", "time_ratio"]
        if summary["task"] == "detection":
            columns.append("settings")
        lines.append(format_table(summary["test"], columns, floatfmt=".4f",
                                  title=f"test canvases ({metric}; not searched on)"))
    return "\n".join(lines)


def _markdown(summary: dict[str, Any]) -> str:
    from ..report.tables import markdown_table

    val = summary["validation"]
    parts = [f"# Dense policy search: {summary['task']}", "",
             f"Selected on {val['n_images']} validation canvases by {summary['objective']}: "
             f"**{', '.join(summary['views'])}**"
             + (f", merged by {_settings_text(summary['settings'])}" if summary["settings"] else "") + ".",
             f"Validation {summary['objective']}: {val['baseline']:.4f} without TTA, {val['score']:.4f} searched "
             f"({val['stop_reason']}).", "", "## Greedy path (validation)", "",
             markdown_table(val["path"], ["step", "added", "score"]), ""]
    if val["grid"]:
        grid = [{"views": ", ".join(r["views"]), "settings": _settings_text(r["settings"])
                 + (" (plain)" if r.get("plain") else ""), "score": r["score"]} for r in val["grid"]]
        parts += ["## Merge settings (validation)", "", markdown_table(grid, ["views", "settings", "score"]), ""]
    if summary["test"]:
        columns = ["policy", "views", "score", "lift_points", "ms_per_image", "time_ratio"]
        if summary["task"] == "detection":
            columns.append("settings")
        parts += ["## Test canvases (not searched on)", "", markdown_table(summary["test"], columns), ""]
    parts.append("```json\n" + json.dumps(summary["validation"]["policy"], indent=1) + "\n```\n")
    return "\n".join(parts)
