"""Provenance: what a policy was fitted on (its views, weights or temperature, on which validation rows) and
whether it may be used with a given model."""

from __future__ import annotations

from typing import Any, Protocol

from .errors import InvalidInputError

# Policy meta kinds that say the views themselves were chosen on labelled data (by ttakit search).
SEARCH_KINDS = frozenset({"greedy-search", "search-control", "refit"})


# meta["validation_rows"]: which rows of a checkpoint's validation split a search fitted on.
ROWS_KEY = "validation_rows"


class _PolicyLike(Protocol):
    """What these checks read of a :class:`ttakit.policy.Policy` (not imported: policy imports this module)."""

    name: str
    weights: list | None
    temperature: float | None
    gate_threshold: float | None
    matrix_scaling: dict | None
    meta: dict


def fitted_parameters(policy: _PolicyLike) -> list[str]:
    """What ``policy`` holds that was fitted to one model's outputs: any of ``"weights"``,
    ``"temperature"``, ``"gate"``, ``"matrix scaling"`` (empty for a views-only policy).

    Example:
        >>> fitted_parameters(Policy([View.identity()], temperature=1.3))
        ['temperature']
    """
    found = []
    if policy.weights is not None:
        found.append("weights")
    if policy.temperature is not None:
        found.append("temperature")
    if policy.gate_threshold is not None:
        found.append("gate")
    if policy.matrix_scaling is not None:
        found.append("matrix scaling")
    return found


def fitted_on_labelled_data(policy: _PolicyLike) -> bool:
    """Whether anything in ``policy`` was chosen on labelled rows: fitted parameters
    (:func:`fitted_parameters`), or views selected by a search (its ``meta`` says so). Named
    policies such as ``hflip`` or ``none`` were not."""
    meta = policy.meta or {}
    return bool(fitted_parameters(policy)) or meta.get("kind") in SEARCH_KINDS or ROWS_KEY in meta


def unused_validation_rows(policy: _PolicyLike, n_rows: int, sha256: str | None = None) -> list[int] | None:
    """The rows of the validation split (positions ``0..n_rows-1``) that fitting ``policy`` never
    used, or None when all of them may be used (nothing in it was fitted on validation rows).

    Raises:
        InvalidInputError: the policy was fitted on labelled rows but records none
            (``meta["validation_rows"]``), records all of them, or records another validation
            split (another size or content hash ``sha256``), with the way to get such rows.
    """
    if not fitted_on_labelled_data(policy):
        return None
    record = (policy.meta or {}).get(ROWS_KEY)
    how = (
        "search again with ttakit search (it keeps --conformal-holdout 0.2 of the validation rows for conformal "
        "calibration by default), or calibrate a policy with nothing fitted (e.g. none, hflip)"
    )
    if not isinstance(record, dict):
        raise InvalidInputError(
            f"policy {policy.name!r} was fitted on labelled images ({', '.join(fitted_parameters(policy)) or 'views searched'}) "
            f"but does not record which, so no validation row is proven unseen for conformal calibration; {how}"
        )
    if record.get("split") not in (None, "val"):  # searched on another split: every validation row is unseen
        return None
    rows = record.get("held_out")
    if (
        not isinstance(rows, list)
        or record.get("n") != n_rows
        or (sha256 is not None and record.get("sha256") not in (None, sha256))
        or not all(isinstance(r, int) and not isinstance(r, bool) and 0 <= r < n_rows for r in rows)
    ):
        raise InvalidInputError(
            f"policy {policy.name!r} records validation rows of another validation split ({record.get('n')!r} rows, "
            f"this one has {n_rows}), so no row is proven unseen for conformal calibration; {how}"
        )
    if not rows:
        raise InvalidInputError(
            f"policy {policy.name!r} was fitted on all {n_rows} validation rows (searched with --conformal-holdout 0), "
            f"so none is left for conformal calibration; {how}"
        )
    return sorted(set(rows))


def _model_of(model: Any) -> tuple[str | None, str]:
    """``(weights sha256 or None, a name)`` of a checkpoint meta, a predictor (its checkpoint's hash,
    else its own :meth:`~ttakit.predictors.Predictor.weights_digest`), or None."""
    meta = getattr(model, "meta", None) or model
    digest = getattr(meta, "weights_sha256", None)
    if not isinstance(digest, str) and callable(getattr(model, "weights_digest", None)):
        digest = model.weights_digest()  # a model that is not a checkpoint: what ttakit search records for it
    name = getattr(meta, "source", None) or getattr(model, "source", None) or "this model"
    return (digest if isinstance(digest, str) else None), str(name)


def check_policy_model(policy: _PolicyLike, model: Any, *, allow_other_model: bool = False) -> str | None:
    """Refuse a policy whose fitted parameters (weights, temperature, gate, matrix scaling) were
    fitted on another model than ``model`` (a :class:`~ttakit.models.CheckpointMeta`, or a
    predictor with ``.meta``; None or a model without a weights hash counts as unknown).

    A policy records its model as ``meta["weights_sha256"]`` (and ``meta["checkpoint"]``), as
    ``ttakit search`` writes it. Views-only policies run on any model. A fitted policy that records
    no model (written before ttakit recorded it) is allowed with a warning: refusing it would break
    every policy searched before, and most were searched on the model they are used with.

    Returns:
        None, or the warning text (also issued as a :class:`UserWarning`) for a fitted policy
        that records no model, or one used on another model with ``allow_other_model``.

    Raises:
        InvalidInputError: naming both models and the flag that allows it.
    """
    import warnings

    fitted = fitted_parameters(policy)
    if not fitted:
        return None
    meta = policy.meta or {}
    recorded = meta.get("weights_sha256")
    digest, name = _model_of(model)
    if not isinstance(recorded, str):
        message = (
            f"policy {policy.name!r} holds fitted {', '.join(fitted)} but does not record the model it was fitted on "
            f"(written before ttakit recorded it); using it with {name} as given: search again to record it"
        )
        warnings.warn(message, UserWarning, stacklevel=2)
        return message
    if digest == recorded:
        return None
    where = meta.get("checkpoint") or "another checkpoint"
    found = f"weights sha256 {digest[:12]}..." if digest else "no recorded weights hash"
    message = (
        f"policy {policy.name!r} holds {', '.join(fitted)} fitted on {where} (weights sha256 {recorded[:12]}...), "
        f"but the model is {name} ({found})"
    )
    if not allow_other_model:
        raise InvalidInputError(
            f"{message}; search a policy for this model (ttakit search), use a views-only policy, "
            "or pass --allow-other-model (allow_other_model=True) to use it anyway"
        )
    warnings.warn(message + " (allowed by --allow-other-model)", UserWarning, stacklevel=2)
    return message
