"""Policy search on Fashion-MNIST: does the searched policy help where hand-picked TTA hurts?

Trains the seed CNN for 3 epochs without and with train-time flip+shift augmentation on
50,000 training images, searches a policy on the 10,000 held-out validation images (at least
100 candidate views for the augmented model), and evaluates plain inference, ttach-style hflip
mean, d4, fastai-style TTA, the searched policy and its gated version on the 10,000 test
images. Prints one table per model and a PASS/FAIL line per claim, and writes JSON.

    python benchmarks/search.py            # the full benchmark (~15 minutes on 2 CPU cores)
    python benchmarks/search.py --quick    # a subset, for a smoke run (~2 minutes)

Trained models are kept in ``--out`` and reused by the next run.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

from ttakit import Compose, HorizontalFlip, Shift, View
from ttakit._io import atomic_write_json
from ttakit.aliases import get_policy
from ttakit.evaluate import evaluate_policies
from ttakit.experiment import load_eval_data, load_or_train
from ttakit.report import format_table
from ttakit.search import default_pool, fastai_policy, search_policy
from ttakit.train import TrainConfig

MODELS = {"no-aug": (), "flip+shift": ("flip", "shift")}
VAL_FRACTION = 1 / 6  # 50,000 training and 10,000 validation images
MIN_CANDIDATES = 100


def candidate_pool(augmentations) -> list[View]:
    """The default pool plus, for a model trained with flips and shifts, every flip x shift of up
    to 3 pixels: random draws of a +-2 pixel augmentation repeat themselves long before 100
    distinct views, and the search-time claim is about 100 candidates."""
    pool = default_pool((28, 28), augmentations, fixed_size=True, n_random=8)
    if augmentations:
        grid = [(dx, dy) for dx in range(-3, 4) for dy in range(-3, 4) if (dx, dy) != (0, 0)]
        pool += Compose([HorizontalFlip(), Shift(grid)]).views
    unique = {}
    for view in pool:
        unique.setdefault(view.name, view)
    return list(unique.values())


def run_model(name: str, augment, args) -> dict:
    config = TrainConfig(epochs=args.epochs, augment=augment, limit=args.train_limit, seed=0)
    model, meta = load_or_train(Path(args.out) / name, config, val_fraction=VAL_FRACTION, progress=not args.quiet)
    val = load_eval_data(meta, "fashion-mnist", "val", limit=args.eval_limit)
    test = load_eval_data(meta, "fashion-mnist", "test", limit=args.eval_limit)
    augs = meta.train_augmentations
    started = time.perf_counter()
    pool = candidate_pool(augs)
    result = search_policy(model, val, pool=pool, train_augmentations=augs, budget=args.budget, progress=not args.quiet)
    total_search = time.perf_counter() - started
    searched_gated = replace(result.policy, name="searched-gated")
    searched_full = replace(result.policy, name="searched", gate_threshold=None)

    policies = [get_policy("hflip"), get_policy("d4")]
    if augs:
        policies.append(fastai_policy(augs, n=4, beta=0.25, seed=0))
        policies[-1].name = "fastai-4"
    policies += [searched_full, searched_gated]
    evaluations = evaluate_policies(model, test, policies, progress=not args.quiet)
    rows = {e.name: e for e in evaluations}
    table = [
        {
            "policy": e.name,
            "views": e.n_views,
            "passes/img": e.forward_passes_per_image,
            "accuracy %": 100 * e.metrics["accuracy"],
            "lift (pts)": 100 * e.lift.get("accuracy", 0.0),
            "p (McNemar)": e.lift.get("mcnemar_p"),
            "NLL": e.metrics["nll"],
            "ECE": e.metrics["ece"],
        }
        for e in evaluations
    ]
    return {
        "model": name,
        "train_augmentations": augs,
        "candidates": result.pool_size,
        "validation_images": len(val),
        "test_images": len(test),
        "selected": result.policy.view_names,
        "weights": result.policy.weights,
        "temperature": result.policy.temperature,
        "gate_threshold": result.policy.gate_threshold,
        "search_seconds_after_caching": result.search_seconds,
        "search_seconds_total": total_search,
        "rows": table,
        "scores": {k: {**v.metrics, **{f"lift_{m}": x for m, x in v.lift.items()}, "passes": v.forward_passes_per_image} for k, v in rows.items()},
    }


def check_claims(results: dict) -> list[tuple[str, bool, str]]:
    checks = []
    plain = results["no-aug"]["scores"]
    checks.append((
        "no-aug: searched accuracy is not below plain",
        plain["searched"]["accuracy"] >= plain["none"]["accuracy"],
        f"{plain['searched']['accuracy']:.4f} vs {plain['none']['accuracy']:.4f}",
    ))
    checks.append((
        "no-aug: hflip and d4 are below plain",
        plain["hflip"]["accuracy"] < plain["none"]["accuracy"] and plain["d4"]["accuracy"] < plain["none"]["accuracy"],
        f"hflip {plain['hflip']['accuracy']:.4f}, d4 {plain['d4']['accuracy']:.4f}",
    ))
    aug = results["flip+shift"]["scores"]
    for rival in ("hflip", "fastai-4"):
        for metric, better in (("accuracy", lambda a, b: a > b), ("nll", lambda a, b: a < b)):
            ours, theirs = aug["searched"][metric], aug[rival][metric]
            checks.append((f"flip+shift: searched beats {rival} in {metric}", better(ours, theirs), f"{ours:.4f} vs {theirs:.4f}"))
    full_lift = aug["searched"]["accuracy"] - aug["none"]["accuracy"]
    gated_lift = aug["searched-gated"]["accuracy"] - aug["none"]["accuracy"]
    kept = gated_lift / full_lift if full_lift > 0 else float("nan")
    cost = aug["searched-gated"]["passes"] / aug["searched"]["passes"]
    checks.append(("flip+shift: gated keeps >= 95% of the searched lift", kept >= 0.95, f"{100 * kept:.1f}% of {100 * full_lift:+.2f} pts"))
    checks.append(("flip+shift: gated uses <= 30% of the searched passes", cost <= 0.30, f"{100 * cost:.1f}%"))
    info = results["flip+shift"]
    checks.append((
        f"search after caching < 5 s for >= {MIN_CANDIDATES} candidates x {info['validation_images']} images",
        info["search_seconds_after_caching"] < 5.0 and info["candidates"] >= MIN_CANDIDATES,
        f"{info['search_seconds_after_caching']:.2f} s for {info['candidates']} candidates",
    ))
    return checks


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10k training images, 1 epoch, 2k val/test images")
    parser.add_argument("--budget", type=int, default=8)
    parser.add_argument("--out", default="benchmarks/results/search")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    args.epochs, args.train_limit, args.eval_limit = (1, 10_000, 2_000) if args.quick else (3, None, None)

    started = time.perf_counter()
    results = {name: run_model(name, augment, args) for name, augment in MODELS.items()}
    for name, info in results.items():
        print()
        print(format_table(info["rows"], floatfmt=".4g", title=f"{name}: {info['test_images']} test images, "
                           f"searched on {info['validation_images']} validation images, {info['candidates']} candidates"))
        print(f"selected: {', '.join(info['selected'])}; temperature {info['temperature']:.3f}; "
              f"gate threshold {info['gate_threshold']}; search after caching {info['search_seconds_after_caching']:.2f} s")
    checks = check_claims(results)
    print()
    for claim, ok, detail in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {claim}: {detail}")
    out = Path(args.out) / ("search-quick.json" if args.quick else "search.json")
    atomic_write_json(out, {"results": results, "claims": [{"claim": c, "pass": ok, "detail": d} for c, ok, d in checks],
                            "seconds": time.perf_counter() - started})
    print(f"\nwritten to {out} ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
