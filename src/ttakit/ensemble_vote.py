"""Ensemble votes over member probabilities ``(M, N, C)``: soft and hard votes, tie-breaks, disagreement."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Literal

import torch

from .errors import InvalidInputError, unknown_name

Vote = Literal["soft", "hard"]
TieBreak = Literal["mean", "random"]
VOTES = ("soft", "hard")
TIE_BREAKS = ("mean", "random")
def _check_choice(kind: str, value: object, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise unknown_name(kind, value, choices)
    return value


def _check_stack(member_probs: object) -> torch.Tensor:
    if not isinstance(member_probs, torch.Tensor) or member_probs.ndim != 3 or not member_probs.is_floating_point():
        shape = tuple(member_probs.shape) if isinstance(member_probs, torch.Tensor) else type(member_probs).__name__
        raise InvalidInputError(
            f"Expected argument `member_probs` to be a float tensor of shape (M, N, C) "
            f"(members, images, classes), but got {shape}"
        )
    if 0 in member_probs.shape:
        raise InvalidInputError(f"Expected argument `member_probs` to be non-empty, but got shape {tuple(member_probs.shape)}")
    if not torch.isfinite(member_probs).all():
        raise InvalidInputError("Expected argument `member_probs` to be finite, but it contains NaN or inf")
    return member_probs


def _check_weights(weights: object, n_members: int) -> torch.Tensor | None:
    if weights is None:
        return None
    try:
        values = [float(w) for w in weights]  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise InvalidInputError(
            f"Expected argument `weights` to be a list of {n_members} non-negative numbers, one per member, "
            f"but got {weights!r}"
        ) from None
    if len(values) != n_members:
        raise InvalidInputError(
            f"Expected argument `weights` to hold one number per member ({n_members}), but got {len(values)}: {values}"
        )
    if any(not (w >= 0) or w == float("inf") for w in values) or sum(values) <= 0:
        raise InvalidInputError(
            f"Expected argument `weights` to be finite, non-negative and not all zero, but got {values}"
        )
    return torch.tensor(values, dtype=torch.float64)


def check_same_classes(classes: Sequence[Sequence[str] | None], names: Sequence[str]) -> list[str] | None:
    """The members' shared class list; :class:`InvalidInputError` naming the first member that differs.

    Members whose classes are unknown (None) are not compared; their output width is checked
    when they run.
    """
    reference, ref_name = None, ""
    for cls, name in zip(classes, names, strict=True):
        if cls is None:
            continue
        if reference is None:
            reference, ref_name = list(cls), name
        elif list(cls) != reference:
            raise InvalidInputError(
                f"ensemble members must predict the same classes in the same order: {ref_name} has "
                f"{_short(reference)} but {name} has {_short(list(cls))}"
            )
    return reference


def _short(classes: list[str]) -> str:
    shown = ", ".join(classes[:6])
    return f"{len(classes)} classes [{shown}{', ...' if len(classes) > 6 else ''}]"


# --------------------------------------------------------------------------- combining


def soft_vote(member_probs: torch.Tensor, weights: Sequence[float] | None = None) -> torch.Tensor:
    """The (weighted) mean of the members' probabilities.

    Args:
        member_probs: ``(M, N, C)`` each member's class probabilities.
        weights: ``M`` non-negative weights (normalised to sum to 1); default equal.

    Returns:
        ``(N, C)`` probabilities.

    Example:
        >>> soft_vote(torch.tensor([[[0.9, 0.1]], [[0.3, 0.7]]]), weights=[1, 3])
        tensor([[0.4500, 0.5500]])
    """
    stack = _check_stack(member_probs)
    w = _check_weights(weights, stack.shape[0])
    if w is None:
        return stack.mean(dim=0)
    w = (w / w.sum()).to(stack.dtype)
    return torch.einsum("m,mnc->nc", w, stack)


def hard_vote(
    member_probs: torch.Tensor,
    weights: Sequence[float] | None = None,
    tie_break: TieBreak = "mean",
    seed: int = 0,
    row_seeds: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Majority vote over the members' predicted classes.

    Args:
        member_probs: ``(M, N, C)`` each member's class probabilities.
        weights: ``M`` non-negative vote weights; default one vote each.
        tie_break: ``"mean"``: among the classes with the most votes, the one with the higher
            (weighted) mean probability, and only if that ties too a seeded random pick;
            ``"random"``: a seeded random pick among the classes with the most votes.
        seed: seeds the random pick (same seed and input, same result).
        row_seeds: ``(N,)`` integers: each tied row draws its random pick from its own stream,
            seeded by ``(seed, row_seeds[i])``, so an image's pick does not depend on the batch it
            came in (``ttakit predict`` passes a hash of each file's path). Default: one stream
            for the whole batch.

    Returns:
        ``(labels, shares)``: ``labels`` ``(N,)`` the winning classes; ``shares`` ``(N, C)`` the
        (weighted) fraction of votes each class got.

    Example:
        >>> probs = torch.tensor([[[0.6, 0.4]], [[0.2, 0.8]]])  # one vote each: a tie
        >>> hard_vote(probs)[0]  # class 1 has the higher mean probability
        tensor([1])
    """
    stack = _check_stack(member_probs)
    tie_break = _check_choice("tie-break", tie_break, TIE_BREAKS)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise InvalidInputError(f"Expected argument `seed` to be an integer, but got {seed!r}")
    m, n, c = stack.shape
    w = _check_weights(weights, m)
    w = torch.ones(m, dtype=torch.float64) if w is None else w
    picks = stack.argmax(dim=2)  # (M, N)
    votes = torch.zeros(n, c, dtype=torch.float64)
    for k in range(m):
        votes.scatter_add_(1, picks[k][:, None], w[k].expand(n, 1))
    shares = votes / w.sum()
    tol = 1e-9 * float(w.sum())
    tied = votes >= votes.amax(dim=1, keepdim=True) - tol  # (N, C) classes with the most votes
    if tie_break == "mean":
        mean = torch.einsum("m,mnc->nc", w / w.sum(), stack.double())
        masked = torch.where(tied, mean, torch.full_like(mean, -torch.inf))
        tied &= masked >= masked.amax(dim=1, keepdim=True) - 1e-12
    if row_seeds is None:
        noise = torch.rand(n, c, generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float64)
    else:
        if not isinstance(row_seeds, torch.Tensor) or row_seeds.shape != (n,):
            raise InvalidInputError(f"Expected argument `row_seeds` to be a tensor of shape ({n},), but got {row_seeds!r}")
        noise = torch.zeros(n, c, dtype=torch.float64)
        for i in torch.nonzero(tied.sum(dim=1) > 1).flatten().tolist():  # only real ties need a draw
            stream = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(row_seeds[i])) % (2**63))
            noise[i] = torch.rand(c, generator=stream, dtype=torch.float64)
    labels = torch.where(tied, noise, torch.full_like(noise, -1.0)).argmax(dim=1)
    return labels, shares


# --------------------------------------------------------------------------- running members


def member_disagreement(stack: torch.Tensor, labels: torch.Tensor, weights: Sequence[float] | None = None) -> torch.Tensor:
    """``(N,)`` the (weighted) share of members whose top class differs from ``labels`` ``(N,)``.

    Args:
        stack: ``(M, N, C)`` the members' probabilities.

    Example:
        >>> member_disagreement(torch.tensor([[[0.9, 0.1]], [[0.2, 0.8]], [[0.6, 0.4]]]), torch.tensor([0]))
        tensor([0.3333], dtype=torch.float64)
    """
    stack = _check_stack(stack)
    w = _check_weights(weights, stack.shape[0])
    w = torch.ones(stack.shape[0], dtype=torch.float64) if w is None else w
    differs = (stack.argmax(dim=2) != labels[None, :]).to(torch.float64)  # (M, N)
    return (w[:, None] * differs).sum(dim=0) / w.sum()
