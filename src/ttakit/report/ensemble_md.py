"""The display rows of ``ttakit ensemble``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _format_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ensemble table in the language of every report: accuracy in percent, its lift over
    the best member in points, ``passes/img``; the JSON keeps fractions."""
    out = []
    for r in rows:
        out.append(
            {
                "model": r["model"],
                "policy": r["policy"],
                "accuracy %": f"{100 * r['accuracy']:.2f}",
                "lift vs best member (points)": f"{100 * r['lift_accuracy']:+.2f}" if "lift_accuracy" in r else "",
                "best member (any policy)": r.get("vs", ""),
                "p (McNemar)": (f"{r['mcnemar_p']:.3g}" if r["mcnemar_p"] >= 1e-300 else "< 1e-300")
                if "mcnemar_p" in r
                else "",
                "NLL": f"{r['nll']:.4f}" if r.get("nll") is not None else "-",
                "ECE": f"{r['ece']:.4f}" if r.get("ece") is not None else "-",
                "passes/img": f"{r['passes_per_image']:.2f}",
            }
        )
    return out
