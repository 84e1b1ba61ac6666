"""``ttakit`` command line: each command parses its arguments, calls one library function that
returns a results dict, and prints it. Bad input ends in a one-line error and exit code 2."""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence

from .. import __version__
from ..errors import TTAKitError
from ._common import (
    _DRAWING_COMMANDS,
    AMP_HELP,
    COMMAND_SPLITS,
    DEVICE_HELP,
    EXIT_BAD_INPUT,
    EXIT_BUG,
    EXIT_INTERRUPTED,
    _add_conformal_args,
    _add_data_args,
    _add_device_args,
    _add_global_args,
    _add_list_arg,
    _add_split_arg,
    _check_outputs,
    _fraction,
    _one_line,
    _OneLineParser,
    _positive_int,
)
from .audit import _add_audit_parser, _run_audit
from .ensemble import _add_ensemble_parser, _run_ensemble
from .export import _add_export_parser, _run_export
from .lr_find import _add_lr_find_parser, _run_lr_find
from .predict import _add_predict_parser, _run_predict
from .train import (
    _add_image_size_arg,
    _add_recipe_args,
    _augment_with_mixup,
    _lr,
    _recipe_options,
    _train_run_options,
)

__all__ = ["main", "build_parser", "EXIT_BAD_INPUT", "EXIT_BUG", "EXIT_INTERRUPTED", "AMP_HELP", "DEVICE_HELP", "COMMAND_SPLITS"]


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="ttakit", description="Test-time augmentation for image models.")
    parser.add_argument("--version", action="version", version=f"ttakit {__version__}")
    _add_global_args(parser, False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train a model and save a checkpoint")
    _add_data_args(train)
    train.add_argument("--arch", default="seed-cnn", help="architecture (seed-cnn, seed-cnn-gap, resnet20, resnet18, resnet34, resnet50; all but seed-cnn take --progressive)")
    train.add_argument("--epochs", type=_positive_int, default=3, help="passes over the training images")
    train.add_argument("--batch-size", type=_positive_int, default=128, help="images per training step")
    train.add_argument("--lr", type=_lr, default=1e-3, help="learning rate, or auto: run lr-find first (default 1e-3)")
    train.add_argument("--optimizer", default="adam", help="adam (constant lr) or sgd (one-cycle schedule)")
    _add_list_arg(train, "--augment", default=[], help="train-time augmentations: flip, shift, crop, mixup",
                  metavar="NAME")
    _add_image_size_arg(train)
    train.add_argument("--seed", type=int, default=0, help="training seed (weights, shuffling, augmentations)")
    train.add_argument("--limit", type=_positive_int, default=None, help="train on the first N images only")
    train.add_argument("--val-fraction", type=_fraction, default=0.1, help="held-out validation share (for search)")
    train.add_argument(
        "--test-fraction", type=_fraction, default=0.15,
        help="held-out test share, carved (seeded, stratified) when the data has no test split of its own "
        "(a flat image folder, an .npz); default 0.15",
    )
    train.add_argument("--out", required=True, help="checkpoint folder to write")
    _add_recipe_args(train)
    _add_device_args(train)

    evaluate = commands.add_parser("evaluate", help="evaluate a checkpoint with and without TTA")
    evaluate.add_argument("checkpoint", help="checkpoint folder (from ttakit train)")
    _add_data_args(evaluate, default=None)
    _add_split_arg(evaluate, "evaluate", "test",
                   "test (held out), val (the held-out validation split; not with --conformal) or train (the "
                   "images it trained on, by name only)")
    _add_list_arg(
        evaluate, "--policy", default=["none", "hflip", "d4", "train-aug"], metavar="POLICY",
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
    _add_device_args(evaluate)

    search = commands.add_parser("search", help="search the TTA policy that helps this model, on held-out data")
    search.add_argument("checkpoint", help="checkpoint folder (from ttakit train)")
    _add_data_args(search, default=None)
    _add_split_arg(search, "search", "val",
                   "the split to search on: val (the held-out validation split; test and train are refused)")
    search.add_argument("--budget", type=_positive_int, default=8, help="most views in the policy")
    search.add_argument("--objective", default="nll", help="nll (after temperature scaling) or accuracy")
    search.add_argument("--limit", type=_positive_int, default=None, help="search on the first N images")
    search.add_argument("--max-batch", type=_positive_int, default=256, help="images per forward pass")
    search.add_argument("--no-weights", action="store_true", help="do not learn per-view or class-by-view weights")
    search.add_argument("--no-gate", action="store_true", help="do not tune a confidence gate")
    search.add_argument(
        "--no-matrix-scaling", action="store_true",
        help="calibrate with a temperature only (by default matrix scaling follows it where there are 20 "
        "validation rows per fitted number and it wins under cross-validation)",
    )
    search.add_argument("--full-cache", action="store_true", help="cache every candidate on every image (no successive halving)")
    search.add_argument("--out", default=None, help="policy JSON to write (default: CHECKPOINT/policy.json)")
    search.add_argument("--report-dir", default=None, help="report folder (default: CHECKPOINT/search)")
    search.add_argument(
        "--conformal-holdout", type=float, default=0.2, metavar="FRACTION",
        help="share of the validation rows kept from the search (seeded, stratified, recorded in the policy) so "
        "--conformal calibrates on rows the policy never saw (default 0.2; 0: search on all rows, no conformal)",
    )
    _add_device_args(search)

    demo = commands.add_parser("demo", help="the classic TTA experiment end to end on Fashion-MNIST")
    demo.add_argument("--quick", action="store_true", help="a subset: 12,000 training images, 2 epochs, 2,000 test images (timing: benchmarks/results/demo-quick.md)")
    demo.add_argument("--epochs", type=_positive_int, default=None,
                      help="epochs per model (default: 2 with --quick, else the full experiment's)")
    demo.add_argument("--data-dir", default=None, help="folder holding Fashion-MNIST's IDX files")
    demo.add_argument("--out", default="runs/demo", help="results folder")
    _add_predict_parser(commands)
    _add_export_parser(commands)
    _add_lr_find_parser(commands)
    _add_ensemble_parser(commands)
    _add_audit_parser(commands)
    from .audit_apply import add_parser as _add_audit_apply_parser

    _add_audit_apply_parser(commands)
    for command in commands.choices.values():  # --debug and --no-progress after the command too
        _add_global_args(command, argparse.SUPPRESS)
    return parser


def _run(args: argparse.Namespace) -> int:
    _check_outputs(args)
    if args.command in _DRAWING_COMMANDS and not getattr(args, "no_plots", False):
        from ..report._figure import (
            require_plots,  # matplotlib (ttakit[plots]): say so before any work
        )

        require_plots("writing PNG plots" + (" (--no-plots skips them)" if args.command == "evaluate" else ""))
    if hasattr(args, "device"):  # every command that runs a model: one device parser, before any work
        from ..engine import check_device

        check_device(args.device)
    progress = not args.no_progress
    if args.command == "train":
        from ..jobs.train import train_run
        from ..training.config import TrainConfig

        config = TrainConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            optimizer=args.optimizer,
            augment=_augment_with_mixup(args),
            seed=args.seed,
            limit=args.limit,
            **_recipe_options(args),
            **_train_run_options(args),
        )
        result = train_run(
            args.data,
            out_dir=args.out,
            config=config,
            arch=args.arch,
            image_size=args.image_size,
            data_dir=args.data_dir,
            val_fraction=args.val_fraction,
            test_fraction=args.test_fraction,
            progress=progress,
        )
        last = result.history[-1]
        scores = ", ".join(f"{k}={v:.4f}" for k, v in last.items() if k in ("train_acc", "val_acc", "val_loss"))
        if result.init_report is not None:
            print(result.init_report.summary())
        if result.size_note and not progress:  # with progress, train already said so
            print(result.size_note)
        if result.lr_find is not None and not progress:  # with progress, train already said so
            print(f"lr auto: {result.lr_find.summary()}; trained at {result.meta.metrics['lr']:.3g}")
        print(f"saved checkpoint to {result.checkpoint_dir} ({scores})")
        recipe = result.meta.extra.get("data") or {}
        if recipe.get("test_source") == "carved":
            print(
                f"held out {len(recipe['test_index'])} of {recipe['n_images']} images as its test split "
                f"(--test-fraction {recipe['test_fraction']}, seed {recipe['split_seed']}; recorded in the checkpoint): "
                "ttakit evaluate scores only those"
            )
        return 0
    if args.command == "evaluate":
        from ..jobs.evaluate import evaluate_checkpoint

        results = evaluate_checkpoint(
            args.checkpoint,
            policies=list(args.policy),
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
            progress=progress,
            conformal=args.conformal,
            conformal_method=args.conformal_method,
            uncertainty=not args.no_uncertainty,
            allow_other_model=args.allow_other_model,
        )
        print(results["table"])
        if results.get("extras_table"):  # uncertainty and conformal tables (issue 11)
            print("\n" + results["extras_table"])
        print(f"\nresults written to {results['out_dir']} (results.json, results.md{', plots' if not args.no_plots else ''})")
        return 0
    if args.command == "search":
        from ..jobs.search import search_checkpoint
        from ..search.run import check_search_split

        check_search_split(args.split)
        results = search_checkpoint(
            args.checkpoint,
            out=args.out,
            report_dir=args.report_dir,
            data=args.data,
            split=args.split,
            data_dir=args.data_dir,
            limit=args.limit,
            budget=args.budget,
            objective=args.objective,
            learn_weights=not args.no_weights,
            gate=not args.no_gate,
            halving=not args.full_cache,
            matrix_scaling=not args.no_matrix_scaling,
            conformal_holdout=args.conformal_holdout,
            max_batch=args.max_batch,
            device=args.device,
            amp=args.amp,
            progress=progress,
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
        print(f"evaluate it with: ttakit evaluate {args.checkpoint} --policy none,{control + ',' if control else ''}{results['policy']}")
        return 0
    if args.command == "predict":
        return _run_predict(args)
    if args.command == "export":
        return _run_export(args)
    if args.command == "lr-find":
        return _run_lr_find(args)
    if args.command == "demo":
        from ..jobs.demo import run_demo

        results = run_demo(args.out, quick=args.quick, data_dir=args.data_dir, epochs=args.epochs, progress=progress)
        print(results["table"])
        print()
        for line in results["lessons"]:
            print(f"- {line}")
        print(f"\nresults written to {results['out_dir']} (results.json, results.md, policy_metrics.png, reliability.png)")
        return 0
    if args.command == "ensemble":
        return _run_ensemble(args, progress)
    if args.command == "audit":
        return _run_audit(args, progress)
    if args.command == "audit-apply":
        from .audit_apply import run as _run_audit_apply

        return _run_audit_apply(args)
    raise AssertionError(f"unhandled command {args.command}")  # argparse rejects unknown commands


# --------------------------------------------------------------------------- ensemble (issue 11)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Bad input: one line on stderr, exit code 2. A bug in ttakit: one line
    and exit code 1, with the traceback under ``--debug`` (accepted before or after the command)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # A usage error exits here through argparse (SystemExit(2)) after one line on stderr.
    first = next((k for k, a in enumerate(argv) if not a.startswith("-")), None)  # the command
    if first is not None and argv[first:first + 2] == ["audit", "apply"]:  # = `ttakit audit-apply ...`
        argv = [*argv[:first], "audit-apply", *argv[first + 2:]]
    args = build_parser().parse_args(argv)
    from ..report.html import record_command  # report.html shows the command that made it

    record_command([a for a in argv if a != "--debug"])
    try:
        return _run(args)
    except TTAKitError as err:
        if args.debug:
            traceback.print_exc()
        print(f"ttakit {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as err:  # the environment, not ttakit: a full disk, a file removed under us
        if args.debug:
            traceback.print_exc()
        where = f" {err.filename!r}" if err.filename else ""
        print(
            f"ttakit {args.command}: error: cannot use{where}: {err.strerror or err}; check the path and its permissions",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(
            f"ttakit {args.command}: interrupted; results finished before the interruption are kept on disk",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    except Exception as err:  # a bug in ttakit itself
        if args.debug:
            traceback.print_exc()
        print(
            f"ttakit {args.command}: internal error: {type(err).__name__}: {_one_line(err)} "
            "(a bug in ttakit; run with --debug for the traceback)",
            file=sys.stderr,
        )
        return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
