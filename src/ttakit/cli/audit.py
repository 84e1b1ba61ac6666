"""``ttakit audit``: parse, call :func:`ttakit.jobs.audit.audit_checkpoint`, print."""

from __future__ import annotations

import argparse

from ..label_issues import DEFAULT_FOLDS, REMOVE_CHOICES, WEAK_ACCURACY, WEAK_GAP
from ._common import (
    _add_data_args,
    _add_device_args,
    _add_list_arg,
    _add_split_arg,
    _positive_int,
    _probability,
    _run_options,
    check_out_path,
)


def _prob_range(text: str) -> tuple[float, float]:
    parts = text.replace(",", "-").split("-")
    try:
        lo, hi = (float(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW-HIGH probabilities such as 0.5-0.6, got {text!r}") from None
    if not 0 <= lo < hi <= 1:
        raise argparse.ArgumentTypeError(f"expected 0 <= LOW < HIGH <= 1 such as 0.5-0.6, got {text!r}")
    return lo, hi


def _folds(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer of at least 2, got {text!r}") from None
    if value < 2:
        raise argparse.ArgumentTypeError(
            f"expected at least 2 folds (each model trains on K-1 folds and scores the one left out), got {value}"
        )
    return value


NAME = "audit"
DRAWS = "writing PNG plots"


def add_parser(commands) -> None:
    audit = commands.add_parser(
        "audit", help="find mislabelled and ambiguous images with out-of-sample TTA probabilities"
    )
    audit.add_argument("model", help="checkpoint folder (its recipe trains the fold models) or a model file")
    _add_data_args(audit, default=None)
    _add_split_arg(audit, "audit", "train",
                   "split to audit (default train: the images a retrained model learns from; a checkpoint's own "
                   "training split is scored by "
                   f"{DEFAULT_FOLDS}-fold cross-validation, since the checkpoint trained on it; val or "
                   "test are scored by the checkpoint itself)")
    audit.add_argument("--folds", type=_folds, default=None,
                       help="train K models on K-1 folds each and score the held-out fold (needs a checkpoint; "
                       f"default: {DEFAULT_FOLDS} on the checkpoint's own training split, none elsewhere)")
    audit.add_argument("--epochs", type=_positive_int, default=None, help="epochs per fold model (default: the recipe's)")
    audit.add_argument("--policy", default=None, help="TTA policy for the probabilities (default: train-aug or none)")
    _add_list_arg(audit, "--method", default=["rule", "cleanlab"], metavar="METHOD", help="rule, cleanlab or both")
    audit.add_argument("--mislabel-threshold", type=_probability, default=0.9,
                       help="rule: flag when another class is on top and the probability --mislabel-by names "
                       "is above this (default 0.9)")
    audit.add_argument("--mislabel-by", default="others", choices=("others", "top"),
                       help="rule: the probability compared with the threshold: all classes but the label together, "
                       "1 - p[label] (default; benchmarks/audit.py measures it best on flipped labels), or the top "
                       "class's")
    audit.add_argument("--ambiguous-range", type=_prob_range, default=(0.5, 0.6),
                       help="rule: flag when the top probability lies in LOW-HIGH (default 0.5-0.6)")
    audit.add_argument("--write-clean", default=None, metavar="FILE",
                       help="write the data without the flagged images --remove names (by default the likely mislabelled): "
                       "an .npz, or a .txt file list for image folders")
    audit.add_argument("--remove", default="mislabelled", choices=REMOVE_CHOICES,
                       help="which flagged images --write-clean drops: mislabelled (default): those flagged likely "
                       "mislabelled, ambiguous images kept; disputed: also ambiguous ones whose label is not the "
                       "model's top class; all: every flagged image; rule or cleanlab: what that method flagged")
    audit.add_argument("--force", action="store_true",
                       help=f"write --write-clean even when the scoring models are weak (held-out accuracy below "
                       f"{WEAK_ACCURACY * 100:.0f}%%, or {WEAK_GAP * 100:.0f} points below the checkpoint's validation accuracy: their flags "
                       "are then mostly their own errors; refused by default)")
    audit.add_argument("--limit", type=_positive_int, default=None, help="audit the first N images")
    audit.add_argument("--fold-seed", "--seed", dest="fold_seed", type=int, default=0,
                       help="seed of the fold assignment (--seed: the old spelling, deprecated)")
    _add_device_args(audit, max_batch=True)
    audit.add_argument(
        "--allow-other-model", action="store_true",
        help="use a --policy whose weights, gate, temperature or matrix were fitted on another checkpoint "
        "(refused by default: a policy records the model it was searched on)",
    )
    audit.add_argument("--out", default="audit", help="folder for issues.csv and contact_sheet.png (default audit)")


def run(args: argparse.Namespace) -> int:
    from ..jobs.audit import audit_checkpoint

    check_out_path(args.out, "folder")
    check_out_path(args.write_clean, "file", "--write-clean")
    methods = list(args.method)
    results = audit_checkpoint(
        args.model,
        data=args.data,
        data_dir=args.data_dir,
        split=args.split,
        folds=args.folds,
        policy=args.policy,
        methods=methods,
        mislabel_threshold=args.mislabel_threshold,
        ambiguous_range=args.ambiguous_range,
        mislabel_by=args.mislabel_by,
        out_dir=args.out,
        write_clean_to=args.write_clean,
        remove=args.remove,
        force=args.force,
        epochs=args.epochs,
        limit=args.limit,
        max_batch=args.max_batch,
        seed=args.fold_seed,
        progress=not args.no_progress,
        allow_other_model=args.allow_other_model,
        **_run_options(audit_checkpoint, args),
    )
    import sys

    from ..report.tables import plural

    if results.get("folds_note") and not results.get("folds_note_shown"):  # else said before the work
        print(results["folds_note"])
    print(results["table"])

    print(f"\n{results['n_flagged_images']} of {plural(results['n_images'], 'image')} flagged; "
          f"scored by {results['scored_by']}")
    print(f"issues: {results['issues_csv']}")
    if results["contact_sheet"]:
        print(f"contact sheet: {results['contact_sheet']}")
    if results.get("review_page"):
        print(f"review page (open it in a browser, decide, export decisions.csv): {results['review_page']}")
    if results.get("warning"):
        print(results["warning"])
    if results["clean"]:
        kept = results["clean_manifest"]
        print(f"cleaned data ({kept['n_kept']} images; {results['removed']} removed: {results['removed_what']}, "
              f"--remove {results['remove']}; the {kept['n_test']} held-out test images kept apart as its test "
              f"split): {results['clean']}; retrain with: ttakit train --data {results['clean']}")
    if results.get("clean_refused"):
        print(f"ttakit audit: error: {results['clean_refused']}", file=sys.stderr)
        return 2
    return 0
