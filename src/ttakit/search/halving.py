"""Successive halving: score candidates on a growing subset of the validation images and cache
in full only the ones still in the running.

Caching every candidate over the whole validation split dominates search time. Instead, rung
``r`` runs the surviving candidates on the next images of a seeded permutation (the subsets
grow by ``eta``: ``n0, n0 * eta, ..., N``), then scores them on every image seen so far:

* the *leaders* are the views a greedy search on the subset selects; they always survive;
* every other candidate's score is its per-image NLL gain when added to the leaders' merge
  (temperature-scaled at the leaders' temperature); a candidate whose upper confidence bound
  on that gain (mean + ``z`` standard errors) is below the mean gain of the ``keep``-th best
  is clearly worse and is dropped;
* at most ``ceil(alive / eta)`` candidates (and never fewer than ``keep``) go on.

The survivors of the last rung have been run on every image: that is the cache the final
greedy search sees. Forward passes are counted per view and image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InvalidInputError
from ..policy import View
from ._util import SCORE_CHUNK, SingleThread, check_count, check_non_negative, cm
from .cache import ViewCache, run_views
from .calibration import per_image_nll, shifted_log

__all__ = ["HalvingResult", "successive_halving", "rung_sizes"]


@dataclass
class HalvingResult:
    """What :func:`successive_halving` returns.

    Attributes:
        cache: the survivors' logits over every image (identity first), in image order.
        rungs: one dict per rung: ``images``, ``candidates``, ``leaders``, ``dropped_by_bound``,
            ``dropped_by_rank``, ``survivors``, ``passes`` (spent in this rung).
        passes: forward passes spent (views x images run).
        full_passes: what caching every candidate on every image costs.
        pool_size: the number of candidates.
    """

    cache: ViewCache
    rungs: list[dict[str, Any]] = field(default_factory=list)
    passes: int = 0
    full_passes: int = 0
    pool_size: int = 0

    def cost(self) -> dict[str, Any]:
        """Forward passes spent and saved, for reports."""
        return {
            "method": "successive halving",
            "pool_size": self.pool_size,
            "survivors": self.cache.n_views,
            "forward_passes": self.passes,
            "full_caching_passes": self.full_passes,
            "saved_passes": self.full_passes - self.passes,
            "fraction_of_full": self.passes / max(self.full_passes, 1),
            "rungs": self.rungs,
        }


def rung_sizes(n_images: int, first: int, eta: float) -> list[int]:
    """Image counts per rung: ``first``, ``first * eta``, ... capped at ``n_images``, last = ``n_images``.

    Example:
        >>> rung_sizes(10_000, 625, 2)
        [625, 1250, 2500, 5000, 10000]
    """
    sizes = []
    size = float(min(first, n_images))
    while size < n_images:
        sizes.append(int(size))
        size *= eta
    sizes.append(int(n_images))
    return sizes


def _gains(probs_cm: torch.Tensor, leaders: list[int], y: torch.Tensor, beta: float) -> torch.Tensor:
    """``(V, n)`` per-image NLL reduction of adding each view to the leaders' mean merge."""
    running = probs_cm[leaders].sum(0)  # (C, n)
    k = len(leaders)
    d0, dy0 = shifted_log((running / k)[None], y)
    base = per_image_nll(d0, dy0, beta)[0]  # (n,)
    out = []
    for start in range(0, probs_cm.shape[0], SCORE_CHUNK):
        merged = (probs_cm[start : start + SCORE_CHUNK] + running) / (k + 1)
        d, dy = shifted_log(merged, y)
        out.append(base - per_image_nll(d, dy, beta))
    return torch.cat(out)


def _rung_survivors(sub: ViewCache, *, budget: int, keep: int, z: float, eta: float) -> tuple[list[int], dict]:
    """One rung's decision on the candidates cached in ``sub``: the greedy search's leaders, plus
    the best of the others whose upper confidence bound on the gain reaches the ``keep``-th best
    mean, at most ``1 / eta`` of the field. Returns ``(rows kept, the identity's row 0 always
    among them; what the rung's report says)``."""
    from .greedy import greedy_search  # greedy imports nothing from here; deferred for clarity

    size, n_alive = sub.n_images, sub.n_views
    result = greedy_search(sub, budget, learn_weights=False, gate=False, class_weights=False)
    leaders = [sub.index(name) for name in result.policy.view_names]
    beta = 1.0 / float(result.policy.temperature or 1.0)
    with SingleThread():
        gains = _gains(cm(sub.probs), leaders, sub.labels, beta)  # (A, size)
    mean = gains.double().mean(1)
    se = gains.double().std(1) / math.sqrt(size)
    others = [k for k in range(n_alive) if k not in leaders]
    slots = max(keep - len(leaders), 0)
    ranked = sorted(others, key=lambda k: -float(mean[k]))
    tau = float(mean[ranked[slots - 1]]) if 0 < slots <= len(ranked) else -math.inf
    hopeful = [k for k in ranked if float(mean[k] + z * se[k]) >= tau]
    cap = max(slots, math.ceil(n_alive / eta) - len(leaders))
    kept = hopeful[:cap]
    decided = {
        "leaders": [sub.views[k].name for k in leaders],
        "dropped_by_bound": len(ranked) - len(hopeful),
        "dropped_by_rank": len(hopeful) - len(kept),
        "survivors": len(leaders) + len(kept),
    }
    keep_rows = sorted(set(leaders) | set(kept))
    if 0 not in keep_rows:
        keep_rows = [0, *keep_rows]  # the identity always stays
    return keep_rows, decided


def successive_halving(
    model: Any,
    images: torch.Tensor,
    labels: torch.Tensor,
    views: Sequence[View],
    sources: Sequence[str],
    *,
    budget: int = 8,
    keep: int | None = None,
    first: int | None = None,
    eta: float = 2.0,
    z: float = 2.0,
    max_batch: int = 256,
    progress: bool = True,
    seed: int = 0,
    replay: ViewCache | None = None,
) -> HalvingResult:
    """Run the pool over a growing subset of ``images`` and keep only candidates still in the
    running (see the module docstring).

    Args:
        model: a classifier returning ``(B, C)`` logits.
        images: ``(N, C, H, W)`` validation images; labels ``(N,)``.
        views, sources: the candidates (identity first, distinct names) and their origins.
        budget: views the final policy may hold; ``keep`` (the fewest survivors, leaders included)
            defaults to ``max(budget + 4, 8)``.
        first: images in the first rung (default ``max(N // 16, min(N, 100))``).
        eta: growth of the subset and shrink of the field per rung (> 1).
        z: standard errors of the confidence bound.
        replay: a cache of every candidate over ``images`` (in order): rungs read their logits
            from it instead of running the model (the same decisions and pass counts, for
            benchmarks comparing halving seeds against full caching without paying twice).

    Returns:
        :class:`HalvingResult`; ``cache`` holds the survivors over all N images.
    """
    n = int(images.shape[0])
    budget = check_count("budget", budget)
    keep = max(budget + 4, 8) if keep is None else check_count("keep", keep)
    first = max(n // 16, min(n, 100)) if first is None else check_count("first", first)
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not eta > 1:
        raise InvalidInputError(f"Expected argument `eta` to be a number > 1 (how fast the subset grows), but got {eta!r}")
    z = check_non_negative("z", z)
    sizes = rung_sizes(n, first, eta)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    if replay is not None:
        if replay.n_images != n or replay.names[: len(views)] != [v.name for v in views]:
            raise InvalidInputError(
                f"Expected `replay` to cache the {len(views)} candidates over the {n} images, but it holds "
                f"{replay.n_views} views over {replay.n_images} images"
            )
        replay_logits = replay.logits[:, perm]
    images, labels = images[perm], labels[perm]
    views = list(views)
    sources = list(sources)
    alive = list(range(len(views)))
    store: dict[int, list[torch.Tensor]] = {v: [] for v in alive}
    rungs: list[dict[str, Any]] = []
    passes = 0
    done = 0
    for r, size in enumerate(sizes):
        if replay is not None:
            logits = replay_logits[alive, done:size]
        else:
            logits = run_views(
                model, images[done:size], [views[v] for v in alive], max_batch=max_batch, progress=progress,
                desc=f"halving rung {r + 1}/{len(sizes)}: {len(alive)} views x {size - done} images",
            )
        for row, v in enumerate(alive):
            store[v].append(logits[row])
        spent = len(alive) * (size - done)
        passes += spent
        done = size
        entry: dict[str, Any] = {"rung": r + 1, "images": size, "candidates": len(alive), "passes": spent}
        if size == n:
            entry.update({"leaders": None, "dropped_by_bound": 0, "dropped_by_rank": 0, "survivors": len(alive)})
            rungs.append(entry)
            break
        sub = ViewCache(
            torch.stack([torch.cat(store[v]) for v in alive]), labels[:size], [views[v] for v in alive],
            [sources[v] for v in alive],
        )
        keep_rows, decided = _rung_survivors(sub, budget=budget, keep=keep, z=z, eta=eta)
        entry.update(decided)
        rungs.append(entry)
        alive = [alive[k] for k in keep_rows]
    inverse = torch.argsort(perm)
    logits = torch.stack([torch.cat(store[v]) for v in alive])[:, inverse]
    cache = ViewCache(logits, labels[inverse], [views[v] for v in alive], [sources[v] for v in alive])
    return HalvingResult(cache, rungs, passes, len(views) * n, len(views))
