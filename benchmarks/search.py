"""Policy search on Fashion-MNIST: cost (successive halving vs caching every candidate) and lift
(the searched policy vs plain inference, hflip and fastai-style TTA), over training seeds.

For each training seed and each model (the seed CNN trained 3 epochs on 50,000 images, without
and with train-time flip+shift augmentation), the policy is searched on the first 2,500 of the
10,000 held-out validation images (``--val-images``; the 2 shared CPU cores of the reference
machine could not afford more) and scored on the 10,000 test images. For the flip+shift model
of the first seed the same search also runs with every candidate cached on every image, side
by side.

    python benchmarks/search.py              # 3 seeds x 2 models (~1 hour on 2 busy CPU cores)
    python benchmarks/search.py --quick      # 1 seed, 12k training images, 2k val/test: a smoke run
    python benchmarks/search.py --summarize  # rebuild search.md/json from the finished runs

Trained models and each finished run are kept in ``--work`` and reused when re-run. Results go
to ``benchmarks/results/search.md`` and ``search.json`` (``search-quick.*`` with --quick).
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info  # noqa: E402
from ttakit._io import atomic_write_json, atomic_write_text, read_json  # noqa: E402
from ttakit.aliases import get_policy  # noqa: E402
from ttakit.errors import CheckpointError  # noqa: E402
from ttakit.evaluate import evaluate_policies  # noqa: E402
from ttakit.experiment import load_eval_data, load_or_train  # noqa: E402
from ttakit.models import load_checkpoint  # noqa: E402
from ttakit.report import format_table, markdown_table  # noqa: E402
from ttakit.search import fastai_policy, search_policy  # noqa: E402
from ttakit.train import TrainConfig  # noqa: E402

MODELS = {"flip+shift": ("flip", "shift"), "no-aug": ()}
VAL_FRACTION = 1 / 6  # 50,000 training and 10,000 validation images
RESULTS = Path(__file__).resolve().parent / "results"
RUN_FORMAT = 4  # bump when a run's contents change, so old runs are not reused


def get_model(name: str, augment: tuple[str, ...], seed: int, args) -> tuple[Any, Any]:
    """The trained model: reused from ``--work`` when its recorded recipe matches, else trained
    (with ``--wait``, first wait up to that many seconds for another process training it)."""
    folder = Path(args.work) / f"{name}-seed{seed}{'-quick' if args.quick else ''}"
    config = TrainConfig(epochs=args.epochs, augment=augment, limit=args.train_limit, seed=seed)
    waited = 0
    while args.wait and waited < args.wait and not (folder / "checkpoint.json").exists():
        time.sleep(30)
        waited += 30
    if (folder / "checkpoint.json").exists():
        try:
            model, meta = load_checkpoint(folder)
            saved = meta.extra.get("train_config") or {}
            same = (
                tuple(saved.get("augment") or ()) == augment
                and saved.get("epochs") == args.epochs
                and saved.get("seed") == seed
                and saved.get("limit") == args.train_limit
                and (meta.extra.get("data") or {}).get("val_fraction") == VAL_FRACTION
            )
            if same:
                return model, meta
        except CheckpointError:
            pass
    return load_or_train(folder, config, val_fraction=VAL_FRACTION, progress=not args.quiet)


def test_rows(model, test, policies) -> dict[str, dict[str, float]]:
    evaluations = evaluate_policies(model, test, policies, progress=False, bootstrap_resamples=200)
    return {
        e.name: {
            "accuracy": e.metrics["accuracy"],
            "nll": e.metrics["nll"],
            "ece": e.metrics["ece"],
            "passes": e.forward_passes_per_image,
            "views": e.n_views,
            "lift_accuracy": e.lift.get("accuracy", 0.0),
            "mcnemar_p": e.lift.get("mcnemar_p"),
        }
        for e in evaluations
    }


def search_summary(result, seconds: float) -> dict[str, Any]:
    policy = result.policy
    return {
        "selected": policy.view_names,
        "weights": policy.weights,
        "temperature": policy.temperature,
        "gate_threshold": policy.gate_threshold,
        "seconds": seconds,
        "cost": result.cost,
        "aggregation": result.aggregation,
        "notes": result.notes,
        "policy": policy.to_json(),
    }


def run_one(name: str, augment: tuple[str, ...], seed: int, args) -> dict[str, Any]:
    """Search and score one model; written to ``--work`` as soon as it is done."""
    path = Path(args.work) / "runs" / f"{name}-seed{seed}{'-quick' if args.quick else ''}.json"
    compare_full = seed == args.full_cache_seed and name in args.full_cache_models
    key = {"format": RUN_FORMAT, "quick": args.quick, "budget": args.budget, "compare_full": compare_full, "val_images": args.val_images}
    if path.exists():
        cached = read_json(path)
        if cached.get("key") == key:
            print(f"{name} seed {seed}: reusing {path}", flush=True)
            return cached
    model, meta = get_model(name, augment, seed, args)
    augs = meta.train_augmentations
    val = load_eval_data(meta, "fashion-mnist", "val", limit=args.val_images)
    test = load_eval_data(meta, "fashion-mnist", "test", limit=args.test_limit)
    progress = not args.quiet
    started = time.perf_counter()
    halved = search_policy(model, val.images, val.labels, train_augmentations=augs, budget=args.budget, progress=progress)
    halved_seconds = time.perf_counter() - started
    out: dict[str, Any] = {
        "key": key,
        "model": name,
        "seed": seed,
        "train_augmentations": augs,
        "validation_images": len(val),
        "test_images": len(test),
        "halving": search_summary(halved, halved_seconds),
    }
    policies = [get_policy("hflip")]
    if augs:
        policies.append(replace(fastai_policy(augs, n=4, beta=0.25, seed=0), name="fastai-4"))
    searched = Policy_named(halved.policy, "searched")
    policies.append(searched)
    if compare_full:
        started = time.perf_counter()
        full = search_policy(
            model, val.images, val.labels, train_augmentations=augs, budget=args.budget, halving=False, progress=progress
        )
        out["full"] = search_summary(full, time.perf_counter() - started)
        policies.append(Policy_named(full.policy, "searched (full caching)"))
    print(f"{name} seed {seed}: scoring {len(policies) + 1} policies on {len(test)} test images", flush=True)
    out["test"] = test_rows(model, test, policies)
    atomic_write_json(path, out)
    return out


def Policy_named(policy, name: str):  # noqa: N802 - reads like a constructor
    return replace(policy, name=name, meta=dict(policy.meta))


def mean_std(values: list[float]) -> tuple[float, float]:
    if len(values) == 1:
        return values[0], 0.0
    return statistics.fmean(values), statistics.stdev(values)


def fmt(values: list[float], scale: float = 1.0, digits: int = 2, sign: bool = False) -> str:
    mean, std = mean_std([v * scale for v in values])
    spec = f"{'+' if sign else ''}.{digits}f"
    return f"{mean:{spec}} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:{spec}}"


def lift_table(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for name in MODELS:
        mine = [r for r in runs if r["model"] == name]
        if not mine:
            continue
        policies = [p for p in mine[0]["test"] if all(p in r["test"] for r in mine)]
        for policy in policies:
            cells = [r["test"][policy] for r in mine]
            rows.append(
                {
                    "model": name,
                    "policy": policy,
                    "seeds": len(cells),
                    "passes/img": fmt([c["passes"] for c in cells], digits=2),
                    "accuracy %": fmt([c["accuracy"] for c in cells], 100),
                    "lift (pts)": fmt([c["accuracy"] - r["test"]["none"]["accuracy"] for c, r in zip(cells, mine, strict=True)], 100, sign=True),
                    "NLL": fmt([c["nll"] for c in cells], digits=4),
                    "ECE": fmt([c["ece"] for c in cells], digits=4),
                }
            )
    return rows


def cost_table(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for r in runs:
        if "full" not in r:
            continue
        for label, key, test_key in (("full caching", "full", "searched (full caching)"), ("successive halving", "halving", "searched")):
            info = r[key]
            cost = info["cost"]
            rows.append(
                {
                    "model": f"{r['model']} seed {r['seed']}",
                    "caching": label,
                    "candidates": cost["pool_size"],
                    "forward passes": cost["forward_passes"],
                    "% of full": 100 * cost["fraction_of_full"],
                    "saved": cost["saved_passes"],
                    "search s": info["seconds"],
                    "views": len(info["selected"]),
                    "test accuracy %": 100 * r["test"][test_key]["accuracy"],
                    "test NLL": r["test"][test_key]["nll"],
                }
            )
    return rows


def claims(runs: list[dict[str, Any]]) -> list[tuple[str, bool, str]]:
    out = []
    for r in runs:
        if "full" not in r:
            continue
        full, fast = r["test"]["searched (full caching)"], r["test"]["searched"]
        frac = r["halving"]["cost"]["fraction_of_full"]
        out.append((f"{r['model']} seed {r['seed']}: halving spends <= 25% of full caching's passes", frac <= 0.25, f"{100 * frac:.1f}%"))
        d_acc = 100 * (fast["accuracy"] - full["accuracy"])
        out.append((f"{r['model']} seed {r['seed']}: test accuracy within 0.1 pt of full caching's", abs(d_acc) <= 0.1 or d_acc > 0, f"{d_acc:+.2f} pts"))
        d_nll = fast["nll"] - full["nll"]
        out.append((f"{r['model']} seed {r['seed']}: test NLL within 0.005 of full caching's", d_nll <= 0.005, f"{d_nll:+.4f}"))
    aug = [r for r in runs if r["model"] == "flip+shift"]
    if aug:
        lifts = [100 * (r["test"]["searched"]["accuracy"] - r["test"]["none"]["accuracy"]) for r in aug]
        mean, std = mean_std(lifts)
        out.append((f"flip+shift: searched lifts test accuracy >= +1.0 pt over plain (mean of {len(aug)} seeds)", mean >= 1.0, f"{mean:+.2f} ± {std:.2f} pts"))
        for rival in ("none", "hflip", "fastai-4"):
            ours = statistics.fmean(r["test"]["searched"]["nll"] for r in aug)
            theirs = statistics.fmean(r["test"][rival]["nll"] for r in aug)
            out.append((f"flip+shift: searched NLL below {rival}'s (mean over seeds)", ours < theirs, f"{ours:.4f} vs {theirs:.4f}"))
    for r in runs:
        if r["model"] == "no-aug":
            ours, plain = r["test"]["searched"]["accuracy"], r["test"]["none"]["accuracy"]
            out.append((f"no-aug seed {r['seed']}: searched test accuracy not below plain", ours >= plain, f"{100 * ours:.2f}% vs {100 * plain:.2f}%"))
    return out


def write(runs: list[dict[str, Any]], args, seconds: float | None) -> Path:
    lift, cost, checks = lift_table(runs), cost_table(runs), claims(runs)
    stem = "search-quick" if args.quick else "search"
    info = machine_info(torch.device("cpu"))
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    selected = [
        f"- {r['model']} seed {r['seed']}: {len(r['halving']['selected'])} views "
        f"({', '.join(r['halving']['selected'])}); temperature {r['halving']['temperature']:.3f}; "
        f"gate {r['halving']['gate_threshold']}; learned weights: {'yes' if r['halving']['weights'] else 'no'}; "
        f"class-by-view weights won under CV: {bool((r['halving']['aggregation'] or {}).get('class_used'))}"
        for r in runs
    ]
    n_val = runs[0]["validation_images"] if runs else 0
    n_test = runs[0]["test_images"] if runs else 0
    markdown = "\n".join(
        [
            "# Policy search benchmark",
            "",
            f"{date}; {info['cpu_count']} CPU cores (shared with other jobs; load at start {info.get('load_average_at_start')}), "
            f"torch {info['torch']}. Seed CNN, {args.epochs} epochs; search on {n_val} validation images, scores on "
            f"{n_test} Fashion-MNIST test images; budget {args.budget} views; `python benchmarks/search.py{' --quick' if args.quick else ''}`.",
            "",
            "## Cost: successive halving vs caching every candidate (same model, same run)",
            "",
            markdown_table(cost, floatfmt=".4g") if cost else "(not measured in this run)",
            "",
            "## Lift on the test set (mean ± std over training seeds)",
            "",
            "`searched` is the policy as saved (gate and temperature included), selected on validation only.",
            "",
            markdown_table(lift) if lift else "(no runs)",
            "",
            "## Selected policies",
            "",
            *selected,
            "",
            "## Claims",
            "",
            *[f"- {'PASS' if ok else 'FAIL'} {claim}: {detail}" for claim, ok, detail in checks],
            "",
            f"Total time: {seconds:.0f} s." if seconds is not None else "",
        ]
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS / f"{stem}.md", markdown + "\n")
    atomic_write_json(
        RESULTS / f"{stem}.json",
        {"date": date, "machine": info, "args": {k: v for k, v in vars(args).items()}, "runs": runs,
         "lift": lift, "cost": cost, "claims": [{"claim": c, "pass": ok, "detail": d} for c, ok, d in checks], "seconds": seconds},
    )
    print()
    if cost:
        print(format_table(cost, floatfmt=".4g", title="Cost: successive halving vs full caching"))
        print()
    print(format_table(lift, title="Lift on the test set (mean ± std over seeds)"))
    print()
    for claim, ok, detail in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {claim}: {detail}")
    return RESULTS / f"{stem}.md"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 12k training images, 1 epoch, 2k val/test images")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default 0 1 2)")
    parser.add_argument("--budget", type=int, default=8)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), help="models to run")
    parser.add_argument("--full-cache-models", nargs="*", default=["flip+shift"], help="models compared with full caching")
    parser.add_argument("--full-cache-seed", type=int, default=0, help="the seed whose models are compared with full caching")
    parser.add_argument("--work", default="runs/bench-search", help="trained models and finished runs")
    parser.add_argument("--summarize", action="store_true", help="only rebuild the report from finished runs")
    parser.add_argument("--val-images", type=int, default=None, help="validation images searched on (default 2,500; quick 1,000)")
    parser.add_argument("--wait", type=int, default=0, help="seconds to wait for a model another process is training")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.seeds is None:
        args.seeds = [0] if args.quick else [0, 1, 2]
    args.epochs, args.train_limit, args.test_limit = (1, 12_000, 2_000) if args.quick else (3, None, None)
    if args.val_images is None:
        args.val_images = 1_000 if args.quick else 2_500
    started = time.perf_counter()
    runs = []
    for seed in args.seeds:
        for name, augment in MODELS.items():
            if name not in args.models:
                continue
            if args.summarize:
                path = Path(args.work) / "runs" / f"{name}-seed{seed}{'-quick' if args.quick else ''}.json"
                if path.exists():
                    runs.append(read_json(path))
                continue
            t0 = time.perf_counter()
            runs.append(run_one(name, augment, seed, args))
            print(f"{name} seed {seed}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    path = write(runs, args, None if args.summarize else time.perf_counter() - started)
    print(f"\nwritten to {path} and {path.with_suffix('.json')} ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
