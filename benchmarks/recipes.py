"""From baseline to strong model: the practitioner's training recipe against the 3-epoch Adam
baseline, transfer from our own weights, and the learning-rate finder, with TTA on top.

Three parts, side by side in one run on Fashion-MNIST (``python benchmarks/recipes.py``):

1. **Recipe vs baseline at equal wall time.** The baseline is the classic experiment's seed CNN:
   Adam at 1e-3, constant rate, 3 epochs. The recipe trains the same network for the same
   number of steps with the rate from ``lr-find`` (minimum/10), a one-cycle schedule and label
   smoothing 0.1; its sweep runs once and its time is reported. Progressive resizing needs a
   size-agnostic architecture and the seed CNN is not one (part 3 measures what it saves on
   resnet20). Baseline and recipe train in turns per seed (interleaved), so a busy moment on
   the shared machine hits both alike. Test accuracy and NLL are mean ± std over the seeds;
   then the TTA policy searched on the validation split (``ttakit.search.search_policy``) is
   evaluated on the test images on top of each model.
2. **Transfer.** Pretrain the seed CNN on Fashion-MNIST classes 0-4 (all their training
   images), then learn classes 5-9 from 100 labelled images per class: (a) from scratch,
   (b) from the pretrained body with a new head (``init``), the head alone first
   (``freeze_epochs``), then everything with discriminative rates (``lr_slice``), both at a
   short (4 epochs) and a long (15 epochs) budget. Scored on the test images of classes 5-9,
   with the searched TTA on top (searched on 50 held-out validation images per class).
3. The lr-find curves and suggestions of the seed CNN and resnet20 (PNGs), and the cost per
   training step of resnet20 at 14x14 against 28x28 (what progressive resizing saves).

Writes ``benchmarks/results/recipes.md``/``.json`` and ``recipes_lr_find_*.png``
(``recipes-quick.*`` with ``--quick``, a few minutes on a subset).
"""

from __future__ import annotations

import argparse
import datetime as dt
import inspect
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from common import machine_info, save_results  # noqa: E402
from ttakit.data import ImageDataset, load_fashion_mnist, train_val_split  # noqa: E402
from ttakit.evaluate import evaluate_policies  # noqa: E402
from ttakit.lr_find import lr_find, plot_lr_find  # noqa: E402
from ttakit.models import save_checkpoint  # noqa: E402
from ttakit.search import search_policy  # noqa: E402
from ttakit.train import TrainConfig, build_model, resize_images, train_model  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


# --------------------------------------------------------------------------- helpers


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def mean_std(values: list[float]) -> tuple[float, float]:
    if len(values) == 1:
        return values[0], 0.0
    return statistics.mean(values), statistics.stdev(values)


def fmt(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    mean, std = mean_std([v * scale for v in values])
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def markdown(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def terminal(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [headers, *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))  # noqa: E731
    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths), *(line(r) for r in cells[1:])])


def classes_subset(ds: ImageDataset, keep: list[int], per_class: int | None = None, offset: int = 0) -> ImageDataset:
    """Images of the classes ``keep`` (relabelled 0..len(keep)-1), the first ``per_class`` of each
    after skipping ``offset``."""
    index = []
    for cls in keep:
        members = torch.nonzero(ds.labels == cls).flatten()
        index.append(members[offset : offset + per_class] if per_class is not None else members)
    index_t = torch.cat(index).sort().values
    mapping = torch.full((len(ds.classes),), -1, dtype=torch.long)
    mapping[torch.tensor(keep)] = torch.arange(len(keep))
    return ImageDataset(ds.images[index_t], mapping[ds.labels[index_t]], [ds.classes[c] for c in keep], name=f"{ds.name}{keep}")


def plain_and_tta(model, meta, val: ImageDataset, test: ImageDataset, budget: int, progress: bool) -> dict[str, Any]:
    """Plain test scores, then the policy searched on ``val`` evaluated on ``test``."""
    started = time.perf_counter()
    data = (val.images, val.labels) if "labels" in inspect.signature(search_policy).parameters else (val,)
    searched = search_policy(model, *data, train_augmentations=meta.train_augmentations, budget=budget, progress=False)
    search_seconds = time.perf_counter() - started
    plain, tta = evaluate_policies(model, test, [searched.policy], progress=False)[:2]
    return {
        "plain_accuracy": plain.metrics["accuracy"],
        "plain_nll": plain.metrics["nll"],
        "tta_accuracy": tta.metrics["accuracy"],
        "tta_nll": tta.metrics["nll"],
        "tta_views": searched.policy.view_names,
        "tta_temperature": searched.policy.temperature,
        "tta_lift_accuracy": tta.lift["accuracy"],
        "tta_mcnemar_p": tta.lift["mcnemar_p"],
        "search_seconds": search_seconds,
    }


def timed_train(train: ImageDataset, config: TrainConfig, arch: str = "seed-cnn", val=None):
    started = time.perf_counter()
    result = train_model(train, config, arch=arch, val_ds=val, progress=False)
    return result, time.perf_counter() - started


# --------------------------------------------------------------------------- part 1


def part_recipe(args, train, val, test) -> dict[str, Any]:
    log(f"part 1: lr-find for the recipe on {len(train)} images")
    recipe_base = TrainConfig(epochs=args.epochs, batch_size=128, schedule="onecycle", label_smoothing=0.1)
    started = time.perf_counter()
    found = lr_find(train, arch="seed-cnn", config=recipe_base, num_steps=args.lr_find_steps, progress=False)
    lr_find_seconds = time.perf_counter() - started
    plot = plot_lr_find(found, RESULTS / f"recipes{args.suffix}_lr_find_seed-cnn.png", title="lr-find: seed-cnn, Fashion-MNIST (recipe: Adam, label smoothing 0.1)")
    log(f"  {found.summary()} in {lr_find_seconds:.0f} s")

    contenders = {
        "baseline": lambda seed: TrainConfig(epochs=args.epochs, batch_size=128, lr=1e-3, seed=seed),
        "recipe": lambda seed: TrainConfig(
            epochs=args.epochs, batch_size=128, lr=found.suggestion, schedule="onecycle", label_smoothing=0.1, seed=seed
        ),
    }
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in contenders}
    for i, seed in enumerate(range(args.seeds)):
        order = list(contenders) if i % 2 == 0 else list(reversed(contenders))  # alternate who goes first
        for name in order:
            log(f"  seed {seed}: training {name}")
            result, seconds = timed_train(train, contenders[name](seed))
            scores = plain_and_tta(result.model, result.meta, val, test, args.budget, False)
            scores.update(seed=seed, train_seconds=seconds)
            runs[name].append(scores)
            log(
                f"    {name}: {seconds:.0f} s, test acc {scores['plain_accuracy']:.4f} NLL {scores['plain_nll']:.4f}; "
                f"TTA ({len(scores['tta_views'])} views) acc {scores['tta_accuracy']:.4f} NLL {scores['tta_nll']:.4f}"
            )
    return {
        "lr_find": found.to_json(curve=False) | {"seconds": lr_find_seconds, "plot": plot.name},
        "recipe": {"lr": found.suggestion, "schedule": "onecycle", "label_smoothing": 0.1, "optimizer": "adam", "epochs": args.epochs},
        "baseline": {"lr": 1e-3, "schedule": "constant", "optimizer": "adam", "epochs": args.epochs},
        "runs": runs,
    }


# --------------------------------------------------------------------------- part 2


def part_transfer(args, full_train, val_full, test_full) -> dict[str, Any]:
    source = classes_subset(full_train, [0, 1, 2, 3, 4], per_class=args.pretrain_per_class)
    target = [5, 6, 7, 8, 9]
    few = classes_subset(full_train, target, per_class=args.shots)
    val = classes_subset(val_full, target, per_class=args.transfer_val_per_class)
    test = classes_subset(test_full, target)
    log(f"part 2: pretraining on classes 0-4 ({len(source)} images, {args.pretrain_epochs} epoch(s))")
    pre_config = TrainConfig(epochs=args.pretrain_epochs, batch_size=128, lr=3e-3, schedule="onecycle", seed=0)
    pre, pre_seconds = timed_train(source, pre_config)
    pre_dir = save_checkpoint(args.work / "pretrained-0-4", pre.model, pre.meta)
    log(f"  pretrained in {pre_seconds:.0f} s")

    lr_slice = (3e-4, 3e-3)
    contenders = {}
    for epochs, freeze in args.transfer_budgets:  # (epochs, of which the head alone)
        contenders[f"scratch-{epochs}"] = (epochs, 0, False)
        contenders[f"pretrained-{epochs}"] = (epochs, freeze, True)

    def config(epochs: int, freeze: int, pretrained: bool, seed: int) -> TrainConfig:
        if not pretrained:
            return TrainConfig(epochs=epochs, batch_size=32, lr=3e-3, schedule="onecycle", seed=seed)
        return TrainConfig(
            epochs=epochs, batch_size=32, lr=3e-3, schedule="onecycle", seed=seed,
            init=str(pre_dir), freeze_epochs=freeze, lr_slice=lr_slice,
        )

    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in contenders}
    init_summary = ""
    for seed in range(args.seeds):
        for name, (epochs, freeze, pretrained) in contenders.items():
            result, seconds = timed_train(few, config(epochs, freeze, pretrained, seed))
            if result.init_report is not None:
                init_summary = result.init_report.summary()
            scores = plain_and_tta(result.model, result.meta, val, test, args.budget, False)
            scores.update(seed=seed, train_seconds=seconds)
            runs[name].append(scores)
            log(f"  seed {seed} {name}: test acc {scores['plain_accuracy']:.4f}, TTA {scores['tta_accuracy']:.4f} ({seconds:.0f} s)")
    return {
        "pretrain": {"images": len(source), "epochs": args.pretrain_epochs, "seconds": pre_seconds, "lr": 3e-3},
        "few_shot": {"images": len(few), "per_class": args.shots, "val_images": len(val), "test_images": len(test)},
        "budgets": [list(b) for b in args.transfer_budgets],
        "scratch": {"lr": 3e-3, "schedule": "onecycle", "batch_size": 32},
        "pretrained": {"head_lr": 3e-3, "lr_slice": list(lr_slice), "schedule": "onecycle (restarted at unfreeze)"},
        "init_report": init_summary,
        "runs": runs,
    }


# --------------------------------------------------------------------------- part 3


def part_lr_find_and_resizing(args, train) -> dict[str, Any]:
    log("part 3: lr-find on resnet20")
    config = TrainConfig(batch_size=64)
    started = time.perf_counter()
    found = lr_find(train, arch="resnet20", config=config, num_steps=args.resnet_lr_find_steps, progress=False)
    seconds = time.perf_counter() - started
    plot = plot_lr_find(found, RESULTS / f"recipes{args.suffix}_lr_find_resnet20.png", title="lr-find: resnet20, Fashion-MNIST (Adam, batch 64)")
    log(f"  {found.summary()} in {seconds:.0f} s")

    log("  resnet20: seconds per training step at 14x14 and 28x28")
    model, _ = build_model(train, TrainConfig(batch_size=64), "resnet20")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batch = train.images[:64]
    labels = train.labels[:64]
    step_seconds: dict[str, list[float]] = {"14": [], "28": []}
    sizes = {"14": resize_images(batch, 14), "28": batch}
    model.train()
    for i in range(args.resize_steps + 1):
        for size in (("14", "28") if i % 2 == 0 else ("28", "14")):  # in turns
            started = time.perf_counter()
            loss = F.cross_entropy(model(sizes[size]), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if i > 0:  # the first round warms up
                step_seconds[size].append(time.perf_counter() - started)
    median = {k: statistics.median(v) for k, v in step_seconds.items()}
    return {
        "resnet20_lr_find": found.to_json(curve=False) | {"seconds": seconds, "plot": plot.name},
        "resnet20_step_seconds": median,
        "resize_speedup": median["28"] / median["14"],
    }


# --------------------------------------------------------------------------- report


def summarize(results: dict[str, Any]) -> tuple[str, str]:
    p1, p2, p3 = results["recipe"], results["transfer"], results["lr_find"]
    rows = []
    base_time = statistics.mean(r["train_seconds"] for r in p1["runs"]["baseline"])
    for name, label in (("baseline", "baseline: Adam 1e-3, constant"), ("recipe", f"recipe: lr-find {p1['recipe']['lr']:.2g}, one-cycle, label smoothing 0.1")):
        runs = p1["runs"][name]
        t = statistics.mean(r["train_seconds"] for r in runs)
        rows.append([
            label,
            fmt([r["plain_accuracy"] for r in runs], 100),
            fmt([r["plain_nll"] for r in runs], 1, 4),
            fmt([r["tta_accuracy"] for r in runs], 100),
            fmt([r["tta_nll"] for r in runs], 1, 4),
            fmt([r["tta_accuracy"] - r["plain_accuracy"] for r in runs], 100),
            f"{t:.0f} s ({t / base_time:.2f}x)",
        ])
    headers1 = ["model (seed CNN, 3 epochs)", "test acc %", "test NLL", "+ searched TTA acc %", "+ TTA NLL", "TTA lift (pts)", "train time"]
    rows2 = []
    for epochs, freeze in p2["budgets"]:
        for name, label in (
            (f"scratch-{epochs}", f"(a) from scratch, {epochs} epochs"),
            (f"pretrained-{epochs}", f"(b) pretrained body + new head: {freeze} frozen + {epochs - freeze} sliced epochs"),
        ):
            runs = p2["runs"][name]
            rows2.append([
                label,
                fmt([r["plain_accuracy"] for r in runs], 100),
                fmt([r["plain_nll"] for r in runs], 1, 4),
                fmt([r["tta_accuracy"] for r in runs], 100),
                fmt([r["tta_nll"] for r in runs], 1, 4),
            ])
    headers2 = ["classes 5-9 from 100 images/class", "test acc %", "test NLL", "+ searched TTA acc %", "+ TTA NLL"]
    lf = p1["lr_find"]
    rf = p3["resnet20_lr_find"]
    rows3 = [
        ["seed-cnn (Adam, batch 128, label smoothing 0.1)", f"{lf['steepest']:.1e}", f"{lf['min10']:.1e}", lf["steps"], lf["stopped"], f"{lf['seconds']:.0f} s"],
        ["resnet20 (Adam, batch 64)", f"{rf['steepest']:.1e}", f"{rf['min10']:.1e}", rf["steps"], rf["stopped"], f"{rf['seconds']:.0f} s"],
    ]
    headers3 = ["lr-find", "steepest descent", "minimum/10", "steps", "stopped", "time"]
    seeds = len(p1["runs"]["baseline"])
    m = results["meta"]
    intro = [
        f"# From baseline to strong model ({'quick' if m['quick'] else 'full'} run)",
        "",
        f"Measured {m['date']} on {m['machine']['cpu_count']} CPU cores shared with six other jobs "
        f"(load average {m['machine'].get('load_average_at_start')} at the start), torch {m['machine']['torch']}, "
        f"{m['machine']['torch_threads']} torch thread(s). Fashion-MNIST: {m['train_images']} training images "
        f"(of the 54,000 left after the 10 % validation split), {m['val_images']} validation images for the TTA search, "
        f"{m['test_images']} test images. Mean ± std over {seeds} seed(s). `python benchmarks/recipes.py{' --quick' if m['quick'] else ''}`, {m['total_seconds'] / 60:.0f} min.",
        "",
        "## 1. Recipe against the baseline at equal wall time",
        "",
        markdown(headers1, rows1 := rows),
        "",
        f"Same network, same data, same number of optimizer steps, trained in turns per seed (interleaved) "
        f"so machine contention hits both alike; the recipe's one lr-find sweep ({lf['steps']} steps, "
        f"{lf['seconds']:.0f} s) comes on top, once. The TTA policy is searched on the validation split "
        f"(budget {m['budget']} views, temperature fitted there) and scored on the test images.",
        "",
        "## 2. Transfer from our own weights",
        "",
        markdown(headers2, rows2),
        "",
        f"Pretrained on classes 0-4 ({p2['pretrain']['images']} images, {p2['pretrain']['epochs']} epoch(s), "
        f"{p2['pretrain']['seconds']:.0f} s). Classes 5-9: {p2['few_shot']['images']} training images, "
        f"{p2['few_shot']['val_images']} validation images for the search, {p2['few_shot']['test_images']} test images. "
        f"(a) and (b) train for the same epochs (one-cycle, peak 3e-3, batch 32); (b) starts from the pretrained convolutions, "
        f"trains the new head (the dense layers) alone first, then everything with rates from "
        f"{p2['pretrained']['lr_slice'][0]:g} (first conv block) to {p2['pretrained']['lr_slice'][1]:g} (head). "
        f"`--init` reported: {p2['init_report']}.",
        "",
        "## 3. lr-find and progressive resizing",
        "",
        markdown(headers3, rows3),
        "",
        f"![seed-cnn]({lf['plot']}) ![resnet20]({rf['plot']})",
        "",
        f"resnet20 training step (batch 64): {p3['resnet20_step_seconds']['14'] * 1000:.0f} ms at 14x14, "
        f"{p3['resnet20_step_seconds']['28'] * 1000:.0f} ms at 28x28: a 14x14 epoch costs {1 / p3['resize_speedup']:.2f} of a full-size one "
        f"(median of {m['resize_steps']} steps each, in turns).",
    ]
    del rows1
    console = "\n\n".join([
        terminal(headers1, rows),
        terminal(headers2, rows2),
        terminal(headers3, rows3),
    ])
    return "\n".join(intro) + "\n", console


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a subset: a few minutes")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--train-images", type=int, default=None, help="training images for part 1 (default 10000; quick 2000)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/ttakit-recipes"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    quick = args.quick
    args.suffix = "-quick" if quick else ""
    args.seeds = args.seeds or (1 if quick else 3)
    args.train_images = args.train_images or (2000 if quick else 10000)
    args.epochs = 3
    args.budget = 4
    args.lr_find_steps = 40 if quick else 80
    args.resnet_lr_find_steps = 20 if quick else 60
    args.resize_steps = 3 if quick else 8
    args.pretrain_per_class = 400 if quick else None
    args.pretrain_epochs = 1
    args.shots = 100
    args.transfer_val_per_class = 50
    args.transfer_budgets = [(4, 1), (15, 5)] if not quick else [(4, 1), (12, 4)]
    val_images = 500 if quick else 1500
    test_images = 1000 if quick else 5000
    args.work.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    full = load_fashion_mnist("train")
    train_all, val_all = train_val_split(full, 0.1, seed=0)
    test_all = load_fashion_mnist("test")
    train = train_all.head(args.train_images)
    val = val_all.subset(torch.randperm(len(val_all), generator=torch.Generator().manual_seed(1))[:val_images])
    test = test_all.head(test_images)
    transfer_test = test_all if not quick else test_all.head(2000)

    results: dict[str, Any] = {
        "meta": {
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine_info(torch.device("cpu")),
            "quick": quick,
            "train_images": len(train),
            "val_images": len(val),
            "test_images": len(test),
            "budget": args.budget,
            "resize_steps": args.resize_steps,
            "note": "2 CPU cores shared with six other helpers' jobs: absolute times are inflated and noisy; "
            "baseline and recipe train in turns per seed so contention hits both alike.",
        }
    }
    results["recipe"] = part_recipe(args, train, val, test)
    results["transfer"] = part_transfer(args, train_all, val_all, transfer_test)
    results["lr_find"] = part_lr_find_and_resizing(args, train)
    results["meta"]["total_seconds"] = time.perf_counter() - started
    md, console = summarize(results)
    name = f"recipes{args.suffix}"
    save_results(RESULTS / f"{name}.json", results)
    from ttakit._io import atomic_write_text

    atomic_write_text(RESULTS / f"{name}.md", md)
    print()
    print(console)
    print(f"\nwritten: {RESULTS / (name + '.md')}, {name}.json and the lr-find PNGs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
