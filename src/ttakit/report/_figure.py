"""The matplotlib figure helpers every plot shares (matplotlib is the ``plots`` extra)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._io import atomic_write
from ..errors import InvalidInputError

if TYPE_CHECKING:  # matplotlib is the optional extra ttakit[plots], imported only to draw
    from matplotlib.figure import Figure
from .tables import _is_number, _scalar

_DPI = 120
_POSITIVE = "#2a7ab9"
_NEGATIVE = "#d1495b"


# --------------------------------------------------------------------------- tables


PLOTS_HINT = "pip install 'ttakit[plots]'"


def require_plots(what: str = "drawing plots") -> None:
    """Raise a one-line :class:`~ttakit.predictors.MissingExtraError` unless matplotlib (the
    optional extra ``ttakit[plots]``) can be imported. ``import ttakit`` never imports it."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        from ..predictors import MissingExtraError

        raise MissingExtraError(
            f"{what} needs matplotlib: {PLOTS_HINT} ({exc.name or exc} is not installed)"
        ) from exc


def _new_figure(width: float, height: float) -> Figure:
    require_plots()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=_DPI))
    finally:
        fig.clear()  # a bare Figure is not in pyplot's registry; this frees its artists


def _check_path(path: object) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidInputError(
            f"Expected argument `path` to be a file path (str or PathLike), but got {type(path).__name__}"
        )
    return Path(path)


def _finite_or_nan(value: Any) -> float:
    value = _scalar(value)
    if value is None or not _is_number(value):
        return math.nan
    return float(value)


def _decimals(ref: float, digits: int) -> int:
    """Decimals that show ``digits`` significant digits of ``ref`` (a span or magnitude)."""
    if not ref > 0 or not math.isfinite(ref):
        return 3
    return min(8, max(0, digits - 1 - math.floor(math.log10(ref))))
