"""``ttakit search``: parse, call :func:`ttakit.jobs.search.search_checkpoint`, print."""

from __future__ import annotations

import argparse

from ._common import (
    _add_data_args,
    _add_device_args,
    _add_model_args,
    _add_split_arg,
    _model_options,
    _positive_int,
)

NAME = "search"
OUTPUTS = [("report_dir", "folder", "--report-dir")]  # --out: a folder, or a .json file (checked in run)
DRAWS = "writing PNG plots"


def add_parser(commands) -> None:
    search = commands.add_parser("search", help="search the TTA policy that helps this model, on held-out data")
    search.add_argument("checkpoint", metavar="MODEL",
                        help="checkpoint folder (from ttakit train), or any model ttakit predict reads (.onnx, .pt2, "
                        "TorchScript, .keras/.h5, file.py:function) with --val-data or --data")
    _add_data_args(search, default=None)
    _add_split_arg(search, "search", "val",
                   "the split to search on: val (the held-out validation split; test and train are refused)")
    search.add_argument("--task", default=None, choices=("segmentation", "detection"),
                        help="search a dense model's views on validation canvases, by mIoU or COCO mAP (detection: "
                        "also its box-fusion settings), and report the lift on test canvases beside hflip and "
                        "multi-scale; default: classification (or the task the checkpoint records)")
    search.add_argument("--budget", type=_positive_int, default=None,
                        help="most views in the policy (default 8; 4 with --task)")
    search.add_argument("--objective", default=None,
                        help="nll (after temperature scaling, the default) or accuracy; with --task: miou "
                        "(segmentation), map (mAP@[.5:.95], the default) or map50 (detection)")
    search.add_argument("--limit", type=_positive_int, default=None,
                        help="search on the first N images (with --task: N validation canvases, default 128)")
    search.add_argument("--test-limit", type=int, default=256, metavar="N",
                        help="with --task: test canvases the searched policy is reported on (0: none)")
    search.add_argument("--max-detections", type=_positive_int, default=100,
                        help="with --task detection: boxes kept per view and image before fusion")
    search.add_argument("--max-batch", type=_positive_int, default=256, help="images per forward pass")
    search.add_argument("--no-weights", action="store_true", help="do not learn per-view or class-by-view weights")
    search.add_argument("--no-gate", action="store_true", help="do not tune a confidence gate")
    search.add_argument(
        "--no-matrix-scaling", action="store_true",
        help="calibrate with a temperature only (by default matrix scaling follows it where there are 20 "
        "validation rows per fitted number and it wins under cross-validation)",
    )
    search.add_argument("--full-cache", action="store_true", help="cache every candidate on every image (no successive halving)")
    search.add_argument("--out", default=None, metavar="FOLDER",
                        help="folder for policy.json, policy-no-tta.json and the report (search.md, search.json, "
                        "plots); default: policy.json in the checkpoint folder, where predict and ensemble find it, "
                        "and the report in CHECKPOINT/search. A path ending in .json is the policy file itself (the "
                        "report then goes to CHECKPOINT/search), as before")
    search.add_argument("--report-dir", default=None, help="deprecated: the report folder (use --out FOLDER)")
    search.add_argument(
        "--conformal-holdout", type=float, default=0.2, metavar="FRACTION",
        help="share of the validation rows kept from the search (seeded, stratified, recorded in the policy) so "
        "--conformal calibrates on rows the policy never saw (default 0.2; 0: search on all rows, no conformal)",
    )
    search.add_argument("--val-data", default=None, metavar="FILE",
                        help="for a model that records no split: labelled validation images it never trained on "
                        "(every row is validation)")
    _add_device_args(search)
    _add_model_args(search)


def _is_policy_file(out: str | None) -> bool:
    return out is not None and out.lower().endswith(".json")


def _dense_task(args: argparse.Namespace) -> str | None:
    """The dense task to search: ``--task``, else the one a checkpoint folder records (None: classification)."""
    if args.task is not None:
        return args.task
    from pathlib import Path

    from ..models import read_checkpoint_meta

    folder = Path(args.checkpoint)
    if not (folder / "checkpoint.json").is_file():
        return None
    task = getattr(read_checkpoint_meta(folder), "task", "classification")
    return task if task in ("segmentation", "detection") else None


# Options of the classification search that a dense search has no use for: refused, not ignored.
_CLASSIFICATION_ONLY = (("data", None, "--data"), ("val_data", None, "--val-data"), ("report_dir", None, "--report-dir"),
                        ("no_weights", False, "--no-weights"), ("no_gate", False, "--no-gate"),
                        ("no_matrix_scaling", False, "--no-matrix-scaling"), ("full_cache", False, "--full-cache"),
                        ("conformal_holdout", 0.2, "--conformal-holdout"))


def _run_dense(args: argparse.Namespace, task: str) -> int:
    from ..errors import InvalidInputError
    from ..jobs.search_dense import search_dense_checkpoint

    for name, default, flag in _CLASSIFICATION_ONLY:
        if getattr(args, name) != default:
            raise InvalidInputError(
                f"{flag} does not apply to a {task} search (it searches on validation canvases of the model's size); "
                f"drop {flag}"
            )
    if args.test_limit < 0:
        raise InvalidInputError(f"--test-limit must be 0 or a positive number of canvases, got {args.test_limit}")
    results = search_dense_checkpoint(
        args.checkpoint, task=task, out=args.out, limit=args.limit or 128, test_limit=args.test_limit,
        budget=args.budget or 4, objective=args.objective, data_dir=args.data_dir,
        max_detections=args.max_detections, max_batch=args.max_batch, device=args.device, amp=args.amp,
        progress=not args.no_progress, model_options=_model_options(args),
    )
    print(results["table"])
    print(f"policy written to {results['policy']}; report in {results['report']}")
    return 0


def run(args: argparse.Namespace) -> int:
    from ..jobs.search import search_checkpoint
    from ..search.run import check_search_split

    task = _dense_task(args)
    if task is not None:
        from ._common import check_out_path

        check_out_path(args.out, "file" if _is_policy_file(args.out) else "folder", "--out")
        return _run_dense(args, task)
    check_search_split(args.split)
    from ._common import check_out_path

    check_out_path(args.out, "file" if _is_policy_file(args.out) else "folder", "--out")
    results = search_checkpoint(
        args.checkpoint,
        out=args.out,
        report_dir=args.report_dir,
        data=args.data,
        split=args.split,
        data_dir=args.data_dir,
        limit=args.limit,
        budget=args.budget or 8,
        objective=args.objective or "nll",
        learn_weights=not args.no_weights,
        gate=not args.no_gate,
        halving=not args.full_cache,
        matrix_scaling=not args.no_matrix_scaling,
        conformal_holdout=args.conformal_holdout,
        max_batch=args.max_batch,
        device=args.device,
        amp=args.amp,
        progress=not args.no_progress,
        model_options=_model_options(args),
        val_data=args.val_data,
    )
    print(results["table"])
    if results.get("cost_line"):
        print(results["cost_line"])
    print(f"\nselected {len(results['views'])} views: {', '.join(results['views'])}")
    control = results.get("control_policy")
    if results.get("matrix_scaling"):
        print("calibration: temperature, then matrix scaling (it won under cross-validation; it corrects class "
              "biases without TTA too: compare the 'none (matrix-scaled)' row)")
    print(f"policy written to {results['policy']}; report in {results['reports']['markdown']}")
    if control:
        print(f"the identity with the same calibration (no TTA) written to {control}")
    other = "" if results.get("records_split", True) else f" --data {args.data or 'DATA'}"  # a model file: say the data
    print(f"evaluate it with: ttakit evaluate {args.checkpoint} --policy none,{control + ',' if control else ''}"
          f"{results['policy']}{other}")
    return 0
