"""The Markdown, display rows and plots of ``ttakit evaluate``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..data import ImageDataset
from .plots import plot_policy_metrics, plot_reliability_diagram
from .tables import format_mean_std

if TYPE_CHECKING:  # the record only; the report draws what a job hands it
    from ..jobs._policy_eval import PolicyEvaluation


def _display_rows(summary: Sequence[dict[str, Any]], model: str | None = None) -> list[dict[str, Any]]:
    """The evaluate tables in the language of every report: accuracy in percent, its lift and
    interval in points, the NLL difference from plain inference as ``NLL change`` (negative is
    better) and ``passes/img``; the JSON keeps fractions."""
    rows = []
    for s in summary:
        row: dict[str, Any] = {}
        if model is not None:
            row["model"] = model
        row["policy"] = s["policy"]
        row["views"] = s["views"]
        row["accuracy %"] = format_mean_std(s["accuracy_mean"], s["accuracy_std"] if s["runs"] > 1 else None, scale=100)
        if "lift_accuracy_mean" in s:
            row["lift (points)"] = format_mean_std(
                s["lift_accuracy_mean"], s["lift_accuracy_std"] if s["runs"] > 1 else None, fmt="+.2f", scale=100
            )
            row["95% CI (points)"] = _format_ci(s)
            if s["runs"] == 1:
                row["p (McNemar)"] = _format_p(s["mcnemar_p_min"])
            else:
                row["p (McNemar)"] = f"{s['significant_runs']}/{s['runs']} runs < 0.05"
        else:
            row["lift (points)"] = "baseline"
            row["95% CI (points)"] = "-"
            row["p (McNemar)"] = "-"
        row["NLL"] = format_mean_std(s["nll_mean"], s["nll_std"] if s["runs"] > 1 else None, fmt=".4f")
        row["NLL change"] = f"{s['lift_nll_mean']:+.4f}" if "lift_nll_mean" in s else "-"
        row["ECE"] = f"{s['ece_mean']:.4f}"
        row["Brier"] = f"{s['brier_mean']:.4f}"
        row["passes/img"] = f"{s['passes_per_image']:.2f}"
        row["ms/img"] = f"{s['ms_per_image_mean']:.3f}"
        rows.append(row)
    return rows


def _format_ci(s: dict[str, Any]) -> str:
    """The paired bootstrap 95% interval of the accuracy lift, in points (mean bounds over runs)."""
    if "lift_ci_low_mean" not in s:
        return "-"
    return f"[{100 * s['lift_ci_low_mean']:+.2f}, {100 * s['lift_ci_high_mean']:+.2f}]"


def _format_p(p: float) -> str:
    # Exact tests on 10,000 images underflow to 0.0; say how small instead of printing 0.
    return "< 1e-300" if p < 1e-300 else f"{p:.3g}"


def _plot_rows(summary: Sequence[dict[str, Any]], model: str | None = None) -> list[dict[str, Any]]:
    rows = []
    for s in summary:
        row = {"name": s["policy"], "accuracy": s["accuracy_mean"], "nll": s["nll_mean"]}
        if s["runs"] > 1:
            row["accuracy_std"], row["nll_std"] = s["accuracy_std"], s["nll_std"]
        if "lift_accuracy_mean" in s:
            row["lift"], row["lift_nll"] = s["lift_accuracy_mean"], s.get("lift_nll_mean")
            row["lift_ci_low"], row["lift_ci_high"] = s.get("lift_ci_low_mean"), s.get("lift_ci_high_mean")
        if model is not None:
            row["model"] = model
        rows.append(row)
    return rows


def _refit_markdown(runs: Sequence[dict[str, Any]]) -> list[str]:
    """results.md lines saying what each retrained seed did with the fitted policies."""
    lines = []
    for run in runs:
        for name, info in (run.get("refit") or {}).items():
            parts = [f"{len(info['views'])} views kept"]
            if info.get("weights"):
                parts.append(f"{info['weights']} weights refit")
            if info.get("gate_threshold") is not None:
                parts.append(f"gate refit at {info['gate_threshold']:.4g}")
            if info.get("temperature") is not None:
                parts.append(f"temperature refit: {info['temperature']:.4g}")
            if info.get("matrix_scaling"):
                parts.append(f"matrix scaling {info['matrix_scaling']}")
            lines.append(f"- seed {run['seed']}, `{name}`: {'; '.join(parts)} (on {info['n_rows']} validation rows)")
    if not lines:
        return []
    return ["", "## Fitted policies on retrained seeds", "",
            "Each retrained seed keeps a fitted policy's views and refits the rest on its own validation rows "
            "(the rows the search fitted on); seed 0 uses the policy as saved.", "", *lines]


def _split_phrase(split: str, dataset: ImageDataset) -> str:
    if split == "train":
        return "TRAINING images (the model trained on these; not a held-out score)"
    if split == "val":
        return "held-out validation split"
    if "not the training data" in dataset.name:
        return "all images (other data than the model trained on)"
    return "held-out test split"


def _write_plots(
    out: Path, plot_rows, evaluations: Sequence[PolicyEvaluation], dataset: ImageDataset, title: str | None = None
) -> list[str]:
    paths = [str(plot_policy_metrics(plot_rows, out / "policy_metrics.png", title=title))]
    curves = {e.name: (e.probs, dataset.labels) for e in evaluations if e.probs is not None}
    if curves:
        paths.append(str(plot_reliability_diagram(curves, out / "reliability.png")))
    return paths


# --------------------------------------------------------------------------- the demo
