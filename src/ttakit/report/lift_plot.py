"""The lift plot of :func:`ttakit.report.plots.plot_policy_metrics`: for rows carrying a ``lift``,
the lift over plain inference in points with its interval and the NLL change, one horizontal bar
per policy, grouped and coloured by model, on zoomed axes (:func:`lift_plot_layout`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ._figure import _finite_or_nan, _new_figure, _save

__all__ = ["lift_plot_layout"]


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
    """What :func:`ttakit.report.plots.plot_policy_metrics` draws for rows carrying a ``lift``:
    one entry per non-baseline row with the lift and its interval in points, the NLL change, the
    value drawn (clipped to the zoomed axis) and the text printed beside the bar.

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
