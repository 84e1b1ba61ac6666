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
``contact_sheet.png``, ``review.html`` (:mod:`ttakit.report.review_page`) and, on request, the data
without the flagged images (``--write-clean``), which ``ttakit train --data`` accepts. All of them
use the same flags (the same ``mislabel_by``).

Example:
    >>> probs = torch.tensor([[0.95, 0.05], [0.55, 0.45], [0.1, 0.9]])
    >>> issues = flag_issues(probs, torch.tensor([1, 0, 1]), methods=("rule",))
    >>> [(i.row, i.kind, i.suggested) for i in issues]
    [(0, 'mislabelled', 0), (1, 'ambiguous', 1)]"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from ..errors import InvalidInputError
from ..label_issues import (
    AUDIT_METHODS,
    DEFAULT_FOLDS,
    WEAK_ACCURACY,
    WEAK_GAP,
    _check_range,
    _check_threshold,
    _summarize,
    check_folds,
    flag_issues,
    fold_assignment,
    rows_to_remove,
)
from ..policy import check_policy_model
from ..report.audit_md import contact_sheet, issues_to_csv
from ._audit_data import (
    _has_own_test,
    _load_audit_data,
    _require_labels,
    _require_recorded_split,
    _rows_not_fitted_on,
    _same_source,
)
from ._audit_write import _write_audit

__all__ = [
    "AUDIT_METHODS",
    "audit_checkpoint",
    "check_folds",
    "contact_sheet",
    "cross_val_probs",
    "flag_issues",
    "fold_assignment",
    "issues_to_csv",
    "rows_to_remove",
]

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
                  label: str, views_of: str | None = None, amp: bool = False,
                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Probabilities ``(N, C)`` of ``images`` under each policy, and, for the policy named
    ``views_of`` (when it has 2 or more views), each view's top class ``(N,)`` (view name -> int64):
    the class each TTA view alone votes for, from the same engine run as the merged probabilities.
    Only the top classes are kept (not ``K`` copies of the probabilities). The model runs where
    it is, under autocast with ``amp``."""
    from ..engine import TTAEngine, eval_mode
    from ..progress import progress as show_progress
    from ._policy_eval import predict_probs

    out: dict[str, torch.Tensor] = {}
    votes: dict[str, torch.Tensor] = {}
    for name, policy in policies.items():
        if name != views_of or len(policy) < 2:
            probs, _ = predict_probs(model, images, policy, max_batch=max_batch, progress=progress,
                                     desc=f"{label} {name}", amp=amp)
            out[name] = probs.float().cpu()
            continue
        engine = TTAEngine(model, policy, activation="softmax", max_batch=max_batch, amp=amp)
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
    folds (:func:`ttakit.training.train_model`) and scoring its held-out fold under each policy.

    Args:
        dataset: an :class:`~ttakit.data.ImageDataset` with labels.
        config: a :class:`~ttakit.training.TrainConfig` (seeds: ``config.seed + fold``).
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
    amp: bool = False,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`cross_val_probs`, plus each view's out-of-fold top class ``(N,)`` under the policy
    named ``views_of`` (view name -> int64; empty when it has fewer than 2 views)."""
    from dataclasses import replace

    from ..aliases import get_policy
    from ..progress import note
    from ..training.config import TrainConfig
    from ..training.loop import train_model

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
                                           f"fold {k + 1}", views_of, amp=amp)
        for name, p in scored.items():
            probs[name][held] = p
        for name, v in fold_votes.items():
            votes.setdefault(name, torch.zeros(n, dtype=torch.long))[held] = v
    return probs, assignment, votes


# --------------------------------------------------------------------------- outputs


def _train_config(meta: Any, epochs: int | None, device: str | None = None, amp: bool = False) -> Any:
    """The checkpoint's recorded training recipe for the fold models, run on ``device`` (default
    the CPU, not the device it trained on) with ``amp``; ``epochs`` overrides its epochs."""
    from dataclasses import replace

    from ..training.config import TrainConfig

    saved = dict(meta.extra.get("train_config") or {})
    known = {f.name for f in fields(TrainConfig)}
    saved = {k: v for k, v in saved.items() if k in known}
    if "augment" in saved:
        saved["augment"] = tuple(saved.get("augment") or ())
    saved["device"], saved["amp"] = str(device) if device is not None else "cpu", bool(amp)
    try:
        config = TrainConfig(**saved)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"checkpoint {meta.source}: its recorded training configuration is not valid ({exc})") from exc
    return replace(config, epochs=epochs) if epochs is not None else config


@dataclass
class _Plan:
    """What ``ttakit audit`` scores: the model, its recipe, the data as given and the audited rows."""

    model: str
    predictor: Any
    meta: Any
    recipe: dict[str, Any]
    spec: Any
    data_dir: str | None
    split: str
    tta_policy: Any
    own: bool
    source: Any = None
    positions: list[int] = field(default_factory=list)
    test_index: list[int] | None = None
    fitted_note: str = ""
    folds: int | None = None
    folds_note: str = ""


def _plan(model: str, data: str | None, data_dir: str | None, split: str, folds: int | None, policy: str | None,
          write_clean: bool, allow_other_model: bool) -> _Plan:
    """Load the model and check the request: ``--folds`` needs a checkpoint, the data is known,
    the policy belongs to the model, a model is never audited on the rows it trained on."""
    from ..predictors import load as load_predictor
    from ._policies import resolve_policy

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
    if write_clean and split == "test":
        raise InvalidInputError(
            "--write-clean with --split test: cleaning never touches the held-out test images (a model retrained "
            "on them would be scored on images a model picked); audit --split train or val to write a cleaned copy"
        )
    own = bool(recipe) and _same_source(str(spec), str(recipe.get("spec")))
    folds_note = ""
    if folds is None and split == "train" and own:
        # the checkpoint trained on these rows, so its own predictions say nothing about their
        # labels: score each row by a model trained on the other folds, with its recipe
        folds = DEFAULT_FOLDS
        folds_note = (
            f"auditing the training split with {folds}-fold cross-validation: {model} trained on these images, so "
            f"{folds} models with its recipe each train on {folds - 1} folds and score the one left out "
            f"(that is {folds} trainings: --folds K and --epochs N change it; --split val or test audits with the "
            "checkpoint itself)"
        )
    return _Plan(model, predictor, meta, recipe, spec, data_dir, split, tta_policy, own, folds=folds,
                 folds_note=folds_note)


def _select_rows(plan: _Plan, data: str | None, write_clean: bool) -> None:
    """``plan.source``: the data as given; ``plan.positions``: the audited rows in it, from the
    split the checkpoint recorded (never by matching pixels); ``plan.test_index``: its held-out
    test rows, kept apart from a cleaned copy."""
    split, spec, data_dir = plan.split, plan.spec, plan.data_dir
    if plan.own:
        from ..data.splits import split_rows

        _require_recorded_split(plan.recipe, split, plan.model)
        plan.source, index, _ = split_rows(plan.recipe, split, data=data, data_dir=data_dir)
        plan.positions = index.tolist()
        if split == "val":
            plan.positions, plan.fitted_note = _rows_not_fitted_on(plan.tta_policy, plan.source, plan.positions)
        if plan.recipe.get("test_source") == "carved" and split != "test":
            plan.test_index = [int(i) for i in plan.recipe["test_index"]]
        return
    plan.source = _load_audit_data(spec, split, data_dir)
    plan.positions = list(range(len(plan.source)))
    if write_clean and not _has_own_test(spec, data_dir):
        # no test split yet: keep apart the one ttakit train would carve, so a model trained
        # on the cleaned copy is scored on images no audit touched
        from ..data import make_splits
        from ..data.splits import SPLIT_SEED

        plan.test_index = [int(i) for i in make_splits(spec, data_dir, val_fraction=0.0, seed=SPLIT_SEED).recipe["test_index"]]
        held = set(plan.test_index)
        plan.positions = [i for i in plan.positions if i not in held]


def _audited_dataset(plan: _Plan, limit: int | None) -> Any:
    """The audited rows (the first ``limit``) as a data set, checked against the model."""
    from ..models import check_compatible

    if limit is not None and limit < 1:
        raise InvalidInputError(f"--limit must be a positive number of images, got {limit}")
    plan.positions = plan.positions[:limit] if limit is not None else plan.positions
    source, positions = plan.source, plan.positions
    dataset = source.subset(positions, f"{plan.spec}[{plan.split}]") if positions != list(range(len(source))) else source
    _require_labels(dataset, plan.spec)
    meta = plan.meta
    if meta is not None:
        from ._eval_data import at_recorded_size

        dataset = at_recorded_size(dataset, plan.recipe)  # trained with --image-size: audit at that size
        check_compatible(meta, dataset.channels, dataset.image_size)
        if list(dataset.classes) != list(meta.classes):
            raise InvalidInputError(
                f"{plan.model} predicts classes {list(meta.classes)[:6]}... but the data has {list(dataset.classes)[:6]}...; "
                "audit it on data with the same classes in the same order"
            )
    return dataset


def _score(plan: _Plan, dataset: Any, folds: int | None, epochs: int | None, seed: int, max_batch: int,
           progress: bool, device: str | None, amp: bool,
           ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], str, str, torch.Tensor | None]:
    """Out-of-sample probabilities under plain inference and the TTA policy: ``(probs, view votes,
    main policy name, how they were scored, each image's fold or None)``."""
    from ..aliases import get_policy
    from ._policy_eval import place_model

    policies = {"none": get_policy("none")}
    if plan.tta_policy.name != "none" or len(plan.tta_policy) > 1:
        policies[plan.tta_policy.name] = plan.tta_policy
    main = plan.tta_policy.name if plan.tta_policy.name in policies else "none"
    if folds is not None:
        meta = plan.meta
        config = _train_config(meta, epochs, device, amp)
        probs, assignment, view_votes = _cross_val(
            dataset, folds, config=config, arch=meta.arch, arch_kwargs=meta.arch_kwargs, policies=policies,
            seed=seed, max_batch=max_batch, progress=progress, views_of=main, amp=amp,
        )
        how = f"{folds}-fold cross-validation ({meta.arch}, {config.epochs} epochs per fold)"
        return probs, view_votes, main, how, assignment
    place_model(plan.predictor, device)  # --device: the engine runs the model where it is
    probs, view_votes = _policy_probs(plan.predictor, dataset.images, policies, max_batch, progress, "audit", main,
                                      amp=amp)
    return probs, view_votes, main, f"{plan.model} on data it did not train on{plan.fitted_note}", None


def _scorer_check(plan: _Plan, probs: torch.Tensor, labels: torch.Tensor, assignment: torch.Tensor | None,
                  ) -> dict[str, Any]:
    """How well the scoring model(s) did on the images they scored (held out): ``accuracy`` against
    the given labels, ``fold_accuracy`` per fold model, the checkpoint's own ``val_accuracy``, and a
    ``warning`` line when it is below :data:`WEAK_ACCURACY` or :data:`WEAK_GAP` below the
    checkpoint's (None otherwise)."""
    hit = (probs.argmax(dim=1) == labels).float()
    accuracy = float(hit.mean()) if len(hit) else float("nan")
    fold_accuracy = None
    if assignment is not None:
        fold_accuracy = [round(float(hit[assignment == k].mean()), 4) for k in range(int(assignment.max()) + 1)
                         if bool((assignment == k).any())]
    own = (getattr(plan.meta, "metrics", None) or {}).get("val_acc")
    own = float(own) if isinstance(own, (int, float)) else None
    who = (f"the {len(fold_accuracy)} fold models score", "they") if fold_accuracy is not None else (
        f"{plan.model} scores", "it")
    reasons = []
    if accuracy < WEAK_ACCURACY:
        reasons.append(f"below {WEAK_ACCURACY:.0%}")
    if own is not None and accuracy < own - WEAK_GAP:
        reasons.append(f"{(own - accuracy) * 100:.0f} points below the checkpoint's own validation accuracy "
                       f"({own:.1%})")
    warning = None
    if reasons:
        warning = (
            f"warning: {who[0]} {accuracy:.1%} on the images {who[1]} did not train on ({' and '.join(reasons)}): "
            "most flags are then the model's errors, not label errors; train longer (--epochs) or on more data "
            "before trusting the flags (--write-clean needs --force)"
        )
    return {"accuracy": round(accuracy, 4), "fold_accuracy": fold_accuracy, "val_accuracy": own, "warning": warning,
            "weak": warning is not None}


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
    remove: str = "mislabelled",
    force: bool = False,
    epochs: int | None = None,
    limit: int | None = None,
    max_batch: int = 256,
    seed: int = 0,
    progress: bool = True,
    allow_other_model: bool = False,
    device: str | None = None,
    amp: bool = False,
) -> dict[str, Any]:
    """``ttakit audit``: score every image of ``split`` out of sample, flag, and write the results.

    With ``folds``: ``folds`` models with the checkpoint's architecture and training recipe
    (``epochs`` overrides its epochs), each trained on the other folds of the split, score the
    held-out fold; every image of the split is audited. Without: the given model scores a split
    it did not train on (``val``, ``test``, or other data than its own); the checkpoint's own
    training split (the default ``split``) is audited with :data:`DEFAULT_FOLDS` folds
    (``result["folds_note"]`` says so).

    The scoring models' accuracy on the images they scored is recorded (``result["scorer"]``); below
    :data:`WEAK_ACCURACY`, or :data:`WEAK_GAP` below the checkpoint's validation accuracy, a warning
    is recorded and the cleaned copy is not written unless ``force`` (``result["clean_refused"]``
    says why). ``remove`` (:data:`ttakit.label_issues.REMOVE_CHOICES`) picks what it drops:
    by default only the images flagged likely mislabelled.

    The flags use the TTA probabilities of ``policy`` (default: the checkpoint's training
    augmentations, ``train-aug``, or plain inference if it trained without any). A policy holding
    fitted parameters must have been fitted on this checkpoint
    (:func:`ttakit.policy.check_policy_model`; ``allow_other_model`` allows another). Auditing the
    checkpoint's own validation split with a policy fitted on validation rows (``ttakit search``)
    audits only the rows it never saw (``meta["validation_rows"]``): a row is never flagged by
    something fitted on it, and those rows can still be audited soundly.

    ``device`` (``--device``) is where the model, or the fold models, train and run (default the
    CPU); ``amp`` (``--amp``) runs them under autocast.
    """
    threshold = _check_threshold(mislabel_threshold)
    amb = _check_range(ambiguous_range)
    if folds is not None:
        folds = check_folds(folds)
    rows_to_remove([], remove)  # an unknown --remove is refused before any work
    plan = _plan(model, data, data_dir, split, folds, policy, write_clean_to is not None, allow_other_model)
    announced = False
    if plan.folds_note:  # said before the fold models train (the CLI says it after when progress is off)
        from ..progress import _silenced, note

        announced = progress and not _silenced()
        note(plan.folds_note, enabled=progress)
    _select_rows(plan, data, write_clean_to is not None)
    dataset = _audited_dataset(plan, limit)
    probs, view_votes, main, how, assignment = _score(plan, dataset, plan.folds, epochs, seed, max_batch, progress,
                                                      device, amp)
    scorer = _scorer_check(plan, probs[main], dataset.labels, assignment)

    def flags(p: torch.Tensor) -> list[Any]:
        return flag_issues(p, dataset.labels, methods=methods, mislabel_threshold=threshold, ambiguous_range=amb,
                           mislabel_by=mislabel_by)

    issues = flags(probs[main])
    summary = _summarize(issues, len(dataset))
    # The same flags from plain probabilities, to show what TTA changed.
    summary_plain = _summarize(flags(probs["none"]), len(dataset)) if main != "none" else summary
    settings = {"methods": list(methods), "mislabel_threshold": threshold, "mislabel_by": mislabel_by,
                "ambiguous_range": list(amb)}
    result = _write_audit(plan, dataset, probs, view_votes, main, how, issues, summary, summary_plain, settings,
                          Path(out_dir), write_clean_to, remove, scorer, force)
    result["folds_note"] = plan.folds_note or None
    result["folds_note_shown"] = announced
    return result
