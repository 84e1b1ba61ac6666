"""What ``ttakit audit`` writes (:func:`ttakit.jobs.audit.audit_checkpoint`): ``issues.csv``, the
contact sheet, ``review.html``, the cleaned copy on request, ``audit.json`` and ``report.html``.

``plan`` is the audit's plan (``ttakit.jobs.audit._Plan``: the model, its recipe, the data as given
and the audited rows)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_write_text
from ..label_issues import REMOVE_HELP, rows_to_remove
from ..report.audit_md import _summary_rows, contact_sheet, issues_to_csv
from ..report.tables import plural
from ._audit_data import _write_clean_copy


def _file_column(plan: Any, dataset: Any) -> tuple[Path, list[str] | None]:
    """The folder an image folder's files are relative to, and each audited image's path (None
    for data that are not files)."""
    root = Path(str(plan.spec)).expanduser()
    if (root / "train").is_dir() and (root / "test").is_dir():  # files are relative to the split's folder
        root = root / ("test" if plan.split == "test" else "train")
    files = getattr(dataset, "files", None)
    if files is None:
        return root, None
    return root, [str(root / f) if not Path(f).is_absolute() else f for f in files]


def _write_audit(plan: Any, dataset: Any, probs: dict[str, torch.Tensor], view_votes: dict[str, torch.Tensor],
                 main: str, how: str, issues: list[Any], summary: dict, summary_plain: dict, settings: dict[str, Any],
                 out: Path, write_clean_to: str | os.PathLike | None, remove: str, scorer: dict[str, Any],
                 force: bool) -> dict[str, Any]:
    """Write ``issues.csv``, the contact sheet, ``review.html``, the cleaned copy (on request),
    ``audit.json`` and ``report.html``; return the results with the terminal table."""
    from .._io import atomic_write_json
    from ..report.html import write_audit_report
    from ..report.review_page import write_review_page
    from ..report.tables import format_table

    spec, split, positions, methods = plan.spec, plan.split, plan.positions, settings["methods"]
    root, file_column = _file_column(plan, dataset)
    csv_path = atomic_write_text(out / "issues.csv", issues_to_csv(issues, dataset.classes, file_column, positions,
                                                                      view_votes))
    sheet = contact_sheet(
        dataset.images, issues, dataset.classes, out / "contact_sheet.png", rows=positions,
        title=f"Flagged images of {spec}/{split}: red probably mislabelled, orange ambiguous (given → suggested, p)",
    )
    # review.html: look at the flagged images, then decide
    review = write_review_page(
        out / "review.html", dataset.images, probs[main], dataset.labels, dataset.classes, rows=positions,
        files=file_column, plain_probs=probs["none"] if main != "none" else None, view_probs=view_votes,
        methods=("others", "top", *(("cleanlab",) if "cleanlab" in methods else ())),
        default_method=settings["mislabel_by"] if "rule" in methods else "cleanlab",
        mislabel_threshold=settings["mislabel_threshold"], ambiguous_range=tuple(settings["ambiguous_range"]),
        title=f"ttakit audit of {spec}/{split}: review",
        subtitle=f"{len(dataset)} images scored by {how}; TTA policy {main}", run=f"{plan.model}|{spec}|{split}|{out}",
    )
    cleaned = manifest = refused = None
    removed = rows_to_remove(issues, remove)
    if write_clean_to is not None and scorer["weak"] and not force:
        refused = (
            f"--write-clean refused: the scoring models are weak ({scorer['accuracy']:.1%} on held-out images), so "
            f"the flags are mostly their errors; {write_clean_to} was not written (issues.csv and review.html were); "
            "train them longer with --epochs, or add --force to write it anyway"
        )
    elif write_clean_to is not None:
        cleaned, manifest = _write_clean_copy(
            plan.source, [positions[r] for r in removed], write_clean_to, spec=str(spec), data_dir=plan.data_dir,
            split=split, model=str(plan.model), test_index=plan.test_index, root=root,
            recipe=plan.recipe if plan.own else None,
        )
    rows = _summary_rows(summary, summary_plain, main)
    result = {
        "format": "ttakit-audit",
        "format_version": 1,
        "model": str(plan.model),
        "data": str(spec),
        "split": split,
        "n_images": len(dataset),
        "scored_by": how,
        "policy": main,
        **settings,
        "flagged": summary,
        "flagged_plain": summary_plain,
        "n_flagged_images": len({i.row for i in issues}),
        "remove": remove,
        "removed_what": REMOVE_HELP[remove],
        "removed": len(removed) if cleaned is not None else None,
        "scorer": scorer,
        "warning": scorer["warning"],
        "clean_refused": refused,
        "rows": rows,
        "issues_csv": str(csv_path),
        "contact_sheet": str(sheet) if sheet else None,
        "review_page": str(review),
        "clean": str(cleaned) if cleaned else None,
        "clean_manifest": manifest,
        "out_dir": str(out),
    }
    atomic_write_json(out / "audit.json", result)
    result["report_html"] = str(write_audit_report(out, result))
    result["table"] = format_table(rows, title=f"audit of {spec}/{split} ({plural(len(dataset), 'image')}): flagged images")
    return result
