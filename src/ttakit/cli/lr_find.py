"""``ttakit lr-find``: parse, call :func:`ttakit.jobs.lr_find.run_lr_find`, print."""

from __future__ import annotations

import argparse

from ._common import (
    _add_data_args,
    _add_device_args,
    _add_list_arg,
    _fraction,
    _joined,
    _positive_int,
    check_out_path,
)
from .train import _add_image_size_arg, _rate, _train_run_options

NAME = "lr-find"
DRAWS = "writing PNG plots"  # needs ttakit[plots]: said before any work


def add_parser(commands) -> None:
    lr_find = commands.add_parser(
        "lr-find", help="sweep the learning rate exponentially and suggest one (writes lr_find.png)"
    )
    _add_data_args(lr_find)
    lr_find.add_argument("--arch", default="seed-cnn", help="architecture (seed-cnn, seed-cnn-gap, resnet20, resnet18, ...)")
    lr_find.add_argument("--batch-size", type=_positive_int, default=128, help="images per sweep step")
    lr_find.add_argument("--optimizer", default="adam", help="adam or sgd: the optimizer train will use")
    _add_list_arg(lr_find, "--augment", default=[], metavar="NAME", help="train-time augmentations, as for train")
    _add_image_size_arg(lr_find)
    lr_find.add_argument("--label-smoothing", type=float, default=0.0, help="label smoothing in [0, 1), as for train")
    lr_find.add_argument("--init", default=None, metavar="WEIGHTS", help="start from these weights, as for train")
    lr_find.add_argument("--start-lr", type=_rate, default=1e-7, help="first learning rate of the sweep")
    lr_find.add_argument("--end-lr", type=_rate, default=10.0, help="last learning rate of the sweep")
    lr_find.add_argument("--steps", type=_positive_int, default=100, help="sweep steps (batches)")
    lr_find.add_argument("--limit", type=_positive_int, default=None, help="use the first N training images only")
    lr_find.add_argument("--seed", type=int, default=0, help="training seed, as for train")
    lr_find.add_argument("--val-fraction", type=_fraction, default=0.1, help="held out as in train (not swept on)")
    lr_find.add_argument(
        "--test-fraction", type=_fraction, default=0.15,
        help="test share carved as in train when the data has no test split of its own (not swept on)",
    )
    lr_find.add_argument("--out", default="lr_find.png", help="plot to write (default lr_find.png)")
    _add_device_args(lr_find)


def run(args: argparse.Namespace) -> int:
    from ..jobs.lr_find import run_lr_find
    from ..training.config import TrainConfig

    check_out_path(args.out, "file", "--out")
    config = TrainConfig(
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        augment=_joined(args.augment),
        label_smoothing=args.label_smoothing,
        init=args.init,
        seed=args.seed,
        limit=args.limit,
        **_train_run_options(args),
    )
    results = run_lr_find(
        args.data,
        arch=args.arch,
        config=config,
        image_size=args.image_size,
        data_dir=args.data_dir,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        start_lr=args.start_lr,
        end_lr=args.end_lr,
        num_steps=args.steps,
        plot=args.out,
        progress=not args.no_progress,
    )
    result = results["result"]
    if results.get("size_note"):
        print(results["size_note"])
    print(
        f"lr-find {args.arch} on {args.data} ({args.optimizer}, batch {args.batch_size}): {len(result.lrs)} steps "
        f"from {result.lrs[0]:.1e} to {result.lrs[-1]:.2e}, stopped: {result.stopped}"
    )
    print(
        f"suggested rate: steepest descent {result.steepest:.2e}, minimum/10 {result.min10:.2e} "
        "(train --lr auto uses minimum/10)"
    )
    print(f"plot written to {results['plot']}")
    return 0
