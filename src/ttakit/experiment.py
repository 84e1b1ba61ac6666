"""The classic TTA experiment: train a baseline, evaluate it with and without TTA over repeated
runs, and report the lift honestly. Every CLI command is one call into this module.

Long jobs write each finished piece (a checkpoint, one repeat's results) atomically as soon as
it exists and reuse it when re-run, so an interrupted run loses only the piece in progress.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from ._io import atomic_write_json, read_json
from .data import ImageDataset, load_dataset, train_val_split
from .errors import CheckpointError, InvalidInputError
from .evaluate import BASELINE, PolicyEvaluation, evaluate_policies, resolve_policies
from .metrics import mean_std
from .models import CheckpointMeta, check_compatible, load_checkpoint, save_checkpoint
from .report import (
    format_mean_std,
    format_table,
    markdown_table,
    plot_policy_metrics,
    plot_reliability_diagram,
    write_results,
)
from .train import TrainConfig, TrainResult, train_model

__all__ = [
    "train_run",
    "load_or_train",
    "load_eval_data",
    "evaluate_checkpoint",
    "search_checkpoint",
    "run_demo",
    "summarize_runs",
]

RESULTS_FORMAT = "ttakit-results"
SPLIT_SEED = 0  # the validation split is the same for every training seed, so searches compare


def train_run(
    data: str = "fashion-mnist",
    *,
    out_dir: str | os.PathLike,
    config: TrainConfig | None = None,
    arch: str = "seed-cnn",
    data_dir: str | None = None,
    val_fraction: float = 0.1,
    progress: bool = True,
) -> TrainResult:
    """Train ``arch`` on the training split of ``data`` minus a held-out validation split
    (``val_fraction``, fixed seed) and save the checkpoint in ``out_dir``.

    The checkpoint records where its data came from, so ``evaluate --repeats`` can retrain
    the same recipe with other seeds and ``search`` can find the same validation split.
    """
    config = config or TrainConfig()
    full = load_dataset(data, split="train", data_dir=data_dir)
    train, val = train_val_split(full, val_fraction, seed=SPLIT_SEED) if val_fraction > 0 else (full, None)
    result = train_model(train, config, arch=arch, val_ds=val, progress=progress)
    result.meta.extra["data"] = {"spec": data, "data_dir": data_dir, "val_fraction": val_fraction, "split_seed": SPLIT_SEED}
    result.meta.dataset = data
    result.checkpoint_dir = save_checkpoint(out_dir, result.model, result.meta)
    return result


def _data_recipe(meta: CheckpointMeta) -> dict[str, Any]:
    return dict(meta.extra.get("data") or {"spec": meta.dataset or "fashion-mnist", "val_fraction": 0.0})


def load_eval_data(
    meta: CheckpointMeta,
    data: str | None = None,
    split: str = "test",
    data_dir: str | None = None,
    limit: int | None = None,
) -> ImageDataset:
    """The data a checkpoint is evaluated on: ``split`` of ``data`` (default: the checkpoint's own
    data set); ``split="val"`` is the validation split held out at training time."""
    recipe = _data_recipe(meta)
    spec = data or recipe.get("spec") or "fashion-mnist"
    data_dir = data_dir or recipe.get("data_dir")
    if split == "val":
        fraction = float(recipe.get("val_fraction") or 0.0)
        if fraction <= 0:
            raise InvalidInputError(
                "split 'val' needs a checkpoint trained with a held-out validation split (ttakit train --val-fraction)"
            )
        full = load_dataset(spec, split="train", data_dir=data_dir)
        dataset = train_val_split(full, fraction, seed=int(recipe.get("split_seed", SPLIT_SEED)))[1]
    else:
        dataset = load_dataset(spec, split=split, data_dir=data_dir)
    dataset = dataset.head(limit)
    check_compatible(meta, dataset.channels, dataset.image_size)
    if list(dataset.classes) != list(meta.classes) and len(dataset.classes) != len(meta.classes):
        raise CheckpointError(
            f"checkpoint {meta.source or ''} predicts {len(meta.classes)} classes but the data has "
            f"{len(dataset.classes)}; evaluate it on the data set it was trained on ({meta.dataset})"
        )
    return dataset


def _retrain(meta: CheckpointMeta, seed: int, out_dir: Path, progress: bool) -> tuple[Any, CheckpointMeta]:
    """Train the checkpoint's recipe again with another seed (reused if already on disk)."""
    if (out_dir / "checkpoint.json").exists():
        try:
            return load_checkpoint(out_dir)
        except CheckpointError:
            pass  # a half-written or foreign folder: train again
    saved = dict(meta.extra.get("train_config") or {})
    if not saved:
        raise CheckpointError(
            f"checkpoint {meta.source} does not record its training configuration, so --repeats cannot retrain it"
        )
    saved["augment"] = tuple(saved.get("augment") or ())
    config = replace(TrainConfig(**saved), seed=seed)
    recipe = _data_recipe(meta)
    result = train_run(
        recipe.get("spec", "fashion-mnist"),
        out_dir=out_dir,
        config=config,
        arch=meta.arch,
        data_dir=recipe.get("data_dir"),
        val_fraction=float(recipe.get("val_fraction") or 0.0),
        progress=progress,
    )
    return result.model, result.meta


def summarize_runs(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation over runs of each policy's metrics and lift."""
    names: list[str] = []
    for run in runs:
        for row in run["rows"]:
            if row["policy"] not in names:
                names.append(row["policy"])
    summary = []
    for name in names:
        rows = [row for run in runs for row in run["rows"] if row["policy"] == name]
        entry: dict[str, Any] = {"policy": name, "views": rows[0]["views"], "runs": len(rows)}
        entry["passes_per_image"] = sum(r["passes_per_image"] for r in rows) / len(rows)
        for key in ("accuracy", "nll", "ece", "brier", "lift_accuracy", "lift_nll", "ms_per_image"):
            values = [r[key] for r in rows if r.get(key) is not None]
            if values:
                entry[f"{key}_mean"], entry[f"{key}_std"] = mean_std(values)
        p_values = [r["lift_mcnemar_p"] for r in rows if r.get("lift_mcnemar_p") is not None]
        if p_values:
            entry["significant_runs"] = sum(p < 0.05 for p in p_values)
            entry["mcnemar_p_max"] = max(p_values)
            entry["mcnemar_p_min"] = min(p_values)
        summary.append(entry)
    return summary


def _display_rows(summary: Sequence[dict[str, Any]], model: str | None = None) -> list[dict[str, Any]]:
    rows = []
    for s in summary:
        row: dict[str, Any] = {}
        if model is not None:
            row["model"] = model
        row["policy"] = s["policy"]
        row["views"] = s["views"]
        row["accuracy %"] = format_mean_std(s["accuracy_mean"], s["accuracy_std"] if s["runs"] > 1 else None, scale=100)
        if "lift_accuracy_mean" in s:
            row["lift (pts)"] = format_mean_std(
                s["lift_accuracy_mean"], s["lift_accuracy_std"] if s["runs"] > 1 else None, fmt="+.2f", scale=100
            )
            if s["runs"] == 1:
                row["p (McNemar)"] = _format_p(s["mcnemar_p_min"])
            else:
                row["p (McNemar)"] = f"{s['significant_runs']}/{s['runs']} runs < 0.05"
        else:
            row["lift (pts)"] = "baseline"
            row["p (McNemar)"] = "-"
        row["NLL"] = format_mean_std(s["nll_mean"], s["nll_std"] if s["runs"] > 1 else None, fmt=".4f")
        row["ECE"] = f"{s['ece_mean']:.4f}"
        row["Brier"] = f"{s['brier_mean']:.4f}"
        row["passes/img"] = f"{s['passes_per_image']:.2f}"
        row["ms/img"] = f"{s['ms_per_image_mean']:.3f}"
        rows.append(row)
    return rows


def _format_p(p: float) -> str:
    # Exact tests on 10,000 images underflow to 0.0; say how small instead of printing 0.
    return "< 1e-300" if p < 1e-300 else f"{p:.3g}"


def _plot_rows(summary: Sequence[dict[str, Any]], model: str | None = None) -> list[dict[str, Any]]:
    rows = []
    for s in summary:
        row = {"name": s["policy"], "accuracy": s["accuracy_mean"], "nll": s["nll_mean"]}
        if s["runs"] > 1:
            row["accuracy_std"], row["nll_std"] = s["accuracy_std"], s["nll_std"]
        if model is not None:
            row["model"] = model
        rows.append(row)
    return rows


def _evaluate_run(model, meta, dataset, policy_specs, max_batch, progress) -> tuple[dict[str, Any], list[PolicyEvaluation]]:
    policies = resolve_policies(policy_specs, meta)
    evaluations = evaluate_policies(model, dataset, policies, max_batch=max_batch, progress=progress)
    run = {
        "seed": meta.seed,
        "checkpoint": meta.source,
        "policies": {p.name: p.view_names for p in policies},
        "rows": [e.row() for e in evaluations],
    }
    return run, evaluations


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    *,
    policies: Sequence[str] = ("none", "hflip"),
    data: str | None = None,
    split: str = "test",
    data_dir: str | None = None,
    limit: int | None = None,
    repeats: int = 1,
    max_batch: int = 256,
    out_dir: str | os.PathLike | None = None,
    plots: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate a checkpoint with each policy; with ``repeats > 1`` also retrain its recipe with
    ``repeats - 1`` further seeds and report mean ± std over the runs.

    Writes ``results.json``, ``results.md`` and PNG plots to ``out_dir`` (default
    ``<checkpoint>/eval``). Each run's results are written as soon as it finishes
    (``runs/seed-<s>.json``) and reused when the same evaluation is re-run.
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise InvalidInputError(f"repeats must be a positive integer, got {repeats!r}")
    checkpoint = Path(checkpoint)
    model, meta = load_checkpoint(checkpoint)
    out = Path(out_dir) if out_dir is not None else (checkpoint if checkpoint.is_dir() else checkpoint.parent) / "eval"
    dataset = load_eval_data(meta, data, split, data_dir, limit)
    key = {"policies": list(policies), "data": data or _data_recipe(meta).get("spec"), "split": split, "n_images": len(dataset)}

    runs: list[dict[str, Any]] = []
    first_evaluations: list[PolicyEvaluation] = []
    for r in range(repeats):
        seed = meta.seed + r
        run_path = out / "runs" / f"seed-{seed}.json"
        if run_path.exists():
            try:
                cached = read_json(run_path)
                if cached.get("key") == key and r > 0:
                    runs.append(cached)
                    continue
            except (OSError, ValueError):
                pass  # unreadable: compute it again
        if r == 0:
            run_model, run_meta = model, meta
        else:
            if progress:
                print(f"repeat {r + 1}/{repeats}: training seed {seed}", flush=True)
            run_model, run_meta = _retrain(meta, seed, out / "repeats" / f"seed-{seed}", progress)
        run, evaluations = _evaluate_run(run_model, run_meta, dataset, policies, max_batch, progress)
        run["key"] = key
        atomic_write_json(run_path, run)
        runs.append(run)
        if r == 0:
            first_evaluations = evaluations

    summary = summarize_runs(runs)
    table = format_table(_display_rows(summary), title=f"{checkpoint} on {key['data']}/{split} ({len(dataset)} images, {repeats} run(s))")
    results = {
        "format": RESULTS_FORMAT,
        "format_version": 1,
        "checkpoint": str(checkpoint),
        "data": key["data"],
        "split": split,
        "n_images": len(dataset),
        "repeats": repeats,
        "summary": summary,
        "runs": runs,
    }
    markdown = "\n".join(
        [
            f"# TTA evaluation of `{checkpoint}`",
            "",
            f"Data: {key['data']} / {split}, {len(dataset)} images; {repeats} run(s) (seeds {meta.seed}..{meta.seed + repeats - 1}).",
            "Lift is accuracy minus plain inference on the same images; p is McNemar's paired test.",
            "",
            markdown_table(_display_rows(summary)),
        ]
    )
    write_results(out, results, markdown)
    if plots:
        results["plots"] = _write_plots(out, _plot_rows(summary), first_evaluations, dataset)
    results["table"] = table
    results["out_dir"] = str(out)
    return results


def _write_plots(out: Path, plot_rows, evaluations: Sequence[PolicyEvaluation], dataset: ImageDataset) -> list[str]:
    paths = [str(plot_policy_metrics(plot_rows, out / "policy_metrics.png"))]
    curves = {e.name: (e.probs, dataset.labels) for e in evaluations if e.probs is not None}
    if curves:
        paths.append(str(plot_reliability_diagram(curves, out / "reliability.png")))
    return paths


# --------------------------------------------------------------------------- the demo

DEMO_POLICIES = ("none", "hflip", "d4", "train-aug")
DEMO_MODELS = {"no-aug": (), "flip+shift": ("flip", "shift")}


def run_demo(
    out_dir: str | os.PathLike = "runs/demo",
    *,
    quick: bool = False,
    data_dir: str | None = None,
    epochs: int | None = None,
    max_batch: int = 256,
    progress: bool = True,
) -> dict[str, Any]:
    """The reference experiment on Fashion-MNIST: train the seed CNN without and with train-time
    flip+shift augmentation, evaluate each with no TTA, hflip, d4 and the policy built from its
    training augmentations, and report accuracy, calibration and lift with significance.

    ``quick`` trains on 12,000 images for 2 epochs and tests on 2,000 images. Trained models
    are reused from ``out_dir`` when the demo is re-run.
    """
    out = Path(out_dir)
    started = time.perf_counter()
    train_limit, test_limit = (12_000, 2_000) if quick else (None, None)
    epochs = epochs or (2 if quick else 3)
    all_display, all_plot, per_model = [], [], {}
    reliability: dict[str, Any] = {}
    test = None
    for model_name, augment in DEMO_MODELS.items():
        config = TrainConfig(epochs=epochs, augment=augment, limit=train_limit, seed=0)
        model_dir = out / "models" / model_name
        model, meta = load_or_train(model_dir, config, data_dir=data_dir, progress=progress)
        if test is None:
            test = load_eval_data(meta, "fashion-mnist", "test", data_dir, test_limit)
        if progress:
            print(f"evaluating {model_name} on {len(test)} test images", flush=True)
        run, evaluations = _evaluate_run(model, meta, test, DEMO_POLICIES, max_batch, progress)
        summary = summarize_runs([run])
        per_model[model_name] = {"checkpoint": str(model_dir), "train_augmentations": meta.train_augmentations, "run": run}
        all_display += _display_rows(summary, model_name)
        all_plot += _plot_rows(summary, model_name)
        for e in evaluations:
            if e.name in ("none", "train-aug"):
                reliability[f"{model_name} / {e.name}"] = (e.probs, test.labels)
    lessons = _demo_lessons(per_model)
    seconds = time.perf_counter() - started
    title = f"TTA on Fashion-MNIST: seed CNN, {epochs} epochs, {len(test)} test images"
    table = format_table(all_display, title=title)
    markdown = "\n".join(
        [
            f"# {title}",
            "",
            markdown_table(all_display),
            "",
            "## What it shows",
            "",
            *[f"- {line}" for line in lessons],
            "",
            f"Total time: {seconds:.0f} s.",
        ]
    )
    results = {
        "format": RESULTS_FORMAT,
        "format_version": 1,
        "experiment": "demo",
        "quick": quick,
        "epochs": epochs,
        "n_test_images": len(test),
        "models": per_model,
        "lessons": lessons,
        "seconds": seconds,
    }
    write_results(out, results, markdown)
    results["plots"] = [
        str(plot_policy_metrics(all_plot, out / "policy_metrics.png", title="Fashion-MNIST: accuracy and NLL per TTA policy")),
        str(plot_reliability_diagram(reliability, out / "reliability.png")),
    ]
    results["table"] = table
    results["out_dir"] = str(out)
    return results


def load_or_train(
    model_dir: str | os.PathLike,
    config: TrainConfig,
    *,
    data_dir: str | None = None,
    val_fraction: float = 0.1,
    progress: bool = True,
):
    """The seed CNN trained on Fashion-MNIST with ``config``: loaded from ``model_dir`` when a
    checkpoint of the same recipe is there, else trained and saved there. Returns (model, meta)."""
    model_dir = Path(model_dir)
    if (model_dir / "checkpoint.json").exists():
        try:
            model, meta = load_checkpoint(model_dir)
            same_split = (meta.extra.get("data") or {}).get("val_fraction") == val_fraction
            if meta.extra.get("train_config") == asdict(config) and same_split:
                if progress:
                    print(f"reusing the model trained earlier in {model_dir}", flush=True)
                return model, meta
        except CheckpointError:
            pass
    if progress:
        print(f"training {model_dir.name} (augment: {', '.join(config.augment) or 'none'})", flush=True)
    result = train_run(
        "fashion-mnist", out_dir=model_dir, config=config, data_dir=data_dir, val_fraction=val_fraction, progress=progress
    )
    return result.model, result.meta


def _demo_lessons(per_model: dict[str, Any]) -> list[str]:
    """Plain-language findings read off the measured rows (never hard-coded)."""
    lessons = []
    for model_name, info in per_model.items():
        rows = {r["policy"]: r for r in info["run"]["rows"]}
        plain = rows[BASELINE]["accuracy"]
        for policy in ("hflip", "d4", "train-aug"):
            row = rows.get(policy)
            if row is None:
                continue
            if row["views"] == 1:
                lessons.append(
                    f"{model_name}: {policy} is plain inference: the model was trained without geometric "
                    "augmentations, so the policy aligned with its training has the identity view alone."
                )
                continue
            lift = 100 * row["lift_accuracy"]
            verdict = "significant" if row["lift_mcnemar_p"] < 0.05 else "not significant"
            direction = "raised" if lift > 0 else "lowered" if lift < 0 else "left"
            lessons.append(
                f"{model_name}: {policy} TTA ({row['views']} views) {direction} accuracy from {100 * plain:.2f}% "
                f"to {100 * row['accuracy']:.2f}% ({lift:+.2f} points, McNemar p={_format_p(row['lift_mcnemar_p'])}, {verdict}); "
                f"NLL {rows[BASELINE]['nll']:.4f} -> {row['nll']:.4f}."
            )
    lessons.append(
        "TTA helps when its views match what the model learned to be invariant to; views it never saw "
        "in training (flips, rotations for a model trained without them) can cost accuracy. Search a policy "
        "on held-out data (ttakit search) rather than assuming one."
    )
    return lessons


# --------------------------------------------------------------------------- policy search


def search_checkpoint(
    checkpoint: str | os.PathLike,
    *,
    out: str | os.PathLike | None = None,
    report_dir: str | os.PathLike | None = None,
    data: str | None = None,
    split: str = "val",
    data_dir: str | None = None,
    limit: int | None = None,
    budget: int = 8,
    objective: str = "nll",
    learn_weights: bool = True,
    gate: bool = True,
    max_batch: int = 256,
    progress: bool = True,
) -> dict[str, Any]:
    """Search a TTA policy for a checkpoint on its held-out validation split (never the test
    split) and save it as JSON that ``evaluate`` accepts.

    The candidate pool is :func:`ttakit.search.default_pool` plus draws of the checkpoint's
    recorded training augmentations. Writes the policy to ``out`` (default
    ``<checkpoint>/policy.json``) and the report (``search.md``, ``search.json``, plots) to
    ``report_dir`` (default ``<checkpoint>/search``).
    """
    from .search import search_policy, write_search_report  # the search stack is heavy; load on use

    checkpoint = Path(checkpoint)
    folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
    model, meta = load_checkpoint(checkpoint)
    dataset = load_eval_data(meta, data, split, data_dir, limit)
    result = search_policy(
        model,
        dataset,
        train_augmentations=meta.train_augmentations,
        budget=budget,
        objective=objective,
        learn_weights=learn_weights,
        gate=gate,
        max_batch=max_batch,
        progress=progress,
    )
    policy_path = Path(out) if out is not None else folder / "policy.json"
    reports = write_search_report(result, Path(report_dir) if report_dir is not None else folder / "search")
    result.policy.name = "searched"
    result.policy.save(policy_path)
    table = format_table(result.rows(), title=f"Policies on {len(dataset)} validation images ({split} split)")
    return {
        "policy": str(policy_path),
        "views": result.policy.view_names,
        "weights": result.policy.weights,
        "temperature": result.policy.temperature,
        "gate_threshold": result.policy.gate_threshold,
        "search_seconds": result.search_seconds,
        "reports": {k: str(v) for k, v in reports.items()},
        "table": table,
    }
