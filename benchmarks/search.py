"""Policy search on Fashion-MNIST: cost (successive halving vs caching every candidate) and lift
(the searched policy vs plain inference, hflip and fastai-style TTA), over training seeds.

For each model (the seed CNN trained 3 epochs on 50,000 images, with and without train-time
flip+shift augmentation) and each training seed, the policy is searched by successive halving on
all 10,000 held-out validation images (``--val-images`` to use fewer) and scored on the 10,000
test images. For the flip+shift model of the first seed the same search also runs with every
candidate cached on every image, side by side; on that full cache successive halving is also
replayed with two more halving seeds (other image orders: the same decisions and pass counts as
running them, without paying for the passes twice), so the halving-vs-full comparison is reported
over 3 halving seeds, mean ± std.

    python benchmarks/search.py              # 3 seeds x 2 models (~45 min on 2 quiet CPU cores)
    python benchmarks/search.py --quick      # 1 seed, 12k training images, 1k val, 2k test: a smoke run
    python benchmarks/search.py --summarize  # rebuild search.md/json from the finished runs

Trained models, the full cache (with the seconds it took) and each finished run are kept in
``--work`` and reused when re-run. Results go to ``benchmarks/results/search.md`` and
``search.json`` (``search-quick.*`` with --quick).
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
from ttakit.jobs._eval_data import load_eval_data  # noqa: E402
from ttakit.jobs._policy_eval import evaluate_policies  # noqa: E402
from ttakit.jobs.demo import load_or_train
from ttakit.models import load_checkpoint  # noqa: E402
from ttakit.report.tables import format_table, markdown_table  # noqa: E402
from ttakit.search import ViewCache, fastai_policy, search_policy  # noqa: E402
from ttakit.search.cache import cache_views  # noqa: E402
from ttakit.search.run import candidate_pool  # noqa: E402
from ttakit.training.config import TrainConfig  # noqa: E402

MODELS = {"flip+shift": ("flip", "shift"), "no-aug": ()}
VAL_FRACTION = 1 / 6  # 50,000 training and 10,000 validation images
RESULTS = Path(__file__).resolve().parent / "results"
RUN_FORMAT = 7  # bump when a run's contents change, so old runs are not reused


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


def search_summary(result, seconds: float, **extra: Any) -> dict[str, Any]:
    policy = result.policy
    return {
        **extra,
        "selected": policy.view_names,
        "weights": policy.weights,
        "class_weights": policy.class_weights,
        "validation": policy.meta.get("validation"),
        "temperature": policy.temperature,
        "matrix_scaling": policy.meta.get("matrix_scaling"),
        "gate_threshold": policy.gate_threshold,
        "seconds": seconds,
        "cost": result.cost,
        "aggregation": result.aggregation,
        "notes": result.notes,
        "policy": policy.to_json(),
    }


def full_cache(model, meta, val, name: str, seed: int, args) -> tuple[ViewCache, float]:
    """Every candidate of the pool over the validation images, and the seconds it took: read from
    ``--work`` when an earlier run of this benchmark cached the same views over the same images
    (the seconds are those measured then), else computed now and saved."""
    folder = Path(args.work) / "caches"
    stem = f"{name}-seed{seed}{'-quick' if args.quick else ''}-val{len(val)}"
    views, sources, _ = candidate_pool(model, val.images, train_augmentations=meta.train_augmentations, seed=0)
    names = [v.name for v in views]
    if (folder / f"{stem}.pt").exists() and (folder / f"{stem}.json").exists():
        info = read_json(folder / f"{stem}.json")
        cache = ViewCache.load(folder / f"{stem}.pt")
        if cache.names == names and cache.n_images == len(val) and torch.equal(cache.labels, val.labels):
            print(f"{name} seed {seed}: reusing the full cache {folder / stem}.pt ({info['seconds']:.0f} s when made)", flush=True)
            return cache, float(info["seconds"])
    started = time.perf_counter()
    cache = cache_views(model, val.images, val.labels, views, sources=sources, progress=not args.quiet)
    seconds = time.perf_counter() - started
    folder.mkdir(parents=True, exist_ok=True)
    cache.save(folder / f"{stem}.pt")
    atomic_write_json(folder / f"{stem}.json", {"seconds": seconds, "passes": len(views) * len(val), "names": names})
    return cache, seconds


def run_one(name: str, augment: tuple[str, ...], seed: int, args) -> dict[str, Any]:
    """Search and score one model; written to ``--work`` as soon as it is done."""
    path = Path(args.work) / "runs" / f"{name}-seed{seed}{'-quick' if args.quick else ''}.json"
    compare_full = seed == args.full_cache_seed and name in args.full_cache_models
    key = {
        "format": RUN_FORMAT, "quick": args.quick, "budget": args.budget, "compare_full": compare_full,
        "val_images": args.val_images, "halving_seeds": args.halving_seeds if compare_full else None,
    }
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
    options = {"train_augmentations": augs, "budget": args.budget, "progress": progress}
    print(f"{name} seed {seed}: searching on {len(val)} validation images", flush=True)
    started = time.perf_counter()
    halved = search_policy(model, val.images, val.labels, **options)
    halved_seconds = time.perf_counter() - started
    out: dict[str, Any] = {
        "key": key,
        "model": name,
        "seed": seed,
        "train_augmentations": augs,
        "validation_images": len(val),
        "test_images": len(test),
        "halving": search_summary(halved, halved_seconds, halving_seed=0, replayed=False),
    }
    policies = [get_policy("hflip")]
    if augs:
        policies.append(replace(fastai_policy(augs, n=4, beta=0.25, seed=0), name="fastai-4"))
    policies.append(Policy_named(halved.policy, "searched"))
    if halved.policy.matrix_scaling is not None:  # the views' own share: the same policy without its matrix
        policies.append(replace(Policy_named(halved.policy, "searched (no matrix)"), matrix_scaling=None))
    if halved.fallback is not None and halved.fallback.matrix_scaling is not None:  # the calibration's own share
        policies.append(Policy_named(halved.fallback, "none (matrix-scaled)"))
    if compare_full:
        cache, cache_seconds = full_cache(model, meta, val, name, seed, args)
        started = time.perf_counter()
        full = search_policy(model, val.images, val.labels, halving=False, precomputed=cache, **options)
        out["full"] = search_summary(full, cache_seconds + time.perf_counter() - started, cache_seconds=cache_seconds)
        policies.append(Policy_named(full.policy, "searched (full caching)"))
        out["replays"] = []
        for halving_seed in args.halving_seeds:
            if halving_seed == 0:
                continue  # the real run above
            started = time.perf_counter()
            replayed = search_policy(
                model, val.images, val.labels, precomputed=cache, halving_seed=halving_seed, **options
            )
            out["replays"].append(search_summary(replayed, time.perf_counter() - started, halving_seed=halving_seed, replayed=True))
            policies.append(Policy_named(replayed.policy, f"searched (halving seed {halving_seed})"))
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


def _halvings(r: dict[str, Any]) -> list[tuple[str, dict[str, Any], str]]:
    """(label, search summary, test row name) of every halving search of a full-cache run."""
    out = [("successive halving (seed 0)", r["halving"], "searched")]
    for rep in r.get("replays", []):
        k = rep["halving_seed"]
        out.append((f"successive halving (seed {k}, replayed)", rep, f"searched (halving seed {k})"))
    return out


def cost_table(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for r in runs:
        if "full" not in r:
            continue
        entries = [("full caching", r["full"], "searched (full caching)"), *_halvings(r)]
        for label, info, test_key in entries:
            cost = info["cost"]
            saved = (info.get("validation") or {}).get("saved") or {}
            rows.append(
                {
                    "model": f"{r['model']} seed {r['seed']}",
                    "caching": label,
                    "candidates": cost["pool_size"],
                    "survivors": cost["survivors"],
                    "forward passes": cost["forward_passes"],
                    "% of full": 100 * cost["fraction_of_full"],
                    "saved": cost["saved_passes"],
                    "search s": None if info.get("replayed") else info["seconds"],
                    "views": len(info["selected"]),
                    "val NLL": saved.get("nll"),
                    "test accuracy %": 100 * r["test"][test_key]["accuracy"],
                    "test NLL": r["test"][test_key]["nll"],
                }
            )
    return rows


def halving_vs_full(r: dict[str, Any]) -> dict[str, Any]:
    """Test accuracy (points) and NLL of each halving search minus full caching's, mean ± std."""
    full = r["test"]["searched (full caching)"]
    d_acc = [100 * (r["test"][key]["accuracy"] - full["accuracy"]) for _, _, key in _halvings(r)]
    d_nll = [r["test"][key]["nll"] - full["nll"] for _, _, key in _halvings(r)]
    fractions = [info["cost"]["fraction_of_full"] for _, info, _ in _halvings(r)]
    return {"d_accuracy_pts": d_acc, "d_nll": d_nll, "fractions": fractions}


def claims(runs: list[dict[str, Any]]) -> list[tuple[str, bool, str]]:
    out = []
    for r in runs:
        if "full" not in r:
            continue
        diff = halving_vs_full(r)
        n = len(diff["d_accuracy_pts"])
        frac = r["halving"]["cost"]["fraction_of_full"]
        worst = max(diff["fractions"])
        out.append((f"{r['model']} seed {r['seed']}: halving spends <= 25% of full caching's passes", worst <= 0.25,
                    f"{100 * frac:.1f}% (run); at most {100 * worst:.1f}% over {n} halving seeds"))
        acc_mean, acc_std = mean_std(diff["d_accuracy_pts"])
        shown = ", ".join(f"{d:+.2f}" for d in diff["d_accuracy_pts"])
        out.append((f"{r['model']} seed {r['seed']}: test accuracy at most 0.1 pt below full caching's (mean of {n} halving seeds)",
                    acc_mean >= -0.1, f"{acc_mean:+.2f} ± {acc_std:.2f} pts (each: {shown})"))
        nll_mean, nll_std = mean_std(diff["d_nll"])
        out.append((f"{r['model']} seed {r['seed']}: test NLL within 0.005 of full caching's (mean of {n} halving seeds)",
                    nll_mean <= 0.005, f"{nll_mean:+.4f} ± {nll_std:.4f} (each: {', '.join(f'{d:+.4f}' for d in diff['d_nll'])})"))
    aug = [r for r in runs if r["model"] == "flip+shift"]
    if aug:
        lifts = [100 * (r["test"]["searched"]["accuracy"] - r["test"]["none"]["accuracy"]) for r in aug]
        mean, std = mean_std(lifts)
        out.append((f"flip+shift: searched lifts test accuracy >= +1.0 pt over plain (mean of {len(aug)} seeds)", mean >= 1.0, f"{mean:+.2f} ± {std:.2f} pts"))
        controlled = all("none (matrix-scaled)" in r["test"] for r in aug)
        if controlled:
            shares = [100 * (r["test"]["searched"]["accuracy"] - r["test"]["none (matrix-scaled)"]["accuracy"]) for r in aug]
            mean, std = mean_std(shares)
            out.append((f"flip+shift: searched above the same calibration without TTA, none (matrix-scaled) (mean of {len(aug)} seeds)",
                        mean > 0, f"{mean:+.2f} ± {std:.2f} pts: the views' own share of the lift"))
        rivals = ["none", "hflip", "fastai-4"] + (["none (matrix-scaled)"] if controlled else [])
        for rival in rivals:
            ours = statistics.fmean(r["test"]["searched"]["nll"] for r in aug)
            theirs = statistics.fmean(r["test"][rival]["nll"] for r in aug)
            out.append((f"flip+shift: searched NLL below {rival}'s (mean over seeds)", ours < theirs, f"{ours:.4f} vs {theirs:.4f}"))
    for r in runs:
        if r["model"] == "no-aug":
            ours, plain = r["test"]["searched"]["accuracy"], r["test"]["none"]["accuracy"]
            out.append((f"no-aug seed {r['seed']}: searched test accuracy not below plain", ours >= plain, f"{100 * ours:.2f}% vs {100 * plain:.2f}%"))
    return out


def _fmt_gate(threshold: float | None) -> str:
    return "none" if threshold is None else f"{threshold:.4f}"


def _weights_kind(info: dict[str, Any]) -> str:
    agg = info.get("aggregation") or {}
    cv = (
        f" (2-fold CV NLL: mean {agg['cv_nll_mean']:.4f}, per-view {agg['cv_nll_weighted']:.4f}, "
        f"class-by-view {agg['cv_nll_class']:.4f})" if agg.get("cv_nll_class") is not None else ""
    )
    if not info["weights"]:
        return "plain mean" + cv
    return ("class-by-view (saved)" if info.get("class_weights") else "per-view") + cv


def _scaling_kind(info: dict[str, Any]) -> str:
    cv = info.get("matrix_scaling") or {}
    scores = (f" (2-fold CV NLL {cv['cv_nll_matrix']:.4f} vs temperature alone {cv['cv_nll_temperature']:.4f})"
              if cv.get("cv_nll_matrix") is not None else "")
    if (info.get("policy") or {}).get("matrix_scaling"):
        return "saved" + scores
    return "not kept" + scores + (f": {cv['not_used_because']}" if cv.get("not_used_because") else "")


def _previous_seconds(stem: str) -> float | None:
    """``--summarize`` keeps the total time of the run that produced the results."""
    try:
        seconds = read_json(RESULTS / f"{stem}.json").get("seconds")
    except (OSError, ValueError):
        return None
    return float(seconds) if isinstance(seconds, (int, float)) else None


def write(runs: list[dict[str, Any]], args, seconds: float | None) -> Path:
    lift, cost, checks = lift_table(runs), cost_table(runs), claims(runs)
    stem = "search-quick" if args.quick else "search"
    if seconds is None:
        seconds = _previous_seconds(stem)
    info = machine_info(torch.device("cpu"))
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    selected = [
        f"- {r['model']} seed {r['seed']}: {len(r['halving']['selected'])} views "
        f"({', '.join(r['halving']['selected'])}); merge {r['halving']['policy']['merge_mode']}; "
        f"temperature {r['halving']['temperature']:.3f}; gate {_fmt_gate(r['halving']['gate_threshold'])}; "
        f"weights: {_weights_kind(r['halving'])}; matrix scaling: {_scaling_kind(r['halving'])}"
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
            "Halving seed 0 ran the model; seeds 1 and 2 replayed halving's rungs on the full cache (the same "
            "decisions and pass counts, other image orders). `val NLL` is the saved policy's on validation; "
            "the test columns are on the 10,000 test images, never used for selection. Full caching's `search s` "
            "includes the seconds its cache took when this benchmark made it (it is kept in `--work` and reused).",
            "",
            markdown_table(cost, floatfmt=".4g") if cost else "(not measured in this run)",
            "",
            "## Lift on the test set (mean ± std over training seeds)",
            "",
            "`searched` is the policy as saved (gate, temperature and matrix scaling included), selected on "
            "validation only. Matrix scaling (`softmax(W log p + b)` after the temperature, fitted on validation, kept "
            "only with 20 rows per fitted number and where it wins under 2-fold cross-validation, in NLL and held-out "
            "accuracy) corrects the model's class biases, which it would do "
            "without TTA too: `none (matrix-scaled)` is the plain model with the matrix the search fitted for it, "
            "and `searched (no matrix)` the saved policy without its matrix (both rows only where every seed kept a "
            "matrix). The views' own share of the lift is `searched` minus `none (matrix-scaled)`.",
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
    parser.add_argument("--budget", type=int, default=12, help="most views per policy (default 12: on 2-fold CV of the validation split of flip+shift seed 0, budget 12 lifted held-out accuracy +1.02 points, budget 8 +0.67, 16 stopped at 10-12 views)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), help="models to run")
    parser.add_argument("--full-cache-models", nargs="*", default=["flip+shift"], help="models compared with full caching")
    parser.add_argument("--full-cache-seed", type=int, default=0, help="the seed whose models are compared with full caching")
    parser.add_argument("--work", default="runs/bench-search", help="trained models and finished runs")
    parser.add_argument("--summarize", action="store_true", help="only rebuild the report from finished runs")
    parser.add_argument("--val-images", type=int, default=None, help="validation images searched on (default all 10,000; quick 1,000)")
    parser.add_argument("--halving-seeds", type=int, nargs="+", default=[0, 1, 2], help="halving seeds compared with full caching (0 runs the model; others replay)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    parser.add_argument("--wait", type=int, default=0, help="seconds to wait for a model another process is training")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.seeds is None:
        args.seeds = [0] if args.quick else [0, 1, 2]
    args.epochs, args.train_limit, args.test_limit = (1, 12_000, 2_000) if args.quick else (3, None, None)
    if args.val_images is None and args.quick:
        args.val_images = 1_000
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    runs = []
    # flip+shift first: its runs carry the cost and lift claims.
    for name, augment in MODELS.items():
        for seed in args.seeds:
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
