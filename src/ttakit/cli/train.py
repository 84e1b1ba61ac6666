"""``ttakit train``: parse, call :func:`ttakit.jobs.train.train_run`, print."""

from __future__ import annotations

import argparse

from ._common import (
    _add_data_args,
    _add_device_args,
    _add_list_arg,
    _fraction,
    _joined,
    _positive_int,
    _run_options,
    _size,
    _sizes,
)

NAME = "train"
OUTPUTS = [("out", "folder", "--out")]  # (argument, "folder" or "file", flag): checked before any work


def add_parser(commands) -> None:
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


def run(args: argparse.Namespace) -> int:
    from ..jobs.train import train_run
    from ..training.config import TrainConfig

    progress = not args.no_progress
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


def _lr(text: str) -> float | str:
    """A learning rate > 0, or ``auto``."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a learning rate such as 1e-3 or 'auto', got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a learning rate > 0 or 'auto', got {text}")
    return value


def _rate(text: str) -> float:
    value = _lr(text)
    if value == "auto":
        raise argparse.ArgumentTypeError("expected a number such as 1e-4, got 'auto'")
    return float(value)


def _add_recipe_args(train: argparse.ArgumentParser) -> None:
    """The practitioner's recipe: schedules, label smoothing, mixup, transfer, progressive resizing."""
    train.add_argument(
        "--schedule",
        default=None,
        help="constant, onecycle, cosine or sgdr (cosine restarted every --cycle-epochs); "
        "default constant for adam, onecycle for sgd",
    )
    train.add_argument("--cycle-epochs", type=_positive_int, default=1, help="SGDR cycle length in epochs (default 1)")
    train.add_argument("--label-smoothing", type=float, default=0.0, help="label smoothing in [0, 1) (default 0)")
    train.add_argument(
        "--mixup",
        type=_rate,
        default=None,
        metavar="ALPHA",
        help="mixup with Beta(ALPHA, ALPHA): the same as --augment mixup with that alpha",
    )
    train.add_argument(
        "--init",
        default=None,
        metavar="WEIGHTS",
        help="start from a state dict: .safetensors, a torch file (read with weights_only=True) or a "
        "checkpoint folder; keys matched by name and shape (a checkpoint for other classes gets a new "
        "classifier, every other matching tensor is kept)",
    )
    train.add_argument("--freeze-epochs", type=int, default=0, metavar="N", help="train only the head for the first N epochs")
    train.add_argument(
        "--lr-slice",
        type=_rate,
        nargs=2,
        default=None,
        metavar=("LOW", "HIGH"),
        help="after unfreezing, rates from LOW (first layers) to HIGH (head), geometric over the layer groups",
    )
    train.add_argument(
        "--progressive",
        type=_sizes,
        default=None,
        metavar="SIZES",
        help="progressive resizing, e.g. 14,28 (or 14x14,28x28): the epochs split over these image sizes in turn "
        "(a size-agnostic architecture such as resnet20)",
    )


def _recipe_options(args: argparse.Namespace) -> dict:
    """TrainConfig keywords from the recipe options (``--mixup ALPHA`` adds ``mixup`` to --augment)."""
    options: dict = {
        "label_smoothing": args.label_smoothing,
        "cycle_epochs": args.cycle_epochs,
        "init": args.init,
        "freeze_epochs": args.freeze_epochs,
        "lr_slice": tuple(args.lr_slice) if args.lr_slice else None,
        "progressive": tuple(args.progressive) if args.progressive else None,
    }
    if args.schedule is not None:
        options["schedule"] = args.schedule
    if args.mixup is not None:
        options["mixup_alpha"] = args.mixup
    return options


def _add_image_size_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--image-size", type=_size, default=None, metavar="SIZE",
        help="train at this size, such as 28 or 32x48 (HxW); images of another size are resized (default: the "
        "data's own size; an image folder: its most common size, capped at 64 on the longer side)",
    )


def _augment_with_mixup(args: argparse.Namespace) -> str:
    """--augment, with ``mixup`` added when --mixup ALPHA is given (one spelling, one setting)."""
    names = [a.strip() for a in _joined(args.augment).split(",") if a.strip()]
    if args.mixup is not None and "mixup" not in names:
        names.append("mixup")
    return ",".join(names)


def _train_run_options(args: argparse.Namespace) -> dict:
    """TrainConfig's ``device``/``amp`` from --device/--amp (checked by the one device parser)."""
    from ..training.config import TrainConfig

    options = _run_options(TrainConfig, args)
    if options.get("device") is None:
        options.pop("device", None)  # TrainConfig's own default: the CPU
    return options
