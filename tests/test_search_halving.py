"""The view cache runs the engine once (no chunk loop of its own) and reports progress through
the engine's hook; successive halving replayed on a full cache makes the same decisions, and
spends the same passes, as halving running the model."""

from __future__ import annotations

import pytest
import torch

from tests.test_search import table_setup  # the known-cache model of the halving tests
from ttakit.engine import TTAEngine
from ttakit.errors import InvalidInputError
from ttakit.search import cache_views, search_policy
from ttakit.search.cache import run_views


def test_cache_is_one_engine_run_with_progress_per_chunk(monkeypatch) -> None:
    model, images, y, views = table_setup(n=300)
    calls, updates = [], []
    original = TTAEngine.run

    def counting(self, batch, *args, **kwargs):
        calls.append(int(batch.shape[0]))
        return original(self, batch, *args, **kwargs)

    monkeypatch.setattr(TTAEngine, "run", counting)

    class Bar:
        def __init__(self, **kwargs):
            self.total = kwargs["total"]

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n):
            updates.append(n)

    monkeypatch.setattr("ttakit.search.cache.progress_bar", Bar)
    logits = run_views(model, images, views[:5], max_batch=64, progress=True)
    assert calls == [300]  # one call over every image: the engine does the chunking
    assert logits.shape == (5, 300, 4) and torch.allclose(logits, model.table[:5], atol=1e-6)
    # one update per chunk of the engine (pass size 32 on CPU), in passes, summing to V x N
    assert len(updates) == 10 and sum(updates) == 5 * 300 and updates[0] == 32 * 5


def test_halving_replayed_on_a_full_cache_matches_running_it() -> None:
    model, images, y, views = table_setup(n=600)
    full = cache_views(model, images, y, views, progress=False)
    model.calls = 0
    ran = search_policy(model, images, y, pool=views, budget=4, gate=False, learn_weights=False, first_rung=75, progress=False, halving_seed=3)
    ran_calls = model.calls
    model.calls = 0
    replayed = search_policy(
        model, images, y, pool=views, budget=4, gate=False, learn_weights=False, first_rung=75, progress=False, halving_seed=3,
        precomputed=full,
    )
    assert model.calls == replayed.cost["check_passes"]  # only the final check through the engine ran
    assert ran_calls == ran.cost["forward_passes"] + ran.cost["check_passes"]
    assert replayed.cost["forward_passes"] == ran.cost["forward_passes"] < 0.6 * len(views) * 600
    assert [r["survivors"] for r in replayed.cost["rungs"]] == [r["survivors"] for r in ran.cost["rungs"]]
    assert replayed.cache.names == ran.cache.names
    assert replayed.policy.view_names == ran.policy.view_names
    # another halving seed visits the images in another order: other subsets, same pool
    other = search_policy(
        model, images, y, pool=views, budget=4, gate=False, learn_weights=False, first_rung=75, progress=False, halving_seed=4,
        precomputed=full,
    )
    assert other.cost["rungs"][0]["leaders"] is not None and other.cost["pool_size"] == len(views)
    # halving=False uses the precomputed cache as the full cache: no passes but the final check
    model.calls = 0
    whole = search_policy(
        model, images, y, pool=views, budget=4, gate=False, learn_weights=False, progress=False, halving=False,
        precomputed=full,
    )
    assert model.calls == whole.cost["check_passes"] and whole.cost["forward_passes"] == len(views) * 600
    assert whole.cache is full
    # a full cache that does not hold the pool is refused
    with pytest.raises(InvalidInputError, match=r"`precomputed` to cache the pool's 30 views over the 600 images"):
        search_policy(model, images, y, pool=views, budget=4, progress=False, precomputed=full.rows(torch.arange(10)))
