"""``ttakit evaluate``: parse, call :func:`ttakit.jobs.evaluate.evaluate_checkpoint`, print."""

from __future__ import annotations

import argparse

from ._common import (
    _add_conformal_args,
    _add_data_args,
    _add_device_args,
    _add_list_arg,
    _add_model_args,
    _add_split_arg,
    _model_options,
    _positive_int,
)

NAME = "evaluate"
OUTPUTS = [("out", "folder", "--out")]
DRAWS = "writing PNG plots (--no-plots skips them)"  # needs ttakit[plots]: said before any work
DEFAULT_POLICIES = ["none", "hflip", "d4", "train-aug"]  # train-aug left out for models that record no augmentations


def add_parser(commands) -> None:
    evaluate = commands.add_parser("evaluate", help="evaluate a checkpoint with and without TTA")
    evaluate.add_argument("checkpoint", metavar="MODEL",
                          help="checkpoint folder (from ttakit train); with --data, any model ttakit predict reads "
                          "(.onnx, .pt2, TorchScript, .keras/.h5, file.py:function)")
    _add_data_args(evaluate, default=None)
    _add_split_arg(evaluate, "evaluate", "test",
                   "test (held out), val (the held-out validation split; not with --conformal) or train (the "
                   "images it trained on, by name only)")
    _add_list_arg(
        evaluate, "--policy", default=DEFAULT_POLICIES, metavar="POLICY",
        help="policy names (none, hflip, vflip, flip, d4, shift, hflip-shift, train-aug) or policy .json files",
    )
    evaluate.add_argument("--repeats", type=_positive_int, default=1, help="retrain with R seeds and report mean ± std")
    evaluate.add_argument("--limit", type=_positive_int, default=None, help="evaluate on the first N images")
    evaluate.add_argument("--max-batch", type=_positive_int, default=256, help="images per forward pass")
    evaluate.add_argument("--out", default=None, help="results folder (default: CHECKPOINT/eval)")
    evaluate.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    _add_conformal_args(evaluate)
    evaluate.add_argument(
        "--allow-other-model", action="store_true",
        help="use a policy whose weights, gate, temperature or matrix were fitted on another checkpoint "
        "(refused by default: a policy records the model it was searched on)",
    )
    evaluate.add_argument("--val-data", default=None, metavar="FILE",
                          help="with --conformal, for a model that records no split: labelled validation images it "
                          "never trained on (every row is validation)")
    _add_device_args(evaluate)
    _add_model_args(evaluate)


def run(args: argparse.Namespace) -> int:
    from ..jobs._eval_data import is_checkpoint
    from ..jobs.evaluate import evaluate_checkpoint

    policies = list(args.policy)
    if policies == DEFAULT_POLICIES and not is_checkpoint(args.checkpoint):
        policies.remove("train-aug")  # the default list; a model that is no checkpoint records no augmentations
    results = evaluate_checkpoint(
        args.checkpoint,
        policies=policies,
        model_options=_model_options(args),
        val_data=args.val_data,
        data=args.data,
        split=args.split,
        data_dir=args.data_dir,
        limit=args.limit,
        repeats=args.repeats,
        max_batch=args.max_batch,
        device=args.device,
        amp=args.amp,
        out_dir=args.out,
        plots=not args.no_plots,
        progress=not args.no_progress,
        conformal=args.conformal,
        conformal_method=args.conformal_method,
        uncertainty=not args.no_uncertainty,
        allow_other_model=args.allow_other_model,
    )
    print(results["table"])
    if results.get("extras_table"):  # uncertainty and conformal tables
        print("\n" + results["extras_table"])
    print(f"\nresults written to {results['out_dir']} (results.json, results.md{', plots' if not args.no_plots else ''})")
    return 0
