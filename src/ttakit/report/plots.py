"""PNG plots: policy metrics, lifts, reliability diagrams, the views curve, candidate lifts, lr-find."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._io import atomic_write
from ..errors import InvalidInputError
from ..metrics import _check_n_bins, expected_calibration_error, reliability_bins
from ..training.lr_find import LRFindResult
from ._figure import (
    _NEGATIVE,
    _POSITIVE,
    _check_path,
    _decimals,
    _finite_or_nan,
    _new_figure,
    _save,
)
from .lift_plot import _plot_lifts, lift_plot_layout
from .tables import _columns

__all__ = [
    "lift_plot_layout",
    "plot_candidate_lifts",
    "plot_policy_metrics",
    "plot_reliability_diagram",
    "plot_views_curve",
]

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
    _check_metrics(rows, metrics)
    return _plot_metric_bars(rows, path, metrics, title)


def _check_metrics(rows: list[dict], metrics: Sequence[str]) -> None:
    """The bar chart's checks: ``metrics`` a non-empty list of keys with a value in some row, every
    row named."""
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


def _plot_metric_bars(rows: list[dict], path: Path, metrics: Sequence[str], title: str) -> Path:
    """The bar chart of :func:`plot_policy_metrics`: one panel per metric, one bar per row,
    grouped by name with one colour per model when rows carry ``model``."""
    names = list(dict.fromkeys(str(r["name"]) for r in rows))
    grouped = any("model" in r for r in rows)
    models = list(dict.fromkeys(str(r.get("model", "-")) for r in rows)) if grouped else [""]
    n_groups, n_models = len(names), len(models)
    n_bars = n_groups * n_models
    width = min(16.0, max(6.0, 1.2 + 0.32 * n_bars + 0.25 * n_groups))
    fig = _new_figure(width, 1.2 + 2.8 * len(metrics) + (0.9 if max(map(len, names)) > 6 else 0.3))
    axes = fig.subplots(len(metrics), 1, sharex=True, squeeze=False)[:, 0]
    annotate = n_bars <= 16

    for ax, metric in zip(axes, metrics, strict=True):
        _metric_panel(ax, rows, metric, names, models if grouped else None, annotate)
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


def _metric_panel(ax: Any, rows: list[dict], metric: str, names: list[str], models: list[str] | None,
                  annotate: bool) -> None:
    """One panel of the bar chart: ``metric`` per name (and per model, when ``models`` is not None),
    with error bars from ``{metric}_std``, on a y-axis zoomed to the data."""
    grouped = models is not None
    models = models if models is not None else [""]
    n_models = len(models)
    bar_w = 0.8 / n_models
    colors = [f"C{i % 10}" for i in range(n_models)]
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


def plot_lr_find(result: LRFindResult, path: str | os.PathLike, title: str | None = None) -> Path:
    """Loss against rate (log scale): raw loss faint, smoothed loss bold, both suggestions marked.

    The y range is clipped to the useful part (up to a little above the starting loss), so the
    divergent tail does not flatten the curve.
    """
    try:  # matplotlib is the optional extra ttakit[plots]
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        from ..predictors import MissingExtraError

        raise MissingExtraError(
            f"drawing the lr-find plot needs matplotlib: pip install 'ttakit[plots]' ({exc.name or exc} is not installed)"
        ) from exc

    if not isinstance(result, LRFindResult):
        raise InvalidInputError(f"result must be an LRFindResult, got {type(result).__name__}")
    path = Path(path)
    fig = Figure(figsize=(6.4, 4.2), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    lrs = np.asarray(result.lrs)
    ax.plot(lrs, result.losses, color="0.75", linewidth=0.8, label="loss per step")
    ax.plot(lrs, result.smoothed, color="C0", linewidth=2.0, label="smoothed loss")
    ax.set_xscale("log")
    finite = [v for v in result.smoothed if math.isfinite(v)]
    raw = [v for v in result.losses if math.isfinite(v)]
    if finite:
        low = min(min(finite), min(raw[: int(np.argmin(finite)) + 1] or finite))
        top = max(finite[: max(3, len(finite) // 10)])  # the loss where the sweep started
        span = max(top - low, 1e-3)
        ax.set_ylim(low - 0.1 * span, top + 0.35 * span)
    for rate, color, name in ((result.steepest, "C2", "steepest descent"), (result.min10, "C3", "minimum/10")):
        y = float(np.interp(np.log10(rate), np.log10(lrs), result.smoothed))
        ax.axvline(rate, color=color, linestyle="--", linewidth=1.0)
        ax.plot([rate], [y], marker="o", color=color, markersize=7, label=f"{name}: {rate:.1e}")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss")
    default = f"lr-find: {result.arch} ({result.optimizer}, batch {result.batch_size}, {result.stopped})"
    ax.set_title(title or default, wrap=True)  # wrapped at the figure's edges, not clipped
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(loc="lower left", fontsize=9)
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        fig.clear()
