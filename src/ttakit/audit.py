"""Find mislabelled and ambiguous images in a labelled data set with out-of-sample TTA
probabilities, and write a cleaned copy to retrain on.

Every image is scored by a model that did not train on it: either ``K`` models trained on
``K - 1`` folds each (:func:`cross_val_probs`, the recipe read from a ttakit checkpoint), or a
given model on data it never saw. Two methods flag images (:func:`flag_issues`):

* the practitioner's rule: the model calls the image another class and is sure of it: the
  probability of every class but the label together, ``1 - p[label]``, is above
  ``mislabel_threshold`` (0.9; ``mislabel_by="others"``, the default, which ``benchmarks/audit.py``
  measures best on flipped labels: recall 0.96 at precision 0.68), or with ``mislabel_by="top"``
  the top class's probability is -> ``mislabelled``; its top probability lies within
  ``ambiguous_range`` (0.5-0.6) -> ``ambiguous`` (it probably shows two classes);
* confident learning: :func:`cleanlab.filter.find_label_issues` on the same probabilities
  (cleanlab is the maintained implementation; it is called, not rewritten) -> ``mislabelled``.

:func:`audit_checkpoint` is the job behind ``ttakit audit``: it writes ``issues.csv`` (one row
per flag: the image's row in the data as given, or its file for a folder; given and suggested
label; probability; kind; method; rank; the TTA views' top classes when they disagree),
``contact_sheet.png``, ``review.html`` (:mod:`ttakit.review_page`) and, on request, the data
without the flagged images (``--write-clean``), which ``ttakit train --data`` accepts. All of them
use the same flags (the same ``mislabel_by``).

Example:
    >>> probs = torch.tensor([[0.95, 0.05], [0.55, 0.45], [0.1, 0.9]])
    >>> issues = flag_issues(probs, torch.tensor([1, 0, 1]), methods=("rule",))
    >>> [(i.row, i.kind, i.suggested) for i in issues]
    [(0, 'mislabelled', 0), (1, 'ambiguous', 1)]
"""

from __future__ import annotations

import csv
import io
import math
import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._io import atomic_write, atomic_write_text
from .errors import DataError, InvalidInputError, unknown_name
from .policy import check_policy_model

__all__ = [
    "AUDIT_METHODS",
    "MISLABEL_BY",
    "Issue",
    "REMOVE_CHOICES",
    "audit_checkpoint",
    "check_folds",
    "contact_sheet",
    "cross_val_probs",
    "flag_issues",
    "fold_assignment",
    "issues_to_csv",
    "rows_to_remove",
    "view_disagreement",
    "write_clean",
]

AUDIT_METHODS = ("rule", "cleanlab")
REMOVE_CHOICES = ("all", "mislabelled", "rule", "cleanlab")
MISLABEL_BY = ("others", "top")  # the default first
CSV_COLUMNS = ("rank", "row", "file", "given", "suggested", "probability", "kind", "method", "views")


# --------------------------------------------------------------------------- validation


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
    """

    row: int
    given: int
    suggested: int
    probability: float
    kind: str
    method: str
    rank: int = 0


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
            issues.append(Issue(r, int(y[r]), int(top[r]), float(top_p[r]), "mislabelled", "rule", rank))
        ambiguous = (top_r >= lo) & (top_r <= hi) & ~wrong
        rows = torch.nonzero(ambiguous).flatten()
        # The other likely class: the top one when it is not the label, else the runner-up.
        other = torch.where(top[rows] != y[rows], top[rows], _runner_up(p[rows], y[rows]))
        margin = top_p[rows] - p[rows].gather(1, _runner_up(p[rows], top[rows])[:, None]).squeeze(1)
        order = torch.argsort(margin, stable=True)
        for rank, k in enumerate(order.tolist(), 1):
            r = int(rows[k])
            s = int(other[k])
            issues.append(Issue(r, int(y[r]), s, float(p[r, s]), "ambiguous", "rule", rank))
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
        issues.append(Issue(int(r), given, suggested, float(p[r, suggested]), "mislabelled", "cleanlab", rank))
    return issues


def rows_to_remove(issues: Sequence[Issue], remove: str = "all") -> list[int]:
    """Rows a cleaned copy drops: ``"all"`` flagged rows, only ``"mislabelled"`` ones (either
    method), or the rows one method (``"rule"``, ``"cleanlab"``) flagged. Sorted, unique."""
    if remove not in REMOVE_CHOICES:
        raise unknown_name("--remove choice", remove, REMOVE_CHOICES)
    keep = {
        "all": lambda i: True,
        "mislabelled": lambda i: i.kind == "mislabelled",
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


#: Images per engine call when each view's output is kept: bounds the ``(K, n, C)`` per-view
#: outputs in memory to this many images (the engine chunks each call further by ``max_batch``).
_VIEW_CHUNK = 4096


def _view_keys(names: Sequence[str]) -> list[str]:
    """The views' names, made unique (``hflip``, ``hflip#2``) to key a dict."""
    seen: dict[str, int] = {}
    keys = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        keys.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return keys


def _policy_probs(model: Any, images: torch.Tensor, policies: dict[str, Any], max_batch: int, progress: bool,
                  label: str, views_of: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Probabilities ``(N, C)`` of ``images`` under each policy, and, for the policy named
    ``views_of`` (when it has 2 or more views), each view's top class ``(N,)`` (view name -> int64):
    the class each TTA view alone votes for, from the same engine run as the merged probabilities.
    Only the top classes are kept (not ``K`` copies of the probabilities)."""
    from .engine import TTAEngine, eval_mode
    from .evaluate import predict_probs
    from .progress import progress as show_progress

    out: dict[str, torch.Tensor] = {}
    votes: dict[str, torch.Tensor] = {}
    for name, policy in policies.items():
        if name != views_of or len(policy) < 2:
            probs, _ = predict_probs(model, images, policy, max_batch=max_batch, progress=progress,
                                     desc=f"{label} {name}")
            out[name] = probs.float().cpu()
            continue
        engine = TTAEngine(model, policy, activation="softmax", max_batch=max_batch)
        merged, tops = [], []
        with eval_mode(model), show_progress(desc=f"{label} {name}", total=len(images), unit="img",
                                             enabled=progress) as bar:
            for start in range(0, len(images), _VIEW_CHUNK):
                run = engine.run(images[start : start + _VIEW_CHUNK], return_views=True, progress=bar.update)
                merged.append(run.merged.float().cpu())
                # (K, n, C) raw outputs before softmax: their argmax is each view's vote
                tops.append(run.views.float().argmax(dim=-1).cpu())
        out[name] = torch.cat(merged)
        per_view = torch.cat(tops, dim=1)
        votes = {key: per_view[k] for k, key in enumerate(_view_keys(run.view_names))}
    return out, votes


def cross_val_probs(
    dataset: Any,
    folds: int,
    *,
    config: Any = None,
    arch: str = "seed-cnn",
    arch_kwargs: dict[str, Any] | None = None,
    policies: dict[str, Any] | None = None,
    seed: int = 0,
    max_batch: int = 256,
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Out-of-sample probabilities of every image: ``folds`` models, each trained on the other
    folds (:func:`ttakit.train.train_model`) and scoring its held-out fold under each policy.

    Args:
        dataset: an :class:`~ttakit.data.ImageDataset` with labels.
        config: a :class:`~ttakit.train.TrainConfig` (seeds: ``config.seed + fold``).
        policies: name -> policy; default ``{"none": plain inference}``.

    Returns:
        ``(probs, fold)``: ``probs`` name -> ``(N, C)``, ``fold`` ``(N,)`` each image's fold.
    """
    probs, assignment, _ = _cross_val(dataset, folds, config=config, arch=arch, arch_kwargs=arch_kwargs,
                                      policies=policies, seed=seed, max_batch=max_batch, progress=progress)
    return probs, assignment


def _cross_val(
    dataset: Any,
    folds: int,
    *,
    config: Any = None,
    arch: str = "seed-cnn",
    arch_kwargs: dict[str, Any] | None = None,
    policies: dict[str, Any] | None = None,
    seed: int = 0,
    max_batch: int = 256,
    progress: bool = True,
    views_of: str | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`cross_val_probs`, plus each view's out-of-fold top class ``(N,)`` under the policy
    named ``views_of`` (view name -> int64; empty when it has fewer than 2 views)."""
    from dataclasses import replace

    from .aliases import get_policy
    from .progress import note
    from .train import TrainConfig, train_model

    folds = check_folds(folds)
    config = config if config is not None else TrainConfig()
    policies = policies or {"none": get_policy("none")}
    assignment = fold_assignment(dataset.labels, folds, seed)
    n, c = len(dataset), dataset.num_classes
    probs = {name: torch.zeros(n, c) for name in policies}
    votes: dict[str, torch.Tensor] = {}
    for k in range(folds):
        held = torch.nonzero(assignment == k).flatten()
        train_rows = torch.nonzero(assignment != k).flatten()
        note(f"fold {k + 1}/{folds}: training on {len(train_rows)} images, scoring {len(held)}", enabled=progress)
        fold_config = replace(config, seed=int(config.seed) + k, limit=None)
        result = train_model(dataset.subset(train_rows), fold_config, arch=arch, arch_kwargs=arch_kwargs,
                             progress=progress)
        scored, fold_votes = _policy_probs(result.model, dataset.images[held], policies, max_batch, progress,
                                           f"fold {k + 1}", views_of)
        for name, p in scored.items():
            probs[name][held] = p
        for name, v in fold_votes.items():
            votes.setdefault(name, torch.zeros(n, dtype=torch.long))[held] = v
    return probs, assignment, votes


# --------------------------------------------------------------------------- outputs


def view_disagreement(view_votes: dict[str, torch.Tensor] | None, row: int) -> list[tuple[str, int]]:
    """``[(view name, its top class), ...]`` of the image at ``row`` when the TTA views do not all
    vote for the same class, else ``[]`` (also without ``view_votes``: a policy of one view)."""
    if not view_votes:
        return []
    named = [(name, int(tops[row])) for name, tops in view_votes.items()]
    return named if len({c for _, c in named}) > 1 else []


def issues_to_csv(issues: Sequence[Issue], classes: Sequence[str], files: Sequence[str] | None = None,
                  rows: Sequence[int] | None = None, view_votes: dict[str, torch.Tensor] | None = None) -> str:
    """``issues.csv`` text: ``rank, row, file, given, suggested, probability, kind, method, views``.

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
                f"{issue.probability:.4f}",
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
    from .report import _new_figure, _save

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


def write_clean(dataset: Any, remove: Sequence[int], path: str | os.PathLike, *, root: str | None = None,
                test: Any = None, manifest: dict[str, Any] | None = None) -> Path:
    """Write ``dataset`` without the rows ``remove`` to ``path``, and ``test`` as its own test split.

    An ``.npz`` (``x`` uint8 when the pixels are multiples of 1/255, else float32 in [0, 1];
    ``y``; ``classes``; ``x_test``, ``y_test`` for ``test``; ``manifest``, ``manifest`` as JSON)
    for array data; for data loaded from image files (``dataset.files``), a file list (``.txt``:
    one ``path<TAB>class`` line per image, ``path<TAB>class<TAB>test`` for ``test``, paths
    absolute, the manifest on a ``# ttakit-clean {json}`` line) that ``ttakit train --data``
    reads with :func:`ttakit.data.load_file_list`. Either way the written data has ``test`` as a
    test split of its own, so a model trained on it is scored on exactly those images.
    """
    import json

    path = Path(path)
    keep = torch.ones(len(dataset), dtype=torch.bool)
    if len(remove):
        keep[torch.as_tensor(list(remove), dtype=torch.long)] = False
    if int(keep.sum()) == 0:
        raise InvalidInputError("--write-clean: every image was flagged, so the cleaned data would be empty")
    kept = torch.nonzero(keep).flatten()
    files = getattr(dataset, "files", None)
    if files is not None:
        if path.suffix.lower() != ".txt":
            raise InvalidInputError(
                f"--write-clean {str(path)!r}: the data are image files, so the cleaned data is a file list; "
                "give a path ending in .txt"
            )
        base = Path(root) if root is not None else Path(".")
        lines = ["# ttakit file list: image path <TAB> class name [<TAB> test]; read by ttakit train --data FILE"]
        if manifest is not None:
            lines.append("# ttakit-clean " + json.dumps(manifest, sort_keys=True))
        parts = [(dataset, kept.tolist(), "")]
        if test is not None:
            if getattr(test, "files", None) is None:
                raise InvalidInputError("--write-clean: the test split of image files must name its files")
            parts.append((test, list(range(len(test))), "\ttest"))
        for part, rows, mark in parts:
            for i in rows:
                file = Path(part.files[i])
                full = file if file.is_absolute() else (base / file)
                lines.append(f"{full.resolve()}\t{part.classes[int(part.labels[i])]}{mark}")
        return atomic_write_text(path, "\n".join(lines) + "\n")
    if path.suffix.lower() != ".npz":
        raise InvalidInputError(f"--write-clean {str(path)!r}: expected a path ending in .npz for array data")

    def arrays(images: torch.Tensor) -> np.ndarray:
        scaled = images * 255.0
        as_uint8 = bool(torch.allclose(scaled, scaled.round(), atol=1e-3))
        x = scaled.round().clamp(0, 255).to(torch.uint8) if as_uint8 else images.float()
        x = x.permute(0, 2, 3, 1).numpy()  # NHWC, which the .npz loader reads for C in 1, 3, 4
        return x[..., 0] if x.shape[-1] == 1 else x

    stored: dict[str, np.ndarray] = {
        "x": arrays(dataset.images[kept]),
        "y": dataset.labels[kept].numpy().astype(np.int64),
        "classes": np.array(list(dataset.classes)),
    }
    if test is not None:
        stored["x_test"] = arrays(test.images)
        stored["y_test"] = test.labels.numpy().astype(np.int64)
    if manifest is not None:
        stored["manifest"] = np.array(json.dumps(manifest, sort_keys=True))

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, **stored)

    return atomic_write(path, write)


# --------------------------------------------------------------------------- the command


def _load_audit_data(spec: str, split: str, data_dir: str | None) -> Any:
    from .data import load_dataset

    try:
        dataset = load_dataset(spec, split=split, data_dir=data_dir)
    except DataError as err:
        text = str(err)
        if "'y'" in text or "no class sub-folders" in text:
            raise InvalidInputError(
                f"--data {spec}: audit needs labelled images (an .npz with labels 'y', or a folder with one "
                f"sub-folder per class); {text}"
            ) from None
        raise
    _require_labels(dataset, spec)
    return dataset


def _require_labels(dataset: Any, spec: str) -> None:
    labels = getattr(dataset, "labels", None)
    if labels is None or len(labels) == 0 or int(labels.min()) < 0 or getattr(dataset, "labelled", True) is False:
        raise InvalidInputError(
            f"--data {spec}: this split has no labels, and an audit compares labels with predictions; "
            "give labelled data (an .npz with 'y', or a folder with one sub-folder per class)"
        )


def _train_config(meta: Any, epochs: int | None) -> Any:
    from dataclasses import replace

    from .train import TrainConfig

    saved = dict(meta.extra.get("train_config") or {})
    known = {f.name for f in fields(TrainConfig)}
    saved = {k: v for k, v in saved.items() if k in known}
    if "augment" in saved:
        saved["augment"] = tuple(saved.get("augment") or ())
    try:
        config = TrainConfig(**saved)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"checkpoint {meta.source}: its recorded training configuration is not valid ({exc})") from exc
    return replace(config, epochs=epochs) if epochs is not None else config


def audit_checkpoint(
    model: str,
    *,
    data: str | None = None,
    data_dir: str | None = None,
    split: str = "train",
    folds: int | None = None,
    policy: str | None = None,
    methods: Sequence[str] = AUDIT_METHODS,
    mislabel_threshold: float = 0.9,
    ambiguous_range: tuple[float, float] = (0.5, 0.6),
    mislabel_by: str = "others",
    out_dir: str | os.PathLike = "audit",
    write_clean_to: str | os.PathLike | None = None,
    remove: str = "all",
    epochs: int | None = None,
    limit: int | None = None,
    max_batch: int = 256,
    seed: int = 0,
    progress: bool = True,
    allow_other_model: bool = False,
) -> dict[str, Any]:
    """``ttakit audit``: score every image of ``split`` out of sample, flag, and write the results.

    With ``folds``: ``folds`` models with the checkpoint's architecture and training recipe
    (``epochs`` overrides its epochs), each trained on the other folds of the split, score the
    held-out fold; every image of the split is audited. Without: the given model scores a split
    it did not train on (``val``, ``test``, or other data than its own).

    The flags use the TTA probabilities of ``policy`` (default: the checkpoint's training
    augmentations, ``train-aug``, or plain inference if it trained without any). A policy holding
    fitted parameters must have been fitted on this checkpoint
    (:func:`ttakit.policy.check_policy_model`; ``allow_other_model`` allows another). Auditing the
    checkpoint's own validation split with a policy fitted on validation rows (``ttakit search``)
    audits only the rows it never saw (``meta["validation_rows"]``): a row is never flagged by
    something fitted on it, and those rows can still be audited soundly.
    """
    from .aliases import get_policy
    from .evaluate import resolve_policy
    from .models import check_compatible
    from .predictors import load as load_predictor

    threshold = _check_threshold(mislabel_threshold)
    amb = _check_range(ambiguous_range)
    if folds is not None:
        folds = check_folds(folds)
    predictor = load_predictor(model)
    meta = getattr(predictor, "meta", None)
    if folds is not None and meta is None:
        raise InvalidInputError(
            f"--folds trains new models with the recipe of a ttakit checkpoint, but {model} is not one; "
            "audit it without --folds on data it did not train on"
        )
    recipe = dict(meta.extra.get("data") or {}) if meta is not None else {}
    spec = data or recipe.get("spec") or (meta.dataset if meta is not None else None)
    if spec is None:
        raise InvalidInputError(f"give the data to audit with --data (the model {model} does not record its own)")
    data_dir = data_dir or (recipe.get("data_dir") if spec == recipe.get("spec") else None)
    if policy is None:
        policy = "train-aug" if getattr(predictor, "train_augmentations", None) else "none"
    tta_policy = resolve_policy(policy, meta)
    check_policy_model(tta_policy, predictor, allow_other_model=allow_other_model)  # fitted on this model?
    if write_clean_to is not None and split == "test":
        raise InvalidInputError(
            "--write-clean with --split test: cleaning never touches the held-out test images (a model retrained "
            "on them would be scored on images a model picked); audit --split train or val to write a cleaned copy"
        )
    own = bool(recipe) and _same_source(str(spec), str(recipe.get("spec")))
    if folds is None and split == "train" and own:
        raise InvalidInputError(
            f"{model} trained on the train split of {spec}, so its predictions there say nothing about the "
            "labels; audit with --folds K (models that did not train on each image), or --split val / test"
        )

    # `source` is the data as given; `positions` number the audited rows in it, from the split
    # the checkpoint recorded (never by matching pixels), and `test_index` its held-out test rows.
    test_index: list[int] | None = None
    fitted_note = ""
    if own:
        from .data.splits import split_rows

        _require_recorded_split(recipe, split, model)
        source, index, _ = split_rows(recipe, split, data=data, data_dir=data_dir)
        positions = index.tolist()
        if split == "val":
            positions, fitted_note = _rows_not_fitted_on(tta_policy, source, positions)
        if recipe.get("test_source") == "carved" and split != "test":
            test_index = [int(i) for i in recipe["test_index"]]
    else:
        source = _load_audit_data(spec, split, data_dir)
        positions = list(range(len(source)))
        if write_clean_to is not None and not _has_own_test(spec, data_dir):
            # no test split yet: keep apart the one ttakit train would carve, so a model trained
            # on the cleaned copy is scored on images no audit touched
            from .data import make_splits
            from .data.splits import SPLIT_SEED

            test_index = [int(i) for i in make_splits(spec, data_dir, val_fraction=0.0, seed=SPLIT_SEED).recipe["test_index"]]
            held = set(test_index)
            positions = [i for i in positions if i not in held]
    if limit is not None and limit < 1:
        raise InvalidInputError(f"--limit must be a positive number of images, got {limit}")
    positions = positions[:limit] if limit is not None else positions
    dataset = source.subset(positions, f"{spec}[{split}]") if positions != list(range(len(source))) else source
    _require_labels(dataset, spec)
    if meta is not None:
        check_compatible(meta, dataset.channels, dataset.image_size)
        if list(dataset.classes) != list(meta.classes):
            raise InvalidInputError(
                f"{model} predicts classes {list(meta.classes)[:6]}... but the data has {list(dataset.classes)[:6]}...; "
                "audit it on data with the same classes in the same order"
            )

    policies = {"none": get_policy("none")}
    if tta_policy.name != "none" or len(tta_policy) > 1:
        policies[tta_policy.name] = tta_policy
    main = tta_policy.name if tta_policy.name in policies else "none"

    if folds is not None:
        config = _train_config(meta, epochs)
        probs, _, view_votes = _cross_val(
            dataset, folds, config=config, arch=meta.arch, arch_kwargs=meta.arch_kwargs, policies=policies,
            seed=seed, max_batch=max_batch, progress=progress, views_of=main,
        )
        how = f"{folds}-fold cross-validation ({meta.arch}, {config.epochs} epochs per fold)"
    else:
        probs, view_votes = _policy_probs(predictor, dataset.images, policies, max_batch, progress, "audit", main)
        how = f"{model} on data it did not train on{fitted_note}"

    issues = flag_issues(probs[main], dataset.labels, methods=methods, mislabel_threshold=threshold,
                         ambiguous_range=amb, mislabel_by=mislabel_by)
    summary = _summarize(issues, len(dataset))
    # The same flags from plain probabilities, to show what TTA changed.
    if main != "none":
        plain_issues = flag_issues(probs["none"], dataset.labels, methods=methods, mislabel_threshold=threshold,
                                   ambiguous_range=amb, mislabel_by=mislabel_by)
        summary_plain = _summarize(plain_issues, len(dataset))
    else:
        summary_plain = summary

    out = Path(out_dir)
    files = getattr(dataset, "files", None)
    file_column = None
    root = Path(str(spec)).expanduser()
    if (root / "train").is_dir() and (root / "test").is_dir():  # files are relative to the split's folder
        root = root / ("test" if split == "test" else "train")
    if files is not None:
        file_column = [str(root / f) if not Path(f).is_absolute() else f for f in files]
    csv_path = atomic_write_text(out / "issues.csv", issues_to_csv(issues, dataset.classes, file_column, positions,
                                                                      view_votes))
    sheet = contact_sheet(
        dataset.images, issues, dataset.classes, out / "contact_sheet.png", rows=positions,
        title=f"Flagged images of {spec}/{split}: red probably mislabelled, orange ambiguous (given → suggested, p)",
    )
    # review.html: look at the flagged images, then decide
    from .review_page import write_review_page

    review = write_review_page(
        out / "review.html", dataset.images, probs[main], dataset.labels, dataset.classes, rows=positions,
        files=file_column, plain_probs=probs["none"] if main != "none" else None, view_probs=view_votes,
        methods=("others", "top", *(("cleanlab",) if "cleanlab" in methods else ())),
        default_method=mislabel_by if "rule" in methods else "cleanlab",
        mislabel_threshold=threshold, ambiguous_range=amb, title=f"ttakit audit of {spec}/{split}: review",
        subtitle=f"{len(dataset)} images scored by {how}; TTA policy {main}", run=f"{model}|{spec}|{split}|{out}",
    )
    cleaned = None
    manifest = None
    removed = rows_to_remove(issues, remove)
    if write_clean_to is not None:
        cleaned, manifest = _write_clean_copy(
            source, [positions[r] for r in removed], write_clean_to, spec=str(spec), data_dir=data_dir,
            split=split, model=str(model), test_index=test_index, root=root, recipe=recipe if own else None,
        )
    rows = _summary_rows(summary, summary_plain, main)
    result = {
        "format": "ttakit-audit",
        "format_version": 1,
        "model": str(model),
        "data": str(spec),
        "split": split,
        "n_images": len(dataset),
        "scored_by": how,
        "policy": main,
        "methods": list(methods),
        "mislabel_threshold": threshold,
        "mislabel_by": mislabel_by,
        "ambiguous_range": list(amb),
        "flagged": summary,
        "flagged_plain": summary_plain,
        "n_flagged_images": len({i.row for i in issues}),
        "removed": len(removed) if cleaned is not None else None,
        "rows": rows,
        "issues_csv": str(csv_path),
        "contact_sheet": str(sheet) if sheet else None,
        "review_page": str(review),
        "clean": str(cleaned) if cleaned else None,
        "clean_manifest": manifest,
        "out_dir": str(out),
    }
    from ._io import atomic_write_json
    from .report import format_table

    atomic_write_json(out / "audit.json", result)
    from .html_report import write_audit_report

    result["report_html"] = str(write_audit_report(out, result))
    result["table"] = format_table(rows, title=f"audit of {spec}/{split} ({len(dataset)} images): flagged images")
    return result


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


def _rows_not_fitted_on(policy: Any, source: Any, positions: list[int]) -> tuple[list[int], str]:
    """The rows of the checkpoint's validation split (``positions`` in ``source``) that nothing in
    ``policy`` was fitted on, and a note for the report ("" when every row is kept).

    Raises:
        InvalidInputError: the policy was fitted on labelled rows but does not record which, or
            records another validation split, or leaves no row unseen.
    """
    from .data.splits import dataset_sha256
    from .policy import fitted_on_labelled_data, fitted_parameters, unused_validation_rows

    if not fitted_on_labelled_data(policy):
        return positions, ""
    what = ", ".join(fitted_parameters(policy)) or "views searched"
    n = len(positions)
    try:
        unused = unused_validation_rows(policy, n, dataset_sha256(source.subset(positions, "val")))
    except InvalidInputError:
        raise InvalidInputError(
            f"audit --split val --policy {policy.name!r}: its {what} were fitted on this checkpoint's validation rows "
            f"and no row of the {n} is proven unseen (the policy records none, records another validation split, or "
            "was searched on all of them), so each row would be flagged by something fitted on it; audit with a "
            "views-only policy (--policy none or hflip), --split test, or search again with ttakit search (it keeps "
            "--conformal-holdout 0.2 of the rows unseen and records them)"
        ) from None
    if unused is None:
        return positions, ""
    kept = [positions[r] for r in unused]
    return kept, f"; the {len(kept)} of {n} validation rows the policy's {what} were not fitted on"


def _same_source(a: str, b: str) -> bool:
    from .data.splits import _same_spec

    return _same_spec(a, b)


def _require_recorded_split(recipe: dict[str, Any], split: str, model: str) -> None:
    """Refuse a checkpoint whose recipe does not record the rows of ``split`` (and of its test
    split): without them the audited rows could be numbered, and the test rows kept apart,
    only by guessing."""
    carved = recipe.get("test_source") == "carved"
    needed = []
    if carved:
        needed.append("test_index")
        if split == "val":
            needed.append("val_index")
        if split == "train" and float(recipe.get("val_fraction") or 0) > 0:
            needed.append("val_index")
    elif split != "test" and recipe.get("test_source") == "own" and not recipe.get("sha256"):
        needed.append("sha256")
    missing = [k for k in needed if not recipe.get(k) and not isinstance(recipe.get(k), list)]
    if missing:
        raise DataError(
            f"checkpoint {model} does not record its split ({', '.join(missing)} missing from checkpoint.json "
            "extra.data), so the audited rows cannot be numbered nor its test rows kept apart; retrain it with "
            "ttakit train"
        )


def _absolute_files(dataset: Any, root: Path) -> Any:
    """``dataset`` with its files as absolute paths (image folders store them relative to ``root``)."""
    files = getattr(dataset, "files", None)
    if files is None:
        return dataset
    dataset = dataset.subset(torch.arange(len(dataset)), dataset.name)
    dataset.files = [f if Path(f).is_absolute() else str((root / f).resolve()) for f in files]
    return dataset


def _write_clean_copy(source: Any, removed_rows: list[int], path: str | os.PathLike, *, spec: str,
                      data_dir: str | None, split: str, model: str, test_index: list[int] | None, root: Path,
                      recipe: dict[str, Any] | None) -> tuple[Path, dict[str, Any]]:
    """The data as given, without ``removed_rows`` and with its test split kept whole and apart:
    the recorded (or carved) ``test_index`` rows of ``source``, or the data's own test split."""
    from .data import load_dataset
    from .data.splits import dataset_sha256

    base = Path(spec).expanduser()
    source = _absolute_files(source, root)
    if test_index is not None:
        test = source.subset(torch.tensor(test_index, dtype=torch.long), f"{spec}[test]")
        test_source = "carved"
    else:
        if not _has_own_test(spec, data_dir):
            raise DataError(f"--write-clean: {spec} has no test split to keep apart; retrain the checkpoint on it first")
        test = load_dataset(spec, split="test", data_dir=data_dir)
        test_source = "own"
        if (base / "train").is_dir() and (base / "test").is_dir():
            test = _absolute_files(test, base / "test")
    manifest = {
        "format": "ttakit-clean",
        "format_version": 1,
        "source": spec,
        "source_sha256": (recipe or {}).get("sha256") or dataset_sha256(source),
        "checkpoint": model,
        "audited_split": split,
        "removed_rows": sorted(removed_rows),
        "test_source": test_source,
        "test_index": sorted(test_index) if test_index is not None else None,
        "n_test": len(test),
    }
    dropped = sorted(set(removed_rows) | set(test_index or []))
    manifest["n_kept"] = len(source) - len(dropped)
    written = write_clean(source, dropped, path, test=test, manifest=manifest)
    return written, manifest


def _has_own_test(spec: str, data_dir: str | None) -> bool:
    try:
        from .data.splits import has_own_test_split
    except ImportError:  # pragma: no cover
        return True
    return has_own_test_split(spec, data_dir)


def _summarize(issues: Sequence[Issue], n: int) -> dict[str, dict[str, int]]:
    summary: dict[str, dict[str, int]] = {}
    for issue in issues:
        summary.setdefault(issue.method, {}).setdefault(issue.kind, 0)
        summary[issue.method][issue.kind] += 1
    return summary
