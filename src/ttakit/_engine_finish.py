"""Finishing a run: the temperature and matrix scaling of the merged output, the per-image uncertainty
of the views around the merge, and :class:`TTAOutput`, what :meth:`TTAEngine.run` returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import InvalidInputError
from .merge import (
    PROB_FLOOR,
    _at_least_float32,
    calibrate,
)
from .uncertainty import view_uncertainty


@dataclass
class TTAOutput:
    """What :meth:`TTAEngine.run` returns.

    Attributes:
        merged: ``(B, ...)`` the merged output, temperature applied (see :class:`TTAEngine`).
        views: ``(K, B, ...)`` each view's de-augmented raw output (before ``activation``), or None
            unless ``return_views=True``. Under the gate, rows that were not gated hold the
            identity view's output in every view (the other views did not run on them).
        view_names: the K views' names, in policy order.
        passes_per_image: forward passes spent per image (images through the model / B): K
            without a gate, ``1 + (K - 1) * gated_fraction`` with one.
        gated: ``(B,)`` bool, the rows that got every view, or None when no gate is active.
        uncertainty: None unless ``return_uncertainty=True``; then per-image tensors
            (:func:`ttakit.uncertainty.view_uncertainty`): ``std`` ``(B, C)``,
            ``predictive_entropy``, ``expected_entropy``, ``mutual_information`` and
            ``disagreement`` ``(B,)``. The entropies are of the merge before temperature and
            matrix scaling (renormalised over classes: ``sum``, ``max``, ``min``, ``tsharpen`` and
            ``vote`` do not sum to 1); ``disagreement`` counts the views whose top class differs
            from the class the row reports (``merged``'s top class, after the scaling). On rows
            the gate kept plain only the identity ran: ``std``, ``mutual_information`` and
            ``disagreement`` are 0 there.
    """

    merged: torch.Tensor
    views: torch.Tensor | None
    view_names: list[str]
    passes_per_image: float = 0.0
    gated: torch.Tensor | None = None
    uncertainty: dict[str, torch.Tensor] | None = None

    @property
    def passes(self) -> torch.Tensor:
        """``(B,)`` forward passes each image got: K, or 1 / K under the gate."""
        k = len(self.view_names)
        if self.gated is None:
            return torch.full((self.merged.shape[0],), k, dtype=torch.long)
        return 1 + (k - 1) * self.gated.long().cpu()


def _as_normal_tensor(x: torch.Tensor | None) -> torch.Tensor | None:
    # Tensors made under inference_mode reject in-place updates outside it; ttach's outputs are
    # ordinary tensors that callers may modify (``pred[pred < 0.5] = 0``), so hand back a copy.
    return x.clone() if x is not None and x.is_inference() else x


class Scaling:
    """The temperature and matrix scaling of a merged output in ``space`` (``"probs"``, ``"raw"``
    or ``"sigmoid"``, see :func:`ttakit.merge.calibrate`), applied on the gated rows only under
    the gate. The matrix is made a tensor once per device and dtype."""

    def __init__(self, temperature: float | None, matrix_scaling: dict | None, class_dim: int, space: str):
        self.temperature, self.matrix_scaling = temperature, matrix_scaling
        self.class_dim, self.space = class_dim, space
        self._matrix_tensors: dict[tuple, dict[str, torch.Tensor]] = {}

    def __call__(self, merged: torch.Tensor, gated: torch.Tensor | None) -> torch.Tensor:
        if self.temperature is None and self.matrix_scaling is None:
            return merged
        if gated is None:
            return self.temper(merged)
        rows = torch.nonzero(gated).flatten()
        if rows.numel() == 0:
            return merged
        if rows.numel() == gated.numel():
            return self.temper(merged)
        merged = merged.clone()
        merged[rows] = self.temper(merged[rows]).to(merged.dtype)
        return merged

    def temper(self, x: torch.Tensor) -> torch.Tensor:
        return calibrate(x, self.temperature, self._matrix_on(x), self.class_dim, space=self.space)

    def _matrix_on(self, x: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """The matrix scaling as tensors on ``x``'s device in its merge dtype, made once per key."""
        if self.matrix_scaling is None:
            return None
        key = (x.device, torch.float64 if x.dtype == torch.float64 else torch.float32)
        if key not in self._matrix_tensors:
            self._matrix_tensors[key] = {
                name: torch.tensor(self.matrix_scaling[name], dtype=key[1], device=x.device)
                for name in ("weight", "bias")
            }
        return self._matrix_tensors[key]


def merged_uncertainty(
    views: torch.Tensor,
    merged: torch.Tensor,
    final: torch.Tensor,
    gated: torch.Tensor | None,
    *,
    class_dim: int,
    views_are_probs: bool,
    space: str,
    view_weights: list[float] | None,
) -> dict[str, torch.Tensor]:
    """Per-image uncertainty of the ``(K, B, C)`` views around the ``(B, C)`` merge (before
    temperature and matrix), with disagreement measured against the class the row reports
    (``final``'s top class). ``views_are_probs``: the model returns probabilities; ``space``: the
    merge's. Rows the gate kept plain get zero spread (only the identity ran on them)."""
    if views.ndim != 3 or class_dim % 2 != 1:
        raise InvalidInputError(
            f"return_uncertainty needs (B, C) class scores with class_dim=1, got outputs of shape "
            f"{tuple(views.shape[1:])} and class_dim={class_dim}"
        )
    view_probs = views if views_are_probs else torch.softmax(views, dim=2)
    merged_probs = merged if space == "probs" else torch.softmax(_at_least_float32(merged), dim=1)
    # sum, max, min, tsharpen and vote do not sum to 1 over the classes: entropies need a distribution.
    merged_probs = _at_least_float32(merged_probs)
    merged_probs = merged_probs / merged_probs.sum(dim=1, keepdim=True).clamp_min(PROB_FLOOR)
    out = view_uncertainty(view_probs, merged_probs, view_weights, labels=final.argmax(dim=1))
    if gated is not None:
        plain = ~gated
        for key in ("std", "mutual_information", "disagreement"):
            out[key][plain] = 0.0
        out["expected_entropy"][plain] = out["predictive_entropy"][plain]
    return out
