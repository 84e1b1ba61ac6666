"""ttach's module path ``ttach.base``: code written as ``tta.base.Merger(...)`` or
``from ttach.base import Compose`` runs unchanged with ``import ttakit as tta``.

The classes are ttakit's own (see :mod:`ttakit.transforms`, :mod:`ttakit.policy`,
:mod:`ttakit.merge`); :class:`Chain` is ttach's small function pipeline, kept for code that
builds one by hand.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .merge import Merger
from .policy import Compose, Transformer
from .transforms import BaseTransform, DualTransform, ImageOnlyTransform

__all__ = ["BaseTransform", "ImageOnlyTransform", "DualTransform", "Chain", "Transformer", "Compose", "Merger"]


class Chain:
    """ttach's ``Chain``: call ``functions`` in order, each on the previous one's result."""

    def __init__(self, functions: Sequence[Callable[[Any], Any]] | None):
        self.functions = list(functions or [])

    def __call__(self, x: Any) -> Any:
        for f in self.functions:
            x = f(x)
        return x
