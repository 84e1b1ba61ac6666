"""``ttakit audit-apply`` (also spelled ``ttakit audit apply``): apply the review page's
``decisions.csv`` to the audited data (see :mod:`ttakit.jobs.audit_apply`)."""

from __future__ import annotations

import argparse
import sys

from ._common import EXIT_BAD_INPUT

NAME = "audit-apply"


def add_parser(commands) -> None:
    apply = commands.add_parser(
        "audit-apply",
        help="apply the decisions exported from the audit's review.html (also: ttakit audit apply ...)",
    )
    apply.add_argument("decisions", help="decisions.csv exported from review.html")
    apply.add_argument("--data", required=True, help="the audited data: an .npz or an image folder")
    apply.add_argument("--out", required=True, help="folder for the cleaned data, changes.csv and manifest.json")
    apply.add_argument("--model", default=None,
                       help="the audited checkpoint: its held-out test rows are kept apart, unchanged")
    apply.add_argument("--mode", default="list", choices=("list", "links", "quarantine"),
                       help="image folders: a file list (default), a class-folder tree of links, or move removed "
                       "files into OUT/quarantine (and relabelled ones to their class) with OUT/undo.sh")


def run(args: argparse.Namespace) -> int:
    from ..jobs.audit_apply import DecisionsError, apply_decisions

    try:
        result = apply_decisions(args.decisions, args.data, args.out, model=args.model, mode=args.mode)
    except DecisionsError as err:
        for line in err.lines:
            print(f"ttakit audit-apply: error: {' '.join(line.split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    paths = result["paths"]
    print(f"{result['removed']} removed, {result['relabelled']} relabelled, {result['kept_as_is']} kept as they "
          f"were; {result['kept']} images in the cleaned data"
          + (f", {result['n_test']} held-out test images kept apart" if result["n_test"] else ""))
    for name in ("clean", "files", "links", "undo", "changes", "manifest"):
        if name in paths:
            print(f"{name}: {paths[name]}")
    if "clean" in paths or "files" in paths:
        print(f"retrain with: ttakit train --data {paths.get('clean') or paths.get('files')}")
    return 0
