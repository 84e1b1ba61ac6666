"""The audit's outputs as files: ``issues.csv`` and the contact sheet."""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..label_issues import Issue, view_disagreement

CSV_COLUMNS = ("rank", "row", "file", "given", "suggested", "probability", "probability_of", "p_suggested", "p_given",
               "kind", "method", "views")


# --------------------------------------------------------------------------- validation


def issues_to_csv(issues: Sequence[Issue], classes: Sequence[str], files: Sequence[str] | None = None,
                  rows: Sequence[int] | None = None, view_votes: dict[str, torch.Tensor] | None = None) -> str:
    """``issues.csv`` text: ``rank, row, file, given, suggested, probability, probability_of,
    p_suggested, p_given, kind, method, views``.

    ``probability`` is the probability the method judged and ``probability_of`` says which
    (:attr:`Issue.judged`): ``1-p(given)`` for the rule's default mislabelled test, ``p(top)`` for
    ``ambiguous`` (the top probability, the one within the range) and ``--mislabel-by top``,
    ``p(given)`` for cleanlab (its self-confidence); ``p_suggested`` and ``p_given`` are the
    model's probabilities of the suggested and the given class (the review page's p and p(given)).

    ``row`` is the image's row in the data as given (``rows`` maps audited positions to it);
    ``file`` its path for image folders (else empty); labels are class names; ``views`` the TTA
    views' votes when they disagree (``identity=Shirt; hflip=Pullover``, from ``view_votes``: view
    name -> ``(N,)`` each view's top class), else empty.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for issue in issues:
        writer.writerow(
            [
                issue.rank,
                rows[issue.row] if rows is not None else issue.row,
                files[issue.row] if files is not None else "",
                classes[issue.given],
                classes[issue.suggested],
                f"{issue.judged if issue.judged is not None else issue.probability:.4f}",
                issue.judged_by if issue.judged is not None else "p(suggested)",
                f"{issue.probability:.4f}",
                "" if issue.given_probability is None else f"{issue.given_probability:.4f}",
                issue.kind,
                issue.method,
                "; ".join(f"{name}={classes[c]}" for name, c in view_disagreement(view_votes, issue.row)),
            ]
        )
    return buffer.getvalue()


def _sheet_order(issues: Sequence[Issue]) -> list[Issue]:
    """One entry per image, most severe first: mislabelled (both methods agreeing, then by
    probability), then ambiguous."""
    by_row: dict[int, list[Issue]] = {}
    for issue in issues:
        by_row.setdefault(issue.row, []).append(issue)
    entries = []
    for group in by_row.values():
        mis = [i for i in group if i.kind == "mislabelled"]
        main = max(mis, key=lambda i: i.probability) if mis else group[0]
        methods = sorted({i.method for i in mis}) if mis else ["rule"]
        key = (0 if mis else 1, -len(methods), -main.probability if mis else main.rank)
        entries.append((key, Issue(main.row, main.given, main.suggested, main.probability, main.kind,
                                   "+".join(methods), main.rank)))
    entries.sort(key=lambda e: e[0])
    return [issue for _, issue in entries]


def contact_sheet(
    images: torch.Tensor,
    issues: Sequence[Issue],
    classes: Sequence[str],
    path: str | os.PathLike,
    *,
    max_images: int = 40,
    columns: int = 8,
    rows: Sequence[int] | None = None,
    title: str | None = None,
) -> Path | None:
    """Draw the top flagged images with their given and suggested labels; None if nothing flagged.

    Args:
        images: ``(N, C, H, W)`` in ``[0, 1]``, indexed by :attr:`Issue.row`.
        rows: the row of each image in the data as given (shown as ``#row``).
    """
    from ._figure import _new_figure, _save

    entries = _sheet_order(issues)
    mis = [i for i in entries if i.kind == "mislabelled"]
    amb = [i for i in entries if i.kind == "ambiguous"]
    # Mostly the probable label errors, with the last rows kept for ambiguous images.
    n_amb = min(len(amb), max(max_images // 5, max_images - len(mis)))
    ordered = mis[: max_images - n_amb] + amb[:n_amb]
    if not ordered:
        return None
    cols = min(columns, len(ordered))
    n_rows = math.ceil(len(ordered) / cols)
    fig = _new_figure(1.55 * cols, 1.95 * n_rows + 0.5)
    for k, issue in enumerate(ordered):
        ax = fig.add_subplot(n_rows, cols, k + 1)
        image = images[issue.row].detach().float().cpu().clamp(0, 1)
        if image.shape[0] == 1:
            ax.imshow(image[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        else:
            ax.imshow(image[:3].permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        colour = "#b2182b" if issue.kind == "mislabelled" else "#e08214"
        for spine in ax.spines.values():
            spine.set_edgecolor(colour)
            spine.set_linewidth(2)
        row = rows[issue.row] if rows is not None else issue.row
        ax.set_title(
            f"#{row} {issue.method if issue.kind == 'mislabelled' else 'ambiguous'}\n"
            f"given: {classes[issue.given][:14]}\n→ {classes[issue.suggested][:14]} {issue.probability:.2f}",
            fontsize=7.5,
            color=colour,
            loc="left",
        )
    fig.suptitle(
        title or "Flagged images (red: probably mislabelled, orange: ambiguous); given label → suggested, probability",
        fontsize=9,
        wrap=True,
    )
    return _save(fig, path)


def _summary_rows(summary: dict, summary_plain: dict, main: str) -> list[dict[str, Any]]:
    """One row per (method, kind): images flagged with the TTA probabilities and with plain ones."""
    keys = []
    for s in (summary, summary_plain):
        for method, kinds in s.items():
            for kind in kinds:
                if (method, kind) not in keys:
                    keys.append((method, kind))
    rows = []
    for method, kind in keys:
        row: dict[str, Any] = {"method": method, "kind": kind}
        if main != "none":
            row[f"flagged ({main})"] = summary.get(method, {}).get(kind, 0)
        row["flagged (plain)"] = summary_plain.get(method, {}).get(kind, 0)
        rows.append(row)
    return rows
