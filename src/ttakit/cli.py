"""``ttakit`` command line: each command parses its arguments, calls one library function that
returns a results dict, and prints it. Bad input ends in a one-line error and exit code 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import __version__
from .errors import TTAKitError

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def _add_data_args(parser: argparse.ArgumentParser, default: str | None = "fashion-mnist") -> None:
    parser.add_argument(
        "--data",
        default=default,
        help="data set: fashion-mnist, cifar10, a .npz file or an image folder"
        + ("" if default else " (default: the checkpoint's own)"),
    )
    parser.add_argument("--data-dir", default=None, help="folder holding the data set's files")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ttakit", description="Test-time augmentation for image models.")
    parser.add_argument("--version", action="version", version=f"ttakit {__version__}")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train a model and save a checkpoint")
    _add_data_args(train)
    train.add_argument("--arch", default="seed-cnn", help="architecture (seed-cnn, resnet20)")
    train.add_argument("--epochs", type=_positive_int, default=3)
    train.add_argument("--batch-size", type=_positive_int, default=128)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--optimizer", default="adam", help="adam (constant lr) or sgd (one-cycle schedule)")
    train.add_argument("--augment", default="", help="train-time augmentations, comma-separated: flip,shift,crop,mixup")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--limit", type=_positive_int, default=None, help="train on the first N images only")
    train.add_argument("--val-fraction", type=float, default=0.1, help="held-out validation share (for search)")
    train.add_argument("--out", required=True, help="checkpoint folder to write")

    evaluate = commands.add_parser("evaluate", help="evaluate a checkpoint with and without TTA")
    evaluate.add_argument("checkpoint", help="checkpoint folder (from ttakit train)")
    _add_data_args(evaluate, default=None)
    evaluate.add_argument("--split", default="test", help="test, train or val (the held-out validation split)")
    evaluate.add_argument(
        "--policy",
        action="append",
        default=None,
        help="policy name (none, hflip, vflip, flip, d4, shift, hflip-shift, train-aug) or a policy .json; "
        "repeat or comma-separate for several (default: none,hflip,d4,train-aug)",
    )
    evaluate.add_argument("--repeats", type=_positive_int, default=1, help="retrain with R seeds and report mean ± std")
    evaluate.add_argument("--limit", type=_positive_int, default=None, help="evaluate on the first N images")
    evaluate.add_argument("--max-batch", type=_positive_int, default=256, help="images per forward pass")
    evaluate.add_argument("--out", default=None, help="results folder (default: CHECKPOINT/eval)")
    evaluate.add_argument("--no-plots", action="store_true")

    search = commands.add_parser("search", help="search the TTA policy that helps this model, on held-out data")
    search.add_argument("checkpoint", help="checkpoint folder (from ttakit train)")
    _add_data_args(search, default=None)
    search.add_argument("--split", default="val", help="the split to search on (default: the held-out validation split)")
    search.add_argument("--budget", type=_positive_int, default=8, help="most views in the policy")
    search.add_argument("--objective", default="nll", help="nll (after temperature scaling) or accuracy")
    search.add_argument("--limit", type=_positive_int, default=None, help="search on the first N images")
    search.add_argument("--max-batch", type=_positive_int, default=256, help="images per forward pass")
    search.add_argument("--no-weights", action="store_true", help="do not learn per-view weights")
    search.add_argument("--no-gate", action="store_true", help="do not tune a confidence gate")
    search.add_argument("--out", default=None, help="policy JSON to write (default: CHECKPOINT/policy.json)")
    search.add_argument("--report-dir", default=None, help="report folder (default: CHECKPOINT/search)")

    demo = commands.add_parser("demo", help="the classic TTA experiment end to end on Fashion-MNIST")
    demo.add_argument("--quick", action="store_true", help="a subset: under 2 minutes on 2 CPU cores")
    demo.add_argument("--epochs", type=_positive_int, default=None)
    demo.add_argument("--data-dir", default=None, help="folder holding Fashion-MNIST's IDX files")
    demo.add_argument("--out", default="runs/demo")
    return parser


def _run(args: argparse.Namespace) -> int:
    progress = not args.no_progress
    if args.command == "train":
        from .experiment import train_run
        from .train import TrainConfig

        config = TrainConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            optimizer=args.optimizer,
            augment=args.augment,
            seed=args.seed,
            limit=args.limit,
        )
        result = train_run(
            args.data,
            out_dir=args.out,
            config=config,
            arch=args.arch,
            data_dir=args.data_dir,
            val_fraction=args.val_fraction,
            progress=progress,
        )
        last = result.history[-1]
        scores = ", ".join(f"{k}={v:.4f}" for k, v in last.items() if k in ("train_acc", "val_acc", "val_loss"))
        print(f"saved checkpoint to {result.checkpoint_dir} ({scores})")
        return 0
    if args.command == "evaluate":
        from .experiment import evaluate_checkpoint

        results = evaluate_checkpoint(
            args.checkpoint,
            policies=args.policy or ["none,hflip,d4,train-aug"],
            data=args.data,
            split=args.split,
            data_dir=args.data_dir,
            limit=args.limit,
            repeats=args.repeats,
            max_batch=args.max_batch,
            out_dir=args.out,
            plots=not args.no_plots,
            progress=progress,
        )
        print(results["table"])
        print(f"\nresults written to {results['out_dir']} (results.json, results.md{', plots' if not args.no_plots else ''})")
        return 0
    if args.command == "search":
        from .experiment import search_checkpoint

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
            max_batch=args.max_batch,
            progress=progress,
        )
        print(results["table"])
        print(f"\nselected {len(results['views'])} views: {', '.join(results['views'])}")
        print(f"policy written to {results['policy']}; report in {results['reports']['markdown']}")
        print(f"evaluate it with: ttakit evaluate {args.checkpoint} --policy none,{results['policy']}")
        return 0
    if args.command == "demo":
        from .experiment import run_demo

        results = run_demo(args.out, quick=args.quick, data_dir=args.data_dir, epochs=args.epochs, progress=progress)
        print(results["table"])
        print()
        for line in results["lessons"]:
            print(f"- {line}")
        print(f"\nresults written to {results['out_dir']} (results.json, results.md, policy_metrics.png, reliability.png)")
        return 0
    raise AssertionError(f"unhandled command {args.command}")  # argparse rejects unknown commands


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except TTAKitError as err:
        print(f"ttakit {args.command}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(
            f"ttakit {args.command}: interrupted; results finished before the interruption are kept on disk",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
