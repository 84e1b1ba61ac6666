"""What every command shares: the help formatter, one-line errors, list, size, split, device and output arguments."""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ..errors import InvalidInputError

EXIT_BUG = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
SPLITS = ("train", "val", "test")


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


# --------------------------------------------------------------------------- running a model


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

    from ..engine import check_device

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


def _model_options(args: argparse.Namespace) -> dict:
    """The options of :func:`_add_model_args` that were given, as ``ttakit.predictors.load`` takes them."""
    names = ("layout", "input_size", "channels", "pixel_range", "mean", "std", "classes", "outputs")
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _add_global_args(parser: argparse.ArgumentParser, default) -> None:
    """--debug and --no-progress, on the main parser (default off) and on every command (default
    SUPPRESS, so a flag given before the command is not undone): before or after the command."""
    parser.add_argument("--debug", action="store_true", default=default,
                        help="on an unexpected error, show the traceback (before or after the command)")
    parser.add_argument("--no-progress", action="store_true", default=default,
                        help="hide progress bars (before or after the command)")


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


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a probability such as 0.9, got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1) such as 0.9, got {text}")
    return value


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


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
