"""The job behind ``ttakit search``: search a checkpoint's policy on held-out rows and write it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..data import ImageDataset, dataset_sha256
from ..errors import InvalidInputError
from ..models import load_checkpoint
from ..predictors import prepare_model
from ..report.search_report import search_display_rows
from ..report.tables import format_table, plural
from ..search.cache import ViewSplit, split_views
from ..search.calibration import MATRIX_CONTROL
from . import _distributed
from ._eval_data import (
    CONFORMAL_HOLDOUT,
    HOLDOUT_SEED,
    fit_to_model,
    is_checkpoint,
    load_eval_data,
    load_other_model,
    other_model_meta,
    other_model_out,
    own_data_split,
    refuse_other_model_options,
    weights_digest,
)


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
    from ..data import stratified_indices

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



def _other_model_rows(model: Any, model_options: dict[str, Any] | None, data: str | None, data_dir: str | None,
                      val_data: str | None) -> tuple[Any, Any, ImageDataset, str]:
    """(predictor, its metadata, the validation rows, its weights digest) for a model that is not a ttakit checkpoint:
    ``val_data`` whole, or ``data``'s own validation split; refused in one line otherwise."""
    from ..data import load_dataset

    if data is None and val_data is None:
        raise InvalidInputError(
            f"{model} is not a ttakit checkpoint, so it records no data: give labelled validation images it never "
            "trained on with --val-data FILE (every row is validation), or --data DATA with a validation split"
        )
    predictor = load_other_model(model, model_options, data or val_data, "search")
    if val_data is not None:
        rows, what = load_dataset(val_data, "train"), f"--val-data {val_data}"
        rows.name = f"{val_data} (every row: validation)"
    else:
        rows, what = own_data_split(data, "val", data_dir), f"the validation split of {data}"
        if rows is None:
            raise InvalidInputError(
                f"search needs labelled validation images the model never trained on, but {model} records no split and "
                f"{data} has no validation split of its own; pass them with --val-data FILE (every row of it is "
                "validation)"
            )
    rows = fit_to_model(rows, predictor, what)
    from ._predict_resume import _weights_digest

    digest = _weights_digest(predictor)  # recorded: a policy that records no model would pass anywhere
    if predictor.outputs == "probs":  # the search caches logits: log-probabilities are logits of the same softmax
        predictor = _LogProbs(predictor)
    return predictor, other_model_meta(predictor, rows, model, val_data or data), rows, digest


class _LogProbs(torch.nn.Module):
    """A model that returns probabilities, as log-probabilities (logits whose softmax is them)."""

    def __init__(self, predictor: Any) -> None:
        super().__init__()
        self.predictor = predictor
        self.kind, self.source, self.mean, self.std = predictor.kind, predictor.source, predictor.mean, predictor.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.predictor(images).clamp_min(1e-12).log()


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
    model_options: dict[str, Any] | None = None,
    val_data: str | None = None,
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

    ``out`` may be a folder: the policy (``policy.json``, ``policy-no-tta.json``) and the report
    are written into it (``report_dir``, deprecated, still names another report folder); a path
    ending in ``.json`` is the policy file itself, as before.

    ``checkpoint`` may also be any model :func:`ttakit.predictors.load` reads (``model_options``
    as its options). It records no split, so the search needs labelled images it never trained
    on: ``data``'s own validation split (an image folder's ``val/``), or every row of ``val_data``
    (``--val-data``); otherwise it is refused. Its outputs default to ``<model name>-policy.json``
    and ``<model name>-search/`` beside the model.
    """
    from ..search.run import check_search_split

    check_search_split(split)  # test and train are refused before anything loads
    holdout = _check_holdout(conformal_holdout)
    from ..search import search_policy  # the search stack is heavy; load on use

    checkpoint, model, meta, full, digest, default_out, default_reports = _model_and_rows(
        checkpoint, model_options, data, split, data_dir, val_data)
    model = prepare_model(model, device, amp)  # --device / --amp (ttakit.predictors)
    searched_rows = _search_rows(full, split, holdout, limit)
    dataset = full.subset(searched_rows, full.name) if len(searched_rows) < len(full) else full
    # torchrun: the ranks share out the candidate views for the cache and gather it whole, then
    # each runs the same (deterministic) selection; rank 0 writes the files.
    ranks = _distributed.group(device)
    sharing = ViewSplit(ranks.rank, ranks.world, lambda value: _distributed.gather(value, ranks, "the view cache")) \
        if ranks.distributed else None
    with split_views(sharing):
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
            progress=progress and ranks.main,
        )
    provenance = {
        "weights_sha256": digest,
        "checkpoint": str(checkpoint),
        "validation_rows": _rows_record(full, split, searched_rows, holdout),
    }
    result.policy.meta.update(dataset=dataset.name, **provenance)
    policy_path, control_path, reports = _save_search(result, provenance, out, report_dir, default_out, default_reports,
                                                      write=ranks.main)
    return _search_summary(result, policy_path, control_path, reports, meta, full, dataset, split)


def _model_and_rows(checkpoint: str | os.PathLike, model_options: dict[str, Any] | None, data: str | None,
                    split: str, data_dir: str | None, val_data: str | None) -> tuple[Any, ...]:
    """``(checkpoint, model, meta, rows, weights digest, default policy path, default report
    folder)``: a ttakit checkpoint (then a :class:`~pathlib.Path`) with the rows of its recorded
    ``split``, or any model :func:`ttakit.predictors.load` reads with the validation rows given."""
    if is_checkpoint(checkpoint):
        refuse_other_model_options(checkpoint, model_options, val_data)
        checkpoint = Path(checkpoint)
        folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
        default_out, default_reports = folder / "policy.json", folder / "search"
        model, meta = load_checkpoint(checkpoint)
        full = load_eval_data(meta, data, split, data_dir)
        digest = meta.weights_sha256 or weights_digest(meta)
    else:  # any model ttakit.predictors reads: it records no split, so validation rows are given
        model, meta, full, digest = _other_model_rows(checkpoint, model_options, data, data_dir, val_data)
        default_out, default_reports = other_model_out(checkpoint, "policy.json"), other_model_out(checkpoint, "search")
    return checkpoint, model, meta, full, digest, default_out, default_reports


def _save_search(result: Any, provenance: dict[str, Any], out: str | os.PathLike | None,
                 report_dir: str | os.PathLike | None, default_out: Path, default_reports: Path,
                 write: bool = True) -> tuple[Path, Path | None, dict[str, Any]]:
    """Write the report, the policy and, with matrix scaling, its control without TTA:
    ``(policy path, control path or None, the report's files)``. ``write=False`` (ranks other
    than 0 under torchrun): the same paths, nothing written."""
    from ..report.search_report import write_search_report

    if out is not None and not str(out).lower().endswith(".json"):  # a folder: the policy and the report in it
        policy_path, default_reports = Path(out) / "policy.json", Path(out)
    else:
        policy_path = Path(out) if out is not None else default_out
    report_folder = Path(report_dir) if report_dir is not None else default_reports
    reports = write_search_report(result, report_folder) if write else \
        {"json": report_folder / "search.json", "markdown": report_folder / "search.md"}  # where rank 0 writes them
    result.policy.name = "searched"
    if write:
        result.policy.save(policy_path)
    # The same calibration without TTA, to score beside the policy: what the views add is the rest.
    control_path = None
    if result.policy.matrix_scaling is not None and result.fallback is not None and result.fallback.matrix_scaling is not None:
        control_path = policy_path.with_name(f"{policy_path.stem}-no-tta.json")
        control_meta = {"kind": "search-control", "for": str(policy_path), **provenance}
        if write:
            replace(result.fallback, name=MATRIX_CONTROL, meta=control_meta).save(control_path)
    return policy_path, control_path, reports


def _search_summary(result: Any, policy_path: Path, control_path: Path | None, reports: dict[str, Any], meta: Any,
                    full: Any, dataset: Any, split: str) -> dict[str, Any]:
    """What :func:`search_checkpoint` returns: the files, the policy's settings, the cost and the table."""
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
        "records_split": meta.extra.get("records_split", True),
        "table": table,
        "cost_line": (
            f"forward passes: {cost['forward_passes']:,} spent ({cost['fraction_of_full']:.0%} of the "
            f"{cost['full_caching_passes']:,} that caching all {cost['pool_size']} candidates costs; "
            f"{cost['saved_passes']:,} saved)"
            if cost
            else ""
        ),
    }
