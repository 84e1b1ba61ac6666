"""Reports: plain-text and Markdown tables, JSON + Markdown results, and PNG plots.

Tables take ``rows: list[dict]`` (one dict per row, keys are column names). Plots are
drawn on a bare :class:`matplotlib.figure.Figure` rendered by the Agg canvas, never through
``pyplot``: no backend is selected, no global figure registry is touched, and the
functions are safe to call from a headless process or a thread. Every file is written
atomically (see :mod:`ttakit._io`).

Example:
    >>> print(format_table([{"policy": "none", "accuracy": 0.9152}, {"policy": "hflip", "accuracy": 0.92}]))
    policy  accuracy
    ------  --------
    none      0.9152
    hflip     0.9200
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ._io import atomic_write, atomic_write_text
from .errors import InvalidInputError
from .metrics import _check_n_bins, expected_calibration_error, reliability_bins

if TYPE_CHECKING:  # matplotlib is the optional extra ttakit[plots], imported only to draw
    from matplotlib.figure import Figure

__all__ = [
    "format_mean_std",
    "format_table",
    "markdown_table",
    "lift_plot_layout",
    "plot_candidate_lifts",
    "plot_policy_metrics",
    "plot_reliability_diagram",
    "plot_views_curve",
    "write_results",
]

_DPI = 120
_POSITIVE = "#2a7ab9"
_NEGATIVE = "#d1495b"


# --------------------------------------------------------------------------- tables


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _scalar(value: Any) -> Any:
    # 0-d tensors and NumPy scalars show up in result rows; treat them as numbers.
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if hasattr(value, "item") and hasattr(value, "dtype") and getattr(value, "ndim", 1) == 0:
        return value.item()
    return value


def _cell(value: Any, floatfmt: str) -> str:
    value = _scalar(value)
    if value is None:
        return "-"
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return str(int(value))
    if _is_number(value):
        return format(float(value), floatfmt)
    return str(value)


def _columns(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None) -> list[str]:
    if (
        not isinstance(rows, Sequence)
        or isinstance(rows, (str, bytes))
        or not all(isinstance(r, Mapping) for r in rows)
    ):
        raise InvalidInputError(
            f"Expected argument `rows` to be a list of dicts, but got {type(rows).__name__}"
        )
    if columns is not None:
        if isinstance(columns, str) or not all(isinstance(c, str) for c in columns):
            raise InvalidInputError(
                f"Expected argument `columns` to be a list of column names, but got {columns!r}"
            )
        return list(columns)
    seen: dict[str, None] = {}
    for row in rows:
        for key in row:
            seen.setdefault(str(key), None)
    return list(seen)


def _grid(
    rows: Sequence[Mapping[str, Any]], columns: list[str], floatfmt: str
) -> tuple[list[list[str]], list[list[bool]], list[bool]]:
    """Cells as text, whether each cell is numeric, and whether each column is numeric."""
    try:
        format(0.5, floatfmt)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(
            f"Expected argument `floatfmt` to be a float format spec like '.4f', but got {floatfmt!r}"
        ) from exc
    text = [[_cell(row.get(col), floatfmt) for col in columns] for row in rows]
    numeric = [[_is_number(_scalar(row.get(col))) for col in columns] for row in rows]
    col_numeric = []
    for j, col in enumerate(columns):
        present = [numeric[i][j] for i, row in enumerate(rows) if _scalar(row.get(col)) is not None]
        col_numeric.append(bool(present) and all(present))
    return text, numeric, col_numeric


def format_table(
    rows: list[dict],
    columns: list[str] | None = None,
    floatfmt: str = ".4f",
    title: str | None = None,
) -> str:
    """An aligned plain-text table for a terminal.

    Columns are separated by two spaces; numbers are right-aligned, text left-aligned, and
    a header is right-aligned when every value in its column is a number. ``None`` and
    missing keys show as ``-``. Floats use ``floatfmt``; ints and bools print as they are.

    Args:
        rows: one dict per row.
        columns: the columns in order; default every key, in order of first appearance.
        floatfmt: format spec for floats, e.g. ``".4f"`` or ``".2%"``.
        title: an optional line above the header.

    Returns:
        The table without a trailing newline; lines carry no trailing spaces. With no
        columns at all, just the title (or ``""``).
    """
    cols = _columns(rows, columns)
    if not cols:
        return "" if title is None else str(title)
    text, numeric, col_numeric = _grid(rows, cols, floatfmt)
    widths = [max([len(c)] + [len(r[j]) for r in text]) for j, c in enumerate(cols)]

    def line(cells: list[str], right: list[bool]) -> str:
        parts = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right, strict=True)]
        return "  ".join(parts).rstrip()

    out = [] if title is None else [str(title)]
    out.append(line(cols, col_numeric))
    out.append("  ".join("-" * w for w in widths))
    for cells, num in zip(text, numeric, strict=True):
        out.append(
            line(cells, [n or (c == "-" and cn) for n, c, cn in zip(num, cells, col_numeric, strict=True)])
        )
    return "\n".join(out)


def markdown_table(
    rows: list[dict], columns: list[str] | None = None, floatfmt: str = ".4f"
) -> str:
    """A GitHub-flavoured Markdown table, padded so the source is readable too.

    Numeric columns (every value a number or ``None``) are right-aligned (``---:``), others
    left-aligned (``:---``). ``None`` and missing keys show as ``-``; ``|`` in text is
    escaped and newlines become spaces.

    Args:
        rows: one dict per row.
        columns: the columns in order; default every key, in order of first appearance.
        floatfmt: format spec for floats.

    Returns:
        The table without a trailing newline (``""`` when there are no columns).
    """
    cols = _columns(rows, columns)
    if not cols:
        return ""
    text, _, col_numeric = _grid(rows, cols, floatfmt)

    def esc(s: str) -> str:
        return s.replace("|", "\\|").replace("\r\n", " ").replace("\n", " ")

    header = [esc(c) for c in cols]
    body = [[esc(c) for c in r] for r in text]
    widths = [max([3, len(h)] + [len(r[j]) for r in body]) for j, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        parts = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, col_numeric, strict=True)]
        return "| " + " | ".join(parts) + " |"

    rule = [
        "-" * (w - 1) + ":" if num else ":" + "-" * (w - 1) for w, num in zip(widths, col_numeric, strict=True)
    ]
    out = [line(header), "| " + " | ".join(rule) + " |"]
    out.extend(line(r) for r in body)
    return "\n".join(out)


def format_mean_std(mean: float, std: float | None, fmt: str = ".2f", scale: float = 1.0) -> str:
    """``mean ± std`` as text, both multiplied by ``scale``, e.g. ``"91.52 ± 0.31"``.

    Args:
        mean: the mean.
        std: the standard deviation; ``None`` prints the mean alone.
        fmt: format spec for both numbers (a ``+`` flag applies to the mean only).
        scale: factor applied to both, e.g. 100 for accuracy in percent.

    Example:
        >>> format_mean_std(0.91523, 0.0031, scale=100)
        '91.52 ± 0.31'
    """
    if not _is_number(_scalar(mean)):
        raise InvalidInputError(f"Expected argument `mean` to be a number, but got {mean!r}")
    if std is not None and not _is_number(_scalar(std)):
        raise InvalidInputError(f"Expected argument `std` to be a number or None, but got {std!r}")
    try:
        m = format(float(_scalar(mean)) * scale, fmt)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(
            f"Expected argument `fmt` to be a float format spec like '.2f', but got {fmt!r}"
        ) from exc
    if std is None:
        return m
    # a sign flag ("+.2f") is for the mean; a spread is never signed
    return f"{m} ± {format(float(_scalar(std)) * scale, fmt.replace('+', '', 1))}"


# --------------------------------------------------------------------------- results files


def _jsonable(obj: Any) -> Any:
    """Plain JSON values: tensors/arrays as lists, dataclasses as dicts, NaN/inf as null."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        return _jsonable(obj.tolist())
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        f = float(obj)
        return f if math.isfinite(f) else None
    raise InvalidInputError(
        f"Expected argument `results` to hold only JSON-serialisable values, but got a "
        f"{type(obj).__name__}: {obj!r}"
    )


def write_results(out_dir: str | os.PathLike, results: dict, markdown: str) -> tuple[Path, Path]:
    """Write ``results.json`` and ``results.md`` into ``out_dir``, each atomically.

    Tensors and NumPy values become lists/numbers, dataclasses (e.g.
    :class:`~ttakit.metrics.McNemarResult`) become objects, and NaN/inf become ``null`` so
    the file is strict JSON. ``out_dir`` is created if needed.

    Returns:
        ``(json_path, markdown_path)``.
    """
    if not isinstance(results, Mapping):
        raise InvalidInputError(
            f"Expected argument `results` to be a dict, but got {type(results).__name__}"
        )
    if not isinstance(markdown, str):
        raise InvalidInputError(
            f"Expected argument `markdown` to be a str, but got {type(markdown).__name__}"
        )
    out = Path(out_dir)
    text = json.dumps(_jsonable(results), indent=2, allow_nan=False) + "\n"
    json_path = atomic_write_text(out / "results.json", text)
    md_path = atomic_write_text(
        out / "results.md", markdown if markdown.endswith("\n") else markdown + "\n"
    )
    return json_path, md_path


# --------------------------------------------------------------------------- plots


PLOTS_HINT = "pip install 'ttakit[plots]'"


def require_plots(what: str = "drawing plots") -> None:
    """Raise a one-line :class:`~ttakit.predictors.MissingExtraError` unless matplotlib (the
    optional extra ``ttakit[plots]``) can be imported. ``import ttakit`` never imports it."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        from .predictors import MissingExtraError

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


def plot_policy_metrics(
    rows: list[dict],
    path: str | os.PathLike,
    metrics: Sequence[str] = ("accuracy", "nll"),
    title: str | None = None,
) -> Path:
    """What TTA did per policy (and model), as a PNG.

    When rows carry ``row["lift"]`` (accuracy minus plain inference, as a fraction; the plain
    row has none), the figure shows what matters: the lift in points with its paired bootstrap
    interval (``lift_ci_low``/``lift_ci_high``) and the NLL change (``lift_nll``, labelled with
    the NLL to 4 decimals), one horizontal bar per policy, grouped and coloured by model. The
    lift axis is zoomed so small lifts stay visible; bars beyond it are hatched and labelled
    with their value (see :func:`lift_plot_layout`).

    Otherwise: a bar chart of ``metrics``, one panel per metric, one bar per row. Each row needs ``row["name"]`` and the metric values; ``row[f"{metric}_std"]`` draws an
    error bar. When rows carry ``row["model"]``, bars are grouped by name with one colour
    per model. The y-axis is zoomed to the data (differences between policies are small),
    so read values from the axis, not from bar lengths.

    Args:
        rows: one dict per policy (and model).
        path: the PNG to write.
        metrics: row keys to plot, one panel each.
        title: figure title.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = _check_path(path)
    _columns(rows, None)
    if not rows:
        raise InvalidInputError(
            "Expected argument `rows` to hold at least one row, but it is empty"
        )
    if any(not math.isnan(_finite_or_nan(row.get("lift"))) for row in rows) and all("name" in r for r in rows):
        return _plot_lifts(rows, path, title or "Lift over plain inference per TTA policy")
    title = title or "Metrics per TTA policy"
    if isinstance(metrics, str) or not metrics:
        raise InvalidInputError(
            f"Expected argument `metrics` to be a non-empty list of row keys, but got {metrics!r}"
        )
    for i, row in enumerate(rows):
        if "name" not in row:
            raise InvalidInputError(
                f"Expected every row to have a 'name' key, but row {i} is {dict(row)!r}"
            )
    for metric in metrics:
        if not any(not math.isnan(_finite_or_nan(row.get(metric))) for row in rows):
            raise InvalidInputError(
                f"Expected argument `metrics` to name numeric row keys, but no row has a value for {metric!r}"
            )

    names = list(dict.fromkeys(str(r["name"]) for r in rows))
    grouped = any("model" in r for r in rows)
    models = list(dict.fromkeys(str(r.get("model", "-")) for r in rows)) if grouped else [""]
    n_groups, n_models = len(names), len(models)
    n_bars = n_groups * n_models
    width = min(16.0, max(6.0, 1.2 + 0.32 * n_bars + 0.25 * n_groups))
    fig = _new_figure(width, 1.2 + 2.8 * len(metrics) + (0.9 if max(map(len, names)) > 6 else 0.3))
    axes = fig.subplots(len(metrics), 1, sharex=True, squeeze=False)[:, 0]
    bar_w = 0.8 / n_models
    colors = [f"C{i % 10}" for i in range(n_models)]
    annotate = n_bars <= 16

    for ax, metric in zip(axes, metrics, strict=True):
        lows, highs = [], []
        present = [_finite_or_nan(r.get(metric)) for r in rows]
        present = [v for v in present if not math.isnan(v)]
        spread = max(present) - min(present)
        digits = _decimals(spread if spread > 0 else max(abs(v) for v in present), 2)
        for m, model in enumerate(models):
            xs, ys, errs = [], [], []
            for g, name in enumerate(names):
                match = [
                    r
                    for r in rows
                    if str(r["name"]) == name and (not grouped or str(r.get("model", "-")) == model)
                ]
                if not match:
                    continue
                y = _finite_or_nan(match[0].get(metric))
                if math.isnan(y):
                    continue
                e = _finite_or_nan(match[0].get(f"{metric}_std"))
                xs.append(g + (m - (n_models - 1) / 2) * bar_w)
                ys.append(y)
                errs.append(0.0 if math.isnan(e) else e)
                lows.append(y - errs[-1])
                highs.append(y + errs[-1])
            if not xs:
                continue
            bars = ax.bar(
                xs,
                ys,
                width=bar_w * 0.92,
                color=colors[m],
                label=model if grouped else None,
                yerr=errs if any(errs) else None,
                capsize=3 if any(errs) else 0,
                ecolor="#333333",
            )
            if annotate:
                ax.bar_label(bars, labels=[f"{v:.{digits}f}" for v in ys], padding=2, fontsize=7)
        lo, hi = min(lows), max(highs)
        span = hi - lo
        if lo > 0 and span < 0.5 * hi:  # zoom: small differences on a large base
            pad = max(span * 0.25, abs(hi) * 0.002, 1e-9)
            ax.set_ylim(lo - pad, hi + pad * (1.8 if annotate else 1.0))
        else:
            ax.margins(y=0.15)
        ax.set_ylabel(metric)
        ax.set_title(metric, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    last = axes[-1]
    last.set_xticks(range(n_groups))
    rotate = n_groups > 6 or max(map(len, names)) > 10
    last.set_xticklabels(
        names, rotation=45 if rotate else 0, ha="right" if rotate else "center", fontsize=8
    )
    last.set_xlabel("policy")
    if grouped:
        axes[0].legend(title="model", fontsize=8, loc="best")
    fig.suptitle(title, wrap=True)  # wrapped at the figure's edges, not clipped
    return _save(fig, path)


def _zoom_limit(values: Sequence[float], intervals: Sequence[tuple[float, float] | None], core: float) -> float:
    """Half-width of an axis centred on 0 that shows every value within ``core`` of 0 with its
    whole interval at a readable size; values beyond ``core`` are drawn clipped."""
    every = [abs(v) for v in values if math.isfinite(v)]
    every += [abs(b) for ci in intervals if ci for b in ci if math.isfinite(b)]
    if not every:
        return 1.0
    inside: list[float] = []
    for value, ci in zip(values, intervals, strict=True):
        # values too small to matter do not set a zoom: the axis then shows everything
        if math.isfinite(value) and abs(value) <= core and (abs(value) > core * 1e-3 or (ci and max(map(abs, ci)) > core * 1e-3)):
            inside += [abs(value), *(abs(b) for b in (ci or ()) if math.isfinite(b))]
    if not inside or max(every) <= core:
        return max(max(every) * 1.12, 1e-6)
    return max(max(inside) * 1.12, core * 0.1, 1e-6)


def lift_plot_layout(rows: Sequence[Mapping[str, Any]], core_points: float = 2.0) -> dict[str, Any]:
    """What :func:`plot_policy_metrics` draws for rows carrying a ``lift``: one entry per
    non-baseline row with the lift and its interval in points, the NLL change, the value drawn
    (clipped to the zoomed axis) and the text printed beside the bar.

    The lift axis is zoomed to lifts within ``core_points`` points of zero (with their
    intervals), so a collapse of tens of points (d4 on a model that never saw rotations) does
    not flatten a +0.35-point lift; clipped bars are hatched and labelled with their value.
    """
    entries = []
    for row in rows:
        lift = _finite_or_nan(row.get("lift"))
        if math.isnan(lift):
            continue
        low, high = _finite_or_nan(row.get("lift_ci_low")), _finite_or_nan(row.get("lift_ci_high"))
        nll, d_nll = _finite_or_nan(row.get("nll")), _finite_or_nan(row.get("lift_nll"))
        entry = {
            "name": str(row["name"]),
            "model": str(row.get("model", "")),
            "lift_pts": 100 * lift,
            "ci_pts": (100 * low, 100 * high) if not (math.isnan(low) or math.isnan(high)) else None,
            "nll": nll,
            "nll_change": d_nll,
        }
        ci = f" [{entry['ci_pts'][0]:+.2f}, {entry['ci_pts'][1]:+.2f}]" if entry["ci_pts"] else ""
        entry["lift_text"] = f"{entry['lift_pts']:+.2f}{ci}"
        change = f"{d_nll:+.4f}" if math.isnan(d_nll) or d_nll == 0 or abs(d_nll) >= 5e-5 else f"{d_nll:+.1e}"
        entry["nll_text"] = f"{nll:.4f} ({change})" if not math.isnan(d_nll) else f"{nll:.4f}"
        entries.append(entry)
    lift_limit = _zoom_limit([e["lift_pts"] for e in entries], [e["ci_pts"] for e in entries], core_points)
    changes = [e["nll_change"] for e in entries if not math.isnan(e["nll_change"])]
    small = sorted(abs(c) for c in changes)
    nll_core = 5 * small[(len(small) - 1) // 2] if small else 1.0  # 5x the lower median change
    nll_limit = _zoom_limit(changes, [None] * len(changes), max(nll_core, 1e-4))
    for e in entries:
        e["lift_shown"] = max(-lift_limit, min(lift_limit, e["lift_pts"]))
        e["lift_clipped"] = abs(e["lift_pts"]) > lift_limit
        change = 0.0 if math.isnan(e["nll_change"]) else e["nll_change"]
        e["nll_shown"] = max(-nll_limit, min(nll_limit, change))
        e["nll_clipped"] = abs(change) > nll_limit
    return {"entries": entries, "lift_limit": lift_limit, "nll_limit": nll_limit}


def _plot_lifts(rows: Sequence[Mapping[str, Any]], path: Path, title: str) -> Path:
    layout = lift_plot_layout(rows)
    entries = layout["entries"]
    models = list(dict.fromkeys(e["model"] for e in entries))
    plain = {
        str(r.get("model", "")): _finite_or_nan(r.get("accuracy"))
        for r in rows
        if math.isnan(_finite_or_nan(r.get("lift")))
    }
    ys, y, labels = [], 0.0, []
    for model in models:  # one block of bars per model, top to bottom
        for e in entries:
            if e["model"] == model:
                ys.append(y)
                labels.append(e["name"])
                y -= 1.0
        y -= 0.6
    order = [e for model in models for e in entries if e["model"] == model]
    colors = {m: f"C{i % 10}" for i, m in enumerate(models)}
    fig = _new_figure(10.0, 2.2 + 0.62 * len(order))
    ax_lift, ax_nll = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [3, 2]})
    panels = (
        (ax_lift, "lift", layout["lift_limit"], "accuracy lift over plain (points), 95% paired bootstrap interval"),
        (ax_nll, "nll", layout["nll_limit"], "NLL change over plain (lower is better); label: NLL (change)"),
    )
    for ax, kind, limit, xlabel in panels:
        for e, yy in zip(order, ys, strict=True):
            shown, clipped = e[f"{kind}_shown"], e[f"{kind}_clipped"]
            ax.barh(
                yy, shown, height=0.7, color=colors[e["model"]], alpha=0.55 if clipped else 1.0,
                hatch="//" if clipped else None, edgecolor="#333333" if clipped else colors[e["model"]],
            )
            if kind == "lift" and e["ci_pts"]:
                lo, hi = (max(-limit, min(limit, b)) for b in e["ci_pts"])
                ax.plot([lo, hi], [yy, yy], color="#222222", lw=1.4, solid_capstyle="butt")
                for b, edge in ((e["ci_pts"][0], lo), (e["ci_pts"][1], hi)):
                    if abs(b) <= limit:
                        ax.plot([edge, edge], [yy - 0.18, yy + 0.18], color="#222222", lw=1.4)
            text = e["lift_text"] if kind == "lift" else e["nll_text"]
            if clipped:
                text += "  (off scale)"
            ax.text(
                1.01 if kind == "lift" else 1.01, yy, text, transform=ax.get_yaxis_transform(),
                va="center", ha="left", fontsize=8, color="#b00020" if clipped else "#222222",
            )
        ax.axvline(0.0, color="#444444", lw=0.9)
        ax.set_xlim(-limit * 1.04, limit * 1.04)
        from matplotlib.ticker import MaxNLocator  # _new_figure above checked matplotlib is there

        ax.xaxis.set_major_locator(MaxNLocator(nbins=5 if kind == "lift" else 3, symmetric=True))
        ax.tick_params(axis="x", labelsize=8)
        ax.ticklabel_format(axis="x", style="plain", useOffset=False)
        ax.grid(axis="x", alpha=0.3)
        ax.set_axisbelow(True)
        ax.set_xlabel(xlabel, fontsize=8)
    ax_lift.set_yticks(ys)
    ax_lift.set_yticklabels(labels, fontsize=9)
    ax_lift.set_ylim(min(ys) - 0.7, max(ys) + 0.7)
    if len(models) > 1 or models[0]:
        from matplotlib.patches import Patch

        handles = [
            Patch(color=colors[m], label=f"{m}" + (f" (plain {100 * plain[m]:.2f}%)" if not math.isnan(plain.get(m, math.nan)) else ""))
            for m in models
        ]
        fig.legend(handles=handles, loc="outside lower center", ncols=min(4, len(models)), fontsize=8, title="model")
    elif not math.isnan(plain.get("", math.nan)):
        ax_lift.set_title(f"plain inference: {100 * plain['']:.2f}% accuracy", fontsize=9)
    fig.suptitle(title, wrap=True)  # wrapped at the figure's edges, not clipped
    return _save(fig, path)


def plot_reliability_diagram(
    curves: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    path: str | os.PathLike,
    n_bins: int = 15,
    title: str = "Reliability diagram",
) -> Path:
    """Accuracy against confidence per bin for each named ``(probs, labels)`` pair.

    The top panel shows each curve (empty bins skipped) against the diagonal of perfect
    calibration, with its ECE in the legend; the bottom panel shows the share of samples
    per confidence bin. Bins are those of :func:`ttakit.metrics.reliability_bins`.

    Args:
        curves: name -> ``(probs: (N, C), labels: (N,))``, e.g. ``{"no TTA": ..., "hflip": ...}``.
        path: the PNG to write.
        n_bins: equal-width confidence bins.
        title: figure title.
    """
    path = _check_path(path)
    n_bins = _check_n_bins(n_bins)
    if not isinstance(curves, Mapping) or not curves:
        raise InvalidInputError(
            f"Expected argument `curves` to be a non-empty dict name -> (probs, labels), but got {curves!r}"
        )
    stats = {}
    for name, pair in curves.items():
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise InvalidInputError(
                f"Expected argument `curves[{name!r}]` to be a (probs, labels) pair, but got {type(pair).__name__}"
            )
        probs, labels = pair
        stats[str(name)] = (
            reliability_bins(probs, labels, n_bins),
            expected_calibration_error(probs, labels, n_bins),
        )

    fig = _new_figure(6.4, 6.8)
    ax, hist = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], ls="--", color="#888888", lw=1, label="perfect calibration")
    edges = next(iter(stats.values()))[0]["edges"]
    centers = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:], strict=True)]
    n_curves = len(stats)
    step = (edges[1] - edges[0]) / (n_curves + 1)
    for i, (name, (bins, ece)) in enumerate(stats.items()):
        keep = [j for j, c in enumerate(bins["count"]) if c > 0]
        ax.plot(
            [bins["confidence"][j] for j in keep],
            [bins["accuracy"][j] for j in keep],
            marker="o",
            ms=4,
            lw=1.5,
            color=f"C{i % 10}",
            label=f"{name} (ECE {ece:.4f})",
        )
        total = sum(bins["count"])
        offset = (i - (n_curves - 1) / 2) * step
        hist.bar(
            [c + offset for c in centers],
            [c / total for c in bins["count"]],
            width=step * 0.95,
            color=f"C{i % 10}",
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("accuracy")
    ax.set_title(title, wrap=True)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    hist.set_xlabel("confidence (top-label probability)")
    hist.set_ylabel("share of samples")
    hist.grid(alpha=0.3)
    return _save(fig, path)


def plot_views_curve(
    n_views: Sequence[int],
    series: Mapping[str, Sequence[float]],
    path: str | os.PathLike,
    title: str = "Validation metrics vs number of TTA views",
) -> Path:
    """Metrics against the number of views: one panel per series, sharing the x-axis.

    Args:
        n_views: ``(K,)`` numbers of views, e.g. ``[1, 2, 3, 4]``.
        series: name -> ``(K,)`` values, e.g. ``{"accuracy": [...], "nll": [...]}``; the
            name is the panel's y-label. ``None``/NaN values leave a gap.
        path: the PNG to write.
        title: figure title.
    """
    path = _check_path(path)
    if isinstance(n_views, (str, bytes)) or not isinstance(n_views, Sequence) or not n_views:
        raise InvalidInputError(
            f"Expected argument `n_views` to be a non-empty list of ints, but got {n_views!r}"
        )
    xs = [_finite_or_nan(v) for v in n_views]
    if any(math.isnan(x) for x in xs):
        raise InvalidInputError(
            f"Expected argument `n_views` to hold only numbers, but got {list(n_views)!r}"
        )
    if not isinstance(series, Mapping) or not series:
        raise InvalidInputError(
            f"Expected argument `series` to be a non-empty dict name -> values, but got {series!r}"
        )
    for name, values in series.items():
        if (
            isinstance(values, (str, bytes))
            or not isinstance(values, Sequence)
            or len(values) != len(xs)
        ):
            got = len(values) if isinstance(values, Sequence) else type(values).__name__
            raise InvalidInputError(
                f"Expected argument `series[{name!r}]` to have one value per entry of `n_views` "
                f"({len(xs)}), but got {got}"
            )

    fig = _new_figure(6.4, 1.0 + 2.6 * len(series))
    axes = fig.subplots(len(series), 1, sharex=True, squeeze=False)[:, 0]
    for i, (ax, (name, values)) in enumerate(zip(axes, series.items(), strict=True)):
        ys = [_finite_or_nan(v) for v in values]
        ax.plot(xs, ys, marker="o", color=f"C{i % 10}", lw=1.8)
        ax.set_ylabel(str(name))
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("number of views")
    if len(xs) <= 30 and all(float(x).is_integer() for x in xs):
        axes[-1].set_xticks(sorted(set(xs)))
    fig.suptitle(title, wrap=True)  # wrapped at the figure's edges, not clipped
    return _save(fig, path)


def plot_candidate_lifts(
    names: Sequence[str],
    lifts: Sequence[float],
    path: str | os.PathLike,
    xlabel: str = "accuracy lift over no TTA",
    title: str = "Lift per candidate view",
) -> Path:
    """Horizontal bars of each candidate's lift, largest at the top; negative bars in red.

    Args:
        names: ``(K,)`` candidate names (views, transforms or policies).
        lifts: ``(K,)`` lifts, e.g. accuracy with the candidate minus without.
        path: the PNG to write.
        xlabel: x-axis label, stating the metric and its unit.
        title: figure title.
    """
    path = _check_path(path)
    if isinstance(names, str) or not isinstance(names, Sequence) or not names:
        raise InvalidInputError(
            f"Expected argument `names` to be a non-empty list of names, but got {names!r}"
        )
    if isinstance(lifts, torch.Tensor):
        lifts = lifts.detach().cpu().reshape(-1).tolist()
    if isinstance(lifts, str) or not isinstance(lifts, Sequence) or len(lifts) != len(names):
        got = len(lifts) if isinstance(lifts, Sequence) else type(lifts).__name__
        raise InvalidInputError(
            f"Expected argument `lifts` to have one number per name ({len(names)}), but got {got}"
        )
    values = [_finite_or_nan(v) for v in lifts]
    if any(math.isnan(v) for v in values):
        raise InvalidInputError(
            f"Expected argument `lifts` to hold finite numbers, but got {list(lifts)!r}"
        )

    order = sorted(range(len(values)), key=lambda i: values[i])  # ascending: largest drawn on top
    ys = list(range(len(order)))
    vals = [values[i] for i in order]
    labels = [str(names[i]) for i in order]
    longest = max(len(s) for s in labels)
    fig = _new_figure(min(14.0, 5.0 + 0.07 * longest), 1.3 + 0.26 * len(vals))
    ax = fig.subplots()
    bars = ax.barh(ys, vals, color=[_NEGATIVE if v < 0 else _POSITIVE for v in vals], height=0.75)
    ax.axvline(0, color="#333333", lw=0.8)
    ax.set_yticks(ys)
    ax.set_yticklabels(labels, fontsize=8 if len(vals) > 20 else 9)
    ax.set_ylim(-0.6, len(vals) - 0.4)
    digits = _decimals(max(abs(v) for v in vals), 3)
    ax.bar_label(bars, labels=[f"{v:+.{digits}f}" for v in vals], padding=3, fontsize=7)
    span = max(max(vals), 0) - min(min(vals), 0)
    pad = 0.18 * span if span > 0 else 1.0
    ax.set_xlim(min(min(vals), 0) - pad, max(max(vals), 0) + pad)
    ax.set_xlabel(xlabel)
    ax.set_title(title, wrap=True)
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    return _save(fig, path)


# =========================================================================== policy search (helper B)
# The Markdown/JSON/PNG report of ttakit.search; duck-typed on SearchResult so that this module
# does not import the search package when it loads.


def plural(n: int, noun: str, plural_form: str | None = None) -> str:
    """``plural(1, "image")`` is ``"1 image"``, ``plural(2, "image")`` ``"2 images"``.

    Example:
        >>> plural(1, "image"), plural(119, "candidate"), plural(2, "pass", "passes")
        ('1 image', '119 candidates', '2 passes')
    """
    return f"{n} {noun if n == 1 else (plural_form or noun + 's')}"


def _accuracy_key(key: str) -> bool:
    return key == "accuracy" or key.startswith("accuracy_") or "_accuracy" in key


def search_display_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Search's tables in the language of every report: accuracy in percent (``accuracy %``),
    accuracy lifts in points, an NLL gain named ``NLL change``, and ``views`` as ``passes/img``.
    The JSON keeps fractions (keys ``accuracy``, ``*_lift``)."""
    out = []
    for row in rows:
        shown: dict[str, Any] = {}
        for key, value in row.items():
            if key == "views":
                shown["passes/img"] = value
            elif _accuracy_key(key) and _is_number(value):
                name = "accuracy %" if key == "accuracy" else key.replace("accuracy_lift", "lift (points)")
                shown[name] = f"{100 * float(value):{'+' if 'lift' in key else ''}.2f}"
            elif key.endswith("nll_lift"):
                shown[key.replace("nll_lift", "NLL change")] = value
            else:
                shown[key] = value
        out.append(shown)
    return out


def _search_fmt(value: Any, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _search_weights_text(policy) -> str:
    """How a searched policy weighs its views, for the report's merge line."""
    if not policy.weights:
        return ""
    if isinstance(policy.weights[0], list):
        return f", class-by-view weights ({len(policy.weights)} views x {len(policy.weights[0])} classes, ClassTTA)"
    return ", learned weights " + str([round(w, 3) for w in policy.weights])


def _search_scaling_text(policy) -> str:
    """Whether matrix scaling follows the temperature, with its cross-validated NLL."""
    cv = policy.meta.get("matrix_scaling")
    if not cv:
        return ""
    scores = ""
    if cv.get("cv_nll_matrix") is not None:
        scores = (f" (2-fold CV NLL {_search_fmt(cv['cv_nll_matrix'])} vs temperature alone "
                  f"{_search_fmt(cv['cv_nll_temperature'])})")
    if policy.matrix_scaling is None:
        why = f": {cv['not_used_because']}" if cv.get("not_used_because") else ""
        return f"; matrix scaling not kept{scores}{why}"
    return (f"; then matrix scaling{scores}: it corrects class biases and would help without TTA too, "
            "see the `none (matrix-scaled)` row")


def search_markdown(result: Any) -> str:
    """The Markdown report of a search."""
    policy = result.policy
    lines = [
        "# TTA policy search",
        "",
        f"- objective: **{result.objective}**{' (after temperature scaling)' if result.objective == 'nll' else ''}, "
        f"budget {result.budget} views, pool of {result.pool_size} candidates"
        f"{f' ({len(result.candidates)} cached on every image)' if len(result.candidates) != result.pool_size else ''}, "
        f"{result.n_images} validation images",
        f"- selected ({len(policy)} views): {', '.join(f'`{n}`' for n in policy.view_names)}",
        f"- stopped: {result.stop_reason}",
        f"- merge: mean of probabilities{_search_weights_text(policy)}; "
        f"temperature {_search_fmt(policy.temperature, 3)}{_search_scaling_text(policy)}",
        f"- search time (after caching): {result.search_seconds:.2f} s"
        + (f"; caching: {result.cache_seconds:.1f} s" if result.cache_seconds is not None else ""),
    ]
    if result.gate is not None:
        g = result.gate
        lines.append(
            f"- gate: extra views on images with plain confidence < {g.threshold:.4f} ({g.fraction_gated:.1%} of images); "
            f"forward passes per image: plain 1, full {g.n_views}, gated {g.forward_passes_per_image:.2f}; "
            f"keeps {g.kept_lift:.1%} of the accuracy lift"
        )
    lines += [f"- note: {n}" for n in result.notes]
    lines += search_cost_lines(result.cost)
    lines += ["", "## Validation comparison", "", markdown_table(search_display_rows(result.rows()), floatfmt=".4f")]
    lines += ["", "## Selection path", "", markdown_table(search_display_rows(result.path), floatfmt=".4f")]
    if result.aggregation is not None:
        a = result.aggregation
        lines += [
            "",
            "## Learned aggregation vs plain mean",
            "",
            f"2-fold cross-validated NLL: weighted {_search_fmt(a['cv_nll_weighted'])}, mean {_search_fmt(a['cv_nll_mean'])}, "
            f"class-by-view {_search_fmt(a.get('cv_nll_class'))}"
            f"{' (wins: the policy stores them)' if a.get('class_used') else ''}; "
            f"accuracy weighted {a['accuracy_weighted']:.4f}, mean {a['accuracy_mean']:.4f}; "
            f"per-view weights {[round(w, 3) for w in a['weights']]} -> "
            f"{'used' if a['used'] and not a.get('class_used') else 'not used'}",
        ]
    if result.copies_curve:
        lines += [
            "",
            "## Random copies (mean of the first k draws)",
            "",
            markdown_table(result.copies_curve, floatfmt=".4f"),
        ]
    ranked = sorted(
        result.candidates,
        key=lambda r: -r["pair_nll_lift" if result.objective == "nll" else "pair_accuracy_lift"],
    )
    lines += [
        "",
        "## Candidates",
        "",
        "Lifts over the identity alone: `accuracy_lift`/`nll_lift` for the view alone, `pair_*` for identity + view "
        "(NLL lifts are reductions after temperature scaling; positive is better).",
        "",
        markdown_table(ranked, floatfmt=".4f"),
    ]
    return "\n".join(lines) + "\n"


def write_search_report(result: Any, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``policy.json``, ``search.json``, ``search.md``, ``views_curve.png`` and
    ``candidate_lifts.png`` (and ``copies_curve.png`` when random copies were candidates) into
    ``out_dir``, each atomically. Returns name -> path."""
    from .search.greedy import SearchResult  # the search package never imports this module at load

    if not isinstance(result, SearchResult):
        raise InvalidInputError(
            f"Expected argument `result` to be a SearchResult, but got {type(result).__name__}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    result.policy.save(out / "policy.json")
    paths["policy"] = out / "policy.json"
    paths["json"] = atomic_write_text(out / "search.json", json.dumps(_search_finite(result.to_json()), indent=2) + "\n")
    paths["markdown"] = atomic_write_text(out / "search.md", search_markdown(result))
    n_views = [row["n_views"] for row in result.path]
    paths["views_curve"] = plot_views_curve(
        n_views,
        {
            "accuracy": [r["accuracy"] for r in result.path],
            "NLL (temperature-scaled)": [r["nll_ts"] for r in result.path],
        },
        out / "views_curve.png",
        title="Validation metrics along the greedy selection path",
    )
    key, label = (
        (
            "pair_nll_lift",
            "NLL reduction of identity + view over identity\n(nats, after temperature scaling)",
        )
        if result.objective == "nll"
        else ("pair_accuracy_lift", "accuracy lift of identity + view over identity (points)")
    )
    n_pool = len(getattr(result, "pool", None) or []) or len(result.candidates)
    paths["candidate_lifts"] = plot_candidate_lifts(
        [r["view"] for r in result.candidates],
        [r[key] if key != "pair_accuracy_lift" else 100 * r[key] for r in result.candidates],
        out / "candidate_lifts.png",
        xlabel=label,
        title=f"Lift per candidate view ({len(result.candidates)} of {plural(n_pool, 'candidate')})"
        if n_pool > len(result.candidates) else f"Lift per candidate view (all {plural(n_pool, 'candidate')})",
    )
    if result.copies_curve:
        paths["copies_curve"] = plot_views_curve(
            [r["copies"] for r in result.copies_curve],
            {
                "accuracy": [r["accuracy"] for r in result.copies_curve],
                "NLL (temperature-scaled)": [r["nll_ts"] for r in result.copies_curve],
            },
            out / "copies_curve.png",
            title="Validation metrics vs number of random copies",
        )
    from .html_report import write_html_report  # report.html: search.md and its plots in one file

    paths["html"] = write_html_report(out, paths["markdown"].read_text(encoding="utf-8"))
    return paths


def _search_finite(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf become None."""
    if isinstance(obj, Mapping):
        return {str(k): _search_finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_search_finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj

def search_cost_lines(cost: Mapping[str, Any] | None) -> list[str]:
    """Markdown lines: forward passes spent and saved by the search's caching."""
    if not cost:
        return []
    lines = [
        "",
        "## Cost",
        "",
        f"{cost['method']}: {cost['forward_passes']:,} forward passes for {cost['pool_size']} candidates "
        f"({cost['survivors']} cached on every image), against {cost['full_caching_passes']:,} to cache every "
        f"candidate on every image: {cost['fraction_of_full']:.1%} spent, {cost['saved_passes']:,} saved. "
        f"Checking the saved policy through the engine: {int(cost.get('check_passes', 0)):,} more.",
    ]
    if cost.get("rungs"):
        rows = [{k: (", ".join(v) if isinstance(v, list) else v) for k, v in r.items() if k != "leaders"} for r in cost["rungs"]]
        lines += ["", markdown_table(rows)]
    return lines


__all__ += ["search_markdown", "write_search_report", "search_cost_lines"]
