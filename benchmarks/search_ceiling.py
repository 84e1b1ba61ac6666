"""How much accuracy is there for a policy search to find? Variants of the search, and its ceiling.

On the flip+shift seed CNNs of ``benchmarks/search.py`` (3 training seeds), every candidate of the
default pool (119 views), plus 48 finer and coarser sub-pixel shifts (0.25, 0.75 and 1.5 px in 8
directions, plain and mirrored: 167 views), is cached over the 10,000 validation images and the
10,000 test images. Each variant selects a policy on one split and is scored on test:

- selected on validation (what a user can do): ttakit's search (NLL, budget 12, as ``ttakit search``
  with every candidate cached, matrix scaling included), the identity with the same calibration
  (the control: no TTA), and with a temperature only: the search, without the gate, on the wider
  pool, greedy *with replacement* (as Greedy Policy Search, Lyzhov et al. 2020, picks), and with
  the accuracy objective;
- selected on the test set itself (not a result: a ceiling): the same NLL search, which no policy
  chosen without the test labels can be expected to beat (also with matrix scaling), and the
  accuracy objective, which
  overfits the test set's own noise (the most any 12-view mean could show on these 10,000 images).

    python benchmarks/search_ceiling.py            # ~30 min on 2 cores the first time (6 caches)

Models come from ``benchmarks/search.py``'s ``--work`` folder (trained there if missing); caches
are kept in ``--work`` (default ``runs/search-ceiling``) and reused. Results go to
``benchmarks/results/search-ceiling.{md,json}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ttakit.transforms as T  # noqa: E402
from common import machine_info, save_results  # noqa: E402
from search import MODELS, fmt, get_model  # noqa: E402
from ttakit._io import atomic_write_text  # noqa: E402
from ttakit.jobs._eval_data import load_eval_data  # noqa: E402
from ttakit.metrics import accuracy, nll  # noqa: E402
from ttakit.policy import Compose  # noqa: E402
from ttakit.report.tables import markdown_table  # noqa: E402
from ttakit.search import ViewCache, fit_temperature, greedy_search  # noqa: E402
from ttakit.search.cache import cache_views  # noqa: E402
from ttakit.search.calibration import apply_temperature  # noqa: E402
from ttakit.search.greedy import cache_output  # noqa: E402
from ttakit.search.run import candidate_pool  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_POOL = 119  # the default pool's size for a flip+shift model of 28x28 images
UNIT = [(1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (1, -1), (-1, 1), (-1, -1)]


def extra_views(known: set[str]) -> list:
    """Sub-pixel shifts by 0.25, 0.75 and 1.5 px in 8 directions, plain and mirrored."""
    views = []
    for step in (0.25, 0.75, 1.5):
        offsets = [(step * dx, step * dy) for dx, dy in UNIT]
        views += Compose([T.Translate(offsets)]).views[1:]
        views += Compose([T.HorizontalFlip(), T.Translate(offsets)]).views
    unique = {v.name: v for v in views if v.name not in known}
    return list(unique.values())


def get_cache(model, meta, split: str, seed: int, work: Path) -> ViewCache:
    path = work / f"seed{seed}-{split}.pt"
    data = load_eval_data(meta, "fashion-mnist", split)
    views, sources, _ = candidate_pool(model, data.images, train_augmentations=meta.train_augmentations, seed=0)
    extra = extra_views({v.name for v in views})
    names = [v.name for v in views + extra]
    if path.exists():
        cache = ViewCache.load(path)
        if cache.names == names and torch.equal(cache.labels, data.labels):
            return cache
    print(f"seed {seed}: caching {len(names)} views over the {len(data)} {split} images", flush=True)
    cache = cache_views(model, data.images, data.labels, views + extra, sources=[*sources, *["extra"] * len(extra)])
    work.mkdir(parents=True, exist_ok=True)
    cache.save(path)
    return cache


def greedy_with_replacement(cache: ViewCache, budget: int, min_gain: float = 1e-4) -> list[int]:
    """Rows of the views picked, repeats allowed: each step adds the view (any, already picked or
    not) whose addition gives the lowest temperature-scaled NLL of the mean of probabilities, and
    keeps accuracy no lower than the identity's; stops when no step gains ``min_gain`` nats."""
    probs, y = cache.probs, cache.labels
    ident = cache.index("identity")
    picked, running = [ident], probs[ident].clone()

    def scaled_nll(mean: torch.Tensor) -> tuple[float, float]:
        t = fit_temperature(mean.clamp_min(1e-12).log(), y)
        return nll(apply_temperature(mean, t), y), t

    current, _ = scaled_nll(running)
    floor = accuracy(running, y)
    while len(picked) < budget:
        m = len(picked)
        merged = (running[None] + probs) / (m + 1)  # (V, N, C): every candidate added once
        _, t = scaled_nll(running / m)
        logp = torch.log_softmax(merged.clamp_min(1e-12).log() / t, dim=2)
        approx = -logp.gather(2, y[None, :, None].expand(len(merged), -1, 1)).squeeze(2).mean(1)
        approx[(merged.argmax(2) == y).float().mean(1) < floor - 1e-12] = math.inf
        best = min((scaled_nll(merged[k])[0], k) for k in torch.argsort(approx)[:4].tolist())
        if not best[0] < current - min_gain:
            break
        current = best[0]
        picked.append(best[1])
        running += probs[best[1]]
    return picked


Selector = Callable[[ViewCache], Callable[[ViewCache], torch.Tensor]]


def search_selector(**options: Any) -> Selector:
    def select(cache: ViewCache) -> Callable[[ViewCache], torch.Tensor]:
        policy = greedy_search(cache, **{"budget": 12, **options}).policy
        return lambda other: cache_output(other, policy)[0]

    return select


def replacement_selector(budget: int) -> Selector:
    def select(cache: ViewCache) -> Callable[[ViewCache], torch.Tensor]:
        rows = greedy_with_replacement(cache, budget)
        t = fit_temperature(cache.probs[rows].mean(0).clamp_min(1e-12).log(), cache.labels)
        return lambda other: apply_temperature(other.probs[rows].mean(0), t)

    return select


def identity_matrix_selector(cache: ViewCache) -> Callable[[ViewCache], torch.Tensor]:
    """The identity alone with the temperature and matrix scaling the search would fit for it
    (no TTA): the lift calibration gives by itself."""
    fallback = greedy_search(cache.select(["identity"]), budget=1).policy
    return lambda other: cache_output(other.select(["identity"]), fallback)[0]


# (name, selected on, pool, selector). Variants after the first two calibrate with a temperature
# only (``matrix_scaling=False``), as the search did before matrix scaling, so they compare views.
VARIANTS: list[tuple[str, str, str, Selector]] = [
    ("ttakit search (NLL, budget 12, gate, matrix scaling)", "val", "default", search_selector()),
    ("control: identity + matrix scaling (no TTA)", "val", "default", identity_matrix_selector),
    ("ttakit search, temperature only", "val", "default", search_selector(matrix_scaling=False)),
    ("ttakit search, temperature only, no gate", "val", "default", search_selector(gate=False, matrix_scaling=False)),
    ("ttakit search, temperature only, wider pool", "val", "wider", search_selector(gate=False, matrix_scaling=False)),
    ("greedy with replacement (GPS), budget 12", "val", "default", replacement_selector(12)),
    ("greedy with replacement (GPS), wider pool", "val", "wider", replacement_selector(12)),
    ("ttakit search, temperature only, accuracy objective", "val", "default",
     search_selector(gate=False, objective="accuracy", matrix_scaling=False)),
    ("ceiling: NLL search on test", "test", "default", search_selector(gate=False, matrix_scaling=False)),
    ("ceiling: NLL search on test, wider pool", "test", "wider", search_selector(gate=False, matrix_scaling=False)),
    ("ceiling: NLL search on test, matrix scaling", "test", "default", search_selector(gate=False)),
    ("ceiling: accuracy search on test", "test", "default",
     search_selector(gate=False, objective="accuracy", matrix_scaling=False)),
    ("ceiling: accuracy search on test, wider pool", "test", "wider",
     search_selector(gate=False, objective="accuracy", matrix_scaling=False)),
]


def run(args) -> dict[str, Any]:
    started = time.perf_counter()
    model_args = SimpleNamespace(work=args.models_work, epochs=3, train_limit=None, quick=False, wait=0, quiet=False)
    rows = []
    for seed in args.seeds:
        model, meta = get_model("flip+shift", MODELS["flip+shift"], seed, model_args)
        caches = {split: get_cache(model, meta, split, seed, Path(args.work)) for split in ("val", "test")}
        default = {split: c.select(c.names[:DEFAULT_POOL]) for split, c in caches.items()}
        pools = {"default": default, "wider": caches}
        for name, on, pool, selector in VARIANTS:
            val, test = pools[pool]["val"], pools[pool]["test"]
            predict = selector(pools[pool][on])
            row = {"seed": seed, "variant": name, "selected_on": on, "pool": val.n_views}
            for split, cache in (("val", val), ("test", test)):
                plain = cache.probs[cache.index("identity")]
                probs = predict(cache)
                row[f"{split}_lift_pts"] = 100 * (accuracy(probs, cache.labels) - accuracy(plain, cache.labels))
                row[f"{split}_nll"] = nll(probs, cache.labels)
            rows.append(row)
            print(f"seed {seed}: {name}: test lift {row['test_lift_pts']:+.2f} pts, val lift {row['val_lift_pts']:+.2f} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
    return {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "argv": sys.argv[1:],
            "machine": machine_info(torch.device("cpu")), "rows": rows, "seconds": time.perf_counter() - started}


def markdown(results: dict[str, Any]) -> str:
    rows = results["rows"]
    table = []
    for name, on, _, _ in VARIANTS:
        mine = [r for r in rows if r["variant"] == name]
        table.append({
            "variant": name, "selected on": on, "pool": mine[0]["pool"],
            "test lift (pts)": fmt([r["test_lift_pts"] for r in mine], sign=True),
            "each seed": ", ".join(f"{r['test_lift_pts']:+.2f}" for r in mine),
            "val lift (pts)": fmt([r["val_lift_pts"] for r in mine], sign=True),
            "test NLL": f"{statistics.fmean(r['test_nll'] for r in mine):.4f}",
        })
    seeds = sorted({r["seed"] for r in rows})
    return "\n".join([
        "# How much lift is there to find? Search variants and the ceiling",
        "",
        f"{results['date']}; flip+shift seed CNN (3 epochs), training seeds {seeds}; every candidate cached over the "
        "10,000 validation and 10,000 test images; `python benchmarks/search_ceiling.py`. Lift = accuracy over the "
        "identity view alone, in points, mean ± std over seeds. Rows selected on `test` are not results: they "
        "bound what selection can find (the accuracy search on test also fits the test set's noise).",
        "",
        markdown_table(table),
        "",
        f"Total time: {results['seconds']:.0f} s.",
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work", default="runs/search-ceiling", help="view caches (reused)")
    parser.add_argument("--models-work", default="runs/bench-search", help="benchmarks/search.py's --work (models)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = run(args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    save_results(RESULTS / "search-ceiling.json", results)
    atomic_write_text(RESULTS / "search-ceiling.md", markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
