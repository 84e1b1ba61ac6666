"""The search report: ``search.md``, its JSON and plots, and ``report.html``."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._io import atomic_write_text
from ..errors import InvalidInputError

if TYPE_CHECKING:  # matplotlib is the optional extra ttakit[plots], imported only to draw
    pass
from .plots import plot_candidate_lifts, plot_views_curve
from .tables import _is_number, markdown_table, plural


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
    from ..search.greedy import SearchResult  # the search package never imports this module at load

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
    from .html import write_html_report  # report.html: search.md and its plots in one file

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


