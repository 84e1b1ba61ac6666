"""``ttakit predict``: TTA predictions for a folder of image files, from any model.

Files are decoded in DataLoader worker processes (so decoding overlaps inference), each batch
goes through :class:`ttakit.engine.TTAEngine` once, and its rows are written and flushed at
once: one row per image with the top-k classes and probabilities, the predictive entropy, the
fraction of views that disagree with the merged class, and the forward passes spent (a gated
policy spends one on confident images).

Crash safety: each batch's rows are written with one write and flushed, so a killed run leaves
whole rows (a torn last line, possible only if the kill lands inside that write, is dropped by
``resume``); ``resume=True`` keeps the rows already there and predicts only the missing files,
so the output ends with exactly one row per image. Files that cannot be decoded are listed with
the reason in ``<out>.errors.csv`` and the run goes on (``retry_errors`` tries them again on a
resume). What the rows depend on (a digest of each model's weights, its input settings, the
policies and every option that changes an answer) is recorded in ``<out>.settings.json`` when an
output is started; a resume with anything else that changes an answer is refused, naming it.

Many processes: under ``torchrun`` each rank predicts whole blocks of ``batch_size`` files by
global position (block ``b`` on rank ``b % world``) into ``<out>.part-R-of-W``, and rank 0 merges
the parts in input order; ``engine="ray"`` runs the blocks in Ray Data workers instead
(:mod:`ttakit.integrations.ray`). Either way each file runs in the same batch of the same files as
in one process, so the output is the same bytes (with one torch thread per process); a resume
takes in the part files an interrupted run left, whatever its process count.

Several models: pass a list of models (and one policy each, or one for all) and each row holds
the ENSEMBLE prediction (:func:`ttakit.jobs._ensemble_predict.ensemble_predict`, the function behind
``ttakit ensemble``): soft vote (the weighted mean of the members' probabilities, each
temperature-scaled on the validation split the members hold out, when they are ttakit
checkpoints that share one) or hard vote (``prob_k`` columns are then vote shares), with the
same tie-break rules. ``disagreement`` is then the (weighted) share of members whose class
differs from the ensemble's, ``forward_passes`` the sum over members.

Example:
    >>> summary = predict_images("runs/cnn", "photos/", out="preds.csv", policy="hflip")  # doctest: +SKIP
    >>> summary["n_predicted"]
    120
    >>> predict_images(["runs/a", "runs/b"], "photos/", out="ens.csv", policy=["hflip", "d4"])  # doctest: +SKIP"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .._io import check_output_file
from ..data.decode import (
    ImageFiles,
    collate_decoded,
    list_images,
)
from ..errors import InvalidInputError
from ..policy import Policy
from . import _distributed
from ._distributed import Ranks
from ._predict_resume import (
    ERROR_COLUMNS,
    _write_settings,
    check_loader,
    check_resume_settings,
    csv_line,
    default_workers,
    errors_to_skip,
    has_output,
    merge_parts,
    part_files,
    part_path,
    read_done,
)
from ._predict_runners import _ensemble_runner, _path_seeds, _Runner, _single_runner

__all__ = ["predict_images", "errors_path", "read_done", "default_workers", "output_columns",
           "check_resume_settings",]



def errors_path(out: str | os.PathLike) -> Path:
    """Where unreadable files are listed: ``<out>.errors.csv``."""
    out = Path(out)
    return out.with_name(out.name + ".errors.csv")


def output_columns(top_k: int, conformal: bool = False) -> list[str]:
    """CSV header: path, class_1, prob_1, ..., class_k, prob_k, entropy, disagreement, forward_passes
    (and ``set``, the conformal prediction set, with ``conformal``)."""
    ranked = [name for i in range(1, top_k + 1) for name in (f"class_{i}", f"prob_{i}")]
    return ["path", *ranked, "entropy", "disagreement", "forward_passes", *(["set"] if conformal else [])]



def _output_format(out: Path, format: str | None) -> str:
    if format is None:
        return "jsonl" if out.suffix.lower() in (".jsonl", ".ndjson") else "csv"
    if format not in ("csv", "jsonl"):
        raise InvalidInputError(f"format must be 'csv' or 'jsonl', got {format!r}")
    return format


# --------------------------------------------------------------------------- reading what exists


def _format_rows(
    paths: Sequence[str],
    probs: torch.Tensor,
    entropy: torch.Tensor,
    disagreement: torch.Tensor,
    passes: torch.Tensor,
    classes: Sequence[str],
    top_k: int,
    format: str,
    sets: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
) -> str:
    if labels is None:
        values, indices = probs.topk(top_k, dim=1)
    else:  # the predicted class first (a hard vote's tie-break winner), then by probability
        boost = torch.zeros_like(probs).scatter_(1, labels[:, None].long(), 2.0)
        indices = (probs + boost).topk(top_k, dim=1).indices
        values = probs.gather(1, indices)
    values, indices = values.tolist(), indices.tolist()
    entropy, disagreement, passes = entropy.tolist(), disagreement.tolist(), passes.tolist()
    if format == "jsonl":
        lines = []
        for i, path in enumerate(paths):
            row = {
                "path": path,
                "top_k": [{"class": classes[c], "prob": round(p, 6)} for c, p in zip(indices[i], values[i], strict=True)],
                "entropy": round(entropy[i], 6),
                "disagreement": round(disagreement[i], 6),
                "forward_passes": int(passes[i]),
            }
            if sets is not None:
                row["set"] = [classes[c] for c in torch.nonzero(sets[i]).flatten().tolist()]
            lines.append(json.dumps(row) + "\n")
        return "".join(lines)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    for i, path in enumerate(paths):
        ranked = [item for c, p in zip(indices[i], values[i], strict=True) for item in (classes[c], f"{p:.6f}")]
        extra = ["|".join(classes[c] for c in torch.nonzero(sets[i]).flatten().tolist())] if sets is not None else []
        writer.writerow([path, *ranked, f"{entropy[i]:.6f}", f"{disagreement[i]:.6f}", int(passes[i]), *extra])
    return buffer.getvalue()



# --------------------------------------------------------------------------- one model or several


def predict_images(
    model: Any,
    images: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    out: str | os.PathLike,
    policy: str | Policy = "none",
    top_k: int = 5,
    workers: int | None = None,
    batch_size: int | None = None,
    resume: bool = False,
    device: str | torch.device | None = None,
    amp: bool = False,
    max_batch: int = 256,
    format: str | None = None,
    progress: bool = True,
    model_options: dict[str, Any] | None = None,
    conformal: float | None = None,
    conformal_method: str = "lac",
    vote: str = "soft",
    weights: Sequence[float] | None = None,
    tie_break: str = "mean",
    seed: int = 0,
    calibrate: bool = True,
    retry_errors: bool = False,
    allow_other_model: bool = False,
    overwrite: bool = False,
    resize: str | None = None,
    engine: str = "local",
    ray_address: str | None = None,
    ray_workers: int | None = None,
) -> dict[str, Any]:
    """Predict every image ``images`` names with ``policy`` and write one row per image to ``out``.

    Args:
        model: anything :func:`ttakit.predictors.load` takes (a checkpoint folder, a model
            file, an ``nn.Module``, a NumPy callable) or a :class:`Predictor`; or a list or
            tuple of them: an ensemble, whose combined prediction each row holds.
        images: a folder (recursive), a glob, a text file listing paths, or a list of paths.
        out: the CSV (default) or ``.jsonl`` file to write.
        policy: a policy name, ``train-aug``, a policy JSON file or a :class:`Policy`; with
            several models, one for all or a list with one per model.
        top_k: classes (with probabilities) per row.
        workers: decoding worker processes (0 decodes in this process); default
            :func:`default_workers`.
        batch_size: images decoded and predicted per step (rows are flushed per step);
            default ``max_batch``.
        resume: keep the rows already in ``out`` and predict only the missing files (and not
            the files listed in the errors file). Refused, naming what differs, unless the
            model(s), the policies and every option that changes an answer (top-k, output
            format, conformal settings, amp, model options such as mean/std or input size, and
            for several models vote, weights, tie-break, seed, calibration) are those ``out``
            was started with (recorded in :func:`settings_path`); batch size, workers, device
            and ``max_batch`` may change.
        resize: ``"stretch"`` (to the model's size), ``"fit"`` (letterbox: keep the aspect
            ratio, pad with black) or ``"crop"`` (resize the short side, cut the centre); default:
            what the checkpoint records for its training images, else ``stretch``
            (:func:`resolve_resize`; the summary's ``resize`` and ``resize_source`` say which).
            Part of the settings ``resume`` checks.
        overwrite: start ``out`` over when it already holds rows (refused otherwise, unless
            ``resume``: an earlier run's predictions are never replaced silently).
        retry_errors: with ``resume``, try the files listed in the errors file again; those
            that now decode leave it.
        device, amp, max_batch: passed to :class:`TTAEngine`.
        format: ``"csv"`` or ``"jsonl"``; default from the suffix of ``out``.
        model_options: options for :func:`ttakit.predictors.load` (layout, input_size, ...).
        conformal: ``ALPHA``: add each image's split-conformal prediction set (covering
            ``1 - ALPHA``), calibrated with the same policy on the validation split a ttakit
            checkpoint held out (:func:`ttakit.conformal.calibrate_predictor`).
        conformal_method: ``"lac"`` (smallest sets) or ``"aps"``.
        allow_other_model: use a policy whose fitted parameters were fitted on another model
            (refused by default: :func:`ttakit.policy.check_policy_model`).
        vote, weights, tie_break, seed: several models only: how they are combined
            (``"soft"``/``"hard"``, one non-negative weight per model, ``"mean"``/``"random"``,
            the random tie-break's seed; see :func:`ttakit.ensemble_vote.hard_vote`).
        calibrate: several models only: temperature-scale each member on the validation split
            they share (ttakit checkpoints trained on the same data) before combining.
        engine: ``"local"`` (this process, or each torchrun rank's share) or ``"ray"``: Ray Data
            workers decode and predict (:func:`ttakit.integrations.ray.predict_files`; one model,
            ``pip install "ttakit[ray]"``), the rows written here in input order, the same bytes
            as one process running one torch thread.
        ray_address: with ``engine="ray"``, the cluster to join (``auto``, ``ray://host:10001``);
            default a local one. ray_workers: Ray actors (default: the cluster's CPUs).

    Under torchrun (``WORLD_SIZE`` > 1) each rank predicts whole blocks of ``batch_size`` files by
    global position (block ``b`` on rank ``b % world``) into ``<out>.part-R-of-W``, and rank 0
    merges the parts in input order: the same bytes as one process (one torch thread each).

    Returns:
        A summary dict: counts (images, predicted, skipped as done, errors), seconds (the whole
        call: loading and calibration included; ``seconds_predicting`` the image loop,
        ``seconds_preparing`` the rest), images/s (while predicting),
        forward passes per image, the policy's views, and the output and errors paths.

    Raises:
        DataError: no images found. InvalidInputError: a bad output path, option or model
        that images cannot be fed to.
    """
    wall_started = time.perf_counter()  # the summary's seconds: loading and calibration included
    out, fmt, models, policies = _check_call(model, policy, out, format, top_k, resume, overwrite, retry_errors)
    ranks = _distributed.group(device)  # torchrun: this rank's share (one process of one without it)
    progress = progress and ranks.main
    _check_engine(engine, ray_address, ray_workers, len(models), ranks)
    options = dict(model_options or {})
    settings: dict[str, Any] = {}

    def check_settings(found: dict[str, Any]) -> None:
        """Called once the models are loaded and the policies resolved, before any calibration."""
        settings.update(found)
        settings.update(top_k=top_k, format=fmt, conformal=conformal,
                        conformal_method=conformal_method if conformal is not None else None, amp=bool(amp))
        if resume and has_output(out):
            check_resume_settings(out, settings)

    if len(models) == 1:
        runner = _single_runner(models[0], policies[0], model_options=options, device=device, amp=amp,
                                max_batch=max_batch, conformal=conformal, conformal_method=conformal_method,
                                check_settings=check_settings, allow_other_model=allow_other_model,
                                resize=resize)
    else:
        runner = _ensemble_runner(models, policies, model_options=options, device=device, amp=amp,
                                  max_batch=max_batch, conformal=conformal, conformal_method=conformal_method,
                                  vote=vote, weights=weights, tie_break=tie_break, seed=seed, calibrate=calibrate,
                                  progress=progress, check_settings=check_settings,
                                  allow_other_model=allow_other_model, resize=resize)
    paths = list_images(images)
    workers, batch_size = check_loader(workers, batch_size, max_batch)

    errors_file = errors_path(out)
    names = [str(p) for p in paths]
    if len(set(names)) != len(names):
        names = list(dict.fromkeys(names))  # a list file naming a file twice: predict it once
    columns = output_columns(min(top_k, len(runner.classes)), runner.calibration is not None) \
        if runner.classes is not None else None
    if ranks.main:
        _start_output(out, errors_file, fmt, names, settings, resume, overwrite)
    _distributed.barrier(ranks, "the start")  # the output is merged or started before any rank reads it
    todo, n_retried = _files_to_do(names, out, fmt, columns, errors_file, resume, retry_errors, ranks)
    mine = _distributed.block_rows(len(names), batch_size, ranks)  # whole blocks by global index
    todo = [i for i in mine if i in todo]
    ray = None if engine != "ray" else {
        "model_source": models[0], "policy": runner.policy, "workers": ray_workers, "address": ray_address,
        "max_batch": max_batch, "device": device, "amp": amp, "predictor_options": options}
    counts = _write_predictions(runner, names, todo, out, errors_file, fmt, columns, top_k=top_k, resume=resume,
                                workers=workers, batch_size=batch_size, progress=progress, ranks=ranks, ray=ray)
    if ranks.distributed:
        _distributed.barrier(ranks, "the end of the images")  # every part file is complete (names a late rank)
        counts = _gathered_counts(counts, len(todo), ranks)
        if ranks.main:
            merge_parts(out, fmt, names)
            merge_parts(errors_file, "csv", names)
        _distributed.barrier(ranks, "the merge")  # the output is whole before any rank returns
    else:
        counts["n_todo"] = len(todo)
    wall_seconds = time.perf_counter() - wall_started
    if ranks.main and counts["n_errors"] == 0 and errors_file.exists() \
            and errors_file.stat().st_size <= len(csv_line(ERROR_COLUMNS)):
        errors_file.unlink()  # no errors ever: no errors file
    return _summary(runner, out, errors_file, fmt, names, n_retried, counts, wall_seconds, workers, batch_size)


def _check_engine(engine: str, address: str | None, workers: int | None, n_models: int, ranks: Ranks) -> None:
    if engine not in ("local", "ray"):
        raise InvalidInputError(f"engine (--engine) must be 'local' or 'ray', got {engine!r}")
    if engine == "local":
        if address is not None or workers is not None:
            raise InvalidInputError("--ray-address and --ray-workers go with --engine ray; add it or drop them")
        return
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise InvalidInputError(f"ray_workers (--ray-workers) must be a positive integer, got {workers!r}")
    if n_models > 1:
        raise InvalidInputError(f"--engine ray predicts with one model, got {n_models}; run the ensemble with the "
                                "local engine (or under torchrun)")
    if ranks.distributed:
        raise InvalidInputError("--engine ray shares the images among Ray workers itself; run it without torchrun")
    from ..integrations.ray import require_ray

    require_ray()  # a missing Ray says how to install it before any model is loaded


def _gathered_counts(counts: dict[str, Any], n_todo: int, ranks: Ranks) -> dict[str, Any]:
    """Every rank's counts added up (seconds: the slowest rank's)."""
    found = _distributed.gather({**counts, "n_todo": n_todo}, ranks, "the counts")
    total = {key: sum(c[key] for c in found) for key in ("n_predicted", "n_errors", "passes", "n_todo")}
    total["seconds"] = max(c["seconds"] for c in found)
    return total


def _start_output(out: Path, errors_file: Path, fmt: str, names: list[str], settings: dict[str, Any], resume: bool,
                  overwrite: bool) -> None:
    """Rank 0 (or the one process), before any rank reads the output: a resumed output takes in
    the part files a killed distributed run left (of any world size), so every rank reads one
    file; a new one records the settings its rows depend on and drops stale part files."""
    if resume and has_output(out):
        merge_parts(out, fmt, names)
        merge_parts(errors_file, "csv", names)
        return
    if overwrite:
        for part in part_files(out) + part_files(errors_file):
            part.unlink(missing_ok=True)
    _write_settings(out, settings)  # a new output: record what its rows depend on


def _check_call(model: Any, policy: Any, out: str | os.PathLike, format: str | None, top_k: int, resume: bool,
                overwrite: bool, retry_errors: bool) -> tuple[Path, str, list[Any], list[Any]]:
    """``predict_images``' arguments checked before any model is loaded: ``(out, format, models, policies)``."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise InvalidInputError(f"top_k must be a positive integer, got {top_k!r}")
    out = check_output_file(out)
    fmt = _output_format(out, format)
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    if not models:
        raise InvalidInputError("give at least one model to predict with, got none")
    policies = list(policy) if isinstance(policy, (list, tuple)) else [policy] * len(models)
    if len(policies) != len(models):
        raise InvalidInputError(f"give one policy for all models or one per model: {len(models)} models but "
                                f"{len(policies)} policies")
    if resume and overwrite:
        raise InvalidInputError("--resume keeps the rows already in --out and --overwrite replaces them: give one")
    if out.exists() and out.stat().st_size > 0 and not resume and not overwrite:
        raise InvalidInputError(
            f"--out {out} already exists ({out.stat().st_size} bytes); add --resume to keep its rows and predict "
            "the rest, --overwrite to replace it, or choose another --out"
        )
    if part_files(out) and not resume and not overwrite:
        raise InvalidInputError(
            f"--out {out}: a distributed run that did not finish left {len(part_files(out))} part files beside it "
            f"({part_files(out)[0].name}, ...); add --resume to keep their rows and predict the rest, --overwrite to "
            "start over, or choose another --out"
        )
    if retry_errors and not resume:
        raise InvalidInputError(
            "retry_errors (--retry-errors) retries the files in the errors file of a run being resumed; add --resume"
        )
    return out, fmt, models, policies


def _files_to_do(names: list[str], out: Path, fmt: str, columns: list[str] | None, errors_file: Path,
                 resume: bool, retry_errors: bool, ranks: Ranks) -> tuple[set[int], int]:
    """The positions in ``names`` still to predict, and how many leave the errors file to be
    retried. A resumed output skips its rows and its listed errors (rank 0 rewrites the errors
    file for ``retry_errors``; the others wait for it)."""
    done: set[str] = set()
    n_retried = 0
    if resume and out.exists():
        done = read_done(out, fmt, columns)
        skipped, n_retried = errors_to_skip(errors_file, names, done, retry_errors, rewrite=ranks.main)
        done |= skipped
    _distributed.barrier(ranks, "the resume")  # the errors file is rewritten before any rank appends to it
    # Compare absolute paths: a resumed run may name the same folder another way (./imgs, imgs/).
    done_abs = {os.path.abspath(p) for p in done}
    return {i for i, n in enumerate(names) if os.path.abspath(n) not in done_abs}, n_retried


def _write_predictions(runner: _Runner, names: list[str], todo: list[int], out: Path, errors_file: Path, fmt: str,
                       columns: list[str] | None, *, top_k: int, resume: bool, workers: int, batch_size: int,
                       progress: bool, ranks: Ranks, ray: dict[str, Any] | None = None) -> dict[str, Any]:
    """The image loop: decode ``names[i]`` for ``i`` in ``todo`` in worker processes, run each
    batch, append its rows to ``out`` (and unreadable files to ``errors_file``) and flush. Under
    torchrun each rank writes its own part files instead (``<out>.part-R-of-W``), merged by rank 0.

    Each batch is one block of ``batch_size`` files by global position (less the files already
    done), so a file runs with the same other files whatever the rank count: its numbers do not
    depend on the batch it came in. Returns the counts and seconds."""
    classes, calibration = runner.classes, runner.calibration
    with_sets = calibration is not None
    started = time.perf_counter()
    n_predicted = n_errors = 0
    passes_total = 0.0
    if ranks.distributed:  # a fresh part file each run: rank 0 took in the last run's parts first
        target, errors_target = part_path(out, ranks.rank, ranks.world), part_path(errors_file, ranks.rank, ranks.world)
        output = open(target, "w", encoding="utf-8", newline="")
        error_output = open(errors_target, "w", encoding="utf-8", newline="")
        resume = False
    else:
        target = out
        output = open(out, "a" if resume and out.exists() else "w", encoding="utf-8", newline="")
        error_output = open(errors_file, "a" if resume and errors_file.exists() else "w", encoding="utf-8", newline="")
    files = [names[i] for i in todo]
    try:
        if error_output.tell() == 0:
            error_output.write(csv_line(ERROR_COLUMNS))
            error_output.flush()
        if ray is not None:  # Ray workers decode and predict; the batches come back in input order
            from ..integrations.ray import predict_files

            batches = predict_files(files=files, positions=todo, batch_size=batch_size, channels=runner.channels,
                                    input_size=runner.input_size, resize=runner.resize, **ray)
        else:
            batches = _local_batches(runner, files, todo, batch_size, workers)
        from ..progress import progress as progress_bar

        with progress_bar(total=len(todo), desc="predict", unit="img", enabled=progress) as bar:
            for indices, probs, disagreement, passes, labels, failures in batches:
                if failures:
                    error_output.write("".join(csv_line([files[i], reason]) for i, reason in failures))
                    error_output.flush()
                    n_errors += len(failures)
                if probs is not None:
                    batch_paths = [files[i] for i in indices]
                    if classes is None:
                        classes = [str(c) for c in range(probs.shape[1])]
                    k = min(top_k, probs.shape[1])
                    if columns is None:
                        columns = output_columns(k, with_sets)
                        if resume and fmt == "csv" and target.stat().st_size:
                            read_done(target, fmt, columns)  # the header must match before appending
                    if fmt == "csv" and output.tell() == 0:
                        output.write(csv_line(columns))
                    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(dim=1) + 0.0  # + 0.0: no "-0.0"
                    sets = calibration.predict_sets(probs, _path_seeds(batch_paths)) if calibration is not None else None
                    output.write(
                        _format_rows(batch_paths, probs, entropy, disagreement, passes, classes, k, fmt, sets, labels)
                    )
                    output.flush()
                    n_predicted += len(indices)
                    passes_total += float(passes.sum())
                bar.update(len(indices) + len(failures))
                elapsed = time.perf_counter() - started
                bar.set_postfix(img_s=f"{(n_predicted + n_errors) / max(elapsed, 1e-9):.0f}", errors=n_errors)
        if fmt == "csv" and output.tell() == 0 and columns is not None:
            output.write(csv_line(columns))  # nothing left to predict: still a valid file
    finally:
        output.close()
        error_output.close()
    return {"n_predicted": n_predicted, "n_errors": n_errors, "passes": passes_total,
            "seconds": time.perf_counter() - started}

def _local_batches(runner: _Runner, files: list[str], todo: list[int], batch_size: int,
                   workers: int) -> Iterator[tuple[list[int], Any, Any, Any, Any, list[tuple[int, str]]]]:
    """This process's batches, one block of ``batch_size`` files by global position each (less
    those done), decoded in ``workers`` processes: ``(rows of files, probs, disagreement, passes,
    labels, [(row, reason)])``, tensors None when every file of the block failed."""
    if not todo:  # nothing to do (a finished run resumed): no worker processes to start
        return
    loader = torch.utils.data.DataLoader(
        ImageFiles(files, runner.channels, runner.input_size, runner.resize),
        batch_sampler=_distributed.blocks_of(todo, batch_size),
        num_workers=workers,
        collate_fn=collate_decoded,
        pin_memory=runner.device is not None and runner.device.type == "cuda",
        prefetch_factor=4 if workers else None,
    )
    for indices, batch, failures in loader:
        if batch is None:
            yield indices, None, None, None, None, failures
            continue
        probs, disagreement, passes, labels = runner.run(batch.float().div_(255.0), [files[i] for i in indices])
        yield indices, probs, disagreement, passes, labels, failures




def _summary(runner: _Runner, out: Path, errors_file: Path, fmt: str, names: list[str], n_retried: int, counts: dict[str, Any], wall_seconds: float, workers: int,
             batch_size: int) -> dict[str, Any]:
    """What :func:`predict_images` returns (see there)."""
    seconds = counts["seconds"]
    n_predicted = counts["n_predicted"]
    return {
        "out": str(out),
        "errors": str(errors_file) if errors_file.exists() else None,
        "format": fmt,
        "n_images": len(names),
        "n_done_before": len(names) - counts["n_todo"],
        "n_retried": n_retried,
        "n_predicted": n_predicted,
        "n_errors": counts["n_errors"],
        "seconds": wall_seconds,
        "seconds_predicting": seconds,
        "seconds_preparing": wall_seconds - seconds,
        "images_per_second": n_predicted / seconds if seconds > 0 else math.inf,
        "passes_per_image": counts["passes"] / n_predicted if n_predicted else 0.0,
        "policy": runner.name,
        "views": runner.views,
        "model": runner.model,
        "ensemble": runner.extra or None,
        "workers": workers,
        "batch_size": batch_size,
        "conformal": runner.calibration.to_json() if runner.calibration is not None else None,
        "resize": runner.resize,
        "resize_source": runner.resize_source,
    }
