"""From baseline to strong model: the practitioner's training recipe against the 3-epoch Adam
baseline, progressive resizing, transfer from our own weights, and the learning-rate finder,
with TTA on top.

Four parts, side by side in one run on Fashion-MNIST (``python benchmarks/recipes.py``):

1. **Recipe vs baseline at equal wall time**, with the TTA policy searched on the validation
   split (``ttakit.search.search_policy``) evaluated on the test images on top of each model;
   test accuracy and NLL are mean ± std over the seeds, contenders train in turns per seed
   (their order rotating), so a busy moment on the shared machine hits them alike.

   a. The classic experiment's seed CNN: Adam at 1e-3, constant rate, 3 epochs, against the
      recipe on the same network for the same steps: the rate from ``lr-find`` (minimum/10),
      one-cycle, label smoothing 0.1. Its sweep runs once and its time is reported.
   b. (part 4 in the code) Progressive resizing needs a size-agnostic network, which the seed
      CNN is not, so the same race runs on ``seed-cnn-gap`` (the seed CNN with a third conv
      block and global average pooling) with a third contender: the recipe trained
      progressively, 14x14 epochs first, then 28x28, with as many 14x14 epochs as the measured
      cost of a 14x14 step buys within the baseline's 3-epoch budget.
2. **Transfer.** Pretrain the seed CNN on Fashion-MNIST classes 0-4 (all their training
   images, several epochs), then learn classes 5-9 from 100 labelled images per class:
   (a) from scratch, (b) from every pretrained tensor but the classifier (``init``), the head
   group alone first (``freeze_epochs``), then everything with discriminative rates
   (``lr_slice``), at a short and a long budget, both arms with the same epochs and
   augmentation. Hyper-parameters (``TRANSFER``) were chosen on validation images by
   ``benchmarks/recipes_transfer_tuning.py``. Scored on the test images of classes 5-9, with
   the searched TTA on top (searched on 50 held-out validation images per class).
3. The lr-find curves and suggestions of the seed CNN, seed-cnn-gap and resnet20 (PNGs), and
   the cost per training step of resnet20 at 14x14 against 28x28.

Writes ``benchmarks/results/recipes.md``/``.json``/``.png`` and ``recipes_lr_find_*.png``
(``recipes-quick.*`` with ``--quick``, a few minutes on a subset).
"""

from __future__ import annotations

import argparse
import datetime as dt
import inspect
import json
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
from ttakit.jobs._policy_eval import evaluate_policies  # noqa: E402
from ttakit.models import save_checkpoint  # noqa: E402
from ttakit.report.plots import plot_lr_find  # noqa: E402
from ttakit.search import search_policy  # noqa: E402
from ttakit.training.build import build_model  # noqa: E402
from ttakit.training.config import TrainConfig  # noqa: E402
from ttakit.training.loop import train_model  # noqa: E402
from ttakit.training.lr_find import lr_find  # noqa: E402
from ttakit.training.resize import resize_images  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"

# Transfer hyper-parameters, chosen on the classes 5-9 VALIDATION images (never the test
# images) by benchmarks/recipes_transfer_tuning.py (results/recipes-transfer-tuning.md).
# Both arms get the same augmentation, batch size and epochs.
TRANSFER: dict[str, Any] = {
    "arch": "seed-cnn",
    "augment": ("flip", "shift"),
    "pretrain_lr": 3e-3,
    "batch_size": 32,
    "scratch_lr": 1e-2,
    "head_lr": 3e-3,
    "lr_slice": (3e-4, 3e-3),
}
TRANSFER_BUDGETS = [(5, 1), (15, 1)]  # (epochs, of which the head alone)
PART_TITLES = {"recipe": "1a (seed CNN race)", "progressive": "1b (progressive race)", "transfer": "2 (transfer)", "lr_find": "3 (resnet20 lr-find and step cost)"}
HEAD_GROUP = {"seed-cnn": "Dense128, its BatchNorm and the new classifier", "resnet20": "the new classifier"}


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


def step_seconds(train: ImageDataset, arch: str, batch_size: int, steps: int) -> dict[str, float]:
    """Median seconds of one Adam training step of ``arch`` at 14x14 and at 28x28 (batch
    ``batch_size``), the two sizes taking turns step by step after one warm-up round."""
    model, _ = build_model(train, TrainConfig(batch_size=batch_size), arch)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batch, labels = train.images[:batch_size], train.labels[:batch_size]
    sizes = {"14": resize_images(batch, 14), "28": batch}
    seconds: dict[str, list[float]] = {"14": [], "28": []}
    model.train()
    for i in range(steps + 1):
        for size in (("14", "28") if i % 2 == 0 else ("28", "14")):  # in turns
            started = time.perf_counter()
            loss = F.cross_entropy(model(sizes[size]), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if i > 0:  # the first round warms up
                seconds[size].append(time.perf_counter() - started)
    return {k: statistics.median(v) for k, v in seconds.items()}


# --------------------------------------------------------------------------- part 1


def part_recipe(args, train, val, test) -> dict[str, Any]:
    log(f"part 1: lr-find for the recipe on {len(train)} images")
    recipe_base = TrainConfig(epochs=args.epochs, batch_size=128, schedule="onecycle", label_smoothing=0.1)
    started = time.perf_counter()
    found = lr_find(train, arch="seed-cnn", config=recipe_base, num_steps=args.lr_find_steps, progress=False)
    lr_find_seconds = time.perf_counter() - started
    plot = plot_lr_find(found, RESULTS / f"recipes{args.suffix}_lr_find_seed-cnn.png", title="lr-find: seed-cnn (Adam, label smoothing 0.1)")
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
    hp = TRANSFER
    log(f"part 2: pretraining {hp['arch']} on classes 0-4 ({len(source)} images, {args.pretrain_epochs} epoch(s))")
    pre_config = TrainConfig(
        epochs=args.pretrain_epochs, batch_size=128, lr=hp["pretrain_lr"], schedule="onecycle", augment=hp["augment"], seed=0
    )
    pre, pre_seconds = timed_train(source, pre_config, arch=hp["arch"])
    pre_dir = save_checkpoint(args.work / "pretrained-0-4", pre.model, pre.meta)
    log(f"  pretrained in {pre_seconds:.0f} s (train accuracy {pre.history[-1]['train_acc']:.4f})")

    contenders = {}
    for epochs, freeze in args.transfer_budgets:  # (epochs, of which the head alone)
        contenders[f"scratch-{epochs}"] = (epochs, 0, False)
        contenders[f"pretrained-{epochs}"] = (epochs, freeze, True)

    def config(epochs: int, freeze: int, pretrained: bool, seed: int) -> TrainConfig:
        common = dict(epochs=epochs, batch_size=hp["batch_size"], schedule="onecycle", augment=hp["augment"], seed=seed)
        if not pretrained:
            return TrainConfig(lr=hp["scratch_lr"], **common)
        return TrainConfig(
            lr=hp["head_lr"], init=str(pre_dir), freeze_epochs=freeze, lr_slice=hp["lr_slice"], **common
        )

    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in contenders}
    init_summary = ""
    for seed in range(args.seeds):
        for name, (epochs, freeze, pretrained) in contenders.items():
            result, seconds = timed_train(few, config(epochs, freeze, pretrained, seed), arch=hp["arch"])
            if result.init_report is not None:
                init_summary = result.init_report.summary()
            scores = plain_and_tta(result.model, result.meta, val, test, args.budget, False)
            scores.update(seed=seed, train_seconds=seconds)
            runs[name].append(scores)
            log(f"  seed {seed} {name}: test acc {scores['plain_accuracy']:.4f}, TTA {scores['tta_accuracy']:.4f} ({seconds:.0f} s)")
    return {
        "pretrain": {
            "arch": hp["arch"], "images": len(source), "epochs": args.pretrain_epochs, "seconds": pre_seconds, "lr": hp["pretrain_lr"],
            "augment": list(hp["augment"]), "train_acc": pre.history[-1]["train_acc"],
        },
        "few_shot": {"images": len(few), "per_class": args.shots, "val_images": len(val), "test_images": len(test)},
        "budgets": [list(b) for b in args.transfer_budgets],
        "hyper_parameters": {k: list(v) if isinstance(v, tuple) else v for k, v in hp.items()},
        "scratch": {"lr": hp["scratch_lr"], "schedule": "onecycle", "batch_size": hp["batch_size"]},
        "pretrained": {"head_lr": hp["head_lr"], "lr_slice": list(hp["lr_slice"]), "schedule": "onecycle (restarted at unfreeze)"},
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
    median = step_seconds(train, "resnet20", 64, args.resize_steps)
    return {
        "resnet20_lr_find": found.to_json(curve=False) | {"seconds": seconds, "plot": plot.name},
        "resnet20_step_seconds": median,
        "resize_speedup": median["28"] / median["14"],
    }


# --------------------------------------------------------------------------- part 4


def progressive_sizes(ratio: float, full_epochs: int = 3, last_full: int = 2) -> tuple[int, ...]:
    """The sizes of a progressive run that costs ``full_epochs`` full-size epochs: ``last_full``
    epochs at 28x28 at the end, and before them as many 14x14 epochs as the rest of the budget
    buys (a 14x14 step costs ``ratio`` of a 28x28 one).

    Example:
        >>> progressive_sizes(0.25)
        (14, 14, 14, 14, 28, 28)
    """
    small = max(1, round((full_epochs - last_full) / ratio))
    return (14,) * small + (28,) * last_full


def part_progressive(args, train, val, test) -> dict[str, Any]:
    arch = args.race_arch
    log(f"part 4: progressive resizing in the race, {arch} on {len(train)} images")
    cost = step_seconds(train, arch, 128, args.resize_steps)
    ratio = cost["14"] / cost["28"]
    sizes = progressive_sizes(ratio, args.epochs)
    log(f"  {arch} step: {cost['14'] * 1000:.0f} ms at 14x14, {cost['28'] * 1000:.0f} ms at 28x28 (ratio {ratio:.2f}): "
        f"progressive run {','.join(map(str, sizes))}")
    recipe_base = TrainConfig(epochs=args.epochs, batch_size=128, schedule="onecycle", label_smoothing=0.1)
    started = time.perf_counter()
    found = lr_find(train, arch=arch, config=recipe_base, num_steps=args.lr_find_steps, progress=False)
    lr_find_seconds = time.perf_counter() - started
    plot = plot_lr_find(found, RESULTS / f"recipes{args.suffix}_lr_find_{arch}.png", title=f"lr-find: {arch} (Adam, label smoothing 0.1)")
    log(f"  {found.summary()} in {lr_find_seconds:.0f} s")
    recipe = dict(batch_size=128, lr=found.suggestion, schedule="onecycle", label_smoothing=0.1)
    contenders = {
        "baseline": lambda seed: TrainConfig(epochs=args.epochs, batch_size=128, lr=1e-3, seed=seed),
        "recipe": lambda seed: TrainConfig(epochs=args.epochs, seed=seed, **recipe),
        "recipe+progressive": lambda seed: TrainConfig(epochs=len(sizes), progressive=sizes, seed=seed, **recipe),
    }
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in contenders}
    names = list(contenders)
    for seed in range(args.seeds):
        order = names[seed % len(names):] + names[: seed % len(names)]  # rotate who goes first
        for name in order:
            log(f"  seed {seed}: training {name}")
            result, seconds = timed_train(train, contenders[name](seed), arch=arch)
            scores = plain_and_tta(result.model, result.meta, val, test, args.budget, False)
            scores.update(seed=seed, train_seconds=seconds, epochs=len(result.history))
            runs[name].append(scores)
            log(
                f"    {name}: {seconds:.0f} s, test acc {scores['plain_accuracy']:.4f} NLL {scores['plain_nll']:.4f}; "
                f"TTA ({len(scores['tta_views'])} views) acc {scores['tta_accuracy']:.4f} NLL {scores['tta_nll']:.4f}"
            )
    return {
        "arch": arch,
        "step_seconds": cost,
        "step_ratio": ratio,
        "progressive_sizes": list(sizes),
        "lr_find": found.to_json(curve=False) | {"seconds": lr_find_seconds, "plot": plot.name},
        "recipe": {"lr": found.suggestion, "schedule": "onecycle", "label_smoothing": 0.1, "optimizer": "adam", "epochs": args.epochs},
        "runs": runs,
    }


# --------------------------------------------------------------------------- report


def plot_summary(results: dict[str, Any], path: Path) -> Path:
    """Three panels: each race's runs as test accuracy against training time (one marker per
    seed, the searched TTA as a hollow marker), and transfer (a) against (b) per budget."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13.5, 4.4), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    races = (
        (axes[0], results["recipe"], "1a. seed CNN, same steps"),
        (axes[1], results["progressive"], f"1b. {results['progressive']['arch']}, same wall time"),
    )
    for ax, part, title in races:
        for i, (name, runs) in enumerate(part["runs"].items()):
            t = [r["train_seconds"] for r in runs]
            ax.scatter(t, [r["plain_accuracy"] * 100 for r in runs], color=f"C{i}", label=name, s=36)
            ax.scatter(t, [r["tta_accuracy"] * 100 for r in runs], facecolors="none", edgecolors=f"C{i}", s=70)
        ax.set_xlabel("training time per run (s)")
        ax.set_ylabel("test accuracy % (hollow: + searched TTA)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.margins(0.2)
        ax.legend(fontsize=8, loc="best")
    ax = axes[2]
    p2 = results["transfer"]
    labels, width = [], 0.38
    for j, (epochs, _) in enumerate(p2["budgets"]):
        for k, (arm, name) in enumerate((("scratch", "(a) from scratch"), ("pretrained", "(b) pretrained, new classifier"))):
            accs = [r["plain_accuracy"] * 100 for r in p2["runs"][f"{arm}-{epochs}"]]
            mean, std = mean_std(accs)
            x = j + (k - 0.5) * width
            ax.bar(x, mean, width, yerr=std, capsize=4, color=f"C{k}", label=name if j == 0 else None)
            ax.scatter([x] * len(accs), accs, color="black", s=10, zorder=3)
            ax.annotate(f"{mean:.2f}", (x, max(accs + [mean + std])), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
        labels.append(f"{epochs} epochs")
    every = [r["plain_accuracy"] * 100 for runs in p2["runs"].values() for r in runs]
    ax.set_ylim(min(every) - 1.5, max(every) + 1.8)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("test accuracy %, classes 5-9 (dots: seeds)")
    ax.set_title("2. transfer: 100 images per class")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path)
    return path


def race_rows(part: dict[str, Any], labels: dict[str, str]) -> list[list[Any]]:
    """One table row per contender: test accuracy/NLL, with the searched TTA, its lift, time."""
    base_time = statistics.mean(r["train_seconds"] for r in part["runs"]["baseline"])
    rows = []
    for name, label in labels.items():
        runs = part["runs"][name]
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
    return rows


def summarize(results: dict[str, Any]) -> tuple[str, str]:
    p1, p2, p3, p4 = results["recipe"], results["transfer"], results["lr_find"], results["progressive"]
    recipe_label = f"recipe: lr-find {p1['recipe']['lr']:.2g}, one-cycle, label smoothing 0.1"
    rows = race_rows(p1, {"baseline": "baseline: Adam 1e-3, constant", "recipe": recipe_label})
    headers1 = ["model (seed CNN, 3 epochs)", "test acc %", "test NLL", "+ searched TTA acc %", "+ TTA NLL", "TTA lift (pts)", "train time"]
    sizes = p4["progressive_sizes"]
    rows4 = race_rows(p4, {
        "baseline": "baseline: Adam 1e-3, constant, 3 epochs at 28",
        "recipe": f"recipe: lr-find {p4['recipe']['lr']:.2g}, one-cycle, label smoothing 0.1, 3 epochs at 28",
        "recipe+progressive": f"recipe + progressive: {sizes.count(14)} epochs at 14, then {sizes.count(28)} at 28",
    })
    headers4 = [f"model ({p4['arch']}, same wall time)", *headers1[1:]]
    rows2 = []
    for epochs, freeze in p2["budgets"]:
        scratch, pretrained = p2["runs"][f"scratch-{epochs}"], p2["runs"][f"pretrained-{epochs}"]
        for runs, label in (
            (scratch, f"(a) from scratch, {epochs} epochs"),
            (pretrained, f"(b) pretrained body + new classifier: {freeze} frozen + {epochs - freeze} sliced epochs"),
        ):
            rows2.append([
                label,
                fmt([r["plain_accuracy"] for r in runs], 100),
                fmt([r["plain_nll"] for r in runs], 1, 4),
                fmt([r["tta_accuracy"] for r in runs], 100),
                fmt([r["tta_nll"] for r in runs], 1, 4),
            ])
        rows2.append([
            f"**(b) - (a), {epochs} epochs** (paired by seed)",
            fmt([b["plain_accuracy"] - a["plain_accuracy"] for a, b in zip(scratch, pretrained, strict=True)], 100),
            fmt([b["plain_nll"] - a["plain_nll"] for a, b in zip(scratch, pretrained, strict=True)], 1, 4),
            fmt([b["tta_accuracy"] - a["tta_accuracy"] for a, b in zip(scratch, pretrained, strict=True)], 100),
            fmt([b["tta_nll"] - a["tta_nll"] for a, b in zip(scratch, pretrained, strict=True)], 1, 4),
        ])
    headers2 = [f"{p2['pretrain']['arch']}: classes 5-9 from 100 images/class", "test acc %", "test NLL", "+ searched TTA acc %", "+ TTA NLL"]
    lf, gf, rf = p1["lr_find"], p4["lr_find"], p3["resnet20_lr_find"]
    rows3 = [
        [f"{name} ({setting})", f"{f['steepest']:.1e}", f"{f['min10']:.1e}", f["steps"], f["stopped"], f"{f['seconds']:.0f} s"]
        for name, setting, f in (
            ("seed-cnn", "Adam, batch 128, label smoothing 0.1", lf),
            (p4["arch"], "Adam, batch 128, label smoothing 0.1", gf),
            ("resnet20", "Adam, batch 64", rf),
        )
    ]
    headers3 = ["lr-find", "steepest descent", "minimum/10", "steps", "stopped", "time"]
    seeds = len(p1["runs"]["baseline"])
    m = results["meta"]
    pre = p2["pretrain"]
    hp = p2["hyper_parameters"]
    intro = [
        f"# From baseline to strong model ({'quick' if m['quick'] else 'full'} run)",
        "",
        f"Measured {m['date']} on {m['machine']['cpu_count']} CPU cores shared with other jobs "
        f"(load average {m['machine'].get('load_average_at_start')} at the start), torch {m['machine']['torch']}, "
        f"{m['machine']['torch_threads']} torch thread(s). Fashion-MNIST: {m['train_images']} training images in race 1a and "
        f"{m.get('race_images', m['train_images'])} in race 1b (of the 54,000 left after the 10 % validation split), {m['val_images']} validation images for the TTA search, "
        f"{m['test_images']} test images. Mean ± std over {seeds} seed(s). "
        f"`python benchmarks/recipes.py{' --quick' if m['quick'] else ''}{m.get('argv', '')}`, {m['total_seconds'] / 60:.0f} min.",
        "",
        *(
            [
                "Parts measured by an earlier run of the same code and reused with `--resume` (the shared machine "
                "could not rerun every part in one go), by the time each finished: "
                + "; ".join(f"{PART_TITLES.get(k, k)} {when}" for k, when in m["resumed"].items())
                + f". The others ran from {m['date']} on.",
                "",
            ]
            if m.get("resumed") else []
        ),
        "## 1. Recipe against the baseline (1a: the same optimizer steps; 1b: the same wall time)",
        "",
        "### 1a. Seed CNN (fixed input size: no progressive resizing)",
        "",
        markdown(headers1, rows),
        "",
        f"Same network, same data, same number of optimizer steps, trained in turns per seed (interleaved) "
        f"so machine contention hits both alike; the recipe's one lr-find sweep ({lf['steps']} steps, "
        f"{lf['seconds']:.0f} s) comes on top, once. The TTA policy is searched on the validation split "
        f"(budget {m['budget']} views, temperature fitted there) and scored on the test images."
,
        "",
        f"### 1b. {p4['arch']} (global pooling) with progressive resizing",
        "",
        markdown(headers4, rows4),
        "",
        f"`{p4['arch']}` is the seed CNN with a third conv block and global average pooling in place of the "
        f"flatten, so it takes any image size. One training step (batch 128) took "
        f"{p4['step_seconds']['14'] * 1000:.0f} ms at 14x14 and {p4['step_seconds']['28'] * 1000:.0f} ms at 28x28 "
        f"(ratio {p4['step_ratio']:.2f}, measured in turns at the start), so the progressive run buys "
        f"{sizes.count(14)} epochs at 14x14 for the price of one at 28x28 and ends with {sizes.count(28)} at 28x28 "
        f"(`--progressive {','.join(map(str, sizes))}`, one one-cycle schedule over all {len(sizes)} epochs). "
        f"The train-time column checks that the budgets came out equal. Same data, contenders in rotating order per seed.",
        "",
        f"![races and transfer]({'recipes-quick' if m['quick'] else 'recipes'}.png)",
        "",
        "## 2. Transfer from our own weights",
        "",
        markdown(headers2, rows2),
        "",
        f"{pre['arch']} pretrained on classes 0-4 ({pre['images']} images, {pre['epochs']} epochs, one-cycle peak {pre['lr']:g}, "
        f"augmentation {'+'.join(pre['augment'])}, {pre['seconds']:.0f} s, final train accuracy {pre['train_acc'] * 100:.1f} %). "
        f"Classes 5-9: {p2['few_shot']['images']} training images, "
        f"{p2['few_shot']['val_images']} validation images for the TTA search, {p2['few_shot']['test_images']} test images. "
        f"(a) and (b) train for the same epochs with the same augmentation ({'+'.join(hp['augment'])}), one-cycle, "
        f"batch {hp['batch_size']}: (a) at peak {hp['scratch_lr']:g}; (b) loads every pretrained tensor but the classifier, "
        f"trains the head group ({HEAD_GROUP.get(pre['arch'], 'the last layer group')}) alone at {hp['head_lr']:g}, then every "
        f"layer group with rates from {hp['lr_slice'][0]:g} (first group) to {hp['lr_slice'][1]:g} (head). "
        f"The hyper-parameters were chosen on the classes 5-9 validation images "
        f"(`benchmarks/recipes_transfer_tuning.py`, `recipes-transfer-tuning.md`), never on the test images. "
        f"`--init` reported: {p2['init_report']}.",
        "",
        "## 3. lr-find and what a 14x14 step costs",
        "",
        markdown(headers3, rows3),
        "",
        f"![seed-cnn]({lf['plot']}) ![{p4['arch']}]({gf['plot']}) ![resnet20]({rf['plot']})",
        "",
        f"resnet20 training step (batch 64): {p3['resnet20_step_seconds']['14'] * 1000:.0f} ms at 14x14, "
        f"{p3['resnet20_step_seconds']['28'] * 1000:.0f} ms at 28x28: a 14x14 epoch costs {1 / p3['resize_speedup']:.2f} of a full-size one "
        f"(median of {m['resize_steps']} steps each, in turns).",
    ]
    console = "\n\n".join([
        terminal(headers1, rows),
        terminal(headers4, rows4),
        terminal(headers2, [[str(c).replace("**", "") for c in r] for r in rows2]),
        terminal(headers3, rows3),
    ])
    return "\n".join(intro) + "\n", console


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a subset: a few minutes")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--train-images", type=int, default=None, help="training images for the races, parts 1a and 1b (default 10000; quick 2000)")
    parser.add_argument("--race-images", type=int, default=None, help="training images for the progressive race, part 1b (default: --train-images)")
    parser.add_argument("--race-arch", default="seed-cnn-gap", help="the size-agnostic architecture of the progressive race (default seed-cnn-gap)")
    parser.add_argument("--pretrain-epochs", type=int, default=None, help="transfer: epochs on classes 0-4 (default 5; quick 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/ttakit-recipes"))
    parser.add_argument("--replot", action="store_true", help="only rewrite recipes[-quick].md and .png from the results JSON")
    parser.add_argument("--resume", action="store_true", help="reuse the parts a previous run with the same options finished (kept in --work)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    quick = args.quick
    args.suffix = "-quick" if quick else ""
    if args.replot:
        name = f"recipes{args.suffix}"
        results = json.loads((RESULTS / f"{name}.json").read_text())
        print(plot_summary(results, RESULTS / f"{name}.png"))
        from ttakit._io import atomic_write_text

        atomic_write_text(RESULTS / f"{name}.md", summarize(results)[0])
        return 0
    args.seeds = args.seeds or (1 if quick else 3)
    args.train_images = args.train_images or (2000 if quick else 10000)
    args.epochs = 3
    args.budget = 4
    args.lr_find_steps = 40 if quick else 80
    args.resnet_lr_find_steps = 20 if quick else 60
    args.resize_steps = 3 if quick else 8
    args.pretrain_per_class = 400 if quick else None
    args.pretrain_epochs = args.pretrain_epochs or (2 if quick else 5)
    args.shots = 100
    args.transfer_val_per_class = 50
    args.transfer_budgets = TRANSFER_BUDGETS
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
            "race_images": args.race_images or len(train),
            "val_images": len(val),
            "test_images": len(test),
            "budget": args.budget,
            "resize_steps": args.resize_steps,
            "argv": "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]) if a not in ("--quick", "--resume")),
            "note": "2 CPU cores shared with other helpers' jobs: absolute times are inflated and noisy; "
            "the contenders of each race train in turns per seed so contention hits them alike.",
        }
    }
    partial = args.work / f"recipes{args.suffix}-partial.json"  # each finished part, for --resume
    done = json.loads(partial.read_text()) if args.resume and partial.is_file() else {}
    if done and done.get("meta", {}).get("argv") != results["meta"]["argv"]:
        raise SystemExit(f"--resume: {partial} was written by another command line ({done['meta'].get('argv')!r})")
    before = done.get("meta", {}).get("total_seconds", 0.0)  # the resumed run's time counts too
    parts = (
        ("recipe", lambda: part_recipe(args, train, val, test)),
        ("transfer", lambda: part_transfer(args, train_all, val_all, transfer_test)),
        ("lr_find", lambda: part_lr_find_and_resizing(args, train)),
        ("progressive", lambda: part_progressive(args, train_all.head(args.race_images or len(train)), val, test)),
    )
    for key, run_part in parts:
        if key in done:
            log(f"{key}: resumed from {partial}")
            results[key] = done[key]
            results["meta"].setdefault("resumed", {})[key] = done.get("part_dates", {}).get(key, done["meta"].get("date"))
            continue
        results[key] = run_part()
        results.setdefault("part_dates", {})[key] = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        results["meta"]["total_seconds"] = before + time.perf_counter() - started
        save_results(partial, results)
    results["meta"]["total_seconds"] = before + time.perf_counter() - started
    md, console = summarize(results)
    name = f"recipes{args.suffix}"
    results["meta"]["plot"] = plot_summary(results, RESULTS / f"{name}.png").name
    save_results(RESULTS / f"{name}.json", results)
    from ttakit._io import atomic_write_text

    atomic_write_text(RESULTS / f"{name}.md", md)
    print()
    print(console)
    print(f"\nwritten: {RESULTS / (name + '.md')}, {name}.json and the lr-find PNGs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
