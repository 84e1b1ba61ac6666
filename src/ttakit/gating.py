"""Gated TTA: predict plainly first, run a policy's extra views only where the model is unsure.

An image whose plain (identity-view) top-class softmax probability is at least ``threshold`` keeps
its plain prediction; the others get the full policy, merged as the policy says. The identity
view's output is reused, so a policy of K views costs ``1 + (K - 1) * fraction_gated`` forward
passes per image (``1 + K * fraction_gated`` would be the cost without reuse).

* :func:`gated_predict` runs a model. Tuning the threshold on validation outputs
  (:func:`tune_gate_threshold`) and computing gated predictions from cached per-view outputs
  (:func:`evaluate_gated_on_cache`) live in :mod:`ttakit.search.gate`, re-exported here.
* :func:`policy_predict` honours everything a searched policy stores: views, weights, gate
  threshold and temperature.

Both are one call of :class:`ttakit.TTAEngine`, which runs the gate and the temperature itself.
:func:`gated_predict` returns merged probabilities *before* temperature scaling (apply
:func:`ttakit.merge.apply_temperature` for calibrated ones); :func:`policy_predict` applies it.
Temperature does not change the arg-max, so accuracies and the gate are unaffected by it.

Example:
    >>> plain = torch.tensor([[0.9, 0.1], [0.55, 0.45]])
    >>> full = torch.tensor([[0.8, 0.2], [0.3, 0.7]])
    >>> tune_gate_threshold(plain, full, torch.tensor([0, 1]), n_views=4).fraction_gated
    0.5
"""

from __future__ import annotations

from typing import Any

import torch

from .engine import TTAEngine, TTAOutput, eval_mode
from .policy import Policy

# Gate tuning lives in the search package (ttakit.search.gate), which never imports this module;
# its names are re-exported here for existing callers.
from .search.gate import (  # noqa: F401  (the private checks serve gated_predict below)
    GATE_ALL,
    GatedOutput,
    GateTuning,
    _check_policy,
    _check_threshold,
    _identity_index,
    _resolve_threshold,
    evaluate_gated_on_cache,
    forward_passes,
    tune_gate_threshold,
)

__all__ = [
    "GateTuning",
    "GatedOutput",
    "tune_gate_threshold",
    "gated_predict",
    "evaluate_gated_on_cache",
    "policy_predict",
    "forward_passes",
    "GATE_ALL",
]


_EvalMode = eval_mode  # the old private name


def _gated_output(out: TTAOutput) -> GatedOutput:
    """A :class:`GatedOutput` from one engine call (every row counts as gated without a gate)."""
    probs = out.merged.float()
    gated = out.gated.cpu() if out.gated is not None else torch.ones(probs.shape[0], dtype=torch.bool)
    return GatedOutput(probs, gated, int(gated.sum()), float(out.passes_per_image))


def gated_predict(
    model: Any,
    images: torch.Tensor,
    policy: Policy,
    threshold: float | None = None,
    max_batch: int = 256,
    activation: str | None = "softmax",
) -> GatedOutput:
    """Plain prediction for confident images, the full ``policy`` for the rest: one
    :class:`~ttakit.engine.TTAEngine` call with ``gate_threshold=threshold`` and no temperature.

    The identity view runs on every image; the policy's other views run only on images whose
    plain top-class softmax probability is ``< threshold``, and are merged with the reused
    identity output exactly as the policy merges (mode, weights). The model is put in eval mode
    for the call.

    Args:
        model: an ``nn.Module`` or callable returning ``(B, C)`` logits.
        images: ``(N, C, H, W)`` float images.
        policy: a policy holding the identity view.
        threshold: the gate; defaults to ``policy.gate_threshold``.
        max_batch: most images per forward pass.
        activation: applied to each view before merging (``"softmax"``: merge probabilities).

    Returns:
        :class:`GatedOutput` with ``probs`` ``(N, C)``, before temperature scaling.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
        >>> from ttakit.aliases import get_policy
        >>> out = gated_predict(model, torch.rand(5, 1, 4, 4), get_policy("hflip"), threshold=1.0)
        >>> out.n_gated, out.forward_passes_per_image
        (5, 2.0)
    """
    policy = _check_policy(policy)
    threshold = _resolve_threshold(policy, threshold)
    _identity_index(policy)
    engine = TTAEngine(
        model, policy, activation=activation, temperature=None, matrix_scaling=None, gate_threshold=threshold,
        max_batch=max_batch,
    )
    with eval_mode(model):
        return _gated_output(engine.run(images))


def policy_predict(
    model: Any,
    images: torch.Tensor,
    policy: Policy,
    *,
    use_gate: bool = True,
    calibrate: bool = True,
    max_batch: int = 256,
) -> GatedOutput:
    """Predict with everything a policy stores: views, merge mode, weights, gate, temperature and
    matrix scaling.

    One :class:`~ttakit.engine.TTAEngine` call (the model in eval mode): with ``use_gate`` and a
    stored ``gate_threshold`` the gate applies (the identity view first, the other views only
    where the plain prediction is unsure); otherwise every image gets every view. With
    ``calibrate`` the merged probabilities are temperature-scaled by ``policy.temperature``, then
    matrix-scaled by ``policy.matrix_scaling`` (under the gate only the gated rows: the others
    are the plain softmax neither was fitted for).

    Returns:
        :class:`GatedOutput`; ``probs`` ``(N, C)`` calibrated when ``calibrate``.
    """
    policy = _check_policy(policy)
    engine = TTAEngine(
        model,
        policy,
        activation="softmax",
        temperature="policy" if calibrate else None,
        matrix_scaling="policy" if calibrate else None,
        gate_threshold="policy" if use_gate else None,
        max_batch=max_batch,
    )
    with eval_mode(model):
        return _gated_output(engine.run(images))
