"""Progress for people: a live bar on a terminal, one line per stage in a log.

Piped into a file, a redrawn bar writes hundreds of lines; :func:`progress` gives a tqdm bar
only when stderr is a terminal, and otherwise prints one summary line when the stage ends
(``desc: 12000 img in 3.1 s (loss=0.41)``), or nothing when ``log=False`` (for callers that
print their own line per stage, such as the trainer's epoch summary).

Example:
    >>> from ttakit.progress import progress
    >>> total = 0
    >>> for x in progress(range(3), desc="adding", enabled=False):
    ...     total += x
    >>> total
    3
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

__all__ = ["Progress", "is_terminal", "note", "progress"]

# TTAKIT_PROGRESS=bar forces bars, =log forces log lines, =off silences both (tests, CI logs).
ENV_VAR = "TTAKIT_PROGRESS"


def is_terminal(stream: TextIO | None = None) -> bool:
    """True when ``stream`` (default stderr) is an interactive terminal.

    ``TTAKIT_PROGRESS=bar`` or ``=log`` overrides the detection.
    """
    mode = os.environ.get(ENV_VAR, "").strip().lower()
    if mode == "bar":
        return True
    if mode in ("log", "off"):
        return False
    stream = stream if stream is not None else sys.stderr
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


def _silenced() -> bool:
    return os.environ.get(ENV_VAR, "").strip().lower() == "off"


class Progress:
    """What :func:`progress` returns: iterate it, or call :meth:`update`; :meth:`close` ends
    the stage (a ``with`` block closes it too).

    On a terminal it wraps a tqdm bar; otherwise it counts silently and, when ``log`` is
    true, prints one line at :meth:`close`.
    """

    def __init__(
        self,
        iterable: Iterable[Any] | None,
        desc: str,
        total: int | None,
        unit: str,
        enabled: bool,
        log: bool,
        leave: bool,
        stream: TextIO | None,
    ):
        self.iterable = iterable
        self.desc = desc
        self.unit = unit
        self.n = 0
        self.postfix: dict[str, Any] = {}
        self.stream = stream
        self.started = time.perf_counter()
        self.closed = False
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total = total
        enabled = enabled and not _silenced()
        self.bar = None
        self.log = enabled and log
        if enabled and is_terminal(stream):
            from tqdm.auto import tqdm

            self.bar = tqdm(
                iterable, desc=desc, total=total, unit=unit, leave=leave, file=stream, dynamic_ncols=True
            )
            self.log = False

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("this Progress was made without an iterable; call update() instead")
        if self.bar is not None:
            try:
                yield from self.bar
            finally:
                self.n = self.bar.n
                self.close()
            return
        try:
            for item in self.iterable:
                yield item
                self.n += 1
        finally:
            self.close()

    def update(self, n: int = 1) -> None:
        """Count ``n`` more items done."""
        self.n += n
        if self.bar is not None:
            self.bar.update(n)

    def set_postfix(self, **values: Any) -> None:
        """Show ``key=value`` pairs after the bar (and in the log line)."""
        self.postfix = values
        if self.bar is not None:
            self.bar.set_postfix(**values)

    def close(self) -> None:
        """End the stage: close the bar, or print the stage's one log line."""
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
            return
        if self.log:
            seconds = time.perf_counter() - self.started
            extra = ", ".join(f"{k}={v}" for k, v in self.postfix.items())
            count = f"{self.n}/{self.total}" if self.total is not None and self.total != self.n else f"{self.n}"
            line = f"{self.desc}: {count} {self.unit} in {seconds:.1f} s" + (f" ({extra})" if extra else "")
            print(line, file=self.stream if self.stream is not None else sys.stderr, flush=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(
    iterable: Iterable[Any] | None = None,
    *,
    desc: str,
    total: int | None = None,
    unit: str = "it",
    enabled: bool = True,
    log: bool = True,
    leave: bool = False,
    stream: TextIO | None = None,
) -> Progress:
    """A progress display for one stage of work.

    Args:
        iterable: what to iterate (optional; without it, call ``update(n)``).
        desc: the stage, e.g. ``"epoch 1/3"`` or ``"hflip"``.
        total: how many items (taken from ``len(iterable)`` when it has one).
        unit: the item's name, e.g. ``"img"`` or ``"batch"``.
        enabled: False shows nothing at all (``--no-progress``).
        log: off a terminal, print the stage's one line at the end (False: print nothing).
        leave: keep the finished bar on a terminal.
        stream: where to write (default stderr).

    Returns:
        A :class:`Progress`: iterable, ``update(n)``, ``set_postfix(**kw)``, ``close()``,
        usable in a ``with`` block.
    """
    return Progress(iterable, desc, total, unit, enabled, log, leave, stream)


def note(message: str, *, enabled: bool = True, stream: TextIO | None = None) -> None:
    """Print one status line without breaking a live bar (``tqdm.write`` on a terminal).

    Goes to stdout by default, like the results it announces; nothing when ``enabled`` is
    false or ``TTAKIT_PROGRESS=off``.
    """
    if not enabled or _silenced():
        return
    target = stream if stream is not None else sys.stdout
    if is_terminal():
        from tqdm.auto import tqdm

        tqdm.write(message, file=target)
        return
    print(message, file=target, flush=True)
