"""Exception types. Every error ttakit raises on bad user input derives from :class:`TTAKitError`.

The CLI turns a ``TTAKitError`` into a one-line message and exit code 2; library users can
catch the specific subclasses. Each subclass also derives from the builtin exception a user
would naturally expect (``ValueError``, ``FileNotFoundError``), so ``except ValueError`` works.
"""

from __future__ import annotations


class TTAKitError(Exception):
    """Base class of every error raised for bad input, data, checkpoints or policies."""


class InvalidInputError(TTAKitError, ValueError):
    """A tensor or argument has the wrong type, rank, layout or value."""


class NotInvertibleError(TTAKitError, ValueError):
    """A transform was asked to map a target back that it cannot invert exactly."""


class ModelOutputError(TTAKitError, ValueError):
    """The model returned NaN/inf, or outputs whose shape differs between views."""


class DataError(TTAKitError, ValueError):
    """A data set is missing, corrupt, empty or in the wrong format."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A data set or image file does not exist where it was looked for."""


class CheckpointError(TTAKitError, ValueError):
    """A file is not a ttakit checkpoint, or does not fit the data it is used with."""


class PolicyFormatError(TTAKitError, ValueError):
    """A policy file is foreign, corrupt, or from a newer format version."""


class UnknownNameError(TTAKitError, KeyError, ValueError):
    """A name (architecture, data set, policy, merge mode, ...) is not registered."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


def unknown_name(kind: str, name: object, choices) -> UnknownNameError:
    """Build the standard error for an unknown registered name, listing the valid choices."""
    listed = ", ".join(sorted(str(c) for c in choices))
    return UnknownNameError(f"unknown {kind} {name!r}; expected one of: {listed}")
