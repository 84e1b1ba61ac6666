"""Ensembles, uncertainty and conformal sets on Fashion-MNIST, as measured.

Three seed CNNs (3 epochs, train-time flips by default, seeds 0, 1, 2; the classic recipe on
the first ``--train-images`` images of the training split) each predict the validation and test
images once through :class:`ttakit.TTAEngine` with the policy of their training augmentations
(``train-aug``: hflip for flip training) and ``return_views=True, return_uncertainty=True``;
the identity view is the plain prediction. Members are temperature-scaled on the first half of
the validation split. Reported:

* each member plain and with TTA, the soft-vote ensemble plain and with TTA (and the hard vote),
  with accuracy, NLL, ECE, forward passes and McNemar's test against the best member;
* how well each uncertainty score flags errors (AUROC against error, accuracy at 90% coverage),
  the plain softmax confidence as the baseline row;
* split-conformal sets (LAC and APS) calibrated on the second half of the validation split:
  coverage and mean set size on the test split, plain against TTA, alpha 0.05 and 0.1.

    python benchmarks/ensemble.py           # an hour or more on 2 busy CPU cores; members in parallel:
    python benchmarks/ensemble.py --stage member0 & ... member1 & ... member2; wait; python benchmarks/ensemble.py
    python benchmarks/ensemble.py --quick   # 2,000 training images, 1 epoch, 2,000 test images

Results: ``benchmarks/results/ensemble.md`` and ``ensemble.json`` (``ensemble-quick.*``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info  # noqa: E402
from ttakit import metrics as M  # noqa: E402
from ttakit._io import atomic_write_json, atomic_write_text  # noqa: E402
from ttakit.aliases import policy_from_augmentations  # noqa: E402
from ttakit.conformal import calibrate  # noqa: E402
from ttakit.engine import TTAEngine  # noqa: E402
from ttakit.ensemble_vote import hard_vote, soft_vote
from ttakit.jobs._ensemble_predict import _apply_temperature, _fit_temperature  # noqa: E402
from ttakit.jobs._eval_data import load_eval_data  # noqa: E402
from ttakit.jobs.demo import load_or_train
from ttakit.report.tables import format_table, markdown_table  # noqa: E402
from ttakit.training.config import TrainConfig  # noqa: E402
from ttakit.uncertainty import entropy  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SEEDS = (0, 1, 2)


def log(message: str) -> None:
    print(f"[{dt.datetime.now(dt.timezone.utc):%H:%M:%S}] {message}", flush=True)


def run_member(model, policy, images: torch.Tensor) -> dict[str, Any]:
    """Plain and TTA probabilities and the views' uncertainty, from one engine run."""
    engine = TTAEngine(model, policy, max_batch=1024)
    started = time.perf_counter()
    out = engine.run(images, return_views=True, return_uncertainty=True)
    seconds = time.perf_counter() - started
    identity = next(k for k, v in enumerate(policy.views) if v.is_identity)
    return {
        "plain": torch.softmax(out.views[identity].float(), 1).cpu(),
        "tta": out.merged.float().cpu(),
        "uncertainty": {k: v.cpu() for k, v in out.uncertainty.items()},
        "passes": float(getattr(out, "passes_per_image", len(policy))),
        "seconds": seconds,
    }


def scores_row(name: str, mode: str, probs: torch.Tensor, labels: torch.Tensor, passes: float,
               pred: torch.Tensor | None = None, probabilistic: bool = True) -> dict[str, Any]:
    pred = probs.argmax(1) if pred is None else pred
    row = {"model": name, "mode": mode, "accuracy": float((pred == labels).double().mean()), "passes": passes}
    row["nll"] = M.nll(probs, labels) if probabilistic else None
    row["ece"] = M.expected_calibration_error(probs, labels) if probabilistic else None
    row["_correct"] = pred == labels
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--train-images", type=int, default=None, help="default 20000 (quick 2000)")
    parser.add_argument("--epochs", type=int, default=None, help="default 3 (quick 1)")
    parser.add_argument("--test-images", type=int, default=None, help="default all 10000 (quick 2000)")
    parser.add_argument("--work", default="runs/bench-ensemble")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: on a shared, busy machine one "
                        "thread per process wastes no time waiting for the others)")
    parser.add_argument("--stage", default="all", help="all (default) or memberK (only train member K, to train "
                        "members in parallel processes)")
    parser.add_argument("--augment", default="flip", help="train-time augmentation of every member (default flip)")
    parser.add_argument("--val-images", type=int, default=None, help="validation images used (default all 6000)")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n_train = args.train_images or (2000 if args.quick else 20000)
    epochs = args.epochs or (1 if args.quick else 3)
    n_test = args.test_images or (2000 if args.quick else None)
    started = time.perf_counter()
    info = machine_info(torch.device("cpu"))

    augment = tuple(a for a in args.augment.split(",") if a)
    n_val = args.val_images or (2000 if args.quick else None)
    work = Path(args.work)
    outputs = []
    for k, seed in enumerate(SEEDS):
        if args.stage not in ("all", f"member{k}"):
            continue
        config = TrainConfig(epochs=epochs, augment=augment, seed=seed, limit=n_train)
        stem = f"n{n_train}-e{epochs}-{'+'.join(augment)}-seed{seed}"
        log(f"member seed {seed}: {n_train} images, {epochs} epochs, augment {augment}")
        model, meta = load_or_train(work / stem, config, progress=args.progress)
        val = load_eval_data(meta, None, "val", limit=n_val)
        test = load_eval_data(meta, None, "test", limit=n_test)
        policy = policy_from_augmentations(meta.train_augmentations)
        cache = work / f"{stem}-preds-v{len(val)}-t{len(test)}.pt"
        if cache.exists():
            v, t = torch.load(cache, weights_only=True)
        else:
            log(f"member seed {seed}: predicting {len(val)} validation and {len(test)} test images with {policy.name}")
            v, t = run_member(model, policy, val.images), run_member(model, policy, test.images)
            torch.save((v, t), cache)
        outputs.append({"name": f"seed CNN #{seed}", "val": v, "test": t, "meta": meta})
    if args.stage != "all":
        log(f"{args.stage} done")
        return
    meta0 = outputs[0]["meta"]
    val = load_eval_data(meta0, None, "val", limit=n_val)
    test = load_eval_data(meta0, None, "test", limit=n_test)
    half = len(val) // 2
    temp_rows, conf_rows = torch.arange(half), torch.arange(half, len(val))
    policy = policy_from_augmentations(meta0.train_augmentations)
    log(f"val {len(val)} images (temperature: {half}, conformal: {len(val) - half}), test {len(test)}; "
        f"TTA {policy.name} ({len(policy)} views)")
    for o in outputs:
        v, t = o["val"], o["test"]
        temps = {}
        for mode in ("plain", "tta"):
            temps[mode] = _fit_temperature(v[mode][temp_rows], val.labels[temp_rows])
            v[f"{mode}_cal"] = _apply_temperature(v[mode], temps[mode])
            t[f"{mode}_cal"] = _apply_temperature(t[mode], temps[mode])
        o["temperatures"] = temps
        del o["meta"]
    members = [(o["name"], None, None) for o in outputs]

    labels = test.labels
    rows = []
    for o in outputs:
        rows.append(scores_row(o["name"], "plain", o["test"]["plain_cal"], labels, 1.0))
        rows.append(scores_row(o["name"], "TTA", o["test"]["tta_cal"], labels, o["test"]["passes"]))
    best = {mode: max((r for r in rows if r["mode"] == mode), key=lambda r: r["accuracy"]) for mode in ("plain", "TTA")}
    ens = {}
    for mode, key in (("plain", "plain_cal"), ("TTA", "tta_cal")):
        stack = torch.stack([o["test"][key] for o in outputs])
        passes = sum(1.0 if mode == "plain" else o["test"]["passes"] for o in outputs)
        ens[mode] = soft_vote(stack)
        soft = scores_row("soft-vote ensemble (3)", mode, ens[mode], labels, passes)
        hard_labels, shares = hard_vote(stack)
        hard = scores_row("hard-vote ensemble (3)", mode, shares.float(), labels, passes, pred=hard_labels,
                          probabilistic=False)
        for row in (soft, hard):
            row["vs_best_pts"] = row["accuracy"] - best[mode]["accuracy"]
            row["mcnemar_p"] = M.mcnemar_test(best[mode]["_correct"], row["_correct"]).p_value
            rows.append(row)
    headline = {
        "best_member_tta": best["TTA"]["model"],
        "best_member_tta_accuracy": best["TTA"]["accuracy"],
        "ensemble_tta_accuracy": next(r for r in rows if r["model"].startswith("soft") and r["mode"] == "TTA")["accuracy"],
    }
    headline["lift_pts"] = 100 * (headline["ensemble_tta_accuracy"] - headline["best_member_tta_accuracy"])
    headline["mcnemar_p"] = next(r for r in rows if r["model"].startswith("soft") and r["mode"] == "TTA")["mcnemar_p"]

    # Uncertainty: each score against the errors of the prediction it describes, per member; mean over members.
    unc_names = ["plain softmax 1 - max p (baseline)", "TTA softmax 1 - max p", "predictive entropy",
                 "expected entropy", "mutual information", "view disagreement", "std of top class"]
    per_member: dict[str, list[dict[str, float]]] = {k: [] for k in unc_names}
    for o in outputs:
        t = o["test"]
        u = t["uncertainty"]
        plain_correct = t["plain"].argmax(1) == labels
        tta_correct = t["tta"].argmax(1) == labels
        top = t["tta"].argmax(1)
        scores = {
            "plain softmax 1 - max p (baseline)": (1 - t["plain"].max(1).values, plain_correct),
            "TTA softmax 1 - max p": (1 - t["tta"].max(1).values, tta_correct),
            "predictive entropy": (u["predictive_entropy"], tta_correct),
            "expected entropy": (u["expected_entropy"], tta_correct),
            "mutual information": (u["mutual_information"], tta_correct),
            "view disagreement": (u["disagreement"], tta_correct),
            "std of top class": (u["std"].gather(1, top[:, None]).squeeze(1), tta_correct),
        }
        for k, (s, c) in scores.items():
            per_member[k].append({"auroc": M.uncertainty_auroc(s.double(), ~c),
                                  "acc90": M.accuracy_at_coverage(s.double(), c, 0.9)})
    unc_rows = []
    for k in unc_names:
        aurocs = [m["auroc"] for m in per_member[k]]
        accs = [m["acc90"] for m in per_member[k]]
        unc_rows.append({"score": k, "auroc_members": aurocs, "auroc_mean": sum(aurocs) / len(aurocs),
                         "acc_at_90_mean": sum(accs) / len(accs)})
    # The ensemble's own scores: its confidence, entropy and the members' disagreement (TTA members).
    stack = torch.stack([o["test"]["tta_cal"] for o in outputs])
    ens_correct = ens["TTA"].argmax(1) == labels
    member_mi = entropy(ens["TTA"]) - entropy(stack).mean(0)
    member_dis = (stack.argmax(2) != ens["TTA"].argmax(1)[None]).double().mean(0)
    for k, s in (("ensemble 1 - max p", 1 - ens["TTA"].max(1).values), ("ensemble predictive entropy", entropy(ens["TTA"])),
                 ("ensemble mutual information (members)", member_mi), ("ensemble member disagreement", member_dis)):
        unc_rows.append({"score": k, "auroc_members": None, "auroc_mean": M.uncertainty_auroc(s.double(), ~ens_correct),
                         "acc_at_90_mean": M.accuracy_at_coverage(s.double(), ens_correct, 0.9)})

    # Conformal sets: calibrated on the second half of val, scored on test.
    conf_labels = val.labels[conf_rows]
    best_idx = next(i for i, o in enumerate(outputs) if o["name"] == best["TTA"]["model"])
    predictors = {
        f"{outputs[best_idx]['name']} plain": (outputs[best_idx]["val"]["plain_cal"], outputs[best_idx]["test"]["plain_cal"]),
        f"{outputs[best_idx]['name']} TTA": (outputs[best_idx]["val"]["tta_cal"], outputs[best_idx]["test"]["tta_cal"]),
        "ensemble plain": (soft_vote(torch.stack([o["val"]["plain_cal"] for o in outputs])), ens["plain"]),
        "ensemble TTA": (soft_vote(torch.stack([o["val"]["tta_cal"] for o in outputs])), ens["TTA"]),
    }
    cp_rows = []
    for alpha in (0.05, 0.1):
        for method in ("lac", "aps"):
            for name, (vp, tp) in predictors.items():
                cal = calibrate(vp[conf_rows], conf_labels, alpha, method)
                sets = cal.predict_sets(tp)
                cp_rows.append({"alpha": alpha, "method": method, "predictor": name,
                                "coverage": M.set_coverage(sets, labels), "mean_set_size": M.set_size(sets),
                                "n_calibration": cal.n_calibration})
    for row in cp_rows:
        if row["predictor"].endswith("TTA"):
            plain = next(r for r in cp_rows if r["alpha"] == row["alpha"] and r["method"] == row["method"]
                         and r["predictor"] == row["predictor"][: -len("TTA")] + "plain")
            row["size_vs_plain"] = row["mean_set_size"] / plain["mean_set_size"]

    elapsed = time.perf_counter() - started
    for r in rows:
        r.pop("_correct", None)
    results = {
        "benchmark": "ensemble",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": info,
        "quick": args.quick,
        "setup": {"members": [m[0] for m in members], "train_images": n_train, "epochs": epochs,
                  "train_augment": list(augment), "tta_policy": policy.name, "tta_views": len(policy),
                  "val_images": len(val), "temperature_images": half, "conformal_images": len(val) - half,
                  "test_images": len(test)},
        "temperatures": {o["name"]: o["temperatures"] for o in outputs},
        "rows": rows,
        "headline": headline,
        "uncertainty": unc_rows,
        "conformal": cp_rows,
        "seconds": elapsed,
    }
    stem = "ensemble-quick" if args.quick else "ensemble"
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS / f"{stem}.json", results)

    def fmt_p(p):
        return "-" if p is None else ("< 1e-300" if p < 1e-300 else f"{p:.3g}")

    show = [{"model": r["model"], "policy": "none" if r["mode"] == "plain" else policy.name,
             "accuracy %": f"{100 * r['accuracy']:.2f}",
             "vs best member (pts)": f"{100 * r['vs_best_pts']:+.2f}" if "vs_best_pts" in r else "",
             "p (McNemar)": fmt_p(r.get("mcnemar_p")),
             "NLL": "-" if r["nll"] is None else f"{r['nll']:.4f}", "ECE": "-" if r["ece"] is None else f"{r['ece']:.4f}",
             "passes/img": f"{r['passes']:.0f}"} for r in rows]
    unc_show = [{"score": r["score"], "AUROC (error)": f"{r['auroc_mean']:.3f}",
                 "members": "" if r["auroc_members"] is None else " / ".join(f"{a:.3f}" for a in r["auroc_members"]),
                 "accuracy at 90% coverage %": f"{100 * r['acc_at_90_mean']:.2f}"} for r in unc_rows]
    cp_show = [{"alpha": r["alpha"], "method": r["method"].upper(), "predictor": r["predictor"],
                "coverage %": f"{100 * r['coverage']:.2f}", "target %": f"{100 * (1 - r['alpha']):.0f}",
                "mean set size": f"{r['mean_set_size']:.3f}",
                "TTA / plain size": f"{r['size_vs_plain']:.3f}" if "size_vs_plain" in r else ""} for r in cp_rows]
    print()
    print(format_table(show, title=f"members and ensembles on {len(test)} test images (members temperature-scaled)"))
    print()
    print(format_table(unc_show, title="uncertainty scores as error detectors (mean over the 3 members unless 'ensemble')"))
    print()
    print(format_table(cp_show, title=f"split-conformal sets, calibrated on {len(val) - half} validation images"))
    md = [
        f"# Ensemble, uncertainty and conformal benchmark{' (quick)' if args.quick else ''}",
        "",
        f"Date: {results['date']}. Machine: {info['cpu_count']} CPU cores (shared with other jobs; load average at "
        f"start {info.get('load_average_at_start')}), torch {info['torch']}. Final stage {elapsed / 60:.1f} min "
        "(members trained and predicted in earlier stages, cached).",
        "",
        f"Three seed CNNs (seeds {', '.join(map(str, SEEDS))}), each trained {epochs} epochs with "
        f"{'+'.join(augment) or 'no augmentation'} on the "
        f"first {n_train} images of the Fashion-MNIST training split; TTA = `{policy.name}` ({len(policy)} views). "
        f"Each member is temperature-scaled on {half} validation images (plain and TTA separately); test: {len(test)} "
        "images. The ensemble rows compare with the best member in the same mode (best on these test images, "
        "which favours the member).",
        "",
        "## Members and ensembles",
        "",
        markdown_table(show),
        "",
        f"Soft-vote ensemble with TTA vs the best single member with TTA: {100 * headline['ensemble_tta_accuracy']:.2f}% "
        f"vs {100 * headline['best_member_tta_accuracy']:.2f}% ({headline['lift_pts']:+.2f} pts, McNemar p = "
        f"{fmt_p(headline['mcnemar_p'])}).",
        "",
        "## Uncertainty: how well each score flags errors",
        "",
        "AUROC of the score against error (1 = every error ranked above every correct image, 0.5 = chance) and "
        "accuracy on the 90% of images the score is surest of. Member rows: mean over the 3 members (each listed).",
        "",
        markdown_table(unc_show),
        "",
        "## Conformal prediction sets",
        "",
        f"Split conformal, calibrated on the other {len(val) - half} validation images; coverage and mean set size on "
        f"the {len(test)} test images.",
        "",
        markdown_table(cp_show),
    ]
    atomic_write_text(RESULTS / f"{stem}.md", "\n".join(md) + "\n")
    log(f"wrote {RESULTS / (stem + '.md')} and .json in {elapsed / 60:.1f} min")


if __name__ == "__main__":
    main()
