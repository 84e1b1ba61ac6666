"""The orchestration behind ``ttakit search``: pool -> view cache (successive halving) -> greedy
selection, weights, gate, temperature and matrix scaling -> the saved policy checked through the
engine.

:func:`search_policy` takes a model and validation tensors (loading data is the caller's job:
:func:`ttakit.jobs.search.search_checkpoint`) and returns a :class:`SearchResult`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from ..augmentations import geometry, parse_augmentations
from ..engine import TTAEngine
from ..errors import InvalidInputError
from ..policy import Policy, View
from ._util import EvalMode, check_count, check_fraction, check_images_labels, check_views, dedupe
from .cache import ViewCache, cache_views
from .greedy import (
    Objective,
    SearchResult,
    _check_budget,
    _check_objective,
    greedy_search,
    never_worse,
)
from .halving import successive_halving
from .pool import baseline_policies, pool_with_sources, random_copy_views

__all__ = ["check_search_split", "search_policy"]


def check_search_split(split: str) -> str:
    """``split`` if a search may select on it (``"val"``); refuse ``"test"`` (a policy chosen on
    the test split makes its test score meaningless) and ``"train"`` (the model fitted those
    images, so they would choose a policy, weights and temperature for images it has memorised).

    Raises:
        InvalidInputError: naming ``--split``, the value and the split to use.
    """
    if split == "test":
        raise InvalidInputError(
            "search selects a policy, so it must not see the test split (--split test); search on 'val' "
            "(the held-out validation split) and score the saved policy on test with ttakit evaluate"
        )
    if split == "train":
        raise InvalidInputError(
            "search --split train: the model trained on those images, so they would choose a policy and fit a "
            "temperature for images it has memorised; search on 'val' (the held-out validation split)"
        )
    return split


def _accepts_other_sizes(model: Any, images: torch.Tensor) -> bool:
    """Whether ``model`` runs on images 10% smaller than ``images`` (a fully convolutional net)."""
    height, width = images.shape[-2:]
    small = torch.nn.functional.interpolate(images[:2], size=(max(1, int(height * 0.9)), max(1, int(width * 0.9))))
    try:
        with torch.inference_mode(), EvalMode(model):
            out = model(small)
    except Exception:  # any failure means: feed this model its own size only
        return False
    return isinstance(out, torch.Tensor) and out.ndim == 2 and out.shape[0] == small.shape[0]


def engine_output(model: Any, images: torch.Tensor, policy: Policy, max_batch: int = 256) -> tuple[torch.Tensor, float]:
    """``(N, C)`` probabilities of ``policy`` on ``images`` as inference produces them (views,
    weights, gate and temperature, through :class:`TTAEngine`) and the passes per image spent."""
    with EvalMode(model):
        out = TTAEngine(model, policy, activation="softmax", max_batch=max_batch).run(images)
    passes = getattr(out, "passes_per_image", None)
    return out.merged.float().cpu(), float(passes if passes else len(policy))


def candidate_pool(
    model: Any,
    images: torch.Tensor,
    *,
    pool: Sequence[View] | None = None,
    train_augmentations: Sequence[dict | str] = (),
    n_random: int = 8,
    fixed_size: bool | None = None,
    seed: int = 0,
) -> tuple[list[View], list[str], bool | None]:
    """The candidates :func:`search_policy` runs: ``(views, sources, fixed_size)``, the identity
    first, names distinct, every view able to invert a label (else :class:`NotInvertibleError`)."""
    augs = parse_augmentations(train_augmentations)
    if pool is None:
        if fixed_size is None:
            fixed_size = not _accepts_other_sizes(model, images[:2])
        size = (int(images.shape[-2]), int(images.shape[-1]))
        views, sources = pool_with_sources(size, augs, fixed_size=fixed_size, n_random=n_random, seed=seed)
    else:
        views = check_views(pool, "pool")
        sources = ["user"] * len(views)
        views, sources = dedupe([View.identity(), *views], ["identity", *sources])
    if not views[0].is_identity:  # the identity leads: halving always keeps row 0
        k = next(i for i, v in enumerate(views) if v.is_identity)
        views.insert(0, views.pop(k))
        sources.insert(0, sources.pop(k))
    Policy(views).check_targets("label")  # NotInvertibleError naming the view, before any work
    return views, sources, fixed_size


def _check_precomputed(precomputed: ViewCache | None, views: Sequence[View], n: int) -> None:
    if precomputed is not None and (precomputed.names != [v.name for v in views] or precomputed.n_images != n):
        raise InvalidInputError(
            f"Expected `precomputed` to cache the pool's {len(views)} views over the {n} images, but it holds "
            f"{precomputed.n_views} views over {precomputed.n_images} images"
        )


def _cache_in_full(
    model: Any,
    images: torch.Tensor,
    labels: torch.Tensor,
    views: list[View],
    sources: list[str],
    precomputed: ViewCache | None,
    max_batch: int,
    progress: bool,
) -> tuple[ViewCache, dict[str, Any]]:
    """Every candidate on every image (``halving=False``), and what it cost."""
    n = int(images.shape[0])
    _check_precomputed(precomputed, views, n)
    if precomputed is not None:
        cache = precomputed
    else:
        cache = cache_views(model, images, labels, views, max_batch=max_batch, progress=progress, sources=sources)
    cost = {
        "method": "full caching",
        "pool_size": len(views),
        "survivors": len(views),
        "forward_passes": len(views) * n,
        "full_caching_passes": len(views) * n,
        "saved_passes": 0,
        "fraction_of_full": 1.0,
        "rungs": [],
    }
    return cache, cost


def _check_through_engine(
    result: SearchResult, model: Any, images: torch.Tensor, labels: torch.Tensor, max_batch: int
) -> float:
    """The policy as saved, run through the engine, against the identity alone (the cache's check
    used the same numbers computed another way; this one is what inference will do): else the
    ungated policy, else the identity. Updates ``result``; returns the forward passes spent."""
    policy = result.policy
    if len(policy) <= 1:
        return 0.0
    candidates = [policy] + ([replace(policy, gate_threshold=None)] if policy.gate_threshold is not None else [])
    fallback = result.fallback
    spent: list[float] = []

    def output(p: Policy) -> tuple[torch.Tensor, float]:
        probs, passes = engine_output(model, images, p, max_batch)
        spent.append(passes)
        return probs, passes

    final, saved, notes = never_worse(candidates, fallback, result.comparison[0], output, labels)
    result.notes += notes
    if final is not policy:  # the fallback keeps what it says of its own calibration
        final.meta = {**policy.meta, **(fallback.meta if final is fallback else {})}
        result.gate = None if final.gate_threshold is None else result.gate
    final.meta.setdefault("validation", {})["saved"] = saved
    final.meta["validation"]["checked_through"] = "TTAEngine"
    result.comparison[-1] = {
        **result.comparison[-1], **{k: saved[k] for k in ("accuracy", "nll")}, "views": saved["passes_per_image"]
    }
    result.policy = final
    return sum(spent) * int(images.shape[0])


def search_policy(
    model: Any,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    pool: Sequence[View] | None = None,
    train_augmentations: Sequence[dict | str] = (),
    budget: int = 8,
    objective: Objective = "nll",
    learn_weights: bool = True,
    class_weights: bool = True,
    matrix_scaling: bool = True,
    gate: bool = True,
    keep: float = 0.95,
    gate_confidence: float = 0.9,
    gate_max_cost: float | None = 0.3,
    n_random: int = 8,
    fixed_size: bool | None = None,
    halving: bool = True,
    first_rung: int | None = None,
    eta: float = 2.0,
    survivors: int | None = None,
    max_batch: int = 256,
    progress: bool = True,
    seed: int = 0,
    name: str = "searched",
    precomputed: ViewCache | None = None,
    halving_seed: int | None = None,
) -> SearchResult:
    """Search a TTA policy for ``model`` on labelled validation images.

    Candidates come from :func:`~ttakit.search.default_pool` (or ``pool``); successive halving
    (:func:`~ttakit.search.successive_halving`) runs them on a growing subset of the images and
    caches in full only the survivors (``halving=False``: every candidate on every image);
    :func:`~ttakit.search.greedy_search` selects views, weights, a gate and a temperature; last,
    the policy as saved runs through :class:`TTAEngine` on the same images and is kept only if it
    is not worse than the identity alone (else the ungated policy, else the identity).

    Args:
        model: a classifier returning ``(B, C)`` logits for raw images in ``[0, 1]``.
        images: ``(N, C, H, W)`` the labelled validation images (never the test split).
        labels: ``(N,)`` class indices.
        pool: candidate views; the identity is added if missing.
        train_augmentations: a checkpoint's ``meta.train_augmentations``.
        budget, objective, learn_weights, class_weights, matrix_scaling, gate, keep,
            gate_confidence, gate_max_cost: see :func:`~ttakit.search.greedy_search`.
        fixed_size: whether the model only takes its training size (crops are resized back);
            None probes the model with a smaller image.
        halving, first_rung, eta, survivors: successive halving and its schedule
            (:func:`~ttakit.search.successive_halving`'s ``first``, ``eta`` and ``keep``).
        max_batch: most images per forward pass.
        precomputed: every candidate of the pool over ``images``, cached beforehand (benchmarks):
            halving then replays its rungs from it (same decisions, passes counted as if run),
            and ``halving=False`` uses it as the full cache.
        halving_seed: seeds the order in which halving visits the images (default ``seed``,
            which also seeds the random copies in the pool and the cross-validation folds).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))
        >>> images, labels = torch.rand(40, 1, 8, 8), torch.arange(40) % 2
        >>> result = search_policy(model, images, labels, budget=3, progress=False)
        >>> result.policy.view_names[0], len(result.policy) <= 3
        ('identity', True)
    """
    images, labels = check_images_labels(images, labels)
    budget = _check_budget(budget)
    objective = _check_objective(objective)
    check_fraction("keep", keep)
    n_random = check_count("n_random", n_random, minimum=0)
    augs = parse_augmentations(train_augmentations)
    views, sources, fixed_size = candidate_pool(
        model, images, pool=pool, train_augmentations=augs, n_random=n_random, fixed_size=fixed_size, seed=seed
    )
    geo = geometry(augs)
    copies = None
    if n_random >= 2 and (geo.flip_p > 0 or geo.max_shift > 0):
        copies = [v.name for v in random_copy_views(augs, n_random, seed)]

    started = time.perf_counter()
    if halving:
        _check_precomputed(precomputed, views, int(images.shape[0]))
        halved = successive_halving(
            model, images, labels, views, sources, budget=budget, keep=survivors, first=first_rung, eta=eta,
            max_batch=max_batch, progress=progress, seed=seed if halving_seed is None else halving_seed,
            replay=precomputed,
        )
        cache, cost = halved.cache, halved.cost()
    else:
        cache, cost = _cache_in_full(model, images, labels, views, sources, precomputed, max_batch, progress)
    cache_seconds = time.perf_counter() - started
    result = greedy_search(
        cache, budget, objective, learn_weights=learn_weights, class_weights=class_weights,
        matrix_scaling=matrix_scaling, gate=gate, keep=keep, gate_confidence=gate_confidence,
        gate_max_cost=gate_max_cost, baselines=baseline_policies(augs, n_random, seed), random_copies=copies,
        seed=seed, name=name,
    )

    checked = time.perf_counter()
    check_passes = _check_through_engine(result, model, images, labels, max_batch)
    result.pool_size = int(cost["pool_size"])  # the whole pool; result.candidates lists the survivors
    cost["check_passes"] = check_passes
    cost["check_seconds"] = time.perf_counter() - checked
    result.cost = cost
    result.cache_seconds = cache_seconds
    result.policy.meta.update(
        cache_seconds=cache_seconds, train_augmentations=augs, fixed_size=fixed_size,
        forward_passes=cost["forward_passes"], full_caching_passes=cost["full_caching_passes"],
    )
    return result
