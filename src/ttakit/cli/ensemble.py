"""``ttakit ensemble``: parse, call :func:`ttakit.jobs.ensemble.ensemble_checkpoints`, print."""

from __future__ import annotations

import argparse

from ._common import (
    _add_data_args,
    _add_device_args,
    _add_split_arg,
    _add_vote_args,
    _positive_int,
    _run_options,
    check_out_path,
)

NAME = "ensemble"


def add_parser(commands) -> None:
    ensemble = commands.add_parser(
        "ensemble", help="combine several models (each with its TTA policy) by soft or hard vote, on held-out data"
    )
    ensemble.add_argument(
        "members", nargs="+", metavar="MODEL[:POLICY]",
        help="two or more models (checkpoint folders or model files), each optionally with a policy "
        "(a name or a policy .json; default: its policy.json, else train-aug, else none)",
    )
    _add_data_args(ensemble, default=None)
    _add_split_arg(ensemble, "ensemble", "test",
                   "split to score: test (default); train and val are refused (the members were fitted there)")
    _add_vote_args(ensemble, calibrated_on="members on the validation split")
    ensemble.add_argument("--limit", type=_positive_int, default=None, help="score the first N images")
    _add_device_args(ensemble, max_batch=True)
    ensemble.add_argument("--out", default=None, help="results folder (default: FIRST_MODEL/ensemble)")
    ensemble.add_argument(
        "--allow-other-model", action="store_true",
        help="use a policy whose weights, gate, temperature or matrix were fitted on another checkpoint "
        "(refused by default: a policy records the model it was searched on)",
    )


def run(args: argparse.Namespace) -> int:
    from ..jobs.ensemble import ensemble_checkpoints

    check_out_path(args.out, "folder")
    results = ensemble_checkpoints(
        args.members,
        data=args.data,
        data_dir=args.data_dir,
        split=args.split,
        limit=args.limit,
        vote=args.vote,
        weights=args.weights,
        tie_break=args.tie_break,
        seed=args.tie_break_seed,
        calibrate=not args.no_calibrate,
        max_batch=args.max_batch,
        out_dir=args.out,
        progress=not args.no_progress,
        allow_other_model=args.allow_other_model,
        **_run_options(ensemble_checkpoints, args),
    )
    print(results["table"])
    print(f"\nresults written to {results['out_dir']} (results.json, results.md)")
    return 0

