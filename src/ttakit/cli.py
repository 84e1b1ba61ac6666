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
_DRAWING_COMMANDS = ("evaluate", "search", "demo", "audit", "lr-find")  # need ttakit[plots]


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, unless the help already names it or there is
    none to show (a flag that is off, an option without a value by default)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or not action.option_strings
        ):
            return text
        if isinstance(default, (list, tuple)):
            shown = ",".join(str(v) for v in default) or "none"
        else:
            shown = "%(default)s" if str(default) else "none"
        return f"{text} (default: {shown})"


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the argument, the value and where to look
    (not the full usage block), still with exit code 2. Every parser (each command's too) shows
    each option's default in its help."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}; see {self.prog} --help\n")


# --------------------------------------------------------------------------- one way to say each thing


class _ListAction(argparse.Action):
    """A list option: repeat it or separate by commas (``--augment flip --augment shift`` is
    ``--augment flip,shift``); every command reads lists this one way."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        current = getattr(namespace, self.dest, None)
        items = [] if current is self.default or current is None else list(current)  # the first use replaces the default
        items += [part.strip() for part in str(values).split(",") if part.strip()]
        setattr(namespace, self.dest, items)


def _add_list_arg(parser, flag: str, *, default: Sequence[str] | None, help: str, metavar: str = "A,B") -> None:
    parser.add_argument(flag, action=_ListAction, default=list(default) if default is not None else None,
                        metavar=metavar, help=f"{help}; repeat the option or separate by commas")


def _joined(values: Sequence[str] | str | None) -> str:
    """A list option as the comma-separated text the library takes."""
    if values is None:
        return ""
    return values if isinstance(values, str) else ",".join(values)


def _size(text: str) -> tuple[int, int]:
    """An image size, one way for every option: ``28`` (square) or ``HxW`` such as ``32x48``."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size such as 28 or 28x28 (HxW), got {text!r}") from None
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected a size such as 28 or 28x28 (HxW), positive, got {text!r}")
    return values[0], values[1]


def _sizes(text: str) -> list[int]:
    """Square sizes for ``--progressive``: ``14,28`` (or ``14x14,28x28``)."""
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        height, width = _size(part)
        if height != width:
            raise argparse.ArgumentTypeError(f"progressive sizes are square (such as 14,28), got {part!r}")
        out.append(height)
    if not out:
        raise argparse.ArgumentTypeError(f"expected sizes such as 14,28, got {text!r}")
    return out


# The splits each command accepts (its --split offers only these). A split a command refuses
# for a reason (ensemble on val, search on test) is refused by the job with that reason.
COMMAND_SPLITS: dict[str, tuple[str, ...]] = {
    "evaluate": ("test", "val", "train"),
    "search": ("val",),
    "ensemble": ("test",),
    "audit": ("train", "val", "test"),
}


def _add_split_arg(parser, command: str, default: str, help: str) -> None:
    accepted = COMMAND_SPLITS[command]

    def split(text: str) -> str:
        if text not in SPLITS:
            raise argparse.ArgumentTypeError(
                f"{command} takes --split {' or '.join(accepted)}, got {text!r}"
            )
        return text  # a known split this command refuses: the job says why, in one line

    parser.add_argument("--split", default=default, type=split, metavar="{" + ",".join(accepted) + "}", help=help)


DEVICE_HELP = "where the model runs: cpu, cuda, cuda:N or mps"
AMP_HELP = "mixed precision (autocast): bfloat16 on CPU, float16 on cuda and mps"


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
    """--device and --amp (and --max-batch where the command lacks it): the run options of every
    command that runs a model, with the same help; :func:`_run_options` checks and passes them."""
    group = parser.add_argument_group("where the model runs")
    group.add_argument("--device", default=None, metavar="DEVICE", help=f"{DEVICE_HELP} (default: cpu)")
    group.add_argument("--amp", action="store_true", help=AMP_HELP)
    if max_batch:
        group.add_argument("--max-batch", type=_positive_int, default=256, help="images per forward pass")


def _run_options(job, args: argparse.Namespace) -> dict:
    """``device``/``amp`` keywords for ``job``, the device checked by the one device parser
    (:func:`ttakit.engine.check_device`) before any work. A job that cannot run elsewhere yet
    refuses a device other than the CPU, and --amp, in one line rather than ignoring them."""
    import inspect

    from .engine import check_device

    device = getattr(args, "device", None)
    amp = bool(getattr(args, "amp", False))
    check_device(device)
    accepted = inspect.signature(job).parameters
    options: dict = {}
    for name, value, given in (("device", device, device is not None), ("amp", amp, amp)):
        if name in accepted:
            options[name] = value
        elif given and not (name == "device" and str(value).strip().lower() == "cpu"):
            raise InvalidInputError(
                f"ttakit {args.command} runs on the CPU without autocast for now; --{name} {'' if name == 'amp' else value}"
                .rstrip() + " is not supported here (drop it)"
            )
    return options


def _add_vote_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup, calibrated_on: str) -> None:
    """--vote, --weights, --tie-break, --seed and --no-calibrate: how several models' predictions merge."""
    parser.add_argument("--vote", default="soft", choices=("soft", "hard"),
                        help="soft: mean of calibrated probabilities (default); hard: majority class")
    parser.add_argument("--weights", action=_WeightsAction, default=None, metavar="W",
                        help="one weight per model, such as 1,1,2; repeat the option or separate by commas")
    parser.add_argument("--tie-break", default="mean", choices=("mean", "random"),
                        help="hard vote ties: mean (higher mean probability, then seeded random) or random")
    parser.add_argument("--tie-break-seed", "--seed", dest="tie_break_seed", type=int, default=0,
                        help="seed of the random tie-break (--seed: the old spelling, deprecated)")
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
    predict.add_argument("--policy", default=None,
                         help="policy name, train-aug, or a policy .json, for models without :POLICY (default: the "
                         "policy.json that ttakit search wrote in a checkpoint folder, else none; --policy none: "
                         "plain inference)")
    predict.add_argument("--out", required=True, help="CSV file to write (.jsonl for JSON Lines)")
    predict.add_argument("--top-k", type=_positive_int, default=5, help="classes per row (default 5)")
    predict.add_argument("--workers", type=int, default=None, help="decoding processes (0: in the main process)")
    predict.add_argument("--batch-size", type=_positive_int, default=None, help="images per step (default: --max-batch)")
    predict.add_argument("--resume", action="store_true",
                         help="keep rows already in --out and predict the rest; refused when the model, policy or an "
                         "option that changes answers differs from the first run's (batch size, workers, device may "
                         "change)")
    predict.add_argument("--resize", default=None, choices=("fit", "crop", "stretch"),
                         help="how images reach the model's size: fit (keep the aspect ratio, pad with black), crop "
                         "(resize the short side, cut the centre) or stretch; default: what the checkpoint records "
                         "for its training images, else stretch (the summary says which)")
    predict.add_argument("--overwrite", action="store_true",
                         help="replace an existing --out (refused by default: add --resume to keep its rows)")
    predict.add_argument("--retry-errors", action="store_true",
                         help="with --resume: try the files in the errors file again (they leave it when they decode)")
    predict.add_argument("--conformal", type=_alpha, default=None, metavar="ALPHA",
                         help="add each image's conformal prediction set covering 1 - ALPHA (ttakit checkpoints: "
                         "calibrated on their validation split)")
    predict.add_argument("--conformal-method", default="lac", choices=("lac", "aps"), help="lac (default) or aps")
    predict.add_argument(
        "--allow-other-model", action="store_true",
        help="use a policy whose weights, gate, temperature or matrix were fitted on another checkpoint "
        "(refused by default: a policy records the model it was searched on)",
    )
    _add_vote_args(predict.add_argument_group("several models (as in ttakit ensemble)"),
                   calibrated_on="the models on their shared validation split")
    _add_device_args(predict, max_batch=True)
    _add_model_args(predict)


def _model_options(args: argparse.Namespace) -> dict:
    names = ("layout", "input_size", "channels", "pixel_range", "mean", "std", "classes", "outputs")
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _searched_policy(model: str) -> str:
    """A checkpoint folder's own ``policy.json`` (written by ``ttakit search``), said in the log,
    as ``ttakit ensemble`` does; else ``none``. ``--policy none`` turns it off."""
    found = Path(model) / "policy.json"
    if Path(model).is_dir() and found.is_file():
        print(f"using the policy that ttakit search wrote next to the checkpoint: {found} (--policy none: plain "
              "inference)")
        return str(found)
    return "none"


def _resume_command() -> str:
    """This process's ``ttakit predict`` command with ``--resume`` (and without ``--overwrite``)."""
    import shlex

    from . import html_report

    argv = [a for a in (html_report._COMMAND or sys.argv[1:]) if a != "--overwrite"]
    if "--resume" not in argv:
        argv.append("--resume")
    return "ttakit " + " ".join(shlex.quote(a) for a in argv)


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
    policies = [m.policy or args.policy or _searched_policy(m.model) for m in members]
    try:
        summary = predict_images(
            models[0] if len(models) == 1 else models,
            args.inputs[-1],
            out=args.out,
            policy=policies if len(models) > 1 else policies[0],
            top_k=args.top_k,
            workers=args.workers,
            batch_size=args.batch_size,
            resume=args.resume,
            retry_errors=args.retry_errors,
            overwrite=args.overwrite,
            resize=args.resize,
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
            seed=args.tie_break_seed,
            calibrate=not args.no_calibrate,
            allow_other_model=args.allow_other_model,
        )
    except KeyboardInterrupt:
        print(f"ttakit predict: interrupted; the rows finished so far are kept in {args.out}; continue with: "
              f"{_resume_command()}", file=sys.stderr)
        return EXIT_INTERRUPTED
    skipped = f" ({summary['n_done_before']} already in {summary['out']})" if summary["n_done_before"] else ""
    if summary.get("n_retried"):
        skipped += f" ({summary['n_retried']} from the errors file retried)"
    how = f"policy {summary['policy']} ({len(summary['views'])} views"
    if summary.get("ensemble"):
        ens = summary["ensemble"]
        how = (f"an ensemble of {len(ens['members'])} models, {ens['vote']} vote ("
               + ", ".join(f"{m['model']}:{m['policy']}" for m in ens["members"]) + f"; {ens['calibration']}")
    print(
        f"predicted {summary['n_predicted']} of {summary['n_images']} images{skipped} with {how}, "
        f"{summary['passes_per_image']:.2f} passes/img) "
        f"in {summary['seconds']:.1f} s ({summary.get('seconds_preparing', 0.0):.1f} s loading and calibrating, "
        f"{summary['images_per_second']:.0f} img/s predicting) -> {summary['out']}"
    )
    if summary.get("resize"):
        print(f"images resized with --resize {summary['resize']} ({summary['resize_source']})")
    if summary["n_errors"]:
        from .report import plural

        print(f"{plural(summary['n_errors'], 'file')} could not be read: see {summary['errors']}")
    return 0


def _add_export_parser(commands) -> None:
    export = commands.add_parser("export", help="write a checkpoint as ONNX, torch.export (.pt2) or TorchScript")
    export.add_argument("checkpoint", help="checkpoint folder (from ttakit train)")
    export.add_argument("--format", default=None, choices=("onnx", "pt2", "torchscript"),
                        help="default: from the suffix of --out (.onnx, .pt2, .pt/.ts); a suffix that "
                        "contradicts --format is refused")
    export.add_argument("--out", required=True, help="file to write: NAME.onnx, NAME.pt2 or NAME.pt (TorchScript)")
    from .export import DEFAULT_OPSET, DEFAULT_TOLERANCE

    export.add_argument("--opset", type=_positive_int, default=None,
                        help=f"ONNX opset, for --format onnx only (default {DEFAULT_OPSET})")
    export.add_argument("--tolerance", type=_tolerance, default=DEFAULT_TOLERANCE,
                        help="largest absolute logit difference the export may show against the checkpoint on random "
                        f"inputs; above it nothing is written (default {DEFAULT_TOLERANCE:g})")
    _add_device_args(export)


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"--tolerance must be a finite number >= 0 (like 1e-4), got {text!r}")
    return value


def _run_export(args: argparse.Namespace) -> int:
    from .export import export_checked

    result = export_checked(args.checkpoint, args.format, args.out, opset=args.opset, tolerance=args.tolerance,
                            **_run_options(export_checked, args))
    path = Path(result["out"])
    opset = f", opset {result['opset']}" if result["opset"] is not None else ""
    print(f"exported {args.checkpoint} as {result['format']}{opset} to {path} ({result['bytes'] / 1e6:.2f} MB; "
          f"metadata {result['metadata']})")
    print(f"checked against the checkpoint on {result['n_inputs']} random {'x'.join(map(str, result['input_shape']))} "
          f"inputs: largest absolute difference {result['max_abs_diff']:.1e} (tolerance {result['tolerance']:g})")
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


def _add_lr_find_parser(commands) -> None:
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


def _run_lr_find(args: argparse.Namespace) -> int:
    from .lr_find import run_lr_find
    from .train import TrainConfig

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
    from .cli_audit_apply import add_parser as _add_audit_apply_parser

    _add_audit_apply_parser(commands)
    for command in commands.choices.values():  # --debug and --no-progress after the command too
        _add_global_args(command, argparse.SUPPRESS)
    return parser


def _add_global_args(parser: argparse.ArgumentParser, default) -> None:
    """--debug and --no-progress, on the main parser (default off) and on every command (default
    SUPPRESS, so a flag given before the command is not undone): before or after the command."""
    parser.add_argument("--debug", action="store_true", default=default,
                        help="on an unexpected error, show the traceback (before or after the command)")
    parser.add_argument("--no-progress", action="store_true", default=default,
                        help="hide progress bars (before or after the command)")


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


def _train_run_options(args: argparse.Namespace) -> dict:
    """TrainConfig's ``device``/``amp`` from --device/--amp (checked by the one device parser)."""
    from .train import TrainConfig

    options = _run_options(TrainConfig, args)
    if options.get("device") is None:
        options.pop("device", None)  # TrainConfig's own default: the CPU
    return options


def _run(args: argparse.Namespace) -> int:
    _check_outputs(args)
    if args.command in _DRAWING_COMMANDS and not getattr(args, "no_plots", False):
        from .report import require_plots  # matplotlib (ttakit[plots]): say so before any work

        require_plots("writing PNG plots" + (" (--no-plots skips them)" if args.command == "evaluate" else ""))
    if hasattr(args, "device"):  # every command that runs a model: one device parser, before any work
        from .engine import check_device

        check_device(args.device)
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
        from .experiment import evaluate_checkpoint

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
        from .experiment import search_checkpoint
        from .search.run import check_search_split

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
    if args.command == "audit-apply":
        from .cli_audit_apply import run as _run_audit_apply

        return _run_audit_apply(args)
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


class _WeightsAction(argparse.Action):
    """--weights 1,1,2 or --weights 1 --weights 1 --weights 2 (the one list syntax)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        try:
            new = _weights(str(values))
        except argparse.ArgumentTypeError as err:
            raise argparse.ArgumentError(self, str(err)) from None
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest, None) or []), *new])


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
        seed=args.tie_break_seed,
        calibrate=not args.no_calibrate,
        max_batch=args.max_batch,
        out_dir=args.out,
        progress=progress,
        allow_other_model=args.allow_other_model,
        **_run_options(ensemble_checkpoints, args),
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
    _add_split_arg(audit, "audit", "train", "split to audit (default train)")
    audit.add_argument("--folds", type=_folds, default=None,
                       help="train K models on K-1 folds each and score the held-out fold (needs a checkpoint)")
    audit.add_argument("--epochs", type=_positive_int, default=None, help="epochs per fold model (default: the recipe's)")
    audit.add_argument("--policy", default=None, help="TTA policy for the probabilities (default: train-aug or none)")
    _add_list_arg(audit, "--method", default=["rule", "cleanlab"], metavar="METHOD", help="rule, cleanlab or both")
    audit.add_argument("--mislabel-threshold", type=_probability, default=0.9,
                       help="rule: flag when another class is on top and the probability --mislabel-by names "
                       "is above this (default 0.9)")
    audit.add_argument("--mislabel-by", default="others", choices=("others", "top"),
                       help="rule: the probability compared with the threshold: all classes but the label together, "
                       "1 - p[label] (default; benchmarks/audit.py measures it best on flipped labels), or the top "
                       "class's")
    audit.add_argument("--ambiguous-range", type=_prob_range, default=(0.5, 0.6),
                       help="rule: flag when the top probability lies in LOW-HIGH (default 0.5-0.6)")
    audit.add_argument("--write-clean", default=None, metavar="FILE",
                       help="write the data without flagged images: an .npz, or a .txt file list for image folders")
    audit.add_argument("--remove", default="all", choices=("all", "mislabelled", "rule", "cleanlab"),
                       help="which flagged images --write-clean drops (default all)")
    audit.add_argument("--limit", type=_positive_int, default=None, help="audit the first N images")
    audit.add_argument("--fold-seed", "--seed", dest="fold_seed", type=int, default=0,
                       help="seed of the fold assignment (--seed: the old spelling, deprecated)")
    _add_device_args(audit, max_batch=True)
    audit.add_argument(
        "--allow-other-model", action="store_true",
        help="use a --policy whose weights, gate, temperature or matrix were fitted on another checkpoint "
        "(refused by default: a policy records the model it was searched on)",
    )
    audit.add_argument("--out", default="audit", help="folder for issues.csv and contact_sheet.png (default audit)")


def _run_audit(args: argparse.Namespace, progress: bool) -> int:
    from .audit import audit_checkpoint

    check_out_path(args.out, "folder")
    check_out_path(args.write_clean, "file", "--write-clean")
    methods = list(args.method)
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
        seed=args.fold_seed,
        progress=progress,
        allow_other_model=args.allow_other_model,
        **_run_options(audit_checkpoint, args),
    )
    print(results["table"])
    from .report import plural

    print(f"\n{results['n_flagged_images']} of {plural(results['n_images'], 'image')} flagged; "
          f"scored by {results['scored_by']}")
    print(f"issues: {results['issues_csv']}")
    if results["contact_sheet"]:
        print(f"contact sheet: {results['contact_sheet']}")
    if results.get("review_page"):
        print(f"review page (open it in a browser, decide, export decisions.csv): {results['review_page']}")
    if results["clean"]:
        kept = results["clean_manifest"]
        print(f"cleaned data ({kept['n_kept']} images, {results['removed']} removed; the {kept['n_test']} held-out "
              f"test images kept apart as its test split): {results['clean']}; "
              f"retrain with: ttakit train --data {results['clean']}")
    return 0


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Bad input: one line on stderr, exit code 2. A bug in ttakit: one line
    and exit code 1, with the traceback under ``--debug`` (accepted before or after the command)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # A usage error exits here through argparse (SystemExit(2)) after one line on stderr.
    first = next((k for k, a in enumerate(argv) if not a.startswith("-")), None)  # the command
    if first is not None and argv[first:first + 2] == ["audit", "apply"]:  # = `ttakit audit-apply ...`
        argv = [*argv[:first], "audit-apply", *argv[first + 2:]]
    args = build_parser().parse_args(argv)
    from .html_report import record_command  # report.html shows the command that made it

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
