"""Label audit on Fashion-MNIST with known noise: do the flags find the flipped labels, does TTA
help, and does retraining on the cleaned data beat the model trained on the noisy labels?

``--images`` Fashion-MNIST training images (a seeded sample; default 20,000) get 5% of their
labels flipped to a random other class (seeded). K seed CNNs (3 epochs, train-time flips by
default), each trained on K-1 folds, score their held-out fold plainly and with the policy of
their training augmentations (``train-aug``: hflip for flip training). On those out-of-sample
probabilities each method flags images (:func:`ttakit.audit.flag_issues`): the practitioner's
rule (mislabelled: another class above 0.9; and with the ambiguous 0.5-0.6 band added) and
confident learning (cleanlab's ``find_label_issues``). Precision, recall and F1 of each flagged
set against the flipped set, plain and TTA.

Then one recipe (``--retrain-epochs``, default 30, cosine schedule: long enough for a model given
the flipped labels to fit them; equal for every arm) is trained on: all the
noisy images; the images the best method kept (the method of the detection target: highest
recall at >= 60% precision); the images the most precise flagged set kept (recall >= 40%); and,
for reference, the images without exactly the flipped ones. Both removal sets are chosen on the
training sample, whose flips are known, never on the test set; ``--primary`` names the one the
target is judged on, fixed before the run (default ``best``).
Each is scored on the 10,000 test images after its last epoch, McNemar's test against the
noisy-label model.

    python benchmarks/audit.py            # about an hour on 2 busy CPU cores; or run folds in parallel:
    python benchmarks/audit.py --stage fold0 & python benchmarks/audit.py --stage fold1 & wait
    python benchmarks/audit.py
    python benchmarks/audit.py --quick    # 4,000 images, 1 epoch (retraining 2): a smoke run
    python benchmarks/audit.py --retrain-seeds 1,2 --seed-arms reviewer,oracle   # the reviewer, 3 seeds

The ``reviewer`` arm simulates a person on the review page (``review.html``): the page's suggestion
accepted for the first N flagged images in its order, N = the label issues the audit expects, applied
with ``ttakit.audit_apply`` (relabelled, nothing removed).

Results: ``benchmarks/results/audit.md``, ``audit.json`` and ``audit_retrain.png`` (``audit-quick*``
with --quick). Trained models and probabilities are kept in ``--work`` and reused when re-run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info  # noqa: E402
from ttakit._io import atomic_write_json, atomic_write_text  # noqa: E402
from ttakit.aliases import get_policy, policy_from_augmentations  # noqa: E402
from ttakit.data import ImageDataset, load_fashion_mnist  # noqa: E402
from ttakit.jobs._policy_eval import predict_probs  # noqa: E402
from ttakit.label_issues import flag_issues, fold_assignment  # noqa: E402
from ttakit.metrics import mcnemar_test  # noqa: E402
from ttakit.models import load_checkpoint, save_checkpoint  # noqa: E402
from ttakit.report.tables import format_table, markdown_table  # noqa: E402
from ttakit.training.config import TrainConfig  # noqa: E402
from ttakit.training.loop import predict_logits, train_model

RESULTS = Path(__file__).resolve().parent / "results"


def log(message: str) -> None:
    print(f"[{dt.datetime.now(dt.timezone.utc):%H:%M:%S}] {message}", flush=True)


def noisy_sample(n: int, noise: float, seed: int) -> tuple[ImageDataset, torch.Tensor, torch.Tensor]:
    """``n`` seeded training images with ``noise`` of the labels flipped to a random other class.

    Returns ``(noisy dataset, flipped mask (n,), true labels (n,))``.
    """
    full = load_fashion_mnist("train")
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(len(full), generator=g)[:n]
    clean = full.subset(rows, "fashion-mnist[audit sample]")
    labels = clean.labels.clone()
    flipped = torch.zeros(n, dtype=torch.bool)
    chosen = torch.randperm(n, generator=g)[: int(round(noise * n))]
    flipped[chosen] = True
    shift = torch.randint(1, clean.num_classes, (len(chosen),), generator=g)
    labels[chosen] = (labels[chosen] + shift) % clean.num_classes
    return ImageDataset(clean.images, labels, list(clean.classes), "fashion-mnist[noisy]"), flipped, clean.labels


def prf(flagged: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    tp = int((flagged & truth).sum())
    precision = tp / max(int(flagged.sum()), 1)
    recall = tp / max(int(truth.sum()), 1)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"flagged": int(flagged.sum()), "true_positives": tp, "precision": precision, "recall": recall, "f1": f1}


METHODS = {
    "rule: top class != label, p(top) > 0.9": ("rule", {"mislabelled"}, "top"),
    "rule: top class != label, 1 - p(label) > 0.9": ("rule", {"mislabelled"}, "others"),
    "rule: p(top) > 0.9, plus ambiguous (0.5-0.6)": ("rule", {"mislabelled", "ambiguous"}, "top"),
    "cleanlab (confident learning)": ("cleanlab", {"mislabelled"}, "top"),
}


def flagged_mask(probs: torch.Tensor, labels: torch.Tensor, method: str, kinds: set[str], by: str) -> torch.Tensor:
    issues = flag_issues(probs, labels, methods=(method,), mislabel_by=by)
    mask = torch.zeros(len(labels), dtype=torch.bool)
    rows = [i.row for i in issues if i.kind in kinds]
    if rows:
        mask[torch.tensor(rows)] = True
    return mask


def simulated_review(probs: torch.Tensor, noisy: ImageDataset, flipped: torch.Tensor, true_labels: torch.Tensor,
                     work: Path) -> tuple[ImageDataset, dict[str, Any]]:
    """A reviewer who accepts the review page's suggestion (relabel to the suggested class) for the
    first N images in the page's order (:func:`ttakit.review_page.review_entries`), N = the number
    of label issues the audit expects (cleanlab's ``num_label_issues`` on the same probabilities);
    the decisions go through ``decisions.csv`` and :func:`ttakit.audit_apply.apply_decisions`, as a
    person's would. Returns the applied data and what the decisions did to the flips."""
    import csv

    import numpy as np
    from cleanlab.count import num_label_issues

    from ttakit.data import load_dataset
    from ttakit.jobs.audit_apply import apply_decisions
    from ttakit.report.review_page import review_entries

    pred = probs.double().numpy()
    expected = int(num_label_issues(noisy.labels.numpy(), pred / pred.sum(1, keepdims=True)))
    entries = review_entries(probs, noisy.labels, methods=("others", "top", "cleanlab"))[:expected]
    source = work / "noisy.npz"
    if not source.exists():
        x = (noisy.images[:, 0] * 255).round().clamp(0, 255).to(torch.uint8).numpy()
        np.savez(source, x=x, y=noisy.labels.numpy(), classes=np.array(noisy.classes))
    decisions = work / "reviewer-decisions.csv"
    with open(decisions, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["row", "file", "given", "decision", "new_label"])
        for e in entries:
            writer.writerow([e["row"], "", noisy.classes[e["given"]], "relabel", noisy.classes[e["suggested"]]])
    started = time.perf_counter()
    apply_decisions(decisions, source, work / "reviewer-applied")
    applied = load_dataset(work / "reviewer-applied" / "clean.npz")
    rows = torch.tensor([e["row"] for e in entries], dtype=torch.long)
    new = torch.tensor([e["suggested"] for e in entries], dtype=torch.long)
    summary = {
        "expected_issues": expected, "decisions": len(entries), "flipped": int(flipped.sum()),
        "flips_reviewed": int(flipped[rows].sum()),
        "flips_fixed": int((flipped[rows] & (new == true_labels[rows])).sum()),
        "flips_relabelled_wrongly": int((flipped[rows] & (new != true_labels[rows])).sum()),
        "clean_labels_broken": int((~flipped[rows]).sum()),
        "labels_right_after": int((applied.labels == true_labels).sum()),
        "labels_right_before": int((noisy.labels == true_labels).sum()),
        "apply_seconds": time.perf_counter() - started,
    }
    data = ImageDataset(applied.images, applied.labels, list(applied.classes), "fashion-mnist[reviewer]")
    return data, summary


def train_or_load(path: Path, dataset: ImageDataset, config: TrainConfig, progress: bool):
    if (path / "checkpoint.json").exists():
        return load_checkpoint(path)[0]
    result = train_model(dataset, config, progress=progress)
    save_checkpoint(path, result.model, result.meta)
    return result.model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--images", type=int, default=None, help="training images audited (default 20000)")
    parser.add_argument("--noise", type=float, default=0.05)
    parser.add_argument("--folds", type=int, default=None, help="cross-validation folds (default 2; quick 2)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs of the cross-validation models (default 3; "
                        "quick 1)")
    parser.add_argument("--retrain-epochs", type=int, default=None, help="epochs of the retrained models, equal for "
                        "the noisy and the cleaned data, cosine schedule (default 30; quick 2)")
    parser.add_argument("--earlier", default="", help="comma-separated results stems (e.g. audit-retrain10) of runs "
                        "with other retraining epochs, summarised in this report")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="runs/bench-audit")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: on a shared, busy machine one "
                        "thread per process wastes no time waiting for the others)")
    parser.add_argument("--stage", default="all", help="all (default), or foldK (only fold K's model): run folds in "
                        "parallel processes, then all")
    parser.add_argument("--arms", default="noisy,reviewer,precise,oracle,best", help="retraining arms, trained in this "
                        "order (default noisy,precise,oracle,best; noisy first: every comparison is against it)")
    parser.add_argument("--schedule", default=None, choices=("constant", "cosine", "onecycle"),
                        help="learning-rate schedule of the cross-validation models (default: Adam's constant rate); "
                        "the retrained models always use cosine")
    parser.add_argument("--primary", default="best", choices=("best", "precise"),
                        help="the removal set the retraining target is judged on, fixed before the run (default best: "
                        "the detection target's method)")
    parser.add_argument("--retrain-seeds", default="", help="comma-separated training seeds to repeat the "
                        "retraining with (e.g. 0,1,2; default: only --seed)")
    parser.add_argument("--seed-arms", default="best", help="arms repeated with each of --retrain-seeds, besides "
                        "noisy (default best)")
    parser.add_argument("--stem", default=None, help="results file stem (default audit, or audit-quick)")
    parser.add_argument("--augment", default="flip", help="train-time augmentation of every model (default flip)")
    parser.add_argument("--progress", action="store_true", help="show training progress bars")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.images or (4000 if args.quick else 20000)
    folds = args.folds or 2
    epochs = args.epochs or (1 if args.quick else 3)
    retrain_epochs = args.retrain_epochs or (2 if args.quick else 30)
    work = Path(args.work) / (f"n{n}-k{folds}-e{epochs}-s{args.seed}-{args.augment.replace(',', '+')}"
                              + (f"-{args.schedule}" if args.schedule else ""))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    info = machine_info(torch.device("cpu"))

    noisy, flipped, true_labels = noisy_sample(n, args.noise, args.seed)
    log(f"{n} images, {int(flipped.sum())} labels flipped ({args.noise:.0%})")
    config = TrainConfig(epochs=epochs, augment=tuple(a for a in args.augment.split(",") if a), seed=args.seed,
                         schedule=args.schedule)
    tta = policy_from_augmentations(config.augmentation_records())
    policies = {"plain": get_policy("none"), "TTA": tta}

    # One model per fold, each cached on its own (``--stage foldK`` computes only fold K, so the
    # folds and the noisy-label model can train in parallel processes).
    assignment = fold_assignment(noisy.labels, folds, args.seed)
    probs = {mode: torch.zeros(n, noisy.num_classes) for mode in policies}
    for k in range(folds):
        if args.stage not in ("all", f"fold{k}"):
            continue
        path = work / f"fold{k}_probs.pt"
        if path.exists():
            cached = torch.load(path, weights_only=True)
        else:
            held = torch.nonzero(assignment == k).flatten()
            train_rows = torch.nonzero(assignment != k).flatten()
            log(f"fold {k + 1}/{folds}: training on {len(train_rows)} images ({epochs} epochs, augment {config.augment})")
            model = train_or_load(work / f"fold{k}-model", noisy.subset(train_rows), replace(config, seed=args.seed + k),
                                  args.progress)
            log(f"fold {k + 1}/{folds}: scoring {len(held)} held-out images, plain and {tta.name}")
            cached = {"rows": held}
            for mode, policy in policies.items():
                cached[mode] = predict_probs(model, noisy.images[held], policy, max_batch=1024)[0].float()
            torch.save(cached, path)
        for mode in policies:
            probs[mode][cached["rows"]] = cached[mode]
    if args.stage.startswith("fold"):
        log(f"{args.stage} done")
        return
    cv_seconds = time.perf_counter() - started

    rows: list[dict[str, Any]] = []
    for name, (method, kinds, by) in METHODS.items():
        for mode in ("plain", "TTA"):
            mask = flagged_mask(probs[mode], noisy.labels, method, kinds, by)
            rows.append({"method": name, "probabilities": mode, **prf(mask, flipped)})
    for mode in ("plain", "TTA"):
        acc = float((probs[mode].argmax(1) == true_labels).double().mean())
        log(f"out-of-fold accuracy against the true labels, {mode}: {acc:.4f}")
    # Best: the highest recall at >= 60% precision (the target's operating point), else the best F1.
    precise = [r for r in rows if r["precision"] >= 0.60]
    best = max(precise, key=lambda r: (r["recall"], r["f1"])) if precise else max(rows, key=lambda r: r["f1"])
    log(f"best method: {best['method']} with {best['probabilities']} probabilities")

    tta_help = {}
    for name in METHODS:
        plain = next(r for r in rows if r["method"] == name and r["probabilities"] == "plain")
        with_tta = next(r for r in rows if r["method"] == name and r["probabilities"] == "TTA")
        tta_help[name] = {
            "f1_plain": plain["f1"], "f1_tta": with_tta["f1"], "f1_change": with_tta["f1"] - plain["f1"],
            "precision_change": with_tta["precision"] - plain["precision"],
            "recall_change": with_tta["recall"] - plain["recall"],
        }
    setup = {"images": n, "noise": args.noise, "flipped": int(flipped.sum()), "folds": folds, "epochs": epochs,
             "arch": "seed-cnn", "train_augment": list(config.augment), "cv_schedule": config.schedule or "constant",
             "tta_policy": tta.name,
             "tta_views": len(tta), "seed": args.seed, "test_images": 10000}
    # The detection results are written now; the retraining below (the slow part) completes them.
    write_report(args, info, setup, rows, best, tta_help, {}, started, cv_seconds, None)

    # Retraining. Arms, all with the same recipe (--retrain-epochs, cosine schedule: trained to
    # convergence, so a model that keeps the flipped labels has time to fit them) and seed:
    #   noisy    - all images with their noisy labels;
    #   best     - without the best method's flags (highest recall at >= 60% precision);
    #   precise  - without the flagged set with the highest precision on the flipped labels among
    #              those with recall >= 40%;
    #   (both chosen on the training sample, whose flips are known, never on the test set; the
    #   target is judged on --primary, fixed before the run)
    #   oracle   - without exactly the flipped images (reference: what perfect cleaning gives).
    # Each is scored on the 10,000 test images after its last epoch (the reported number); the
    # per-epoch test accuracy is recorded only to plot how noise hurts with training length.
    test = load_fashion_mnist("test")
    precise = max((r for r in rows if r["recall"] >= 0.4), key=lambda r: (r["precision"], r["recall"]))
    arms: dict[str, dict[str, Any]] = {}

    def removal(row: dict[str, Any]) -> torch.Tensor:
        method, kinds, by = METHODS[row["method"]]
        return flagged_mask(probs[row["probabilities"]], noisy.labels, method, kinds, by)

    plan = [
        ("noisy labels", "noisy", torch.zeros(n, dtype=torch.bool), None),
        ("cleaned: most precise flags", "precise", removal(precise), precise),
        ("cleaned: best method's flags", "best", removal(best), best),
        ("oracle: exactly the flipped images removed", "oracle", flipped.clone(), None),
        ("reviewer: the page's suggestion accepted for the first N flagged", "reviewer",
         torch.zeros(n, dtype=torch.bool), None),
    ]
    # The simulated reviewer relabels instead of removing: its training data is the applied decisions.
    datasets: dict[str, ImageDataset] = {}
    if "reviewer" in [a.strip() for a in args.arms.split(",")]:
        datasets["reviewer"], setup["reviewer"] = simulated_review(probs["TTA"], noisy, flipped, true_labels, work)
        log(f"simulated reviewer: {setup['reviewer']}")
    order = [a.strip() for a in args.arms.split(",") if a.strip()]
    plan = sorted((arm for arm in plan if arm[1] in order), key=lambda arm: order.index(arm[1]))
    if not plan or plan[0][1] != "noisy":
        raise SystemExit(f"--arms must start with noisy (every comparison is against it), got {args.arms!r}")
    if (best["method"], best["probabilities"]) == (precise["method"], precise["probabilities"]):
        plan = [arm for arm in plan if arm[1] != "best"]  # the same set: train it once
    retrain_config = replace(config, epochs=retrain_epochs, schedule="cosine")
    setup["retrain"] = {"epochs": retrain_epochs, "schedule": "cosine", "optimizer": retrain_config.optimizer,
                        "lr": retrain_config.lr, "augment": list(retrain_config.augment), "seed": args.seed}
    for label, key, remove, row in plan:
        kept_rows = torch.nonzero(~remove).flatten()
        data = datasets[key] if key in datasets else noisy.subset(kept_rows, f"fashion-mnist[{key}]")
        log(f"retraining '{label}' on {len(data)} images ({int(remove.sum())} removed, "
            f"{int((remove & flipped).sum())} of them flipped), {retrain_epochs} epochs")
        model, history = train_logged(work / f"retrain-e{retrain_epochs}-cosine-{key}", data, retrain_config, test,
                                      args.progress)
        correct = predict_logits(model, test.images).argmax(1) == test.labels
        arms[key] = {"label": label, "images": len(data), "removed": int(remove.sum()),
                     "removed_flipped": int((remove & flipped).sum()), "flipped_left": int((flipped & ~remove).sum()),
                     "method": None if row is None else f"{row['method']} ({row['probabilities']})",
                     "precision": None if row is None else row["precision"],
                     "recall": None if row is None else row["recall"],
                     "test_accuracy": float(correct.double().mean()), "correct": correct,
                     "curve": [h.get("val_acc") for h in history],
                     "train_seconds": sum(h.get("seconds", 0.0) for h in history),
                     "train_acc_last_epoch": history[-1].get("train_acc") if history else None}
        if key == "reviewer":  # relabelled, not removed: the flips left are those it did not fix
            arms[key]["flipped_left"] = setup["reviewer"]["flipped"] - setup["reviewer"]["flips_fixed"]
            arms[key]["relabelled"] = setup["reviewer"]["decisions"]
        if key != "noisy":
            arms[key]["lift"] = arms[key]["test_accuracy"] - arms["noisy"]["test_accuracy"]
            arms[key]["mcnemar_p"] = mcnemar_test(arms["noisy"]["correct"], correct).p_value
        log(f"  '{label}': test accuracy {100 * arms[key]['test_accuracy']:.2f}%"
            + (f" ({100 * arms[key]['lift']:+.2f} pts vs noisy, McNemar p = {arms[key]['mcnemar_p']:.3g})"
               if key != "noisy" else ""))
        plot_curves(arms, RESULTS / f"{args.stem or ('audit-quick' if args.quick else 'audit')}_retrain.png", setup)
        write_report(args, info, setup, rows, best, tta_help, arms, started, cv_seconds, precise)

    # Training seed: McNemar's test covers the test sample only, so the comparisons are repeated
    # with other seeds (--retrain-seeds) for the arms in --seed-arms; each seed's cleaned model is
    # compared with the noisy model of the same seed.
    extra_seeds = [int(x) for x in args.retrain_seeds.split(",") if x.strip() and int(x) != args.seed]
    seed_arms = [a for a in args.seed_arms.split(",") if a.strip() in arms and a.strip() != "noisy"]
    by_seed: dict[int, dict[str, float]] = {args.seed: {k: v["test_accuracy"] for k, v in arms.items()}}
    setup["retrain_seeds"] = [args.seed]
    masks = {key: remove for _, key, remove, _ in plan}
    for s in extra_seeds:
        by_seed[s] = {}
        for key in ["noisy", *seed_arms]:
            data = datasets[key] if key in datasets else noisy.subset(torch.nonzero(~masks[key]).flatten(), f"fashion-mnist[{key}]")
            log(f"seed {s}: retraining '{arms[key]['label']}' on {len(data)} images, {retrain_epochs} epochs")
            model, _ = train_logged(work / f"retrain-e{retrain_epochs}-cosine-{key}-seed{s}", data,
                                    replace(retrain_config, seed=s), test, args.progress)
            by_seed[s][key] = float((predict_logits(model, test.images).argmax(1) == test.labels).double().mean())
            log(f"seed {s}: '{arms[key]['label']}': test accuracy {100 * by_seed[s][key]:.2f}%")
        setup["retrain_seeds"] = sorted(by_seed)
        for key in seed_arms:
            lifts = [v[key] - v["noisy"] for v in by_seed.values() if key in v and "noisy" in v]
            mean = sum(lifts) / len(lifts)
            sd = (sum((x - mean) ** 2 for x in lifts) / (len(lifts) - 1)) ** 0.5 if len(lifts) > 1 else None
            arms[key]["seeds"] = {"lifts": lifts, "mean_lift": mean, "sd_lift": sd, "n": len(lifts),
                                  "test_accuracy_by_seed": {str(k): v.get(key) for k, v in by_seed.items()}}
        arms["noisy"]["seeds"] = {"test_accuracy_by_seed": {str(k): v.get("noisy") for k, v in by_seed.items()}}
        write_report(args, info, setup, rows, best, tta_help, arms, started, cv_seconds, precise)


def train_logged(path: Path, dataset: ImageDataset, config: TrainConfig, test: ImageDataset, progress: bool):
    """Train (or load the cached model and its history); the history holds the test accuracy
    after every epoch (``val_acc``: recorded for the curve plot only, nothing is chosen by it)."""
    history_path = path / "history.json"
    if (path / "checkpoint.json").exists() and history_path.exists():
        return load_checkpoint(path)[0], json.loads(history_path.read_text())
    result = train_model(dataset, config, val_ds=test, progress=progress)
    save_checkpoint(path, result.model, result.meta)
    atomic_write_json(history_path, result.history)
    return result.model, result.history


def plot_curves(arms: dict[str, dict[str, Any]], path: Path, setup: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    styles = {"noisy": ("#b2182b", "-"), "precise": ("#2166ac", "-"), "best": ("#762a83", "--"),
              "oracle": ("#4d4d4d", ":")}
    for key, arm in arms.items():
        curve = [100 * a for a in arm["curve"] if a is not None]
        colour, line = styles.get(key, ("#000000", "-"))
        ax.plot(range(1, len(curve) + 1), curve, line, color=colour, marker="o", markersize=3,
                label=f"{arm['label']} ({arm['images']} images): {100 * arm['test_accuracy']:.2f}%")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch (cosine schedule over all epochs)")
    ax.set_ylabel("test accuracy % (10,000 images)")
    ax.set_title(f"Retraining on {setup['images']} Fashion-MNIST images with {setup['flipped']} flipped labels",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    log(f"wrote {path}")


PRIMARY_NAMES = {"best": "best method's", "precise": "most precise"}


def _pct2(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}"


def write_report(args, info, setup, rows, best, tta_help, arms, started, cv_seconds, precise) -> None:
    """Write results JSON and Markdown; ``arms``: the retrained models finished so far."""
    n, flipped = setup["images"], setup["flipped"]
    primary = arms.get(args.primary)
    targets = {
        "recall_at_least_0.80": best["recall"] >= 0.80,
        "precision_at_least_0.60": best["precision"] >= 0.60,
        "any_method_meets_both": any(r["recall"] >= 0.8 and r["precision"] >= 0.6 for r in rows),
        "cleaned_beats_noisy_on_test": None if primary is None else primary["lift"] > 0,
        "cleaned_beats_noisy_significantly": None if primary is None else (primary["lift"] > 0
                                                                          and primary["mcnemar_p"] < 0.05),
        "cleaned_beats_noisy_every_seed": None if primary is None or "seeds" not in primary
        else all(x > 0 for x in primary["seeds"]["lifts"]),
    }
    other = "precise" if args.primary == "best" else "best"
    if other in arms:
        targets[f"{other}_set_cleaned_beats_noisy_on_test"] = arms[other]["lift"] > 0
    if "oracle" in arms:
        targets["oracle_cleaned_beats_noisy_on_test"] = arms["oracle"]["lift"] > 0
    elapsed = time.perf_counter() - started
    results = {
        "benchmark": "audit",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": info,
        "quick": args.quick,
        "setup": setup,
        "detection": rows,
        "best": best,
        "primary": args.primary,
        "precise_removal": precise,
        "tta_effect": tta_help,
        "retrain": {k: {kk: vv for kk, vv in v.items() if kk != "correct"} for k, v in arms.items()},
        "targets": targets,
        "seconds": {"cross_validation": cv_seconds, "total": elapsed},
    }
    stem = args.stem or ("audit-quick" if args.quick else "audit")
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS / f"{stem}.json", results)

    det_rows = [
        {"method": r["method"], "probabilities": r["probabilities"], "flagged": r["flagged"],
         "precision %": f"{100 * r['precision']:.1f}", "recall %": f"{100 * r['recall']:.1f}",
         "F1 %": f"{100 * r['f1']:.1f}"}
        for r in rows
    ]
    effect_rows = [{"method": k, "F1 plain %": f"{100 * v['f1_plain']:.1f}", "F1 TTA %": f"{100 * v['f1_tta']:.1f}",
                    "change (pts)": f"{100 * v['f1_change']:+.1f}",
                    "verdict": "TTA helps" if v["f1_change"] > 0.005 else ("TTA hurts" if v["f1_change"] < -0.005
                                                                          else "no real difference")}
                   for k, v in tta_help.items()]
    print()
    print(format_table(det_rows, title=f"flagged vs the {flipped} flipped labels of {n} images"))
    print()
    print(format_table(effect_rows, title="does TTA help each method? (F1)"))
    md = [
        f"# Label audit benchmark{' (quick)' if args.quick else ''}",
        "",
        f"Date: {results['date']}. Machine: {info['cpu_count']} CPU cores (shared with other jobs; load "
        f"average at start {info.get('load_average_at_start')}), torch {info['torch']}, {info['platform']}.",
        f"Total time {elapsed / 60:.1f} min (trained models are cached between runs).",
        "",
        f"{n} Fashion-MNIST training images (seeded sample), {flipped} labels ({args.noise:.0%}) flipped to "
        f"a random other class. Out-of-sample probabilities from {setup['folds']}-fold cross-validation: seed CNN, "
        f"{setup['epochs']} epochs ({setup.get('cv_schedule', 'constant')} rate), train-time {'+'.join(setup['train_augment']) or 'none'}; TTA = "
        f"`{setup['tta_policy']}` ({setup['tta_views']} views).",
        "",
        "## Flagged images against the flipped labels",
        "",
        "Best method: the highest recall at >= 60% precision (else the best F1).",
        "",
        markdown_table(det_rows),
        "",
        "## Does TTA help each method?",
        "",
        markdown_table(effect_rows),
        "",
        "## Retraining on the cleaned data",
        "",
    ]
    if arms:
        rt = setup["retrain"]
        re_rows = []
        for key, arm in arms.items():
            re_rows.append({
                "training data": arm["label"], "images": arm["images"], "removed": arm["removed"],
                "flipped left": arm["flipped_left"], "test accuracy %": f"{100 * arm['test_accuracy']:.2f}",
                "vs noisy (pts)": "" if key == "noisy" else f"{100 * arm['lift']:+.2f}",
                "McNemar p": "" if key == "noisy" else f"{arm['mcnemar_p']:.3g}",
                "fit to its labels %": _pct(arm.get("train_acc_last_epoch")),
            })
        print()
        print(format_table(re_rows, title=f"retraining ({rt['epochs']} epochs, cosine)"))
        print(f"\ntargets: {targets}")
        md += [
            f"One recipe for every row: seed CNN, {rt['epochs']} epochs, Adam lr {rt['lr']:g}, cosine schedule, "
            f"train-time {'+'.join(rt['augment']) or 'none'}, seed {rt['seed']}. "
            "Plain accuracy on the 10,000 test images after the last epoch; McNemar's paired test "
            "against the noisy-label model (it covers the test sample, not the training seed: one seed per row). "
            "'Fit to its labels' is the training accuracy of the last epoch against the labels each model was given "
            "(with its flips): a model that fits the flipped labels too has memorised the noise.",
            "",
            "Removal sets, chosen on the training sample (whose flips are known), never on the test set: the best "
            f"method's flags (`{best['method']}`, {best['probabilities']}: {100 * best['precision']:.1f}% precision, "
            f"{100 * best['recall']:.1f}% recall) and the most precise flagged set with recall >= 40%"
            + (f" (`{precise['method']}`, {precise['probabilities']}: {100 * precise['precision']:.1f}% precision, "
               f"{100 * precise['recall']:.1f}% recall)" if precise else "")
            + f". The target is judged on the **{PRIMARY_NAMES[args.primary]}** set, fixed before this run. "
            "The oracle row removes exactly the flipped images: what perfect cleaning would give.",
            "",
            markdown_table(re_rows),
            "",
        ]
        for key in (args.primary, *(k for k in ("best", "precise") if k != args.primary)):
            if key in arms:
                md.append(f"Cleaned by the {PRIMARY_NAMES[key]} set{' (target)' if key == args.primary else ''} minus "
                          f"noisy: {100 * arms[key]['lift']:+.2f} points (McNemar p = {arms[key]['mcnemar_p']:.3g}).")
        if "oracle" in arms:
            md.append(f"Oracle: {100 * arms['oracle']['lift']:+.2f} points (p = {arms['oracle']['mcnemar_p']:.3g}).")
        if "reviewer" in arms and setup.get("reviewer"):
            r = setup["reviewer"]
            md.append(f"Simulated reviewer (the review page's suggestion accepted for its first {r['decisions']} images, "
                      f"the number of label issues cleanlab expects): {r['flips_fixed']} of {r['flipped']} flips "
                      f"fixed, {r['flips_relabelled_wrongly']} flips given another wrong label, {r['clean_labels_broken']} "
                      f"right labels changed; retrained {100 * arms['reviewer']['lift']:+.2f} points vs noisy "
                      f"(p = {arms['reviewer']['mcnemar_p']:.3g}). Time per decision in the page: see "
                      "tests/test_review_page.py::test_thousand_flagged_images_stay_responsive (1,000 flagged images).")
        seeded = {k: a["seeds"] for k, a in arms.items() if "seeds" in a and k != "noisy"}
        if seeded:
            seeds = setup["retrain_seeds"]
            seed_rows = [{"training data": arms["noisy"]["label"],
                          **{f"seed {s}": _pct2(arms["noisy"]["seeds"]["test_accuracy_by_seed"].get(str(s)))
                             for s in seeds}, "mean lift (pts)": "", "sd (pts)": ""}]
            for k, sd in seeded.items():
                seed_rows.append({"training data": arms[k]["label"],
                                  **{f"seed {s}": _pct2(sd["test_accuracy_by_seed"].get(str(s))) for s in seeds},
                                  "mean lift (pts)": f"{100 * sd['mean_lift']:+.2f}",
                                  "sd (pts)": "" if sd["sd_lift"] is None else f"{100 * sd['sd_lift']:.2f}"})
            md += ["", f"The same comparison with {len(seeds)} training seeds (test accuracy %; each cleaned model "
                   "against the noisy model of its seed):", "", markdown_table(seed_rows)]
            for k, sd in seeded.items():
                md.append("")
                md.append(f"{arms[k]['label']}: better than the noisy-label model with {sum(x > 0 for x in sd['lifts'])} "
                          f"of {sd['n']} seeds, mean {100 * sd['mean_lift']:+.2f} points.")
        for earlier in [e for e in args.earlier.split(",") if e.strip()]:
            path = RESULTS / f"{earlier.strip()}.json"
            if not path.exists():
                continue
            old = json.loads(path.read_text())
            old_rows = [{"training data": a["label"], "images": a["images"],
                         "test accuracy %": f"{100 * a['test_accuracy']:.2f}",
                         "vs noisy (pts)": f"{100 * a['lift']:+.2f}" if "lift" in a else "",
                         "McNemar p": f"{a['mcnemar_p']:.3g}" if "mcnemar_p" in a else "",
                         "fit to its labels %": _pct(a.get("train_acc_last_epoch"))}
                        for a in old["retrain"].values()]
            o = old["setup"]
            md += ["", f"An earlier run with weaker out-of-sample probabilities ({o['folds']}-fold cross-validation, "
                   f"{o['epochs']} epochs at a {o.get('cv_schedule', 'constant')} rate; best method "
                   f"{100 * old['best']['precision']:.1f}% precision at {100 * old['best']['recall']:.1f}% recall) and "
                   f"the same retraining recipe ({o['retrain']['epochs']} epochs), seed {o['retrain']['seed']} "
                   f"(`{earlier.strip()}.md`):", "", markdown_table(old_rows)]
        png = f"{stem}_retrain.png"
        if (RESULTS / png).exists():
            md += ["", f"![test accuracy per epoch]({png})",
                   "", "Test accuracy after each epoch (recorded for this plot only; every number above is the "
                   "last epoch's)."]
    else:
        md += ["Retraining is still running (this file is rewritten when it finishes)."]
    beats = targets["cleaned_beats_noisy_on_test"]
    md += [
        "",
        "## Targets",
        "",
        f"- best method recall >= 80%: {'yes' if targets['recall_at_least_0.80'] else 'NO'} "
        f"({100 * best['recall']:.1f}%)",
        f"- best method precision >= 60%: {'yes' if targets['precision_at_least_0.60'] else 'NO'} "
        f"({100 * best['precision']:.1f}%)",
        f"- retraining on the cleaned data ({PRIMARY_NAMES[args.primary]} set) beats the noisy-label model: "
        + ("pending" if beats is None else (("yes" if beats else "NO")
           + f" ({100 * primary['lift']:+.2f} points, McNemar p = {primary['mcnemar_p']:.3g}"
           + ("" if targets["cleaned_beats_noisy_significantly"] else "; not significant at 0.05") + ")")),
    ]
    if primary is not None and "seeds" in primary:
        sd = primary["seeds"]
        md.append(f"- over {sd['n']} training seeds: better with {sum(x > 0 for x in sd['lifts'])} of {sd['n']}, "
                  f"mean {100 * sd['mean_lift']:+.2f} points"
                  + ("" if sd["sd_lift"] is None else f" (sd {100 * sd['sd_lift']:.2f})"))
    if other in arms:
        md.append(f"- with the {PRIMARY_NAMES[other]} set instead: "
                  + ("yes" if arms[other]["lift"] > 0 else "NO")
                  + f" ({100 * arms[other]['lift']:+.2f} points, p = {arms[other]['mcnemar_p']:.3g})")
    atomic_write_text(RESULTS / f"{stem}.md", "\n".join(md) + "\n")
    log(f"wrote {RESULTS / (stem + '.md')} and .json")


if __name__ == "__main__":
    main()
