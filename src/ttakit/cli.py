"""``ttakit`` command line: each command parses its arguments, calls one library function that
returns a results dict, and prints it. Bad input ends in a one-line error and exit code 2."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import traceback
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .errors import InvalidInputError, TTAKitError

EXIT_BUG = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
SPLITS = ("train", "val", "test")


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the argument, the value and where to look
    (not the full usage block), still with exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}; see {self.prog} --help\n")


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


def _fraction(text: str) -> float:
    """A share strictly between 0 and 1 (``--val-fraction``, ``--test-fraction``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1 such as 0.1, got {text!r}") from None
    if not 0 < value < 1:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a fraction strictly between 0 and 1 such as 0.1, got {text}")
    return value


def _writable_ancestor(path: Path, flag: str) -> None:
    """Raise unless ``path`` (which does not exist yet) can be created: its nearest existing
    ancestor must be a folder we can create entries in (probed, not guessed from mode bits)."""
    ancestor = path.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InvalidInputError(f"{flag} {str(path)!r}: {str(ancestor)!r} is a file, not a folder; choose another path")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".ttakit-probe-", dir=ancestor))
    except OSError as err:
        raise InvalidInputError(
            f"{flag} {str(path)!r}: cannot create it inside {str(ancestor)!r} ({err.strerror or err}); "
            "choose a writable location"
        ) from None


def check_out_path(path: str | os.PathLike | None, kind: str, flag: str = "--out") -> None:
    """Refuse an output path before any work is done: ``kind`` is ``"folder"`` or ``"file"``.

    A folder must be (or become) a writable folder; a file must not be a folder and its folder
    must be writable. Raises :class:`~ttakit.errors.InvalidInputError` naming ``flag``.
    """
    if path is None:
        return
    target = Path(path)
    if kind == "folder":
        if target.exists() and not target.is_dir():
            raise InvalidInputError(f"{flag} {str(path)!r} is a file; expected a folder: give a new or existing folder")
        if target.is_dir():
            if not os.access(target, os.W_OK | os.X_OK):
                raise InvalidInputError(f"{flag} {str(path)!r} is a folder you cannot write to; choose a writable folder")
            return
        _writable_ancestor(target, flag)
        return
    if target.is_dir():
        raise InvalidInputError(
            f"{flag} {str(path)!r} is a folder; expected a file path such as {str(target / 'policy.json')!r}"
        )
    if target.exists():
        if not os.access(target.parent if str(target.parent) else Path("."), os.W_OK):
            raise InvalidInputError(f"{flag} {str(path)!r}: its folder is not writable; choose a writable location")
        return
    _writable_ancestor(target, flag)


# --------------------------------------------------------------------------- predict / export (issue 10)


def _add_device_args(parser: argparse.ArgumentParser, max_batch: bool = False) -> None:
    """--device and --amp (and --max-batch where the command lacks it): the engine's run options."""
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 or mps (default: cpu)")
    parser.add_argument("--amp", action="store_true", help="autocast: bfloat16 on CPU, float16 on cuda/mps")
    if max_batch:
        parser.add_argument("--max-batch", type=_positive_int, default=256, help="images per forward pass")


def _add_vote_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup, calibrated_on: str) -> None:
    """--vote, --weights, --tie-break, --seed and --no-calibrate: how several models' predictions merge."""
    parser.add_argument("--vote", default="soft", choices=("soft", "hard"),
                        help="soft: mean of calibrated probabilities (default); hard: majority class")
    parser.add_argument("--weights", type=_weights, default=None, help="one weight per model, e.g. 1,1,2")
    parser.add_argument("--tie-break", default="mean", choices=("mean", "random"),
                        help="hard vote ties: mean (higher mean probability, then seeded random) or random")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random tie-break")
    parser.add_argument("--no-calibrate", action="store_true", help=f"do not temperature-scale {calibrated_on}")


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    """How to read a model whose file does not say (the names of ttakit.predictors.load's options)."""
    group = parser.add_argument_group("model options (where the model file does not say)")
    group.add_argument("--layout", choices=("nchw", "nhwc"), default=None, help="the model's input layout")
    group.add_argument("--input-size", default=None, metavar="HxW", help="input size, like 224x224 (or 224)")
    group.add_argument("--channels", type=_positive_int, default=None, help="input channels: 1 (gray), 3 (RGB), 4")
    group.add_argument("--pixel-range", choices=("0-1", "0-255"), default=None, help="pixel scale the model expects")
    group.add_argument("--mean", default=None, help="per-channel mean in pixel-range units, like 0.485,0.456,0.406")
    group.add_argument("--std", default=None, help="per-channel std in pixel-range units, like 0.229,0.224,0.225")
    group.add_argument("--classes", default=None, metavar="FILE", help="text file with one class name a line")
    group.add_argument("--outputs", choices=("logits", "probs"), default=None, help="what the model returns")


def _add_predict_parser(commands) -> None:
    predict = commands.add_parser(
        "predict", help="TTA predictions for your own images, from any model (or an ensemble of several)",
        usage="ttakit predict [options] MODEL[:POLICY] [MODEL[:POLICY] ...] IMAGES --out FILE",
    )
    predict.add_argument(
        "inputs", nargs="+", metavar="MODEL[:POLICY] [...] IMAGES",
        help="one or more models (checkpoint folder, .pt2, TorchScript, .onnx, .keras/.h5, or module:function), each "
        "optionally with its policy after a colon; several models write ENSEMBLE predictions. Last: the images, a "
        "folder (searched recursively), a quoted glob, or a text file of paths",
    )
    predict.add_argument("--policy", default="none",
                         help="policy name, train-aug, or a policy .json, for models without :POLICY (default: none)")
    predict.add_argument("--out", required=True, help="CSV file to write (.jsonl for JSON Lines)")
    predict.add_argument("--top-k", type=_positive_int, default=5, help="classes per row (default 5)")
    predict.add_argument("--workers", type=int, default=None, help="decoding processes (0: in the main process)")
    predict.add_argument("--batch-size", type=_positive_int, default=None, help="images per step (default: --max-batch)")
    predict.add_argument("--resume", action="store_true", help="keep rows already in --out; predict the rest")
    predict.add_argument("--conformal", type=_alpha, default=None, metavar="ALPHA",
                         help="add each image's conformal prediction set covering 1 - ALPHA (ttakit checkpoints: "
                         "calibrated on their validation split)")
    predict.add_argument("--conformal-method", default="lac", choices=("lac", "aps"), help="lac (default) or aps")
    _add_vote_args(predict.add_argument_group("several models (as in ttakit ensemble)"),
                   calibrated_on="the models on their shared validation split")
    _add_device_args(predict, max_batch=True)
    _add_model_args(predict)


def _model_options(args: argparse.Namespace) -> dict:
    names = ("layout", "input_size", "channels", "pixel_range", "mean", "std", "classes", "outputs")
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _run_predict(args: argparse.Namespace) -> int:
    from .ensemble import parse_member
    from .predict import predict_images

    if len(args.inputs) < 2:
        raise InvalidInputError(
            f"predict needs MODEL [MODEL ...] IMAGES: at least one model and the images, got only {args.inputs[0]!r}"
        )
    members = [parse_member(spec) for spec in args.inputs[:-1]]
    if args.weights is not None and len(args.weights) != len(members):
        raise InvalidInputError(
            f"--weights needs one number per model ({len(members)}), got {len(args.weights)}: "
            f"{','.join(f'{w:g}' for w in args.weights)}"
        )
    models = [m.model for m in members]
    summary = predict_images(
        models[0] if len(models) == 1 else models,
        args.inputs[-1],
        out=args.out,
        policy=[m.policy or args.policy for m in members] if len(models) > 1 else (members[0].policy or args.policy),
        top_k=args.top_k,
        workers=args.workers,
        batch_size=args.batch_size,
        resume=args.resume,
        device=args.device,
        amp=args.amp,
        max_batch=args.max_batch,
        progress=not args.no_progress,
        model_options=_model_options(args),
        conformal=args.conformal,
        conformal_method=args.conformal_method,
        vote=args.vote,
        weights=args.weights,
        tie_break=args.tie_break,
        seed=args.seed,
        calibrate=not args.no_calibrate,
    )
    skipped = f" ({summary['n_done_before']} already in {summary['out']})" if summary["n_done_before"] else ""
    how = f"policy {summary['policy']} ({len(summary['views'])} views"
    if summary.get("ensemble"):
        ens = summary["ensemble"]
        how = (f"an ensemble of {len(ens['members'])} models, {ens['vote']} vote ("
               + ", ".join(f"{m['model']}:{m['policy']}" for m in ens["members"]) + f"; {ens['calibration']}")
    print(
        f"predicted {summary['n_predicted']} of {summary['n_images']} images{skipped} with {how}, "
        f"{summary['passes_per_image']:.2f} passes/img) "
        f"in {summary['seconds']:.1f} s ({summary['images_per_second']:.0f} img/s) -> {summary['out']}"
    )
    if summary["n_errors"]:
        print(f"{summary['n_errors']} file(s) could not be read: see {summary['errors']}")
    return 0


def _add_export_parser(commands) -> None:
    export = commands.add_parser("export", help="write a checkpoint as ONNX, torch.export (.pt2) or TorchScript")
    export.add_argument("checkpoint", help="checkpoint folder (from ttakit train)")
    export.add_argument("--format", required=True, choices=("onnx", "pt2", "torchscript"))
    export.add_argument("--out", required=True, help="file to write")


def _run_export(args: argparse.Namespace) -> int:
    from .export import export_checkpoint

    path = export_checkpoint(args.checkpoint, args.format, args.out)
    print(f"exported {args.checkpoint} as {args.format} to {path} ({path.stat().st_size / 1e6:.2f} MB, metadata in ttakit.json)")
    print(f"use it with: ttakit predict {path} IMAGES --out preds.csv")
    return 0


# --------------------------------------------------------------------------- training recipe (issue 12)


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
        default=None,
        metavar="SIZES",
        help="progressive resizing, e.g. 14,28: the epochs split over these image sizes in turn "
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
        "progressive": args.progressive,
    }
    if args.schedule is not None:
        options["schedule"] = args.schedule
    if args.mixup is not None:
        options["mixup_alpha"] = args.mixup
    return options


def _augment_with_mixup(args: argparse.Namespace) -> str:
    """--augment, with ``mixup`` added when --mixup ALPHA is given (one spelling, one setting)."""
    names = [a.strip() for a in (args.augment or "").split(",") if a.strip()]
    if args.mixup is not None and "mixup" not in names:
        names.append("mixup")
    return ",".join(names)


def _add_lr_find_parser(commands) -> None:
    lr_find = commands.add_parser(
        "lr-find", help="sweep the learning rate exponentially and suggest one (writes lr_find.png)"
    )
    _add_data_args(lr_find)
    lr_find.add_argument("--arch", default="seed-cnn", help="architecture (seed-cnn, seed-cnn-gap, resnet20, resnet18, ...)")
    lr_find.add_argument("--batch-size", type=_positive_int, default=128)
    lr_find.add_argument("--optimizer", default="adam", help="adam or sgd")
    lr_find.add_argument("--augment", default="", help="train-time augmentations, as for train")
    lr_find.add_argument("--label-smoothing", type=float, default=0.0)
    lr_find.add_argument("--init", default=None, metavar="WEIGHTS", help="start from these weights, as for train")
    lr_find.add_argument("--start-lr", type=_rate, default=1e-7)
    lr_find.add_argument("--end-lr", type=_rate, default=10.0)
    lr_find.add_argument("--steps", type=_positive_int, default=100, help="sweep steps (batches), default 100")
    lr_find.add_argument("--limit", type=_positive_int, default=None, help="use the first N training images only")
    lr_find.add_argument("--seed", type=int, default=0)
    lr_find.add_argument("--val-fraction", type=_fraction, default=0.1, help="held out as in train (not swept on)")
    lr_find.add_argument("--out", default="lr_find.png", help="plot to write (default lr_find.png)")


def _run_lr_find(args: argparse.Namespace) -> int:
    from .lr_find import run_lr_find
    from .train import TrainConfig

    check_out_path(args.out, "file", "--out")
    config = TrainConfig(
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        augment=args.augment,
        label_smoothing=args.label_smoothing,
        init=args.init,
        seed=args.seed,
        limit=args.limit,
    )
    results = run_lr_find(
        args.data,
        arch=args.arch,
        config=config,
        data_dir=args.data_dir,
        val_fraction=args.val_fraction,
        start_lr=args.start_lr,
        end_lr=args.end_lr,
        num_steps=args.steps,
        plot=args.out,
        progress=not args.no_progress,
    )
    result = results["result"]
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


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="ttakit", description="Test-time augmentation for image models.")
    parser.add_argument("--version", action="version", version=f"ttakit {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="on an unexpected error, show the traceback (any position)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train a model and save a checkpoint")
    _add_data_args(train)
    train.add_argument("--arch", default="seed-cnn", help="architecture (seed-cnn, seed-cnn-gap, resnet20, resnet18, resnet34, resnet50; all but seed-cnn take --progressive)")
    train.add_argument("--epochs", type=_positive_int, default=3)
    train.add_argument("--batch-size", type=_positive_int, default=128)
    train.add_argument("--lr", type=_lr, default=1e-3, help="learning rate, or auto: run lr-find first (default 1e-3)")
    train.add_argument("--optimizer", default="adam", help="adam (constant lr) or sgd (one-cycle schedule)")
    train.add_argument("--augment", default="", help="train-time augmentations, comma-separated: flip,shift,crop,mixup")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--limit", type=_positive_int, default=None, help="train on the first N images only")
    train.add_argument("--val-fraction", type=_fraction, default=0.1, help="held-out validation share (for search)")
    train.add_argument(
        "--test-fraction", type=_fraction, default=0.15,
        help="held-out test share, carved (seeded, stratified) when the data has no test split of its own "
        "(a flat image folder, an .npz); default 0.15",
    )
    train.add_argument("--out", required=True, help="checkpoint folder to write")
    _add_recipe_args(train)

    evaluate = commands.add_parser("evaluate", help="evaluate a checkpoint with and without TTA")
    evaluate.add_argument("checkpoint", help="checkpoint folder (from ttakit train)")
    _add_data_args(evaluate, default=None)
    evaluate.add_argument(
        "--split", default="test", choices=SPLITS, help="test, train or val (the held-out validation split)"
    )
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
    _add_conformal_args(evaluate)
    _add_device_args(evaluate)

    search = commands.add_parser("search", help="search the TTA policy that helps this model, on held-out data")
    search.add_argument("checkpoint", help="checkpoint folder (from ttakit train)")
    _add_data_args(search, default=None)
    search.add_argument(
        "--split", default="val", choices=SPLITS, help="the split to search on (default: the held-out validation split)"
    )
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
    _add_device_args(search)

    demo = commands.add_parser("demo", help="the classic TTA experiment end to end on Fashion-MNIST")
    demo.add_argument("--quick", action="store_true", help="a subset: 12,000 training images, 2 epochs, 2,000 test images (timing: benchmarks/results/demo-quick.md)")
    demo.add_argument("--epochs", type=_positive_int, default=None)
    demo.add_argument("--data-dir", default=None, help="folder holding Fashion-MNIST's IDX files")
    demo.add_argument("--out", default="runs/demo")
    _add_predict_parser(commands)
    _add_export_parser(commands)
    _add_lr_find_parser(commands)
    _add_ensemble_parser(commands)
    _add_audit_parser(commands)
    return parser


# command -> its output options: (argument name, "folder" or "file", flag), checked before any work.
OUTPUTS: dict[str, list[tuple[str, str, str]]] = {
    "train": [("out", "folder", "--out")],
    "evaluate": [("out", "folder", "--out")],
    "search": [("out", "file", "--out"), ("report_dir", "folder", "--report-dir")],
    "demo": [("out", "folder", "--out")],
}


def _check_outputs(args: argparse.Namespace) -> None:
    for name, kind, flag in OUTPUTS.get(args.command, []):
        check_out_path(getattr(args, name, None), kind, flag)


def _run(args: argparse.Namespace) -> int:
    _check_outputs(args)
    progress = not args.no_progress
    if args.command == "train":
        from .experiment import train_run
        from .train import TrainConfig

        config = TrainConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            optimizer=args.optimizer,
            augment=_augment_with_mixup(args),
            seed=args.seed,
            limit=args.limit,
            **_recipe_options(args),
        )
        result = train_run(
            args.data,
            out_dir=args.out,
            config=config,
            arch=args.arch,
            data_dir=args.data_dir,
            val_fraction=args.val_fraction,
            test_fraction=args.test_fraction,
            progress=progress,
        )
        last = result.history[-1]
        scores = ", ".join(f"{k}={v:.4f}" for k, v in last.items() if k in ("train_acc", "val_acc", "val_loss"))
        if result.init_report is not None:
            print(result.init_report.summary())
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
            device=args.device,
            amp=args.amp,
            out_dir=args.out,
            plots=not args.no_plots,
            progress=progress,
            conformal=args.conformal,
            conformal_method=args.conformal_method,
            uncertainty=not args.no_uncertainty,
        )
        print(results["table"])
        if results.get("extras_table"):  # uncertainty and conformal tables (issue 11)
            print("\n" + results["extras_table"])
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
            halving=not args.full_cache,
            matrix_scaling=not args.no_matrix_scaling,
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
        from .experiment import run_demo

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
    raise AssertionError(f"unhandled command {args.command}")  # argparse rejects unknown commands


# --------------------------------------------------------------------------- ensemble (issue 11)


def _weights(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 1,1,2, got {text!r}") from None
    if not values or any(not v >= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected non-negative numbers such as 1,1,2, got {text!r}")
    return values


def _alpha(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ALPHA, a miscoverage rate such as 0.1, got {text!r}") from None
    if not 0 < value < 1:  # also refuses nan
        raise argparse.ArgumentTypeError(
            f"expected ALPHA strictly between 0 and 1 such as 0.1 (sets cover 1 - ALPHA), got {text}"
        )
    return value


def _add_conformal_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--conformal", type=_alpha, default=None, metavar="ALPHA",
                        help="split-conformal prediction sets covering 1 - ALPHA, calibrated on the validation split")
    parser.add_argument("--conformal-method", default="lac", choices=("lac", "aps"),
                        help="conformal score: lac (smallest sets, default) or aps (adaptive)")
    parser.add_argument("--no-uncertainty", action="store_true",
                        help="skip the uncertainty report (AUROC of each score against error)")


def _add_ensemble_parser(commands) -> None:
    ensemble = commands.add_parser(
        "ensemble", help="combine several models (each with its TTA policy) by soft or hard vote, on held-out data"
    )
    ensemble.add_argument(
        "members", nargs="+", metavar="MODEL[:POLICY]",
        help="two or more models (checkpoint folders or model files), each optionally with a policy "
        "(a name or a policy .json; default: its policy.json, else train-aug, else none)",
    )
    _add_data_args(ensemble, default=None)
    ensemble.add_argument("--split", default="test", choices=SPLITS, help="held-out split to score (default test)")
    _add_vote_args(ensemble, calibrated_on="members on the validation split")
    ensemble.add_argument("--limit", type=_positive_int, default=None, help="score the first N images")
    ensemble.add_argument("--max-batch", type=_positive_int, default=256, help="images per forward pass")
    ensemble.add_argument("--out", default=None, help="results folder (default: FIRST_MODEL/ensemble)")


def _run_ensemble(args: argparse.Namespace, progress: bool) -> int:
    from .ensemble import ensemble_checkpoints

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
        seed=args.seed,
        calibrate=not args.no_calibrate,
        max_batch=args.max_batch,
        out_dir=args.out,
        progress=progress,
    )
    print(results["table"])
    print(f"\nresults written to {results['out_dir']} (results.json, results.md)")
    return 0


# --------------------------------------------------------------------------- audit (issue 11)


def _prob_range(text: str) -> tuple[float, float]:
    parts = text.replace(",", "-").split("-")
    try:
        lo, hi = (float(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW-HIGH probabilities such as 0.5-0.6, got {text!r}") from None
    if not 0 <= lo < hi <= 1:
        raise argparse.ArgumentTypeError(f"expected 0 <= LOW < HIGH <= 1 such as 0.5-0.6, got {text!r}")
    return lo, hi


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a probability such as 0.9, got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1) such as 0.9, got {text}")
    return value


def _folds(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer of at least 2, got {text!r}") from None
    if value < 2:
        raise argparse.ArgumentTypeError(
            f"expected at least 2 folds (each model trains on K-1 folds and scores the one left out), got {value}"
        )
    return value


def _add_audit_parser(commands) -> None:
    audit = commands.add_parser(
        "audit", help="find mislabelled and ambiguous images with out-of-sample TTA probabilities"
    )
    audit.add_argument("model", help="checkpoint folder (its recipe trains the fold models) or a model file")
    _add_data_args(audit, default=None)
    audit.add_argument("--split", default="train", choices=SPLITS, help="split to audit (default train)")
    audit.add_argument("--folds", type=_folds, default=None,
                       help="train K models on K-1 folds each and score the held-out fold (needs a checkpoint)")
    audit.add_argument("--epochs", type=_positive_int, default=None, help="epochs per fold model (default: the recipe's)")
    audit.add_argument("--policy", default=None, help="TTA policy for the probabilities (default: train-aug or none)")
    audit.add_argument("--method", default="rule,cleanlab", help="rule, cleanlab or both (default rule,cleanlab)")
    audit.add_argument("--mislabel-threshold", type=_probability, default=0.9,
                       help="rule: flag when another class has probability above this (default 0.9)")
    audit.add_argument("--mislabel-by", default="top", choices=("top", "others"),
                       help="rule: the probability compared with the threshold: the top class's (default), or "
                       "all classes but the label together (1 - p[label])")
    audit.add_argument("--ambiguous-range", type=_prob_range, default=(0.5, 0.6),
                       help="rule: flag when the top probability lies in LOW-HIGH (default 0.5-0.6)")
    audit.add_argument("--write-clean", default=None, metavar="FILE",
                       help="write the data without flagged images: an .npz, or a .txt file list for image folders")
    audit.add_argument("--remove", default="all", choices=("all", "mislabelled", "rule", "cleanlab"),
                       help="which flagged images --write-clean drops (default all)")
    audit.add_argument("--limit", type=_positive_int, default=None, help="audit the first N images")
    audit.add_argument("--max-batch", type=_positive_int, default=256, help="images per forward pass")
    audit.add_argument("--seed", type=int, default=0, help="seed of the fold assignment")
    audit.add_argument("--out", default="audit", help="folder for issues.csv and contact_sheet.png (default audit)")


def _run_audit(args: argparse.Namespace, progress: bool) -> int:
    from .audit import audit_checkpoint

    check_out_path(args.out, "folder")
    check_out_path(args.write_clean, "file", "--write-clean")
    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    results = audit_checkpoint(
        args.model,
        data=args.data,
        data_dir=args.data_dir,
        split=args.split,
        folds=args.folds,
        policy=args.policy,
        methods=methods,
        mislabel_threshold=args.mislabel_threshold,
        ambiguous_range=args.ambiguous_range,
        mislabel_by=args.mislabel_by,
        out_dir=args.out,
        write_clean_to=args.write_clean,
        remove=args.remove,
        epochs=args.epochs,
        limit=args.limit,
        max_batch=args.max_batch,
        seed=args.seed,
        progress=progress,
    )
    print(results["table"])
    print(f"\n{results['n_flagged_images']} of {results['n_images']} images flagged; scored by {results['scored_by']}")
    print(f"issues: {results['issues_csv']}")
    if results["contact_sheet"]:
        print(f"contact sheet: {results['contact_sheet']}")
    if results["clean"]:
        print(f"cleaned data ({results['n_images'] - results['removed']} images): {results['clean']}; "
              f"retrain with: ttakit train --data {results['clean']}")
    return 0


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Bad input: one line on stderr, exit code 2. A bug in ttakit: one line
    and exit code 1, with the traceback under ``--debug`` (accepted before or after the command)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in argv[1:]:  # hoist it, so `ttakit evaluate ... --debug` works too
        argv = ["--debug", *(a for a in argv if a != "--debug")]
    # A usage error exits here through argparse (SystemExit(2)) after one line on stderr.
    args = build_parser().parse_args(argv)
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
