"""The classic TTA experiment: train a baseline, evaluate it with and without TTA over repeated
runs, and report the lift honestly. Every CLI command is one call into this module.

Long jobs write each finished piece (a checkpoint, one repeat's results) atomically as soon as
it exists and reuse it when re-run, so an interrupted run loses only the piece in progress.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from ._io import atomic_write_json, read_json
from .conformal import conformal_split, evaluate_extras
from .data import ImageDataset, dataset_sha256, load_split, make_splits
from .data.splits import DEFAULT_TEST_FRACTION, SPLIT_SEED
from .errors import CheckpointError, InvalidInputError, TTAKitError
from .evaluate import BASELINE, PolicyEvaluation, evaluate_policies, resolve_policy
from .metrics import mean_std
from .models import CheckpointMeta, check_compatible, load_checkpoint, save_checkpoint
from .models.checkpoint import weights_sha256
from .policy import Policy, check_policy_model, fitted_parameters
from .predictors import prepare_model
from .progress import note
from .report import (
    format_mean_std,
    format_table,
    markdown_table,
    plot_policy_metrics,
    plot_reliability_diagram,
    plural,
    search_display_rows,
    write_results,
)
from .search.calibration import MATRIX_CONTROL
from .train import TrainConfig, TrainResult, fit_image_size, train_model

__all__ = [
    "train_run",
    "load_or_train",
    "load_eval_data",
    "evaluate_checkpoint",
    "search_checkpoint",
    "run_demo",
    "summarize_runs",
    "SPLIT_SEED",
]

RESULTS_FORMAT = "ttakit-results"
# SPLIT_SEED (imported above) lives in ttakit.data.splits; it stays importable from here.


def train_run(
    data: str = "fashion-mnist",
    *,
    out_dir: str | os.PathLike,
    config: TrainConfig | None = None,
    arch: str = "seed-cnn",
    data_dir: str | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    progress: bool = True,
    image_size: int | tuple[int, int] | None = None,
) -> TrainResult:
    """Train ``arch`` on the training split of ``data`` and save the checkpoint in ``out_dir``.

    ``image_size`` (``--image-size``): train at this ``(H, W)`` (an int: square), resizing every
    split; recorded in the split recipe, so evaluate and search resize the same way. Without it
    the data's own size is kept. ``result.size_note`` says which size was chosen and why.

    Held out from training, with a fixed seed and stratified by class: a validation split
    (``val_fraction`` of the non-test images, for search) and, when the data has no test split
    of its own (a flat image folder, an ``.npz`` file), a test split (``test_fraction`` of all
    images). The checkpoint records the recipe exactly (seed, fractions, content hash, held-out
    rows and files; see :mod:`ttakit.data.splits`), so ``evaluate`` scores only held-out images,
    ``search`` finds the same validation split, and ``evaluate --repeats`` retrains the same recipe.
    """
    config = config or TrainConfig()
    splits = make_splits(data, data_dir, val_fraction=val_fraction, test_fraction=test_fraction, seed=SPLIT_SEED)
    splits, size_note = fit_image_size(splits, image_size, data)
    if progress:
        note(size_note)
    result = train_model(splits.train, config, arch=arch, val_ds=splits.val, progress=progress)
    result.size_note = size_note
    result.meta.extra["data"] = splits.recipe
    result.meta.dataset = data
    result.checkpoint_dir = save_checkpoint(out_dir, result.model, result.meta)
    result.meta.source = str(result.checkpoint_dir)
    return result


def _data_recipe(meta: CheckpointMeta) -> dict[str, Any]:
    recipe = meta.extra.get("data") or {"spec": meta.dataset or "fashion-mnist", "val_fraction": 0.0}
    if not isinstance(recipe, dict):
        raise CheckpointError(
            f"checkpoint {meta.source or meta.arch}: checkpoint.json field extra.data must be an object "
            f"(the data split recipe), got {type(recipe).__name__}"
        )
    return dict(recipe)


def load_eval_data(
    meta: CheckpointMeta,
    data: str | None = None,
    split: str = "test",
    data_dir: str | None = None,
    limit: int | None = None,
) -> ImageDataset:
    """The held-out data a checkpoint is scored on: ``split`` of ``data`` (default: the
    checkpoint's own data), rebuilt from the split recipe the checkpoint recorded.

    ``split="test"``: the data's own test split, or the test split carved at training time;
    ``"val"``: the validation split held out at training time; ``"train"``: the images the
    model trained on (asked for by name only). Checks the data matches the checkpoint: channels,
    image size, and class names in the same order.

    This is the one function every command that scores a checkpoint (evaluate, search, audit,
    ensemble) uses to get its data, so none of them can score training images by accident.
    """
    recipe = _data_recipe(meta)
    dataset = load_split(recipe, split, data=data, data_dir=data_dir).head(limit)
    if recipe.get("image_size"):  # trained with --image-size: score at that size too
        from .data.registry import resize_dataset

        dataset = resize_dataset(dataset, tuple(int(v) for v in recipe["image_size"]))
    check_compatible(meta, dataset.channels, dataset.image_size)
    if list(dataset.classes) != list(meta.classes):
        raise CheckpointError(
            f"checkpoint {meta.source or meta.arch} was trained on classes {list(meta.classes)} "
            f"but the data has classes {list(dataset.classes)} (names and order must match)"
        )
    return dataset


def _train_config_of(meta: CheckpointMeta) -> TrainConfig:
    saved = meta.extra.get("train_config") or {}
    if not isinstance(saved, dict) or not saved:
        raise CheckpointError(
            f"checkpoint {meta.source} does not record its training configuration as an object, "
            "so --repeats cannot retrain it"
        )
    try:
        saved = {**saved, "augment": tuple(saved.get("augment") or ())}
        return TrainConfig(**saved)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {meta.source}: its recorded train_config is not valid ({exc})") from exc


def _as_json(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), for comparing recipes."""
    return json.loads(json.dumps(value, default=str))


def _same_recipe(found: CheckpointMeta, expected: CheckpointMeta, config: TrainConfig) -> str | None:
    """None when ``found`` was trained with ``expected``'s recipe and ``config``, else what differs."""
    if found.arch != expected.arch or found.arch_kwargs != expected.arch_kwargs:
        return f"architecture {found.arch} {found.arch_kwargs} instead of {expected.arch} {expected.arch_kwargs}"
    if _as_json(found.extra.get("train_config")) != _as_json(asdict(config)):
        return "another training configuration"
    if _as_json(_data_recipe(found)) != _as_json(_data_recipe(expected)):
        return "another data recipe (data, splits or content)"
    return None


def _retrain(meta: CheckpointMeta, seed: int, out_dir: Path, progress: bool) -> tuple[Any, CheckpointMeta]:
    """Train the checkpoint's recipe again with another seed; a checkpoint already in
    ``out_dir`` is reused only when it was trained with exactly that recipe and seed."""
    config = replace(_train_config_of(meta), seed=seed)
    if (out_dir / "checkpoint.json").exists():
        try:
            model, found = load_checkpoint(out_dir)
            why = _same_recipe(found, meta, config)
            if why is None:
                return model, found
            note(f"retraining {out_dir}: the checkpoint there has {why}", enabled=progress)
        except CheckpointError:
            pass  # a half-written or foreign folder: train again
    recipe = _data_recipe(meta)
    result = train_run(
        recipe.get("spec", "fashion-mnist"),
        out_dir=out_dir,
        config=config,
        arch=meta.arch,
        data_dir=recipe.get("data_dir"),
        val_fraction=float(recipe.get("val_fraction") or 0.0),
        test_fraction=float(recipe.get("test_fraction") or DEFAULT_TEST_FRACTION),
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
        for key in ("accuracy", "nll", "ece", "brier", "lift_accuracy", "lift_nll", "lift_ci_low", "lift_ci_high", "ms_per_image"):
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
            row["95% CI (pts)"] = _format_ci(s)
            if s["runs"] == 1:
                row["p (McNemar)"] = _format_p(s["mcnemar_p_min"])
            else:
                row["p (McNemar)"] = f"{s['significant_runs']}/{s['runs']} runs < 0.05"
        else:
            row["lift (pts)"] = "baseline"
            row["95% CI (pts)"] = "-"
            row["p (McNemar)"] = "-"
        row["NLL"] = format_mean_std(s["nll_mean"], s["nll_std"] if s["runs"] > 1 else None, fmt=".4f")
        row["ECE"] = f"{s['ece_mean']:.4f}"
        row["Brier"] = f"{s['brier_mean']:.4f}"
        row["passes/img"] = f"{s['passes_per_image']:.2f}"
        row["ms/img"] = f"{s['ms_per_image_mean']:.3f}"
        rows.append(row)
    return rows


def _format_ci(s: dict[str, Any]) -> str:
    """The paired bootstrap 95% interval of the accuracy lift, in points (mean bounds over runs)."""
    if "lift_ci_low_mean" not in s:
        return "-"
    return f"[{100 * s['lift_ci_low_mean']:+.2f}, {100 * s['lift_ci_high_mean']:+.2f}]"


def _format_p(p: float) -> str:
    # Exact tests on 10,000 images underflow to 0.0; say how small instead of printing 0.
    return "< 1e-300" if p < 1e-300 else f"{p:.3g}"


def _plot_rows(summary: Sequence[dict[str, Any]], model: str | None = None) -> list[dict[str, Any]]:
    rows = []
    for s in summary:
        row = {"name": s["policy"], "accuracy": s["accuracy_mean"], "nll": s["nll_mean"]}
        if s["runs"] > 1:
            row["accuracy_std"], row["nll_std"] = s["accuracy_std"], s["nll_std"]
        if "lift_accuracy_mean" in s:
            row["lift"], row["lift_nll"] = s["lift_accuracy_mean"], s.get("lift_nll_mean")
            row["lift_ci_low"], row["lift_ci_high"] = s.get("lift_ci_low_mean"), s.get("lift_ci_high_mean")
        if model is not None:
            row["model"] = model
        rows.append(row)
    return rows


def _evaluate_run(model, meta, dataset, policy_specs, max_batch, progress,
                  uncertainty: bool = False) -> tuple[dict[str, Any], list[PolicyEvaluation]]:
    policies = resolve_named_policies(policy_specs, meta)
    check_input_sizes(model, meta, policies)
    # uncertainty: the same engine run returns it (the uncertainty report re-runs nothing)
    evaluations = evaluate_policies(model, dataset, policies, max_batch=max_batch, progress=progress,
                                    return_uncertainty=uncertainty)
    run = {
        "seed": meta.seed,
        "checkpoint": meta.source,
        "policies": {p.name: p.view_names for p in policies},
        "rows": [e.row() for e in evaluations],
    }
    return run, evaluations


def _flat_specs(specs: Sequence[str | Policy]) -> list[str | Policy]:
    if isinstance(specs, (str, Policy)):
        specs = [specs]
    flat: list[str | Policy] = []
    for spec in specs:
        if isinstance(spec, str):
            flat.extend(s.strip() for s in spec.split(",") if s.strip())
        elif isinstance(spec, Policy):
            flat.append(spec)
        else:
            raise InvalidInputError(
                f"policies must be names, policy .json paths or Policy objects, got {type(spec).__name__}: {spec!r}"
            )
    return flat


def _is_plain(policy: Policy) -> bool:
    return (
        len(policy) == 1
        and policy.views[0].is_identity
        and policy.temperature is None
        and policy.matrix_scaling is None
        and policy.gate_threshold is None
    )


def policy_fingerprint(policy: Policy) -> dict[str, Any]:
    """What a policy computes, as JSON: name, views, merge mode, weights, temperature, matrix
    scaling, gate (not its provenance ``meta`` nor the ttakit version). Equal fingerprints give
    equal results."""
    data = policy.to_json()
    keys = ("name", "merge_mode", "weights", "temperature", "matrix_scaling", "gate_threshold", "views")
    return {k: data[k] for k in keys}


def resolve_named_policies(specs: Sequence[str | Policy], meta: CheckpointMeta | None = None) -> list[Policy]:
    """Resolve policy specs (names, ``train-aug``, ``.json`` paths, :class:`Policy` objects;
    comma-separated strings are split) into policies with distinct names.

    A policy file whose name clashes with another policy, or that calls itself ``none`` without
    being plain inference, is named by its file stem instead. A clash that remains is refused,
    naming both sources: two different policies are never merged or dropped. The same spec
    given twice is evaluated once.

    Raises:
        InvalidInputError: no policy given, or two different policies with the same name.
    """
    flat = _flat_specs(specs)
    if not flat:
        raise InvalidInputError(f"give at least one policy, got {list(specs)!r}")
    resolved: list[tuple[Policy, str, bool]] = []  # (policy, where it came from, from a file)
    for spec in flat:
        policy = resolve_policy(spec, meta)
        from_file = isinstance(spec, str) and (spec.endswith(".json") or os.path.sep in spec)
        source = spec if isinstance(spec, str) else f"Policy object {policy.name!r}"
        resolved.append((replace(policy) if from_file else policy, source, from_file))
    # pass 1: a file whose name another, different policy also uses (or that calls itself
    # "none" without being plain inference) is named by its file stem
    by_name: dict[str, set[str]] = {}
    for policy, _, _ in resolved:
        by_name.setdefault(policy.name, set()).add(json.dumps(policy_fingerprint(policy), sort_keys=True))
    renamed: dict[str, str] = {}  # source -> the name its file gave
    for policy, source, from_file in resolved:
        if from_file and (len(by_name[policy.name]) > 1 or (policy.name == BASELINE and not _is_plain(policy))):
            renamed[source] = policy.name
            policy.name = Path(source).stem
    # pass 2: what still clashes is refused, naming both sources
    policies: list[Policy] = []
    sources: dict[str, str] = {}
    fingerprints: dict[str, dict[str, Any]] = {}
    for policy, source, _ in resolved:
        fingerprint = policy_fingerprint(policy)
        if policy.name in fingerprints:
            if fingerprints[policy.name] == fingerprint:
                continue  # the very same policy twice: one row
            first = sources[policy.name]
            named = {renamed[x] for x in (first, source) if x in renamed}
            via = f" (named {', '.join(repr(n) for n in sorted(named))} inside, so named by file stem)" if named else ""
            raise InvalidInputError(
                f"policies {first!r} and {source!r} both resolve to the name {policy.name!r}{via} "
                "but differ; give them distinct names (the \"name\" field, or distinct file names)"
            )
        if policy.name == BASELINE and not _is_plain(policy):
            raise InvalidInputError(
                f"policy {source!r} is named {BASELINE!r}, which is reserved for plain inference "
                f"(the identity view alone), but has views {policy.view_names}; rename it"
            )
        fingerprints[policy.name] = fingerprint
        sources[policy.name] = source
        policies.append(policy)
    return policies


def _probe_size(model: torch.nn.Module, channels: int, size: tuple[int, int]) -> bool:
    """Whether ``model`` accepts one ``channels`` x ``size`` image (a forward pass of one blank image)."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        with torch.inference_mode():
            model.eval()
            model(torch.zeros(1, channels, *size, device=device))
    except (RuntimeError, ValueError):
        return False
    return True


def _is_fixed_size(arch: str) -> bool:
    try:
        from .models.registry import is_fixed_size
    except ImportError:  # a registry without size flags: probe every size instead
        return False
    try:
        return bool(is_fixed_size(arch))
    except TTAKitError:
        return False


def check_input_sizes(model: torch.nn.Module, meta: CheckpointMeta, policies: Sequence[Policy]) -> None:
    """Refuse, before any inference, a view that changes the image size when the model takes
    only the size it was trained on (e.g. ``multiscale`` on ``seed-cnn``, whose classifier is a
    fixed-size linear layer). Models that pool globally accept other sizes and pass.

    Raises:
        InvalidInputError: naming the policy, the view, the size it produces and the size the
            model takes.
    """
    channels = int(meta.in_channels)
    size = (int(meta.image_size[0]), int(meta.image_size[1]))
    blank = torch.zeros(1, channels, *size)
    fixed = _is_fixed_size(meta.arch)
    accepted: dict[tuple[int, int], bool] = {size: True}
    for policy in policies:
        for view in policy.views:
            try:
                out = tuple(int(d) for d in view.transformer().augment_image(blank).shape[-2:])
            except (RuntimeError, ValueError):
                continue  # the engine reports views that cannot run on this input itself
            if out not in accepted:
                # a registered fixed-size architecture takes no other size, even where its
                # pooling happens to round to the same feature count; others are probed
                accepted[out] = not fixed and _probe_size(model, channels, out)  # type: ignore[index]
            if not accepted[out]:
                raise InvalidInputError(
                    f"policy {policy.name!r}: view {view.name!r} turns the {size[0]}x{size[1]} images into "
                    f"{out[0]}x{out[1]}, but model {meta.arch} ({meta.source or 'checkpoint'}) takes only "
                    f"{size[0]}x{size[1]} images; drop that view, or use an architecture that pools globally (resnet20)"
                )


def weights_digest(meta: CheckpointMeta) -> str | None:
    """SHA-256 of the checkpoint's weights file, or None for a model not loaded from disk."""
    if not meta.source:
        return None
    try:
        return weights_sha256(meta.source)
    except CheckpointError:
        return None


def _run_key(
    policies: Sequence[Policy], meta: CheckpointMeta, dataset: ImageDataset, split: str, seed: int
) -> dict[str, Any]:
    """What a repeat's results depend on, by content: each policy as it computes, the base
    checkpoint's weights and training recipe, the retraining seed, and the scored images."""
    recipe = {k: v for k, v in _data_recipe(meta).items() if k not in ("test_index", "val_index", "test_files")}
    return {
        "policies": [policy_fingerprint(p) for p in policies],
        "checkpoint_weights_sha256": weights_digest(meta),
        "arch": meta.arch,
        "train_config": meta.extra.get("train_config"),
        "data_recipe": recipe,
        "split": split,
        "eval_data_sha256": dataset_sha256(dataset),
        "n_images": len(dataset),
        "seed": seed,
    }


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    *,
    policies: Sequence[str | Policy] = ("none", "hflip"),
    data: str | None = None,
    split: str = "test",
    data_dir: str | None = None,
    limit: int | None = None,
    repeats: int = 1,
    max_batch: int = 256,
    out_dir: str | os.PathLike | None = None,
    plots: bool = True,
    progress: bool = True,
    device: str | None = None,
    amp: bool = False,
    conformal: float | None = None,
    conformal_method: str = "lac",
    uncertainty: bool = True,
    allow_other_model: bool = False,
) -> dict[str, Any]:
    """Evaluate a checkpoint with each policy on held-out data; with ``repeats > 1`` also
    retrain its recipe with ``repeats - 1`` further seeds and report mean ± std over the runs.

    A policy holding fitted parameters (weights, gate, temperature, matrix scaling) runs on the
    checkpoint it was searched on only (:func:`ttakit.policy.check_policy_model`; another one with
    ``allow_other_model``). Each retrained seed keeps only its views and refits those parameters
    on that seed's own validation rows (the rows the search fitted on;
    :func:`ttakit.search.refit_policy`); each run records what it did (``runs[i]["refit"]``).
    With ``conformal``, sets calibrate on the validation rows no policy was fitted on
    (:func:`ttakit.conformal.conformal_split`); ``split="val"`` is refused.

    ``split`` is ``"test"`` (default: the data's own test split, or the one carved at training
    time), ``"val"``, or ``"train"`` (the training images, flagged as such in every title).

    Writes ``results.json``, ``results.md`` and PNG plots to ``out_dir`` (default
    ``<checkpoint>/eval``). Each run's results are written as soon as it finishes
    (``runs/seed-<s>.json``) with a key of everything they depend on (policies by content,
    checkpoint weights hash, data recipe, scored images); a re-run reuses a finished repeat
    only when its key is unchanged.
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise InvalidInputError(f"repeats must be a positive integer, got {repeats!r}")
    checkpoint = Path(checkpoint)
    model, meta = load_checkpoint(checkpoint)
    model = prepare_model(model, device, amp)  # --device / --amp (ttakit.predictors)
    out = Path(out_dir) if out_dir is not None else (checkpoint if checkpoint.is_dir() else checkpoint.parent) / "eval"
    if out.exists() and not out.is_dir():
        raise InvalidInputError(f"out_dir (--out) must be a folder for the results, got the file {out}")
    dataset = load_eval_data(meta, data, split, data_dir, limit)
    resolved = resolve_named_policies(policies, meta)
    check_input_sizes(model, meta, resolved)
    for policy in resolved:  # a fitted policy belongs to the model it was searched on
        check_policy_model(policy, meta, allow_other_model=allow_other_model)
    # --conformal: checked up front (ttakit.conformal), on rows no policy was fitted on
    conformal_val = conformal_split(meta, data, data_dir, conformal, policies=resolved, split=split)
    data_name = data or _data_recipe(meta).get("spec")
    refit_val = _refit_rows(meta, data, data_dir, resolved) if repeats > 1 else None

    runs: list[dict[str, Any]] = []
    first_evaluations: list[PolicyEvaluation] = []
    for r in range(repeats):
        seed = meta.seed + r
        key = _run_key(resolved, meta, dataset, split, seed)
        if r > 0:
            key["refit"] = REFIT_RULE  # what a retrained seed does with fitted policies
        run_path = out / "runs" / f"seed-{seed}.json"
        if r > 0 and run_path.exists():  # run 0 is always computed: its outputs feed the plots
            try:
                cached = read_json(run_path)
            except (OSError, ValueError):
                cached = None  # unreadable: compute it again
            if isinstance(cached, dict) and cached.get("key") == key:
                note(f"repeat {r + 1}/{repeats}: reusing {run_path} (same policies, checkpoint and data)", enabled=progress)
                runs.append(cached)
                continue
        if r == 0:
            run_model, run_meta = model, meta
        else:
            note(f"repeat {r + 1}/{repeats}: training seed {seed}", enabled=progress)
            run_model, run_meta = _retrain(meta, seed, out / "repeats" / f"seed-{seed}", progress)
        run_policies, refits = resolved, {}
        if r > 0 and refit_val is not None:
            run_policies, refits = _refit_for_seed(run_model, refit_val, resolved, seed, max_batch, progress)
        run, evaluations = _evaluate_run(run_model, run_meta, dataset, run_policies, max_batch, progress,
                                         uncertainty=uncertainty and r == 0)
        run["refit"] = refits if r > 0 else {}
        run["key"] = key
        atomic_write_json(run_path, run)
        runs.append(run)
        if r == 0:
            first_evaluations = evaluations

    summary = summarize_runs(runs)
    scope = _split_phrase(split, dataset)
    table = format_table(
        _display_rows(summary),
        title=f"{checkpoint} on {data_name}: {scope} ({len(dataset)} images, {repeats} run(s))",
    )
    results = {
        "format": RESULTS_FORMAT,
        "format_version": 2,
        "checkpoint": str(checkpoint),
        "data": data_name,
        "split": split,
        "held_out": split != "train",
        "n_images": len(dataset),
        "repeats": repeats,
        "summary": summary,
        "runs": runs,
    }
    markdown = "\n".join(
        [
            f"# TTA evaluation of `{checkpoint}`",
            "",
            f"Data: {data_name}: {scope}, {len(dataset)} images; {repeats} run(s) (seeds {meta.seed}..{meta.seed + repeats - 1}).",
            "Lift is accuracy minus plain inference on the same images; the interval is a 95% paired bootstrap "
            "interval of that difference (with several runs: its bounds averaged over the runs); "
            "p is McNemar's paired test.",
            "",
            markdown_table(_display_rows(summary)),
            *_refit_markdown(runs),
        ]
    )
    if uncertainty or conformal is not None:  # uncertainty AUROC and conformal sets (ttakit.conformal)
        extras = evaluate_extras(model, dataset, resolved, val=conformal_val, alpha=conformal, method=conformal_method,
                                 uncertainty=uncertainty, max_batch=max_batch, progress=progress,
                                 evaluations=first_evaluations)
        results.update(uncertainty=extras["uncertainty"], conformal=extras["conformal"], extras_table=extras["table"])
        markdown += "\n\n" + extras["markdown"]
    write_results(out, results, markdown)
    if plots:
        title = f"{Path(checkpoint).name} on {data_name}: {scope}"
        results["plots"] = _write_plots(out, _plot_rows(summary), first_evaluations, dataset, title)
    from .html_report import write_html_report  # report.html: the same tables and plots in one file

    results["report_html"] = str(write_html_report(out, markdown))
    results["table"] = table
    results["out_dir"] = str(out)
    return results


REFIT_RULE = "views carried; weights, gate, temperature and matrix scaling refit on the seed's validation rows"


def _refit_rows(meta: CheckpointMeta, data: str | None, data_dir: str | None,
                policies: Sequence[Policy]) -> ImageDataset | None:
    """The validation rows a retrained seed refits fitted policies on: the rows their search
    fitted on (every row a policy records as unused is left out, so conformal rows stay unseen),
    or None when no policy holds fitted parameters. Refused without a validation split."""
    fitted = [p for p in policies if fitted_parameters(p)]
    if not fitted:
        return None
    try:
        val = load_eval_data(meta, data, "val", data_dir)
    except InvalidInputError as err:
        names = ", ".join(repr(p.name) for p in fitted)
        raise InvalidInputError(
            f"--repeats refits the fitted parameters of policies {names} on each retrained seed's validation rows, "
            f"but: {err}"
        ) from None
    unused: set[int] = set()
    for policy in fitted:
        record = (policy.meta or {}).get("validation_rows")
        if isinstance(record, dict) and record.get("split") == "val" and record.get("n") == len(val):
            unused |= {r for r in record.get("held_out") or [] if isinstance(r, int)}
    rows = [i for i in range(len(val)) if i not in unused]
    if not rows:
        return val
    return val.subset(rows, f"{val.name} (rows the search fitted on)") if len(rows) < len(val) else val


def _refit_for_seed(model: Any, val: ImageDataset, policies: Sequence[Policy], seed: int, max_batch: int,
                    progress: bool) -> tuple[list[Policy], dict[str, Any]]:
    """Each policy for a retrained seed: views-only ones as they are; fitted ones with their views
    kept and their parameters refitted on ``val`` for this model. Returns (policies, what was done)."""
    from .search import refit_policy

    out, done = [], {}
    for policy in policies:
        if not fitted_parameters(policy):
            out.append(policy)
            continue
        note(f"seed {seed}: refitting {', '.join(fitted_parameters(policy))} of {policy.name!r} on {len(val)} "
             "validation rows (views kept)", enabled=progress)
        refitted, info = refit_policy(model, val.images, val.labels, policy, seed=0, max_batch=max_batch)
        out.append(refitted)
        done[policy.name] = info
    return out, done


def _refit_markdown(runs: Sequence[dict[str, Any]]) -> list[str]:
    """results.md lines saying what each retrained seed did with the fitted policies."""
    lines = []
    for run in runs:
        for name, info in (run.get("refit") or {}).items():
            parts = [f"{len(info['views'])} views kept"]
            if info.get("weights"):
                parts.append(f"{info['weights']} weights refit")
            if info.get("gate_threshold") is not None:
                parts.append(f"gate refit at {info['gate_threshold']:.4g}")
            if info.get("temperature") is not None:
                parts.append(f"temperature refit: {info['temperature']:.4g}")
            if info.get("matrix_scaling"):
                parts.append(f"matrix scaling {info['matrix_scaling']}")
            lines.append(f"- seed {run['seed']}, `{name}`: {'; '.join(parts)} (on {info['n_rows']} validation rows)")
    if not lines:
        return []
    return ["", "## Fitted policies on retrained seeds", "",
            "Each retrained seed keeps a fitted policy's views and refits the rest on its own validation rows "
            "(the rows the search fitted on); seed 0 uses the policy as saved.", "", *lines]


def _split_phrase(split: str, dataset: ImageDataset) -> str:
    if split == "train":
        return "TRAINING images (the model trained on these; not a held-out score)"
    if split == "val":
        return "held-out validation split"
    if "not the training data" in dataset.name:
        return "all images (other data than the model trained on)"
    return "held-out test split"


def _write_plots(
    out: Path, plot_rows, evaluations: Sequence[PolicyEvaluation], dataset: ImageDataset, title: str | None = None
) -> list[str]:
    paths = [str(plot_policy_metrics(plot_rows, out / "policy_metrics.png", title=title))]
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
        str(plot_policy_metrics(all_plot, out / "policy_metrics.png", title="Fashion-MNIST: lift over plain inference per TTA policy")),
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
    from .report import write_search_report
    from .search import search_policy

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


def _demo_lessons(per_model: dict[str, Any]) -> list[str]:
    """Plain-language findings read off the measured rows (never hard-coded)."""
    lessons = []
    for model_name, info in per_model.items():
        rows = {r["policy"]: r for r in info["run"]["rows"]}
        plain = rows[BASELINE]["accuracy"]
        for policy in ("hflip", "d4", "train-aug", "searched"):
            row = rows.get(policy)
            if row is None:
                continue
            if policy == "searched":
                lessons.append(_searched_lesson(model_name, info.get("search") or {}, row, rows[BASELINE], rows.get(MATRIX_CONTROL)))
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
        "in training (flips, rotations for a model trained without them) can cost accuracy. The searched rows "
        "pick views on held-out validation images (ttakit search) and never do worse than plain inference there."
    )
    return lessons


def _searched_lesson(
    model_name: str, search: dict[str, Any], row: dict[str, Any], plain: dict[str, Any], control: dict[str, Any] | None = None
) -> str:
    views = search.get("views") or []
    extra = [v for v in views if v != "identity"]
    lift = 100 * row.get("lift_accuracy", 0.0)
    p = row.get("lift_mcnemar_p")
    chosen = (
        f"chose {len(views)} views ({', '.join(extra[:8])}{', ...' if len(extra) > 8 else ''} besides the identity)"
        if extra
        else "kept the identity view alone (no candidate helped on validation)"
    )
    gate = search.get("gate_threshold")
    cost = (
        f" Search spent {search['forward_passes']:,} forward passes, {search['forward_passes'] / search['full_caching_passes']:.0%} "
        f"of caching all {search['pool_size']} candidates."
        if search.get("forward_passes") and search.get("full_caching_passes")
        else ""
    )
    share = ""
    if control is not None:
        share = (
            f" It calibrates with a temperature and then matrix scaling, which corrects class biases without TTA too: "
            f"{MATRIX_CONTROL} gives {100 * control['accuracy']:.2f}% "
            f"({100 * control['lift_accuracy']:+.2f} points), so the views' own share is "
            f"{100 * (row['accuracy'] - control['accuracy']):+.2f} points."
        )
    return (
        f"{model_name}: search on {search.get('validation_images', '?')} validation images {chosen}"
        f"{f', gated at plain confidence < {gate:.3f}' if gate is not None else ''}; on test it gives "
        f"{100 * row['accuracy']:.2f}% ({lift:+.2f} points{f', McNemar p={_format_p(p)}' if p is not None else ''}) at "
        f"{row['passes_per_image']:.2f} passes per image; NLL {plain['nll']:.4f} -> {row['nll']:.4f}.{share}{cost}"
    )


# --------------------------------------------------------------------------- policy search

CONFORMAL_HOLDOUT = 0.2  # share of the validation rows ttakit search leaves for conformal calibration
HOLDOUT_SEED = 0


def _check_holdout(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise InvalidInputError(
            f"--conformal-holdout (conformal_holdout) must be a fraction in [0, 1) of the validation rows to keep "
            f"from the search for conformal calibration, such as 0.2 (0: search on all of them), got {value!r}"
        )
    return float(value)


def _search_rows(dataset: ImageDataset, split: str, holdout: float, limit: int | None) -> list[int]:
    """The rows of ``split`` the search fits on: on the validation split, all but a seeded,
    stratified ``holdout`` share (kept for conformal calibration); the first ``limit`` of them."""
    from .data import stratified_indices

    rows = list(range(len(dataset)))
    if split == "val" and holdout > 0:
        keep, _ = stratified_indices(dataset.labels, holdout, HOLDOUT_SEED, name="--conformal-holdout")
        rows = keep.tolist()
    if limit is not None:
        if limit < 1:
            raise InvalidInputError(f"limit must be a positive number of images, got {limit}")
        rows = rows[:limit]
    return rows


def _rows_record(dataset: ImageDataset, split: str, searched: Sequence[int], holdout: float) -> dict[str, Any]:
    """What a policy records of the rows it was fitted on (:data:`ttakit.policy.ROWS_KEY`)."""
    record: dict[str, Any] = {"split": split, "n": len(dataset), "searched": len(searched)}
    if split == "val":
        used = set(searched)
        record.update(
            sha256=dataset_sha256(dataset),
            conformal_holdout=holdout,
            holdout_seed=HOLDOUT_SEED,
            held_out=[r for r in range(len(dataset)) if r not in used],
        )
    return record



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
    halving: bool = True,
    matrix_scaling: bool = True,
    max_batch: int = 256,
    progress: bool = True,
    device: str | None = None,
    amp: bool = False,
    conformal_holdout: float = CONFORMAL_HOLDOUT,
) -> dict[str, Any]:
    """Search a TTA policy for a checkpoint on its held-out validation split (never the test
    split) and save it as JSON that ``evaluate`` accepts.

    ``conformal_holdout`` of the validation rows (seeded, stratified; default 0.2) are kept from
    the search, so conformal sets (``evaluate --conformal``, ``predict --conformal``) calibrate on
    rows nothing in the policy was fitted on; 0 searches on every row (conformal is then refused
    for this policy). ``limit`` caps the rows searched (the first N of the rest); rows not searched
    are left for conformal too. The policy records them (``meta["validation_rows"]``: the split's
    size, content hash and the rows left unseen) and the model it was fitted on
    (``meta["weights_sha256"]``, ``meta["checkpoint"]``).

    The candidate pool is :func:`ttakit.search.default_pool` plus draws of the checkpoint's
    recorded training augmentations; successive halving caches in full only the candidates
    still in the running (``halving=False``: all of them). Writes the policy to ``out`` (default
    ``<checkpoint>/policy.json``) and the report (``search.md``, ``search.json``, plots) to
    ``report_dir`` (default ``<checkpoint>/search``).
    """
    from .search.run import check_search_split

    check_search_split(split)  # test and train are refused before anything loads
    holdout = _check_holdout(conformal_holdout)
    from .report import write_search_report
    from .search import search_policy  # the search stack is heavy; load on use

    checkpoint = Path(checkpoint)
    folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
    model, meta = load_checkpoint(checkpoint)
    model = prepare_model(model, device, amp)  # --device / --amp (ttakit.predictors)
    full = load_eval_data(meta, data, split, data_dir)
    searched_rows = _search_rows(full, split, holdout, limit)
    dataset = full.subset(searched_rows, full.name) if len(searched_rows) < len(full) else full
    result = search_policy(
        model,
        dataset.images,
        dataset.labels,
        train_augmentations=meta.train_augmentations,
        budget=budget,
        objective=objective,
        learn_weights=learn_weights,
        gate=gate,
        halving=halving,
        matrix_scaling=matrix_scaling,
        max_batch=max_batch,
        progress=progress,
    )
    provenance = {
        "weights_sha256": meta.weights_sha256 or weights_digest(meta),
        "checkpoint": str(checkpoint),
        "validation_rows": _rows_record(full, split, searched_rows, holdout),
    }
    result.policy.meta.update(dataset=dataset.name, **provenance)
    policy_path = Path(out) if out is not None else folder / "policy.json"
    reports = write_search_report(result, Path(report_dir) if report_dir is not None else folder / "search")
    result.policy.name = "searched"
    result.policy.save(policy_path)
    # The same calibration without TTA, to score beside the policy: what the views add is the rest.
    control_path = None
    if result.policy.matrix_scaling is not None and result.fallback is not None and result.fallback.matrix_scaling is not None:
        control_path = policy_path.with_name(f"{policy_path.stem}-no-tta.json")
        control_meta = {"kind": "search-control", "for": str(policy_path), **provenance}
        replace(result.fallback, name=MATRIX_CONTROL, meta=control_meta).save(control_path)
    held = len(full) - len(dataset)
    kept = f"; {held} of {len(full)} kept unseen for conformal calibration" if split == "val" and held else ""
    table = format_table(search_display_rows(result.rows()),
                         title=f"Policies on {plural(len(dataset), 'validation image')} ({split} split{kept})")
    cost = result.cost or {}
    return {
        "policy": str(policy_path),
        "control_policy": None if control_path is None else str(control_path),
        "searched_rows": len(dataset),
        "conformal_rows": held if split == "val" else None,
        "views": result.policy.view_names,
        "weights": result.policy.weights,
        "temperature": result.policy.temperature,
        "matrix_scaling": result.policy.matrix_scaling is not None,
        "gate_threshold": result.policy.gate_threshold,
        "search_seconds": result.search_seconds,
        "forward_passes": cost.get("forward_passes"),
        "full_caching_passes": cost.get("full_caching_passes"),
        "reports": {k: str(v) for k, v in reports.items()},
        "table": table,
        "cost_line": (
            f"forward passes: {cost['forward_passes']:,} spent ({cost['fraction_of_full']:.0%} of the "
            f"{cost['full_caching_passes']:,} that caching all {cost['pool_size']} candidates costs; "
            f"{cost['saved_passes']:,} saved)"
            if cost
            else ""
        ),
    }
