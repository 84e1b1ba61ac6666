"""Per-image uncertainty from the views of test-time augmentation (pure functions).

Given each view's class probabilities and the merged prediction, :func:`view_uncertainty`
returns, per image:

========================  =======  ==================================================================
key                       shape    meaning
========================  =======  ==================================================================
``std``                   (B, C)   standard deviation over the K views of each class probability
                                   (population std: divides by K, so one view gives 0)
``predictive_entropy``    (B,)     entropy (nats) of the merged probabilities
``expected_entropy``      (B,)     mean over views of each view's entropy (weighted by ``weights``)
``mutual_information``    (B,)     ``predictive_entropy - expected_entropy``; >= 0 when the merge is
                                   the (weighted) mean of the views' probabilities (Jensen); other
                                   merges (gmean, vote) can make it slightly negative
``disagreement``          (B,)     fraction of the K views whose top class differs from the class
                                   the row reports (``labels``; default the merged top class),
                                   unweighted
========================  =======  ==================================================================

This is the decomposition used for MC-dropout and ensembles (BALD: Houlsby et al. 2011), with the
views of TTA in place of the samples. :class:`ttakit.TTAEngine` computes it with
``run(images, return_uncertainty=True)``.

Example:
    >>> views = torch.tensor([[[0.9, 0.1]], [[0.5, 0.5]]])  # K=2 views, B=1 image, C=2 classes
    >>> u = view_uncertainty(views, views.mean(0))
    >>> round(float(u["std"][0, 0]), 3), float(u["disagreement"][0])
    (0.2, 0.0)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import InvalidInputError

__all__ = ["UNCERTAINTY_KEYS", "entropy", "view_uncertainty"]

UNCERTAINTY_KEYS = ("std", "predictive_entropy", "expected_entropy", "mutual_information", "disagreement")


def entropy(probs: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy in nats over ``dim``; ``0 * log 0`` counts as 0. ``(..., C) -> (...)``."""
    p = probs if probs.dtype == torch.float64 else probs.float()
    return -torch.special.xlogy(p, p).sum(dim=dim)


def view_uncertainty(
    view_probs: torch.Tensor,
    merged: torch.Tensor,
    weights: Sequence[float] | torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Uncertainty of each image from the spread of its views.

    Args:
        view_probs: ``(K, B, C)`` each view's class probabilities.
        merged: ``(B, C)`` the merged probabilities (the prediction whose top class counts as the
            answer; for gated-out images the plain prediction).
        weights: optional ``(K,)`` non-negative view weights for ``expected_entropy`` (the merge's).
        labels: optional ``(B,)`` integer class each row reports, for ``disagreement``: the top
            class of the final output when it is recalibrated after the merge (a matrix scaling
            can move the top class). Default ``merged.argmax(1)``.

    Returns:
        dict with ``std`` ``(B, C)`` and ``predictive_entropy``, ``expected_entropy``,
        ``mutual_information``, ``disagreement`` ``(B,)``, in float32 (float64 if the input is).
    """
    if not isinstance(view_probs, torch.Tensor) or view_probs.ndim != 3 or view_probs.shape[0] == 0:
        got = tuple(view_probs.shape) if isinstance(view_probs, torch.Tensor) else type(view_probs).__name__
        raise InvalidInputError(f"Expected argument `view_probs` to be a (K, B, C) tensor with K >= 1, but got {got}")
    if not isinstance(merged, torch.Tensor) or tuple(merged.shape) != tuple(view_probs.shape[1:]):
        got = tuple(merged.shape) if isinstance(merged, torch.Tensor) else type(merged).__name__
        raise InvalidInputError(
            f"Expected argument `merged` to be a {tuple(view_probs.shape[1:])} tensor (B, C), but got {got}"
        )
    dtype = torch.float64 if view_probs.dtype == torch.float64 else torch.float32
    p = view_probs.to(dtype)
    k = p.shape[0]
    std = p.std(dim=0, correction=0)
    per_view = entropy(p, dim=2)  # (K, B)
    if weights is None:
        expected = per_view.mean(dim=0)
    else:
        w = torch.as_tensor(weights, dtype=dtype, device=p.device).flatten()
        if w.numel() != k or bool((w < 0).any()) or float(w.sum()) <= 0:
            raise InvalidInputError(
                f"Expected argument `weights` to hold {k} non-negative numbers, not all zero, but got {w.tolist()}"
            )
        expected = (per_view * (w / w.sum())[:, None]).sum(dim=0)
    if labels is None:
        labels = merged.argmax(dim=1)
    elif (
        not isinstance(labels, torch.Tensor)
        or labels.shape != merged.shape[:1]
        or labels.is_floating_point()
        or labels.is_complex()
    ):
        got = f"{tuple(labels.shape)} {labels.dtype}" if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise InvalidInputError(
            f"Expected argument `labels` to be a ({merged.shape[0]},) integer tensor (one class per row), but got {got}"
        )
    predictive = entropy(merged.to(dtype), dim=1)
    disagree = (p.argmax(dim=2) != labels.to(p.device)[None]).to(dtype).mean(dim=0)
    return {
        "std": std,
        "predictive_entropy": predictive,
        "expected_entropy": expected,
        "mutual_information": predictive - expected,
        "disagreement": disagree,
    }
