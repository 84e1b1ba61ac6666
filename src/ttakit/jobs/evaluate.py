"""The job behind ``ttakit evaluate``: a checkpoint with and without TTA over repeated runs.

Long jobs write each finished piece (a checkpoint, one repeat's results) atomically as soon as
it exists and reuse it when re-run, so an interrupted run loses only the piece in progress.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._io import atomic_write_json, read_json
from ..data import ImageDataset, load_dataset
from ..data.splits import SPLIT_SEED
from ..errors import InvalidInputError
from ..metrics import mean_std
from ..models import CheckpointMeta, load_checkpoint
from ..policy import Policy, check_policy_model, fitted_parameters
from ..predictors import prepare_model
from ..progress import note
from ..report.evaluate_md import (
    _display_rows,
    _plot_rows,
    _refit_markdown,
    _split_phrase,
    _write_plots,
)
from ..report.results import write_results
from ..report.tables import format_table, markdown_table, plural
from . import _distributed
from ._conformal import conformal_split, evaluate_extras
from ._eval_data import (
    NO_SPLIT,
    _data_recipe,
    _retrain,
    _run_key,
    fit_to_model,
    is_checkpoint,
    load_eval_data,
    load_other_model,
    other_model_meta,
    other_model_out,
    own_data_split,
    refuse_other_model_options,
)
from ._policies import _flat_specs, check_input_sizes, resolve_named_policies
from ._policy_eval import PolicyEvaluation, evaluate_policies

__all__ = [
    "load_eval_data",
    "evaluate_checkpoint",
    "summarize_runs",
    "SPLIT_SEED",
]

RESULTS_FORMAT = "ttakit-results"
# SPLIT_SEED (imported above) lives in ttakit.data.splits; it stays importable from here.


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
    model_options: dict[str, Any] | None = None,
    val_data: str | None = None,
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

    ``checkpoint`` may also be any model :func:`ttakit.predictors.load` reads (``.onnx``,
    ``.pt2``, TorchScript, Keras, ``file.py:function``; ``model_options`` as its options), with
    ``data``: such a model records no split, normalisation or training augmentations, so it is
    scored on ``data``'s own test split, or on every row of ``data`` when it has none (the title
    says which); ``train-aug`` and ``repeats > 1`` are refused; ``conformal`` calibrates on
    ``data``'s own validation split or on every row of ``val_data``.
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise InvalidInputError(f"repeats must be a positive integer, got {repeats!r}")
    ranks = _distributed.group(device)  # torchrun: the rows are shared out, rank 0 writes the results
    if ranks.distributed and repeats > 1:
        raise InvalidInputError(
            f"--repeats {repeats} retrains the checkpoint, which runs in one process; under torchrun evaluate with "
            "--repeats 1 (the images are shared among the ranks), or run --repeats without torchrun"
        )
    scope = None
    other_val = None
    if is_checkpoint(checkpoint):
        refuse_other_model_options(checkpoint, model_options, val_data)
        checkpoint = Path(checkpoint)
        model, meta = load_checkpoint(checkpoint)
        default_out = (checkpoint if checkpoint.is_dir() else checkpoint.parent) / "eval"
        dataset = load_eval_data(meta, data, split, data_dir, limit)
    else:  # any model ttakit.predictors reads: no split, no augmentations recorded
        model, meta, dataset, scope, other_val = _other_model_data(checkpoint, model_options, data, split, data_dir,
                                                                   limit, repeats, policies, conformal, val_data)
        default_out = other_model_out(checkpoint, "eval")
    model = prepare_model(model, device, amp)  # --device / --amp (ttakit.predictors)
    out = Path(out_dir) if out_dir is not None else default_out
    if out.exists() and not out.is_dir():
        raise InvalidInputError(f"out_dir (--out) must be a folder for the results, got the file {out}")
    resolved = resolve_named_policies(policies, meta)
    check_input_sizes(model, meta, resolved)
    for policy in resolved:  # a fitted policy belongs to the model it was searched on
        check_policy_model(policy, meta, allow_other_model=allow_other_model)
    # --conformal: checked up front (ttakit.conformal), on rows no policy was fitted on
    conformal_val = conformal_split(meta, data, data_dir, conformal, policies=resolved, split=split, val=other_val)
    data_name = data or _data_recipe(meta).get("spec")
    refit_val = _refit_rows(meta, data, data_dir, resolved) if repeats > 1 else None

    runs, first_evaluations = _run_repeats(model, meta, dataset, resolved, split, repeats, out, refit_val,
                                           max_batch, progress and ranks.main, uncertainty, write=ranks.main)
    summary = summarize_runs(runs)
    scope = scope or _split_phrase(split, dataset)
    table = format_table(
        _display_rows(summary),
        title=f"{checkpoint} on {data_name}: {scope} ({plural(len(dataset), 'image')}, {plural(repeats, 'run')})",
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
    markdown = _markdown(checkpoint, data_name, scope, len(dataset), meta.seed, summary, runs)
    if uncertainty or conformal is not None:  # uncertainty AUROC and conformal sets (ttakit.conformal)
        extras = evaluate_extras(model, dataset, resolved, val=conformal_val, alpha=conformal, method=conformal_method,
                                 uncertainty=uncertainty, max_batch=max_batch, progress=progress and ranks.main,
                                 evaluations=first_evaluations)
        results.update(uncertainty=extras["uncertainty"], conformal=extras["conformal"], extras_table=extras["table"])
        markdown += "\n\n" + extras["markdown"]
    if not ranks.main:  # the same results on every rank; one writes them
        return {**results, "table": table, "out_dir": str(out)}
    write_results(out, results, markdown)
    if plots:
        title = f"{Path(checkpoint).name} on {data_name}: {scope}"
        results["plots"] = _write_plots(out, _plot_rows(summary), first_evaluations, dataset, title)
    from ..report.html import (
        write_html_report,  # report.html: the same tables and plots in one file
    )

    results["report_html"] = str(write_html_report(out, markdown))
    results["table"] = table
    results["out_dir"] = str(out)
    return results


def _other_model_data(model: Any, model_options: dict[str, Any] | None, data: str | None, split: str,
                      data_dir: str | None, limit: int | None, repeats: int, policies: Sequence[str | Policy],
                      conformal: float | None, val_data: str | None
                      ) -> tuple[Any, CheckpointMeta, ImageDataset, str, ImageDataset | None]:
    """A model that is not a ttakit checkpoint, its data and what the title says of it: (predictor,
    its metadata, the scored rows, the scope phrase, the conformal rows or None). What needs a
    recorded split or recipe is refused, each in one line."""
    if repeats > 1:
        raise InvalidInputError(
            f"--repeats {repeats} retrains the checkpoint's recipe with other seeds, but {model} is not a ttakit "
            "checkpoint and records no recipe; evaluate it with --repeats 1"
        )
    if "train-aug" in [p for p in _flat_specs(policies) if isinstance(p, str)]:
        raise InvalidInputError(
            f"policy 'train-aug' needs the training augmentations a ttakit checkpoint records; {model} records "
            "none: name the views instead (such as hflip or d4)"
        )
    if split != "test":
        raise InvalidInputError(
            f"--split {split}: {model} is not a ttakit checkpoint and records no split, so evaluate scores --data's "
            "own test split (or every row of --data when it has none); drop --split"
        )
    predictor = load_other_model(model, model_options, data, "evaluate")
    own = own_data_split(data, "test", data_dir)
    dataset = own if own is not None else load_dataset(data, "train", data_dir)
    total = len(dataset)
    dataset = fit_to_model(dataset.head(limit), predictor, f"--data {data}")
    first = f"the first {len(dataset)} of " if len(dataset) < total else ("all " if own is None else "")
    if own is not None:
        scope = f"{first}{plural(len(dataset), 'image')} of the test split of {data} ({NO_SPLIT})"
    else:
        scope = f"{first}{plural(len(dataset), 'image')} of {data} ({NO_SPLIT}; {data} has no test split of its own)"
    meta = other_model_meta(predictor, dataset, model, data)
    val = None
    if conformal is not None:
        if val_data is not None:
            val = fit_to_model(load_dataset(val_data, "train"), predictor, f"--val-data {val_data}")
        else:
            val = own_data_split(data, "val", data_dir)
            if val is None:
                raise InvalidInputError(
                    f"--conformal {conformal:g} calibrates on labelled validation images the model never trained on, "
                    f"but {model} records no split and {data} has no validation split of its own; pass them with "
                    "--val-data FILE (every row of it is validation)"
                )
            val = fit_to_model(val, predictor, f"the validation split of {data}")
    return predictor, meta, dataset, scope, val


def _run_repeats(model: Any, meta: CheckpointMeta, dataset: ImageDataset, resolved: Sequence[Policy], split: str,
                 repeats: int, out: Path, refit_val: ImageDataset | None, max_batch: int, progress: bool,
                 uncertainty: bool, write: bool = True) -> tuple[list[dict[str, Any]], list[PolicyEvaluation]]:
    """Each repeat's run (the checkpoint, then a retrained seed each), written as it finishes and
    reused when its key is unchanged; returns the runs and the first run's evaluations."""
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
        if write:
            atomic_write_json(run_path, run)
        runs.append(run)
        if r == 0:
            first_evaluations = evaluations
    return runs, first_evaluations


def _markdown(checkpoint: Path, data_name: Any, scope: str, n_images: int, first_seed: int,
              summary: Sequence[dict[str, Any]], runs: Sequence[dict[str, Any]]) -> str:
    """``results.md`` before the uncertainty and conformal sections."""
    repeats = len(runs)
    return "\n".join(
        [
            f"# TTA evaluation of `{checkpoint}`",
            "",
            f"Data: {data_name}: {scope}, {plural(n_images, 'image')}; {plural(repeats, 'run')} "
            f"(seed{'s' if repeats > 1 else ''} {first_seed}{f'..{first_seed + repeats - 1}' if repeats > 1 else ''}).",
            "Accuracy is in percent; lift is accuracy minus plain inference on the same images, in points; "
            "NLL change is the NLL minus plain inference's (negative is better); the interval is a 95% paired bootstrap "
            "interval of that difference (with several runs: its bounds averaged over the runs); "
            "p is McNemar's paired test.",
            "",
            markdown_table(_display_rows(summary)),
            *_refit_markdown(runs),
        ]
    )


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
    from ..search import refit_policy

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
