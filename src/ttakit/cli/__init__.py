"""``ttakit`` command line: one module per command (``cli/<command>.py``), each with
``add_parser(commands)`` and ``run(args) -> int``: parse, call one job, print. This module
only dispatches; bad input ends in a one-line error and exit code 2."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence

from .. import __version__
from ..errors import TTAKitError
from . import audit, audit_apply, demo, ensemble, evaluate, export, lr_find, predict, search, train
from ._common import (
    AMP_HELP,
    COMMAND_SPLITS,
    DEVICE_HELP,
    EXIT_BAD_INPUT,
    EXIT_BUG,
    EXIT_INTERRUPTED,
    _add_global_args,
    _one_line,
    _OneLineParser,
    check_out_path,
)

__all__ = ["main", "build_parser", "EXIT_BAD_INPUT", "EXIT_BUG", "EXIT_INTERRUPTED", "AMP_HELP", "DEVICE_HELP", "COMMAND_SPLITS"]

# Every command, in the order `ttakit --help` lists them. A command module names itself (NAME)
# and may declare OUTPUTS (paths checked before any work) and DRAWS (it needs ttakit[plots]).
COMMANDS = (train, evaluate, search, demo, predict, export, lr_find, ensemble, audit, audit_apply)
_BY_NAME = {command.NAME: command for command in COMMANDS}


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="ttakit", description="Test-time augmentation for image models.")
    parser.add_argument("--version", action="version", version=f"ttakit {__version__}")
    _add_global_args(parser, False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(commands)
    for command in commands.choices.values():  # --debug and --no-progress after the command too
        _add_global_args(command, argparse.SUPPRESS)
    return parser


def _run(args: argparse.Namespace) -> int:
    """What every command checks before any work (output paths, matplotlib, the device), then its ``run``."""
    command = _BY_NAME[args.command]
    for name, kind, flag in getattr(command, "OUTPUTS", ()):
        check_out_path(getattr(args, name, None), kind, flag)
    draws = getattr(command, "DRAWS", None)
    if draws and not getattr(args, "no_plots", False):
        from ..report._figure import (
            require_plots,  # matplotlib (ttakit[plots]): say so before any work
        )

        require_plots(draws)
    if hasattr(args, "device"):  # every command that runs a model: one device parser, before any work
        from ..engine import check_device

        check_device(args.device)
    return command.run(args)


def _error(args: argparse.Namespace, message: str) -> None:
    """One line on stderr; under torchrun it names the rank (``rank R of W failed: ...``), so the
    job's log says which process ended it and why."""
    from ..jobs._distributed import rank_failure

    if args.debug:
        traceback.print_exc()
    print(f"ttakit {args.command}: {rank_failure(message)}", file=sys.stderr)


def _quiet_other_ranks(args: argparse.Namespace) -> None:
    """Under torchrun only rank 0 prints results and progress; the others print only their failures."""
    from ..jobs._distributed import detect

    if not detect().main:
        sys.stdout = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 (for the life of the process)
        args.no_progress = True


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
        _quiet_other_ranks(args)
        return _run(args)
    except TTAKitError as err:
        _error(args, f"error: {_one_line(err)}")
        return EXIT_BAD_INPUT
    except OSError as err:  # the environment, not ttakit: a full disk, a file removed under us
        where = f" {err.filename!r}" if err.filename else ""
        _error(args, f"error: cannot use{where}: {err.strerror or err}; check the path and its permissions")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(
            f"ttakit {args.command}: interrupted; results finished before the interruption are kept on disk",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    except Exception as err:  # a bug in ttakit itself
        _error(args, f"internal error: {type(err).__name__}: {_one_line(err)} "
               "(a bug in ttakit; run with --debug for the traceback)")
        return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
