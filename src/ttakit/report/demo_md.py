"""The demo's lessons: what its numbers say, in words."""

from __future__ import annotations

from typing import Any

from ..aliases import BASELINE
from ..search.calibration import MATRIX_CONTROL
from .evaluate_md import _format_p


def _demo_lessons(per_model: dict[str, Any]) -> list[str]:
    """Plain-language findings read off the measured rows (never hard-coded)."""
    lessons = []
    for model_name, info in per_model.items():
        rows = {r["policy"]: r for r in info["run"]["rows"]}
        plain = rows[BASELINE]["accuracy"]
        for policy in ("hflip", "d4", "train-aug", "searched"):
            row = rows.get(policy)
            if row is None:
                continue
            if policy == "searched":
                lessons.append(_searched_lesson(model_name, info.get("search") or {}, row, rows[BASELINE], rows.get(MATRIX_CONTROL)))
                continue
            if row["views"] == 1:
                lessons.append(
                    f"{model_name}: {policy} is plain inference: the model was trained without geometric "
                    "augmentations, so the policy aligned with its training has the identity view alone."
                )
                continue
            lift = 100 * row["lift_accuracy"]
            verdict = "significant" if row["lift_mcnemar_p"] < 0.05 else "not significant"
            direction = "raised" if lift > 0 else "lowered" if lift < 0 else "left"
            lessons.append(
                f"{model_name}: {policy} TTA ({row['views']} views) {direction} accuracy from {100 * plain:.2f}% "
                f"to {100 * row['accuracy']:.2f}% ({lift:+.2f} points, McNemar p={_format_p(row['lift_mcnemar_p'])}, {verdict}); "
                f"NLL {rows[BASELINE]['nll']:.4f} -> {row['nll']:.4f}."
            )
    lessons.append(
        "TTA helps when its views match what the model learned to be invariant to; views it never saw "
        "in training (flips, rotations for a model trained without them) can cost accuracy. The searched rows "
        "pick views on held-out validation images (ttakit search) and never do worse than plain inference there."
    )
    return lessons


def _searched_lesson(
    model_name: str, search: dict[str, Any], row: dict[str, Any], plain: dict[str, Any], control: dict[str, Any] | None = None
) -> str:
    views = search.get("views") or []
    extra = [v for v in views if v != "identity"]
    lift = 100 * row.get("lift_accuracy", 0.0)
    p = row.get("lift_mcnemar_p")
    chosen = (
        f"chose {len(views)} views ({', '.join(extra[:8])}{', ...' if len(extra) > 8 else ''} besides the identity)"
        if extra
        else "kept the identity view alone (no candidate helped on validation)"
    )
    gate = search.get("gate_threshold")
    cost = (
        f" Search spent {search['forward_passes']:,} forward passes, {search['forward_passes'] / search['full_caching_passes']:.0%} "
        f"of caching all {search['pool_size']} candidates."
        if search.get("forward_passes") and search.get("full_caching_passes")
        else ""
    )
    share = ""
    if control is not None:
        share = (
            f" It calibrates with a temperature and then matrix scaling, which corrects class biases without TTA too: "
            f"{MATRIX_CONTROL} gives {100 * control['accuracy']:.2f}% "
            f"({100 * control['lift_accuracy']:+.2f} points), so the views' own share is "
            f"{100 * (row['accuracy'] - control['accuracy']):+.2f} points."
        )
    return (
        f"{model_name}: search on {search.get('validation_images', '?')} validation images {chosen}"
        f"{f', gated at plain confidence < {gate:.3f}' if gate is not None else ''}; on test it gives "
        f"{100 * row['accuracy']:.2f}% ({lift:+.2f} points{f', McNemar p={_format_p(p)}' if p is not None else ''}) at "
        f"{row['passes_per_image']:.2f} passes per image; NLL {plain['nll']:.4f} -> {row['nll']:.4f}.{share}{cost}"
    )


# --------------------------------------------------------------------------- policy search
