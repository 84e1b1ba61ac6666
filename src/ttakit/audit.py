"""Find mislabelled and ambiguous images in a labelled data set with out-of-sample TTA
probabilities, and write a cleaned copy to retrain on.

Every image is scored by a model that did not train on it: either ``K`` models trained on
``K - 1`` folds each (:func:`cross_val_probs`, the recipe read from a ttakit checkpoint), or a
given model on data it never saw. Two methods flag images (:func:`flag_issues`):

* the practitioner's rule: the model calls the image another class with probability above
  ``mislabel_threshold`` (0.9) -> ``mislabelled``; its top probability lies within
  ``ambiguous_range`` (0.5-0.6) -> ``ambiguous`` (it probably shows two classes);
* confident learning: :func:`cleanlab.filter.find_label_issues` on the same probabilities
  (cleanlab is the maintained implementation; it is called, not rewritten) -> ``mislabelled``.

:func:`audit_checkpoint` is the job behind ``ttakit audit``: it writes ``issues.csv`` (one row
per flag: the image's row in the data as given, or its file for a folder; given and suggested
label; probability; kind; method; rank), ``contact_sheet.png`` and, on request, the data
without the flagged images (``--write-clean``), which ``ttakit train --data`` accepts.

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
    "write_clean",
]

AUDIT_METHODS = ("rule", "cleanlab")
REMOVE_CHOICES = ("all", "mislabelled", "rule", "cleanlab")
MISLABEL_BY = ("top", "others")
CSV_COLUMNS = ("rank", "row", "file", "given", "suggested", "probability", "kind", "method")


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
    mislabel_by: str = "top",
) -> list[Issue]:
    """Flag images by the practitioner's rule and by confident learning.

    Args:
        probs: ``(N, C)`` out-of-sample probabilities (each image scored by a model that did
            not train on it; cleanlab assumes so too).
        labels: ``(N,)`` the given labels.
        methods: any of ``"rule"``, ``"cleanlab"``.
        mislabel_threshold: rule: flag ``mislabelled`` when the top class differs from the label
            and the model is this sure: its top class's probability is above it
            (``mislabel_by="top"``), or the probability of every class but the label together is
            (``mislabel_by="others"``, i.e. ``p[label] < 1 - threshold``).
        ambiguous_range: rule: flag ``ambiguous`` when the top probability lies in ``[low, high]``.

    Returns:
        Issues sorted by method, kind, then rank. Rule ``mislabelled``: ranked by the probability
        of the suggested class (highest first); ``ambiguous``: by the margin between the two top
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


def _policy_probs(model: Any, images: torch.Tensor, policies: dict[str, Any], max_batch: int, progress: bool,
                  label: str) -> dict[str, torch.Tensor]:
    from .evaluate import predict_probs

    out = {}
    for name, policy in policies.items():
        probs, _ = predict_probs(model, images, policy, max_batch=max_batch, progress=progress, desc=f"{label} {name}")
        out[name] = probs.float().cpu()
    return out


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
    for k in range(folds):
        held = torch.nonzero(assignment == k).flatten()
        train_rows = torch.nonzero(assignment != k).flatten()
        note(f"fold {k + 1}/{folds}: training on {len(train_rows)} images, scoring {len(held)}", enabled=progress)
        fold_config = replace(config, seed=int(config.seed) + k, limit=None)
        result = train_model(dataset.subset(train_rows), fold_config, arch=arch, arch_kwargs=arch_kwargs,
                             progress=progress)
        scored = _policy_probs(result.model, dataset.images[held], policies, max_batch, progress, f"fold {k + 1}")
        for name, p in scored.items():
            probs[name][held] = p
    return probs, assignment


# --------------------------------------------------------------------------- outputs


def issues_to_csv(issues: Sequence[Issue], classes: Sequence[str], files: Sequence[str] | None = None,
                  rows: Sequence[int] | None = None) -> str:
    """``issues.csv`` text: ``rank, row, file, given, suggested, probability, kind, method``.

    ``row`` is the image's row in the data as given (``rows`` maps audited positions to it);
    ``file`` its path for image folders (else empty); labels are class names.
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


def write_clean(dataset: Any, remove: Sequence[int], path: str | os.PathLike, *, root: str | None = None) -> Path:
    """Write ``dataset`` without the rows ``remove`` to ``path``.

    An ``.npz`` (``x`` uint8 when the pixels are multiples of 1/255, else float32 in [0, 1];
    ``y``; ``classes``) for array data; for data loaded from image files (``dataset.files``),
    a file list (``.txt``: one ``path<TAB>class`` line per image, paths absolute) that
    ``ttakit train --data`` reads with :func:`ttakit.data.load_file_list`.
    """
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
        lines = ["# ttakit file list: image path <TAB> class name; read by ttakit train --data FILE"]
        for i in kept.tolist():
            file = Path(files[i])
            full = file if file.is_absolute() else (base / file)
            lines.append(f"{full.resolve()}\t{dataset.classes[int(dataset.labels[i])]}")
        return atomic_write_text(path, "\n".join(lines) + "\n")
    if path.suffix.lower() != ".npz":
        raise InvalidInputError(f"--write-clean {str(path)!r}: expected a path ending in .npz for array data")
    images = dataset.images[kept]
    scaled = images * 255.0
    as_uint8 = bool(torch.allclose(scaled, scaled.round(), atol=1e-3))
    x = scaled.round().clamp(0, 255).to(torch.uint8) if as_uint8 else images.float()
    x = x.permute(0, 2, 3, 1).numpy()  # NHWC, which the .npz loader reads for C in 1, 3, 4
    if x.shape[-1] == 1:
        x = x[..., 0]
    y = dataset.labels[kept].numpy().astype(np.int64)
    classes = np.array(list(dataset.classes))

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, x=x, y=y, classes=classes)

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


def _rows_in(pool: Any, subset: Any) -> list[int]:
    """The row of each ``subset`` image in ``pool`` (matched by pixels and label)."""
    keys: dict[bytes, list[int]] = {}
    pool_bytes = pool.images.reshape(len(pool), -1).numpy()
    for i in range(len(pool)):
        keys.setdefault(pool_bytes[i].tobytes() + bytes([int(pool.labels[i]) % 256]), []).append(i)
    sub_bytes = subset.images.reshape(len(subset), -1).numpy()
    rows = []
    for i in range(len(subset)):
        bucket = keys.get(sub_bytes[i].tobytes() + bytes([int(subset.labels[i]) % 256]))
        rows.append(bucket.pop(0) if bucket else i)
    return rows


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
    mislabel_by: str = "top",
    out_dir: str | os.PathLike = "audit",
    write_clean_to: str | os.PathLike | None = None,
    remove: str = "all",
    epochs: int | None = None,
    limit: int | None = None,
    max_batch: int = 256,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """``ttakit audit``: score every image of ``split`` out of sample, flag, and write the results.

    With ``folds``: ``folds`` models with the checkpoint's architecture and training recipe
    (``epochs`` overrides its epochs), each trained on the other folds of the split, score the
    held-out fold; every image of the split is audited. Without: the given model scores a split
    it did not train on (``val``, ``test``, or other data than its own).

    The flags use the TTA probabilities of ``policy`` (default: the checkpoint's training
    augmentations, ``train-aug``, or plain inference if it trained without any).
    """
    from .aliases import get_policy
    from .evaluate import resolve_policy
    from .models import check_compatible
    from .predictors import load as load_predictor
    from .progress import note

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

    if folds is not None:
        dataset = _load_audit_data(spec, split, data_dir).head(limit)
        positions = list(range(len(dataset)))
    else:
        from .data import load_dataset
        from .experiment import load_eval_data

        own = meta is not None and str(spec) == str(recipe.get("spec"))
        if split == "train" and own:
            raise InvalidInputError(
                f"{model} trained on the train split of {spec}, so its predictions there say nothing about the "
                "labels; audit with --folds K (models that did not train on each image), or --split val / test"
            )
        if meta is not None and split in ("val", "test"):
            dataset = load_eval_data(meta, data, split, data_dir).head(limit)
            _require_labels(dataset, spec)
            pool = load_dataset(spec, split="train" if split == "val" or not _has_own_test(spec, data_dir) else "test",
                                data_dir=data_dir)
            positions = _rows_in(pool, dataset)
        else:
            dataset = _load_audit_data(spec, split, data_dir).head(limit)
            positions = list(range(len(dataset)))
    if meta is not None:
        check_compatible(meta, dataset.channels, dataset.image_size)
        if list(dataset.classes) != list(meta.classes):
            raise InvalidInputError(
                f"{model} predicts classes {list(meta.classes)[:6]}... but the data has {list(dataset.classes)[:6]}...; "
                "audit it on data with the same classes in the same order"
            )

    if policy is None:
        policy = "train-aug" if getattr(predictor, "train_augmentations", None) else "none"
    tta_policy = resolve_policy(policy, meta)
    policies = {"none": get_policy("none")}
    if tta_policy.name != "none" or len(tta_policy) > 1:
        policies[tta_policy.name] = tta_policy
    main = tta_policy.name if tta_policy.name in policies else "none"

    if folds is not None:
        config = _train_config(meta, epochs)
        probs, _ = cross_val_probs(
            dataset, folds, config=config, arch=meta.arch, arch_kwargs=meta.arch_kwargs, policies=policies,
            seed=seed, max_batch=max_batch, progress=progress,
        )
        how = f"{folds}-fold cross-validation ({meta.arch}, {config.epochs} epochs per fold)"
    else:
        probs = _policy_probs(predictor, dataset.images, policies, max_batch, progress, "audit")
        how = f"{model} on data it did not train on"

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
    csv_path = atomic_write_text(out / "issues.csv", issues_to_csv(issues, dataset.classes, file_column, positions))
    sheet = contact_sheet(
        dataset.images, issues, dataset.classes, out / "contact_sheet.png", rows=positions,
        title=f"Flagged images of {spec}/{split}: red probably mislabelled, orange ambiguous (given → suggested, p)",
    )
    cleaned = None
    removed = rows_to_remove(issues, remove)
    if write_clean_to is not None:
        if folds is None or len(dataset) != len(positions) or positions != list(range(len(dataset))):
            note("note: the cleaned copy holds only the audited split", enabled=progress)
        cleaned = write_clean(dataset, removed, write_clean_to, root=str(root))
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
        "clean": str(cleaned) if cleaned else None,
        "out_dir": str(out),
    }
    from ._io import atomic_write_json
    from .report import format_table

    atomic_write_json(out / "audit.json", result)
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
