"""Where the time goes at batch 1: the seed CNN with hflip, the configuration of
``benchmarks/engine.py`` where ttakit landed 2-3% above ttach in earlier runs, when each timed
call followed whichever contender ran before it (``--order shuffle``).

Four measurements, in one run:

1. **Repeats.** ``engine.py`` for this one configuration in ``--repeats`` fresh processes, each
   with both orders of turns (``--order shuffle``: batch by batch in a random order;
   ``--order after-itself``: the same, each timed call right after an untimed call of the same
   contender): how far ttakit/ttach and the A/A control (ttach/ttach) move
   from process to process, and with the order.
2. **The forward passes alone.** One pass of 2 images (the two views stacked, ttakit's plan) against
   two passes of 1 image (ttach's plan), each timed after another call (plain inference, a stacked
   pass, two single passes) or alone: whether stacking itself is slower.
3. **The engine's own steps**, timed one by one around the seed CNN and around a linear model
   (almost free): how much each small operation costs right after a CNN's forward pass.
4. **Each call by the call before it.** Plain inference, ttakit and ttach called in a seeded
   random sequence on random test images; each call's time grouped by which one ran just before:
   whether a call right after one of its own shapes runs faster. In ``--order shuffle`` ttach's
   passes of one image follow a call of one image (plain inference's, the A/A copy's, its own)
   in 11 calls of 16, ttakit's stacked pass follows its own shapes in 1 of 16.

    python benchmarks/engine_profile.py   # ~2 min; writes benchmarks/results/engine-profile.{md,json}
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_test_images, machine_info, make_model, save_results  # noqa: E402
from ttakit import ClassificationTTAWrapper, get_policy  # noqa: E402
from ttakit._io import atomic_write_text  # noqa: E402
from ttakit.engine import _sum_is_finite  # noqa: E402
from ttakit.report.tables import markdown_table  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ORDERS = ("shuffle", "after-itself")


def repeats(n: int) -> list[dict[str, Any]]:
    """ttakit/ttach and ttach/ttach of engine.py's seed-cnn, batch 1, hflip in ``n`` fresh processes
    per order of turns (the orders alternate)."""
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(n):
            for order in ORDERS:
                path = Path(tmp) / f"run{k}-{order}.json"
                cmd = [sys.executable, str(HERE / "engine.py"), "--archs", "seed-cnn", "--batch-sizes", "1",
                       "--policies", "hflip", "--no-memory", "--order", order, "--out", str(path)]
                subprocess.run(cmd, check=True, capture_output=True, text=True)
                row = json.loads(path.read_text())["timing"][0]
                out.append({"order": order, "ttakit_over_ttach": row["ttakit_over_ttach"],
                            "ttach_again_over_ttach": row["ttach_again_over_ttach"], "pass": row["ttakit_pass_size"]})
                print(f"  repeat {k + 1}/{n}, order {order}: ttakit/ttach {row['ttakit_over_ttach']:.3f}, "
                      f"A/A {row['ttach_again_over_ttach']:.3f}", flush=True)
    return out


def by_predecessor(model, images, calls: int) -> list[dict[str, Any]]:
    """Plain inference, ttakit and ttach called ``calls`` times in a seeded random sequence on random
    images; per (contender, contender just before): the number of calls, their 10th percentile and
    median (µs)."""
    import ttach

    ours = ClassificationTTAWrapper(model, get_policy("hflip"), max_batch=256)
    theirs = ttach.ClassificationTTAWrapper(model, ttach.Compose([ttach.HorizontalFlip()]))
    contenders = {"plain": model, "ttakit": ours, "ttach": theirs}
    for _ in range(20):  # let ttakit's engine choose its pass plan first
        ours(images[0])
    rng = random.Random(0)
    names = list(contenders)
    spent: dict[tuple[str, str], list[float]] = {}
    before = None
    with torch.inference_mode():
        for _ in range(calls):
            name = rng.choice(names)
            x = images[rng.randrange(len(images))]
            start = time.perf_counter()
            contenders[name](x)
            seconds = time.perf_counter() - start
            if before is not None:
                spent.setdefault((name, before), []).append(seconds)
            before = name
    rows = []
    for name in names:
        for previous in names:
            t = sorted(spent.get((name, previous), []))
            rows.append({"call": name, "right after": previous, "calls": len(t),
                         "p10_us": 1e6 * t[len(t) // 10] if t else math.nan,
                         "median_us": 1e6 * statistics.median(t) if t else math.nan})
    return rows


def least_disturbed_us(before, call, images, rounds: int) -> float:
    """Microseconds per call of ``call`` (each image's fastest of ``rounds``, averaged), each call
    right after ``before`` on the same image (untimed)."""
    best = [math.inf] * len(images)
    with torch.inference_mode():
        for _ in range(rounds):
            for i, x in enumerate(images):
                if before is not None:
                    before(x)
                start = time.perf_counter()
                call(x)
                best[i] = min(best[i], time.perf_counter() - start)
    return 1e6 * statistics.fmean(best)


def passes_in_context(model, images, rounds: int) -> list[dict[str, Any]]:
    def stacked(x):
        return model(torch.cat([x, x.flip(-1)]))

    def two(x):
        return model(x), model(x.flip(-1))

    def plain(x):
        return model(x)

    with torch.inference_mode():
        for x in images[:4]:
            stacked(x), two(x)
    rows = []
    for label, before in (("plain inference (1 image)", plain), ("a stacked pass (2 images)", stacked),
                          ("two single passes", two), ("nothing (back to back)", None)):
        rows.append({"after": label,
                     "stacked_us": least_disturbed_us(before, stacked, images, rounds),
                     "two_single_us": least_disturbed_us(before, two, images, rounds)})
    return rows


def engine_steps(model, x: torch.Tensor, calls: int) -> dict[str, float]:
    """Each step of the engine's one-pass path for hflip, timed separately over ``calls`` calls
    (10th percentile, microseconds), in the order the engine runs them."""
    engine = ClassificationTTAWrapper(model, get_policy("hflip"), max_batch=256).engine
    for _ in range(20):
        engine(x)
    spent: dict[str, list[int]] = {}

    def tick(name: str, since: int) -> int:
        now = time.perf_counter_ns()
        spent.setdefault(name, []).append(now - since)
        return now

    for _ in range(calls):
        t = time.perf_counter_ns()
        with torch.inference_mode():
            t = tick("enter inference mode", t)
            views = [augment(x) for augment in engine._augment]
            t = tick("augment (flip)", t)
            batch = torch.cat(views)
            t = tick("stack the views (cat)", t)
            output = engine._forward(batch, ())
            t = tick("model", t)
            _sum_is_finite(output)
            t = tick("NaN/inf check (the pass)", t)
            stack = output.reshape(2, 1, *output.shape[1:])
            t = tick("view", t)
            acc = engine._template.fresh()
            acc.add_stack(stack, [0, 1])  # the mean, as the engine runs it
            t = tick("merge (mean)", t)
        t = tick("leave inference mode", t)
        acc.result()
        tick("merge's result", t)
    return {name: sorted(v)[len(v) // 10] / 1000 for name, v in spent.items()}


def markdown(results: dict[str, Any]) -> str:
    rep = results["repeats"]
    summary = []
    for order in ORDERS:
        ratios = [r["ttakit_over_ttach"] for r in rep if r["order"] == order]
        aa = [r["ttach_again_over_ttach"] for r in rep if r["order"] == order]
        if ratios:
            summary.append(f"- order `{order}`: ttakit/ttach median {statistics.median(ratios):.3f}, range "
                           f"{min(ratios):.3f}–{max(ratios):.3f}; A/A range {min(aa):.3f}–{max(aa):.3f}.")
    pred = {(r["call"], r["right after"]): r for r in results["predecessors"]}
    steps = results["steps"]
    step_rows = [{"step": name, "around a linear model (µs)": f"{steps['linear'][name]:.1f}",
                  "around the seed CNN (µs)": f"{steps['seed-cnn'][name]:.1f}",
                  "ratio": f"{steps['seed-cnn'][name] / steps['linear'][name]:.1f}"} for name in steps["linear"]]
    glue_linear = sum(v for k, v in steps["linear"].items() if k != "model")
    glue_cnn = sum(v for k, v in steps["seed-cnn"].items() if k != "model")
    return "\n".join([
        "# Where the time goes: seed CNN, batch 1, hflip",
        "",
        f"{results['date']}; {results['machine']['cpu_count']} CPU cores, torch {results['machine']['torch']}, "
        f"1 thread; load average at start {results['machine'].get('load_average_at_start')}; "
        "`python benchmarks/engine_profile.py`.",
        "",
        f"## 1. `engine.py` for this configuration in {len(rep) // len(ORDERS)} fresh processes per order of turns",
        "",
        "`shuffle`: the contenders take turns batch by batch in a random order (engine.py's order until "
        "2026-12-01); `after-itself`: the same, each timed call right after an untimed call of the same "
        "contender on the previous batch (engine.py's order now).",
        "",
        markdown_table([{"run": i // len(ORDERS) + 1, "order": r["order"], "ttakit/ttach": f"{r['ttakit_over_ttach']:.3f}",
                         "ttach/ttach (A/A)": f"{r['ttach_again_over_ttach']:.3f}", "pass": r["pass"]}
                        for i, r in enumerate(rep)]),
        "",
        *summary,
        "",
        "## 2. The forward passes alone (µs per call, each image's fastest of the rounds)",
        "",
        markdown_table([{"timed right after": r["after"], "one pass of 2 images (ttakit)": f"{r['stacked_us']:.0f}",
                         "two passes of 1 image (ttach)": f"{r['two_single_us']:.0f}"} for r in results["passes"]]),
        "",
        "## 3. The engine's steps, one by one (10th percentile of "
        f"{results['args']['calls']} calls, µs)",
        "",
        markdown_table(step_rows),
        "",
        f"Everything but the model: {glue_linear:.1f} µs around a linear model, {glue_cnn:.1f} µs around the seed CNN.",
        "",
        f"## 4. Each call by the call just before it ({results['args']['sequence']} calls in a random sequence, "
        "random test images, µs)",
        "",
        markdown_table([{"call": r["call"], "right after": r["right after"], "calls": r["calls"],
                         "10th percentile": f"{r['p10_us']:.0f}", "median": f"{r['median_us']:.0f}"}
                        for r in results["predecessors"]]),
        "",
        "Each contender right after itself, as a user's repeated calls run: ttakit/ttach "
        f"{pred[('ttakit', 'ttakit')]['p10_us'] / pred[('ttach', 'ttach')]['p10_us']:.3f} (10th percentiles). "
        "Right after plain inference, whose pass has the shapes of ttach's: "
        f"{pred[('ttakit', 'plain')]['p10_us'] / pred[('ttach', 'plain')]['p10_us']:.3f}. "
        "ttach right after ttach against right after ttakit: "
        f"{pred[('ttach', 'ttach')]['p10_us'] / pred[('ttach', 'ttakit')]['p10_us']:.3f}; ttakit right after "
        f"ttakit against right after ttach: {pred[('ttakit', 'ttakit')]['p10_us'] / pred[('ttakit', 'ttach')]['p10_us']:.3f}.",
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=6, help="fresh processes of engine.py's configuration")
    parser.add_argument("--rounds", type=int, default=10, help="rounds of the pass timings")
    parser.add_argument("--calls", type=int, default=3000, help="calls of the step timings")
    parser.add_argument("--sequence", type=int, default=4000, help="calls of the random sequence (measurement 4)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    device = torch.device("cpu")
    info = machine_info(device)
    print(f"1. engine.py in {args.repeats} fresh processes per order of turns", flush=True)
    rep = repeats(args.repeats)
    images = [x[None] for x in load_test_images(32, device)]
    cnn = make_model("seed-cnn", device)
    print("2. forward passes in context", flush=True)
    passes = passes_in_context(cnn, images, args.rounds)
    print("3. engine steps", flush=True)
    torch.manual_seed(0)
    linear = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10)).eval()
    steps = {"linear": engine_steps(linear, images[0], args.calls), "seed-cnn": engine_steps(cnn, images[0], args.calls)}
    print("4. each call by the call before it", flush=True)
    predecessors = by_predecessor(cnn, images, args.sequence)
    results = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": info,
               "args": vars(args), "repeats": rep, "passes": passes, "steps": steps, "predecessors": predecessors,
               "seconds": time.perf_counter() - started}
    RESULTS.mkdir(parents=True, exist_ok=True)
    save_results(RESULTS / "engine-profile.json", results)
    text = markdown(results)
    atomic_write_text(RESULTS / "engine-profile.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
