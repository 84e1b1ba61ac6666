"""Label issues from out-of-sample probabilities: the practitioner's rule and confident learning.

Example:
    >>> import torch
    >>> probs = torch.tensor([[0.95, 0.05], [0.55, 0.45], [0.1, 0.9]])
    >>> issues = flag_issues(probs, torch.tensor([1, 0, 1]), methods=("rule",))
    >>> [(i.row, i.kind, i.suggested) for i in issues]
    [(0, 'mislabelled', 0), (1, 'ambiguous', 1)]
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .errors import InvalidInputError, unknown_name

AUDIT_METHODS = ("rule", "cleanlab")
#: What ``--write-clean`` drops (the default first): ``mislabelled``: the images flagged likely
#: mislabelled (either method); ``disputed``: those and the ambiguous ones whose label is not the
#: model's top class; ``all``: every flagged image, also ambiguous ones the model agrees with;
#: ``rule`` / ``cleanlab``: what one method flagged.
REMOVE_CHOICES = ("mislabelled", "disputed", "all", "rule", "cleanlab")
REMOVE_HELP = {
    "mislabelled": "the images flagged likely mislabelled (ambiguous images kept)",
    "disputed": "the likely mislabelled images and the ambiguous ones whose label is not the model's top class",
    "all": "every flagged image (also ambiguous ones whose label is the model's top class)",
    "rule": "every image the rule flagged (mislabelled or ambiguous)",
    "cleanlab": "every image confident learning flagged",
}
#: What an issue's ``judged`` probability is (issues.csv ``probability_of``).
JUDGED_OTHERS, JUDGED_TOP, JUDGED_GIVEN = "1-p(given)", "p(top)", "p(given)"
MISLABEL_BY = ("others", "top")  # the default first

#: Folds when the checkpoint's own training split is audited without ``folds``: each image is
#: scored by a model trained on the other 80% (5 models: the usual cross-validation cost/benefit).
DEFAULT_FOLDS = 5

#: Below this held-out accuracy of the scoring model(s), more than 30% of the images disagree with
#: their label through the model's own errors, far more than the few percent of label noise an
#: audit looks for: most flags are then the model's mistakes, not the labels'.
WEAK_ACCURACY = 0.70
#: ... or this far below the checkpoint's own validation accuracy: the fold models, with the same
#: recipe on (K-1)/K of the data, should come within a few points of it; 10 points less means
#: they trained too briefly (``--epochs``) or on too little.
WEAK_GAP = 0.10


def check_folds(folds: object) -> int:
    """``folds`` as an int >= 2, or :class:`InvalidInputError`."""
    if isinstance(folds, bool) or not isinstance(folds, numbers.Integral) or folds < 2:
        raise InvalidInputError(
            f"--folds must be an integer of at least 2 (each model trains on K-1 folds and scores the one "
            f"left out; 1 fold leaves nothing to train on), got {folds!r}"
        )
    return int(folds)


def _check_threshold(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= float(value) < 1:
        raise InvalidInputError(f"--mislabel-threshold must be a probability in [0, 1), such as 0.9, got {value!r}")
    return float(value)


def _check_range(value: object) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise InvalidInputError(
            f"--ambiguous-range must be two probabilities LOW-HIGH such as 0.5-0.6, got {value!r}"
        ) from None
    if not 0 <= lo < hi <= 1:
        raise InvalidInputError(
            f"--ambiguous-range must satisfy 0 <= LOW < HIGH <= 1 (such as 0.5-0.6), got {lo:g}-{hi:g}"
        )
    return lo, hi


def _check_labels(probs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from .metrics import _check_probs_labels

    return _check_probs_labels(probs, labels)


# --------------------------------------------------------------------------- flagging


@dataclass
class Issue:
    """One flag on one image.

    Attributes:
        row: the image's row in the audited data (``(N,)`` order).
        given: the label in the data.
        suggested: the class the model suggests (ambiguous: the other likely class).
        probability: the model's probability of ``suggested``.
        kind: ``"mislabelled"`` or ``"ambiguous"``.
        method: ``"rule"`` or ``"cleanlab"``.
        rank: 1 = most severe, within (method, kind).
        judged: the probability the method judged: rule ``mislabelled``: ``1 - p[given]``
            (``mislabel_by="others"``) or the top class's (``"top"``); ``ambiguous``: the top
            probability, the one within ``ambiguous_range``; cleanlab: ``p[given]`` (its
            self-confidence). None for issues made without it.
        judged_by: which one: ``"1-p(given)"``, ``"p(top)"`` or ``"p(given)"``.
        given_probability: the model's probability of ``given``.
        top: the model's top class.
    """

    row: int
    given: int
    suggested: int
    probability: float
    kind: str
    method: str
    rank: int = 0
    judged: float | None = None
    judged_by: str = ""
    given_probability: float | None = None
    top: int | None = None


def _runner_up(p: torch.Tensor, exclude: torch.Tensor) -> torch.Tensor:
    """Per row, the most probable class other than ``exclude``."""
    masked = p.clone()
    masked.scatter_(1, exclude[:, None], -1.0)
    return masked.argmax(dim=1)


def flag_issues(
    probs: torch.Tensor,
    labels: torch.Tensor,
    *,
    methods: Sequence[str] = AUDIT_METHODS,
    mislabel_threshold: float = 0.9,
    ambiguous_range: tuple[float, float] = (0.5, 0.6),
    mislabel_by: str = "others",
) -> list[Issue]:
    """Flag images by the practitioner's rule and by confident learning.

    Args:
        probs: ``(N, C)`` out-of-sample probabilities (each image scored by a model that did
            not train on it; cleanlab assumes so too).
        labels: ``(N,)`` the given labels.
        methods: any of ``"rule"``, ``"cleanlab"``.
        mislabel_threshold: rule: flag ``mislabelled`` when the top class differs from the label
            and the model is this sure: the probability of every class but the label together is
            above it (``mislabel_by="others"``, the default, i.e. ``p[label] < 1 - threshold``), or
            its top class's probability is (``mislabel_by="top"``).
        ambiguous_range: rule: flag ``ambiguous`` when the top probability lies in ``[low, high]``.

    Returns:
        Issues sorted by method, kind, then rank. Rule ``mislabelled``: ranked by the probability
        compared with the threshold (``1 - p[label]``, or the top class's; highest first); ``ambiguous``: by the margin between the two top
        classes (smallest first); ``cleanlab``: in cleanlab's order (self-confidence, lowest first).
    """
    p, y = _check_labels(probs, labels)
    threshold = _check_threshold(mislabel_threshold)
    lo, hi = _check_range(ambiguous_range)
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    for method in methods:
        if method not in AUDIT_METHODS:
            raise unknown_name("audit method", method, AUDIT_METHODS)
    if mislabel_by not in MISLABEL_BY:
        raise unknown_name("--mislabel-by", mislabel_by, MISLABEL_BY)
    top_p, top = p.max(dim=1)
    # Compare at 6 decimals, so a float32 0.6 (0.60000002) counts as 0.6.
    top_r = top_p.round(decimals=6)
    others = (1.0 - p.gather(1, y[:, None]).squeeze(1)).round(decimals=6)  # P(not the given label)
    issues: list[Issue] = []
    if "rule" in methods:
        sure = top_r if mislabel_by == "top" else others
        wrong = (top != y) & (sure > threshold)
        rows = torch.nonzero(wrong).flatten()
        order = torch.argsort(-(top_p if mislabel_by == "top" else others)[rows], stable=True)
        for rank, r in enumerate(rows[order].tolist(), 1):
            judged, by = (float(top_p[r]), JUDGED_TOP) if mislabel_by == "top" else (float(1.0 - p[r, y[r]]), JUDGED_OTHERS)
            issues.append(Issue(r, int(y[r]), int(top[r]), float(top_p[r]), "mislabelled", "rule", rank, judged, by,
                                float(p[r, y[r]]), int(top[r])))
        ambiguous = (top_r >= lo) & (top_r <= hi) & ~wrong
        rows = torch.nonzero(ambiguous).flatten()
        # The other likely class: the top one when it is not the label, else the runner-up.
        other = torch.where(top[rows] != y[rows], top[rows], _runner_up(p[rows], y[rows]))
        margin = top_p[rows] - p[rows].gather(1, _runner_up(p[rows], top[rows])[:, None]).squeeze(1)
        order = torch.argsort(margin, stable=True)
        for rank, k in enumerate(order.tolist(), 1):
            r = int(rows[k])
            s = int(other[k])
            issues.append(Issue(r, int(y[r]), s, float(p[r, s]), "ambiguous", "rule", rank, float(top_p[r]), JUDGED_TOP,
                                float(p[r, y[r]]), int(top[r])))
    if "cleanlab" in methods:
        issues.extend(_cleanlab_issues(p, y))
    return issues


def _cleanlab_issues(p: torch.Tensor, y: torch.Tensor) -> list[Issue]:
    try:
        from cleanlab.filter import find_label_issues
    except ImportError as exc:  # pragma: no cover - cleanlab comes with the audit extra
        from .predictors import MissingExtraError

        raise MissingExtraError(
            "confident learning needs cleanlab: pip install 'ttakit[audit]' (or use --method rule)"
        ) from exc
    present = torch.unique(y)
    if len(present) < 2:
        raise InvalidInputError(
            f"confident learning needs labels of at least two classes, but every image is labelled {int(present[0])}"
        )
    pred = p.numpy().astype(np.float64)
    pred = pred / pred.sum(axis=1, keepdims=True)
    ranked = find_label_issues(
        y.numpy(), pred, return_indices_ranked_by="self_confidence", n_jobs=1
    )
    top = p.argmax(dim=1)
    issues = []
    for rank, r in enumerate(np.asarray(ranked).tolist(), 1):
        given = int(y[r])
        suggested = int(top[r]) if int(top[r]) != given else int(_runner_up(p[r : r + 1], y[r : r + 1])[0])
        issues.append(Issue(int(r), given, suggested, float(p[r, suggested]), "mislabelled", "cleanlab", rank,
                            float(p[r, given]), JUDGED_GIVEN, float(p[r, given]), int(top[r])))
    return issues


def rows_to_remove(issues: Sequence[Issue], remove: str = "mislabelled") -> list[int]:
    """Rows a cleaned copy drops (:data:`REMOVE_CHOICES`): only ``"mislabelled"`` ones (either
    method; the default), ``"disputed"`` (those and ambiguous rows whose label is not the model's
    top class), ``"all"`` flagged rows, or the rows one method (``"rule"``, ``"cleanlab"``)
    flagged. Sorted, unique."""
    if remove not in REMOVE_CHOICES:
        raise unknown_name("--remove choice", remove, REMOVE_CHOICES)
    keep = {
        "all": lambda i: True,
        "mislabelled": lambda i: i.kind == "mislabelled",
        "disputed": lambda i: i.kind == "mislabelled" or (i.top is not None and i.top != i.given),
        "rule": lambda i: i.method == "rule",
        "cleanlab": lambda i: i.method == "cleanlab",
    }[remove]
    return sorted({i.row for i in issues if keep(i)})


# --------------------------------------------------------------------------- scoring held-out images


def fold_assignment(labels: torch.Tensor, folds: int, seed: int = 0) -> torch.Tensor:
    """Stratified, seeded fold of each image: ``(N,)`` ints in ``[0, folds)``; each class is
    spread evenly over the folds."""
    folds = check_folds(folds)
    n = int(labels.shape[0])
    if n < folds:
        raise InvalidInputError(f"--folds {folds} needs at least {folds} images, the data has {n}")
    generator = torch.Generator().manual_seed(int(seed))
    assignment = torch.empty(n, dtype=torch.long)
    offset = 0
    for cls in torch.unique(labels):
        members = torch.nonzero(labels == cls).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        assignment[members] = (torch.arange(len(members)) + offset) % folds
        offset += len(members)
    return assignment


def view_disagreement(view_votes: dict[str, torch.Tensor] | None, row: int) -> list[tuple[str, int]]:
    """``[(view name, its top class), ...]`` of the image at ``row`` when the TTA views do not all
    vote for the same class, else ``[]`` (also without ``view_votes``: a policy of one view)."""
    if not view_votes:
        return []
    named = [(name, int(tops[row])) for name, tops in view_votes.items()]
    return named if len({c for _, c in named}) > 1 else []


def _summarize(issues: Sequence[Issue], n: int) -> dict[str, dict[str, int]]:
    summary: dict[str, dict[str, int]] = {}
    for issue in issues:
        summary.setdefault(issue.method, {}).setdefault(issue.kind, 0)
        summary[issue.method][issue.kind] += 1
    return summary
