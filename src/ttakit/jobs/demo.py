"""The job behind ``ttakit demo``: the classic TTA experiment end to end on Fashion-MNIST."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, TTAKitError
from ..models import CheckpointMeta, load_checkpoint
from ..policy import Policy
from ..progress import note
from ..report.demo_md import _demo_lessons
from ..report.evaluate_md import _display_rows, _plot_rows
from ..report.plots import plot_policy_metrics, plot_reliability_diagram
from ..report.results import write_results
from ..report.tables import format_table, markdown_table
from ..search.calibration import MATRIX_CONTROL
from ..training.config import TrainConfig
from ._eval_data import _as_json, load_eval_data, weights_digest
from .evaluate import RESULTS_FORMAT, _evaluate_run, summarize_runs
from .search import _rows_record
from .train import train_run

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
    flip+shift augmentation, evaluate each with no TTA, hflip, d4, the policy built from its
    training augmentations and the policy searched for it (selected on validation images, scored
    on test), and report accuracy, calibration and lift with significance.

    ``quick`` trains on 12,000 images for 2 epochs and tests on 2,000 images. Trained models
    and searched policies are reused from ``out_dir`` when the demo is re-run.
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
        searched, search_info = _demo_search(model, meta, model_dir, out / "search" / model_name, quick, data_dir, max_batch, progress)
        control = _matrix_control(searched)
        if progress:
            print(f"evaluating {model_name} on {len(test)} test images", flush=True)
        policies = [*DEMO_POLICIES, *([control] if control is not None else []), searched]
        run, evaluations = _evaluate_run(model, meta, test, policies, max_batch, progress)
        summary = summarize_runs([run])
        per_model[model_name] = {
            "checkpoint": str(model_dir),
            "train_augmentations": meta.train_augmentations,
            "run": run,
            "search": search_info,
        }
        all_display += _display_rows(summary, model_name)
        all_plot += _plot_rows(summary, model_name)
        for e in evaluations:
            if e.name in ("none", "train-aug"):
                reliability[f"{model_name} / {e.name}"] = (e.probs, test.labels)
    lessons = _demo_lessons(per_model)
    seconds = time.perf_counter() - started
    return _write_demo(out, quick=quick, epochs=epochs, n_test=len(test), per_model=per_model, lessons=lessons,
                       seconds=seconds, display=all_display, plot=all_plot, reliability=reliability)


def _write_demo(out: Path, *, quick: bool, epochs: int, n_test: int, per_model: dict[str, Any], lessons: list[str],
                seconds: float, display: list, plot: list, reliability: dict[str, Any]) -> dict[str, Any]:
    """results.json, results.md and the two plots in ``out``; the results dict with the terminal table."""
    title = f"TTA on Fashion-MNIST: seed CNN, {epochs} epochs, {n_test} test images"
    table = format_table(display, title=title)
    markdown = "\n".join(
        [
            f"# {title}",
            "",
            markdown_table(display),
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
        "n_test_images": n_test,
        "models": per_model,
        "lessons": lessons,
        "seconds": seconds,
    }
    write_results(out, results, markdown)
    results["plots"] = [
        str(plot_policy_metrics(plot, out / "policy_metrics.png", title="Fashion-MNIST: lift over plain inference per TTA policy")),
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
            if _as_json(meta.extra.get("train_config")) == _as_json(asdict(config)) and same_split:
                note(f"reusing the model trained earlier in {model_dir}", enabled=progress)
                return model, meta
        except CheckpointError:
            pass
    note(f"training {model_dir.name} (augment: {', '.join(config.augment) or 'none'})", enabled=progress)
    result = train_run(
        "fashion-mnist", out_dir=model_dir, config=config, data_dir=data_dir, val_fraction=val_fraction, progress=progress
    )
    return result.model, result.meta


DEMO_SEARCH = {"val_images": 2000, "budget": 8}  # quick: a quarter of the images


def _demo_search(
    model: Any,
    meta: CheckpointMeta,
    model_dir: Path,
    report_dir: Path,
    quick: bool,
    data_dir: str | None,
    max_batch: int,
    progress: bool,
) -> tuple[Policy, dict[str, Any]]:
    """Search a policy for a demo model on validation images (successive halving on a subset of
    the held-out split, to keep the demo short), write its report, and return it named
    ``searched``; a policy searched earlier for the same weights is reused."""
    from ..report.search_report import write_search_report
    from ..search import search_policy

    path = model_dir / "policy.json"
    digest = weights_digest(meta)
    if path.exists():
        try:
            policy = Policy.load(path)
            if digest is not None and policy.meta.get("weights_sha256") == digest and policy.meta.get("quick") == quick:
                note(f"reusing the policy searched earlier in {path}", enabled=progress)
                return replace(policy, name="searched"), dict(policy.meta.get("demo_search") or {})
        except TTAKitError:
            pass  # unreadable or foreign: search again
    limit = DEMO_SEARCH["val_images"] // (4 if quick else 1)
    full_val = load_eval_data(meta, "fashion-mnist", "val", data_dir)
    val = full_val.head(limit)
    note(f"searching a policy for {model_dir.name} on {len(val)} validation images", enabled=progress)
    started = time.perf_counter()
    result = search_policy(
        model,
        val.images,
        val.labels,
        train_augmentations=meta.train_augmentations,
        budget=DEMO_SEARCH["budget"],
        max_batch=max_batch,
        progress=progress,
    )
    write_search_report(result, report_dir)
    cost = result.cost or {}
    fallback = result.fallback
    info = {
        "views": result.policy.view_names,
        "gate_threshold": result.policy.gate_threshold,
        "temperature": result.policy.temperature,
        "matrix_scaling": result.policy.matrix_scaling is not None,
        # The identity with the calibration the search fitted for it: the demo's no-TTA control.
        "control": None if fallback is None or fallback.matrix_scaling is None else
        {"temperature": fallback.temperature, "matrix_scaling": fallback.matrix_scaling},
        "validation_images": len(val),
        "pool_size": cost.get("pool_size"),
        "forward_passes": cost.get("forward_passes"),
        "full_caching_passes": cost.get("full_caching_passes"),
        "seconds": time.perf_counter() - started,
        "report": str(report_dir / "search.md"),
    }
    # the rows past the first `limit` were never searched: conformal calibration may use them
    rows = _rows_record(full_val, "val", range(len(val)), 0.0)
    policy = replace(result.policy, name="searched", meta={**result.policy.meta, "weights_sha256": digest, "quick": quick,
                                                           "checkpoint": str(model_dir), "validation_rows": rows,
                                                           "demo_search": info})
    policy.save(path)
    return policy, info


def _matrix_control(searched: Policy) -> Policy | None:
    """The identity with the temperature and matrix scaling the search fitted for it, when the
    searched policy holds a matrix: what the calibration gives without TTA."""
    control = (searched.meta.get("demo_search") or {}).get("control")
    if searched.matrix_scaling is None or not control:
        return None
    return replace(Policy.identity(), name=MATRIX_CONTROL, temperature=control["temperature"],
                   matrix_scaling=control["matrix_scaling"])
