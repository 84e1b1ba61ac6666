"""Dense TTA measured on models trained here: segmentation mIoU and detection COCO mAP, plain and
with TTA, on canvases of Fashion-MNIST items (``ttakit.data.canvases``).

Training canvases take their items from Fashion-MNIST training images 0..49,999, validation
canvases from 50,000..59,999 and test canvases from the test images. A small U-Net
(``unet-small``) and a CenterNet-style detector (``centernet-small``) are trained on CPU with
random horizontal flips, then scored on the test canvases:

- segmentation (``SegmentationTTAWrapper``, softmax probabilities averaged): plain, hflip,
  multi-scale (``Scale([0.75, 1, 1.25])``, bilinear), hflip x multi-scale, and sliding-window
  ``Tiles`` (alone and beside the full image);
- detection (``DetectionTTAWrapper``): plain, hflip, multi-scale and hflip x multi-scale, each
  view set fused by weighted boxes fusion (WBF), NMS and soft-NMS; COCO mAP@[.5:.95] and mAP@.5 by
  pycocotools;
- the searched policies of ``ttakit search --task segmentation|detection``
  (:func:`ttakit.search.dense.dense_search`): views selected greedily on the validation canvases
  by mIoU, or for detection views and merge settings (method, IoU threshold, match by IoU or IoS,
  conf_type) by mAP@[.5:.95], from the pool of flips and 0.75/1.25 scales; never on the test
  canvases. Each is scored on the test canvases beside the hand-picked rows, with what it chose and
  the search's own time.

Each row gives the time per image and its ratio to K x plain (K = images the model sees per
test image: views, tiles counted one by one), so the cost of the merge and of the views' resizing
shows beside the forward passes.

    python benchmarks/dense.py            # ~15 min on 2 quiet CPU cores (training ~10 of them)
    python benchmarks/dense.py --quick    # a 1-2 minute smoke run (small data, 1-2 epochs)

Trained models are kept in ``--work`` (default ``runs/bench-dense``, ignored by git) and reused
when their recorded recipe matches. Results: ``benchmarks/results/dense.md`` and ``dense.json``
(``dense-quick.*`` with --quick).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, save_results  # noqa: E402
from ttakit._io import atomic_write_text  # noqa: E402
from ttakit.data.canvases import Canvases, load_fashion_canvases  # noqa: E402
from ttakit.dense_metrics import confusion_matrix, detection_map, mean_iou  # noqa: E402
from ttakit.errors import CheckpointError  # noqa: E402
from ttakit.models import load_checkpoint, save_checkpoint  # noqa: E402
from ttakit.policy import Compose  # noqa: E402
from ttakit.report.tables import markdown_table  # noqa: E402
from ttakit.search.dense import default_dense_pool, dense_search  # noqa: E402
from ttakit.training.dense import DenseTrainConfig, train_detection, train_segmentation  # noqa: E402
from ttakit.transforms import HorizontalFlip, Scale, Tiles  # noqa: E402
from ttakit.wrappers import SegmentationTTAWrapper  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
RUN_FORMAT = 1  # bump when the recipe of a cached model changes, so old models are not reused
SCALES = [0.75, 1.0, 1.25]
BATCH = 50  # test canvases per call of a wrapper
MERGES = ("wbf", "nms", "soft_nms")
IOU_THR = 0.55  # one overlap for every fusion (ensemble-boxes' WBF default; 0.5-0.6 is usual for NMS)


# ----------------------------------------------------------------------------- data and models


def settings(args: argparse.Namespace) -> dict[str, Any]:
    quick = args.quick
    return {
        "train": args.train or (600 if quick else 2500),
        "val": 100 if quick else 300,
        "test": args.test or (100 if quick else 500),
        "seg_epochs": args.seg_epochs or (1 if quick else 8),
        "det_epochs": args.det_epochs or (2 if quick else 8),
        "seed": args.seed,
    }


def get_model(kind: str, train: Canvases, val: Canvases, config: DenseTrainConfig, args, spec) -> tuple[nn.Module, Any, float]:
    """The trained model from ``--work`` when its recorded recipe matches, else trained now.

    Returns ``(model, meta, seconds it took to train)`` (the seconds recorded at training)."""
    folder = Path(args.work) / f"{kind}-seed{config.seed}{'-quick' if args.quick else ''}"
    recipe = {"format": RUN_FORMAT, "train": spec["train"], "val": spec["val"], "config": asdict(config)}
    if (folder / "checkpoint.json").exists():
        try:
            model, meta = load_checkpoint(folder)
            if meta.extra.get("bench_recipe") == recipe:
                print(f"{kind}: reusing {folder} (trained in {meta.extra['train_seconds']:.0f} s)", flush=True)
                return model, meta, float(meta.extra["train_seconds"])
        except CheckpointError:
            pass
    train_fn = train_segmentation if kind == "unet" else train_detection
    started = time.perf_counter()
    result = train_fn(train, config, val=val, progress=not args.quiet)
    seconds = time.perf_counter() - started
    result.meta.extra.update({"bench_recipe": recipe, "train_seconds": seconds})
    save_checkpoint(folder, result.model, result.meta)
    print(f"{kind}: trained in {seconds:.0f} s, saved to {folder}", flush=True)
    return result.model, result.meta, seconds


class Counting(nn.Module):
    """The model, counting the images and pixels it is given (K = images per test image)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.images = 0
        self.pixels = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images += int(x.shape[0])
        self.pixels += int(x.shape[0]) * int(x.shape[-2]) * int(x.shape[-1])
        return self.model(x)


def _pixels(counter: Counting, test: Canvases, repeats: int) -> float:
    """Pixels the model saw per test image, in canvases (a 64x64 tile is 0.44 of a 96x96 canvas)."""
    return counter.pixels / (repeats * len(test) * test.images.shape[-2] * test.images.shape[-1])


def timed(fn: Callable[[torch.Tensor], Any], images: torch.Tensor, repeats: int) -> tuple[list[Any], float]:
    """``fn`` over ``images`` in batches of :data:`BATCH`, ``repeats`` times: the outputs (the
    same every time) and the seconds of the fastest pass (on a shared machine the least
    disturbed one)."""
    best = float("inf")
    outputs: list[Any] = []
    with torch.inference_mode():
        for _ in range(repeats):
            outputs = []
            started = time.perf_counter()
            for batch in images.split(BATCH):
                outputs.append(fn(batch))
            best = min(best, time.perf_counter() - started)
    return outputs, best


# ----------------------------------------------------------------------------- rows


def segmentation_row(
    name: str, model: nn.Module, test: Canvases, policy: Compose | None, repeats: int = 1, **wrapper_options
) -> dict[str, Any]:
    """One segmentation row: ``policy`` (None: plain inference) through SegmentationTTAWrapper,
    softmax probabilities averaged (or the policy's own merge and weights when it holds them)."""
    counter = Counting(model)
    if policy is None:
        fn = counter
    else:
        wrapper_options.setdefault("activation", "softmax")
        fn = SegmentationTTAWrapper(counter, policy, **wrapper_options)
    outputs, seconds = timed(fn, test.images, repeats)
    pred = torch.cat([o.argmax(1) for o in outputs])
    scores = mean_iou(pred, test.masks, num_classes=len(test.mask_classes))
    seen, pixels = counter.images / len(test) / repeats, _pixels(counter, test, repeats)
    per_view = view_scores(fn, test) if policy is not None else {}  # after the count: not a timed pass
    return {
        "policy": name, "K": seen, "pixels": pixels, "views_miou": per_view, "miou": scores["miou"],
        "pixel_accuracy": scores["pixel_accuracy"], "seconds": seconds,
    }


def view_scores(wrapper: SegmentationTTAWrapper, test: Canvases) -> dict[str, float]:
    """Each view's own mIoU (its de-augmented output alone; an untimed extra pass): which views
    help the merge and which pull it down."""
    classes = len(test.mask_classes)
    matrices: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for batch, masks in zip(test.images.split(BATCH), test.masks.split(BATCH), strict=True):
            out = wrapper.run(batch, return_views=True)
            for name, view in zip(out.view_names, out.views, strict=True):
                found = confusion_matrix(view.argmax(1), masks, classes)
                matrices[name] = matrices[name] + found if name in matrices else found
    scores = {}
    for name, matrix in matrices.items():
        hits = matrix.diag().double()
        union = matrix.sum(0) + matrix.sum(1) - matrix.diag()
        present = union > 0
        scores[name] = float((hits[present] / union[present]).mean())
    return scores


def detection_row(
    name: str, model: nn.Module, test: Canvases, policy: Compose | None, merge: str | None = None,
    repeats: int = 1, **fusion,
) -> dict[str, Any]:
    """One detection row: ``policy`` (None: plain inference) through DetectionTTAWrapper with
    ``merge`` (``wbf``, ``nms``, ``soft_nms``) and the fusion settings ``fusion`` (``iou_thr``,
    ``skip_box_thr``, ``conf_type``, ``weights``...)."""
    counter = Counting(model)
    if policy is None:
        fn = counter
    else:
        from ttakit.detection import DetectionTTAWrapper

        fusion.setdefault("iou_thr", IOU_THR)
        fn = DetectionTTAWrapper(counter, policy, merge=merge, **fusion)
    outputs, seconds = timed(fn, test.images, repeats)
    rows = [image for batch in outputs for image in batch]
    scores = detection_map(rows, test.targets())
    return {
        "policy": name, "merge": merge or "-", "K": counter.images / len(test) / repeats,
        "pixels": _pixels(counter, test, repeats), "map": scores["map"],
        "map50": scores["map50"], "boxes_per_image": scores["detections"] / len(test), "seconds": seconds,
    }


# ----------------------------------------------------------------------------- searched policies
#
# The policies `ttakit search --task segmentation|detection` selects: views (and for detection the
# box-fusion settings) chosen greedily on the VALIDATION canvases by mIoU or mAP
# (`ttakit.search.dense.dense_search`), then scored on the test canvases, which the search never
# sees, as one more row beside hflip and multi-scale.


def _search(model: nn.Module, val: Canvases, task: str, args, **options) -> tuple[Any, dict[str, Any]]:
    """``dense_search`` on the validation canvases: the result and what it chose and cost.

    The search's time is split into running the candidate views over the validation canvases
    (the cache: forward passes) and selecting on the cached outputs (``result.seconds``)."""
    pool = default_dense_pool()
    targets = val.masks if task == "segmentation" else val.targets()
    started = time.perf_counter()
    with torch.inference_mode():
        result = dense_search(model, val.images, targets, task=task, views=pool, budget=args.budget, **options)
    seconds = time.perf_counter() - started
    record = {
        "task": task, "objective": result.objective, "budget": result.budget, "pool": [v.name for v in pool],
        "views": result.policy.view_names, "settings": result.settings, "n_images": result.n_images,
        "val_baseline": result.baseline, "val_score": result.score, "val_lift_pts": 100 * result.lift,
        "stop_reason": result.stop_reason, "seconds": seconds, "selection_seconds": result.seconds,
        "cache_seconds": seconds - result.seconds, "validation": result.to_json(),
    }
    return result, record


def _settings_text(settings: dict[str, Any] | None) -> str:
    """``wbf ios>=0.6 avg``: the merge, what boxes are matched by and at which overlap, WBF's conf_type."""
    if not settings:
        return "-"
    text = f"{settings['merge']} {settings.get('match', 'iou')}>={settings['iou_thr']:g}"
    return text + (f" {settings['conf_type']}" if settings["merge"] == "wbf" else "")


def searched_segmentation_rows(model: nn.Module, val: Canvases, test: Canvases, args) -> list[dict[str, Any]]:
    """The views selected by validation mIoU, scored on the test canvases (one row)."""
    result, record = _search(model, val, "segmentation", args, num_classes=len(val.mask_classes))
    print(f"  segmentation search on {len(val)} val canvases: {', '.join(record['views'])} "
          f"(val mIoU {record['val_baseline']:.4f} -> {record['val_score']:.4f}, {record['seconds']:.1f} s)", flush=True)
    row = segmentation_row(f"searched ({' + '.join(record['views'])})", model, test, result.policy, args.repeats)
    row["search"] = record
    print(f"  segmentation {row['policy']}: mIoU {row['miou']:.4f} ({row['seconds']:.1f} s)", flush=True)
    return [row]


def searched_detection_rows(model: nn.Module, val: Canvases, test: Canvases, args) -> list[dict[str, Any]]:
    """The views and merge settings selected by validation mAP@[.5:.95], scored on the test canvases
    (one row, run with the searched settings)."""
    result, record = _search(model, val, "detection", args, objective="map")
    settings = dict(record["settings"])
    print(f"  detection search on {len(val)} val canvases: {', '.join(record['views'])}, "
          f"{_settings_text(settings)} (val mAP {record['val_baseline']:.4f} -> {record['val_score']:.4f}, "
          f"{record['seconds']:.1f} s)", flush=True)
    merge = settings.pop("merge")
    row = detection_row(f"searched ({' + '.join(record['views'])})", model, test, result.policy, merge,
                        args.repeats, **settings)
    row["merge"] = _settings_text(record["settings"])  # the whole setting, not just the method
    row["search"] = record
    print(f"  detection {row['policy']} {row['merge']}: mAP {row['map']:.4f} ({row['seconds']:.1f} s)", flush=True)
    return [row]


# ----------------------------------------------------------------------------- the benchmark


def segmentation_rows(model: nn.Module, val: Canvases, test: Canvases, args) -> list[dict[str, Any]]:
    scale = Scale(SCALES, interpolation="bilinear")
    policies: list[tuple[str, Compose | None]] = [
        ("plain", None),
        ("hflip", Compose([HorizontalFlip()])),
        ("multi-scale", Compose([scale])),
        ("hflip x multi-scale", Compose([HorizontalFlip(), scale])),
        ("tiles 64 (overlap 0.5)", Compose([Tiles(64, 0.5)])),
        ("full + tiles 64", Compose([Tiles(64, 0.5, full_image=True)])),
    ]
    rows = []
    for name, policy in policies:
        rows.append(segmentation_row(name, model, test, policy, args.repeats))
        print(f"  segmentation {name}: mIoU {rows[-1]['miou']:.4f} ({rows[-1]['seconds']:.1f} s)", flush=True)
    return rows + searched_segmentation_rows(model, val, test, args)


def detection_rows(model: nn.Module, val: Canvases, test: Canvases, args) -> list[dict[str, Any]]:
    scale = Scale(SCALES, interpolation="bilinear")
    rows = [detection_row("plain", model, test, None, repeats=args.repeats)]
    print(f"  detection plain: mAP {rows[-1]['map']:.4f} ({rows[-1]['seconds']:.1f} s)", flush=True)
    for name, policy in (
        ("hflip", Compose([HorizontalFlip()])),
        ("multi-scale", Compose([scale])),
        ("hflip x multi-scale", Compose([HorizontalFlip(), scale])),
    ):
        for merge in MERGES:
            rows.append(detection_row(name, model, test, policy, merge, args.repeats))
            print(f"  detection {name} {merge}: mAP {rows[-1]['map']:.4f} ({rows[-1]['seconds']:.1f} s)", flush=True)
    return rows + searched_detection_rows(model, val, test, args)


def add_ratios(rows: list[dict[str, Any]], n_images: int, metrics: Sequence[str]) -> None:
    """Lift over plain (points), time per image and the ratio to K x plain, in place."""
    plain = rows[0]
    for row in rows:
        row["ms_per_image"] = 1000 * row["seconds"] / n_images
        row["ratio_to_K_plain"] = row["seconds"] / (row["K"] * plain["seconds"])
        for metric in metrics:
            row[f"{metric}_pct"] = 100 * row[metric]
            row[f"lift_{metric}_pts"] = 100 * (row[metric] - plain[metric])


def _epochs(n: int) -> str:
    return f"{n} epoch" + ("" if n == 1 else "s")


def _searched(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("search")]


def searched_section(results: dict[str, Any]) -> list[str]:
    """The searched policies: what the search chose on the validation canvases, its score there,
    its lift on the test canvases and its time (empty when the run holds none)."""
    found = [(r, "miou") for r in _searched(results["segmentation"])] + [(r, "map") for r in _searched(results["detection"])]
    if not found:
        return []
    table = markdown_table([
        {"task": r["search"]["task"], "selected by": {"miou": "mIoU", "map": "mAP", "map50": "mAP@.5"}[r["search"]["objective"]],
         "views": ", ".join(r["search"]["views"]), "merge": r["merge"] if "merge" in r else "mean of softmax",
         "val: no TTA %": f"{100 * r['search']['val_baseline']:.2f}", "val: searched %": f"{100 * r['search']['val_score']:.2f}",
         "val lift (pts)": f"{r['search']['val_lift_pts']:+.2f}", "test lift (pts)": f"{r[f'lift_{metric}_pts']:+.2f}",
         "K": f"{r['K']:g}", "search s (views / selection)":
             f"{r['search']['seconds']:.1f} ({r['search']['cache_seconds']:.1f} / {r['search']['selection_seconds']:.1f})",
         "stopped": r["search"]["stop_reason"]}
        for r, metric in found
    ])
    first = found[0][0]["search"]
    return [
        "## Searched policies (selected on the validation canvases, scored on the test canvases)",
        "",
        f"`ttakit.search.dense.dense_search` as `ttakit search --task segmentation|detection` runs it: each of the "
        f"{len(first['pool'])} candidate views ({', '.join(first['pool'])}) runs once over the "
        f"{first['n_images']} validation canvases and its de-augmented output is cached; views are then added "
        f"greedily from the identity while one raises the validation score, at most {first['budget']}. For detection "
        "a grid of merge settings (WBF, NMS, soft-NMS, NMW; IoU threshold; match by IoU or IoS; conf_type) is then "
        "scored for the chosen views and for the identity alone, and the detector's plain output is a candidate too, "
        "so the result is never below no TTA on the validation canvases. The test canvases are not searched on: the "
        "searched rows in the tables above are scored on them like the hand-picked ones. Search time: the candidate "
        "views' forward passes over the validation canvases, then the selection on the cached outputs (on a shared "
        "machine, with the other jobs' load).",
        "",
        table,
        "",
    ]


def report(results: dict[str, Any]) -> str:
    spec, seg, det = results["settings"], results["segmentation"], results["detection"]
    info = results["machine"]
    seg_table = markdown_table(
        [{"policy": r["policy"], "K": f"{r['K']:g}", "pixels (canvases)": f"{r['pixels']:.2f}", "mIoU %": f"{r['miou_pct']:.2f}",
          "lift (pts)": f"{r['lift_miou_pts']:+.2f}" if r is not seg[0] else "",
          "ms / image": f"{r['ms_per_image']:.2f}", "time / (K x plain)": f"{r['ratio_to_K_plain']:.2f}"} for r in seg]
    )
    det_table = markdown_table(
        [{"policy": r["policy"], "merge": r["merge"], "K": f"{r['K']:g}", "pixels (canvases)": f"{r['pixels']:.2f}",
          "mAP %": f"{r['map_pct']:.2f}",
          "lift (pts)": f"{r['lift_map_pts']:+.2f}" if r is not det[0] else "",
          "mAP@.5 %": f"{r['map50_pct']:.2f}",
          "lift @.5 (pts)": f"{r['lift_map50_pts']:+.2f}" if r is not det[0] else "",
          "boxes / image": f"{r['boxes_per_image']:.1f}", "ms / image": f"{r['ms_per_image']:.2f}", "time / (K x plain)": f"{r['ratio_to_K_plain']:.2f}"} for r in det]
    )
    lines = [
        "# Dense TTA: segmentation and detection on models trained here" + (" (quick run)" if results["quick"] else ""),
        "",
        f"Date: {results['date']}. Machine: {info['cpu_count']} CPU cores, torch threads {info['torch_threads']} "
        f"(shared with other jobs; load average at start {info.get('load_average_at_start')}), torch {info['torch']}. "
        f"This run {results['seconds'] / 60:.1f} min: U-Net trained in {results['train_seconds']['unet']:.0f} s, "
        f"detector in {results['train_seconds']['centernet']:.0f} s"
        + (" (recorded when trained; this run reused them from the work folder)" if results["reused"] else "")
        + "; on a shared machine these times include the other jobs' load.",
        "",
        f"Data: canvases of 96x96 pixels with 1-4 Fashion-MNIST items (20-44 px, random positions, Gaussian "
        f"background noise). {spec['train']} training canvases (items from training images 0-49,999), "
        f"{spec['val']} validation canvases (items from training images 50,000-59,999), {spec['test']} test "
        f"canvases (items from the test images). Models: `unet-small` ({results['params']['unet']:,} parameters, "
        f"{_epochs(spec['seg_epochs'])}) and `centernet-small` ({results['params']['centernet']:,} parameters, "
        f"{_epochs(spec['det_epochs'])}), Adam with a one-cycle schedule, random horizontal flips, seed {spec['seed']}.",
        "",
        "K: images the model sees per test image (views; tiles counted one by one). Time: the whole test set in "
        f"batches of {BATCH}, "
        + (f"the fastest of {results['repeats']} passes (on a shared machine, the least disturbed). "
           if results["repeats"] > 1 else "one pass: on a shared machine other jobs' load lands on some rows and "
           "not others (a ratio well below 1 is such noise); rerun with --repeats 3 on a quiet machine for timings. ")
        +
        "The ratio to K x plain shows what the views' resizing and the merge cost beyond the K forward passes; "
        "the pixels column says how many canvases' worth of pixels the model saw (a 0.75 view is 0.56 of a "
        "canvas, a 1.25 view 1.56, a 64x64 tile 0.44), which is what a forward pass of these fully "
        "convolutional models costs in proportion to.",
        "",
        "## Segmentation (mIoU over the 11 classes, background included)",
        "",
        "Probabilities (softmax) averaged over the views by `SegmentationTTAWrapper`. Multi-scale: "
        f"`Scale({SCALES}, interpolation='bilinear')`. Tiles: `Tiles(64, 0.5)` (4 tiles of 64x64 per canvas, "
        "overlaps averaged); full + tiles: the whole canvas as one more view.",
        "",
        seg_table,
        "",
        "Each view's own mIoU (its de-augmented output alone): "
        + "; ".join(f"{r['policy']}: " + ", ".join(f"{v} {100 * m:.2f}" for v, m in r["views_miou"].items())
                    for r in seg if r.get("views_miou")) + ".",
        "",
        "## Detection (COCO mAP@[.5:.95] and mAP@.5, pycocotools)",
        "",
        f"Views fused per image by `DetectionTTAWrapper` (ensemble-boxes), iou_thr {IOU_THR} for every hand-picked "
        "merge, conf_type avg for WBF (the searched row: the settings its search chose, in the merge column); the "
        "plain detector's output is its own peak-picked top 32.",
        "",
        det_table,
        "",
        *searched_section(results),
        "## Reading",
        "",
        *results["reading"],
        "",
    ]
    return "\n".join(lines)


def reading(seg: list[dict[str, Any]], det: list[dict[str, Any]]) -> list[str]:
    """Sentences computed from the numbers of this run (none is written by hand)."""
    out = []
    hand = [r for r in seg[1:] if not r.get("search")]  # the searched rows have their own sentences below
    best_seg = max(hand, key=lambda r: r["miou"])
    out.append(
        f"- Segmentation: the best hand-picked TTA row is {best_seg['policy']} ({100 * best_seg['miou']:.2f}% mIoU, "
        f"{best_seg['lift_miou_pts']:+.2f} pts over plain at {best_seg['K']:g}x the forward passes); "
        + ", ".join(f"{r['policy']} {r['lift_miou_pts']:+.2f}" for r in hand) + " pts."
    )
    views: dict[str, float] = {}
    for row in seg:
        views.update(row.get("views_miou") or {})
    identity = views.get("identity")
    weaker = {v: m for v, m in views.items() if identity is not None and m < identity - 0.01}
    if weaker:
        out.append(
            f"- Segmentation views alone, against the unaugmented view's {100 * identity:.2f}%: "
            + ", ".join(f"{v} {100 * m:.2f}%" for v, m in sorted(weaker.items()))
            + ". Averaging a view that is much weaker than the identity pulls the merge down. The U-Net saw items "
            "of 20-44 px only (flips, no scale augmentation): a 0.75 view shrinks the smallest items to 15 px and a "
            "1.25 view grows the largest to 55 px, outside that range, and a 64 px tile cuts items of up to 44 px, "
            "whose whole shape is what tells the classes apart."
        )
    stronger = {v: m for v, m in views.items() if identity is not None and m > identity and v != "identity"}
    if stronger:
        out.append(
            "- Views at least as good as the unaugmented one: "
            + ", ".join(f"{v} {100 * m:.2f}%" for v, m in sorted(stronger.items()))
            + "."
        )
    for policy in ("hflip", "multi-scale", "hflip x multi-scale"):
        by_merge = {r["merge"]: r for r in det if r["policy"] == policy}
        if not by_merge:
            continue
        wbf, nms = by_merge.get("wbf"), by_merge.get("nms")
        verdict = ""
        if wbf and nms:
            verdict = "WBF beats NMS" if wbf["map"] > nms["map"] else "WBF does not beat NMS"
            verdict += f" ({100 * (wbf['map'] - nms['map']):+.2f} pts mAP, {100 * (wbf['map50'] - nms['map50']):+.2f} pts mAP@.5)"
        lifts = ", ".join(f"{m} {r['lift_map_pts']:+.2f} / {r['lift_map50_pts']:+.2f}" for m, r in by_merge.items())
        out.append(f"- Detection, {policy}: lift over plain in mAP / mAP@.5 pts: {lifts}; {verdict}.")
    soft = [r for r in det if r["merge"] == "soft_nms"]
    hard = {r["policy"]: r for r in det if r["merge"] == "nms"}
    if soft and all(r["map"] < hard[r["policy"]]["map"] for r in soft):
        out.append(
            "- Soft-NMS scores below NMS on every view set: it keeps "
            + ", ".join(f"{r['boxes_per_image']:.0f}" for r in soft)
            + " boxes per image against NMS's "
            + ", ".join(f"{hard[r['policy']]['boxes_per_image']:.0f}" for r in soft)
            + ". Soft-NMS decays rather than drops the boxes that overlap a better one, which suits distinct "
            "objects that overlap; here most overlapping boxes are the other views' copies of the same object, so "
            "the copies stay as false positives, some ranked above weaker true objects."
        )
    return out + searched_reading(seg, det)


def _search_cost(row: dict[str, Any]) -> str:
    found = row["search"]
    return (f"The search took {found['seconds']:.0f} s ({found['cache_seconds']:.0f} s running the "
            f"{len(found['pool'])} candidate views over the {found['n_images']} validation canvases, "
            f"{found['selection_seconds']:.1f} s selecting); the searched row runs at {row['ms_per_image']:.2f} ms per "
            f"test image, {row['ratio_to_K_plain']:.2f}x K x plain.")


def _carried(row: dict[str, Any], lift: float, unit: str) -> str:
    """Whether the validation lift held on the test canvases."""
    found = row["search"]
    if found["val_lift_pts"] <= 0:
        return "Nothing beat no TTA on the validation canvases, so the search kept plain inference."
    if lift <= 0:
        return (f"The validation lift ({found['val_lift_pts']:+.2f} pts) did not carry over: on the test canvases the "
                f"searched policy is {lift:+.2f} pts {unit} against plain.")
    return f"The validation lift ({found['val_lift_pts']:+.2f} pts) held on the test canvases as {lift:+.2f} pts {unit}."


def _compared(gap: float) -> str:
    return "beats" if round(gap, 2) > 0 else "matches" if round(gap, 2) == 0 else "is below"


def searched_reading(seg: list[dict[str, Any]], det: list[dict[str, Any]]) -> list[str]:
    """Sentences on the searched rows against the hand-picked ones (computed, none written by hand)."""
    out = []
    hand_seg = [r for r in seg[1:] if not r.get("search")]
    for row in _searched(seg):
        found = row["search"]
        best = max(hand_seg, key=lambda r: r["miou"]) if hand_seg else None
        rivals = ", ".join(f"{r['policy']} {r['lift_miou_pts']:+.2f}" for r in hand_seg
                           if r["policy"] in ("hflip", "multi-scale"))
        text = (f"- Segmentation, searched by mIoU on the {found['n_images']} validation canvases: "
                f"{', '.join(found['views'])} (validation mIoU {100 * found['val_baseline']:.2f}% without TTA, "
                f"{100 * found['val_score']:.2f}% searched). On the test canvases: {100 * row['miou']:.2f}% mIoU, "
                f"{row['lift_miou_pts']:+.2f} pts over plain at K {row['K']:g}" + (f" (hand-picked: {rivals} pts)" if rivals else "")
                + ". " + _carried(row, row["lift_miou_pts"], "mIoU"))
        if best is not None:
            gap = row["lift_miou_pts"] - best["lift_miou_pts"]
            text += (f" The searched row {_compared(gap)} the best hand-picked row, "
                     f"{best['policy']} ({best['lift_miou_pts']:+.2f} pts at K {best['K']:g}; {gap:+.2f} pts).")
        out.append(text + " " + _search_cost(row))
    hand_det = [r for r in det[1:] if not r.get("search")]
    for row in _searched(det):
        found = row["search"]
        best = max(hand_det, key=lambda r: r["map"]) if hand_det else None
        rivals = ", ".join(f"{r['policy']} {r['merge']} {r['lift_map_pts']:+.2f}" for r in hand_det
                           if r["policy"] in ("hflip", "multi-scale") and r["merge"] == "wbf")
        text = (f"- Detection, searched by mAP on the {found['n_images']} validation canvases: "
                f"{', '.join(found['views'])} merged by {row['merge']} (validation mAP {100 * found['val_baseline']:.2f}% "
                f"without TTA, {100 * found['val_score']:.2f}% searched). On the test canvases: {100 * row['map']:.2f}% "
                f"mAP ({row['lift_map_pts']:+.2f} pts over plain; mAP@.5 {row['lift_map50_pts']:+.2f} pts) at K "
                f"{row['K']:g}" + (f" (hand-picked: {rivals} pts mAP)" if rivals else "") + ". "
                + _carried(row, row["lift_map_pts"], "mAP"))
        if best is not None:
            gap = row["lift_map_pts"] - best["lift_map_pts"]
            text += (f" The searched row {_compared(gap)} the best hand-picked row, "
                     f"{best['policy']} {best['merge']} ({best['lift_map_pts']:+.2f} pts at K {best['K']:g}; "
                     f"{gap:+.2f} pts).")
        out.append(text + " " + _search_cost(row))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 1-2 minute smoke run")
    parser.add_argument("--work", default="runs/bench-dense", help="where trained models are kept and reused")
    parser.add_argument("--train", type=int, default=None, help="training canvases (default 2500; quick 600)")
    parser.add_argument("--test", type=int, default=None, help="test canvases (default 500; quick 100)")
    parser.add_argument("--seg-epochs", type=int, default=None, help="U-Net epochs (default 8; quick 1)")
    parser.add_argument("--det-epochs", type=int, default=None, help="detector epochs (default 8; quick 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget", type=int, default=4, help="most views a searched policy may hold (default 4)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed passes per row, fastest kept (default 1)")
    parser.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    parser.add_argument("--out", default=None, help="results stem (default results/dense or dense-quick)")
    parser.add_argument("--summarize", action="store_true", help="rewrite the .md from the .json of an earlier run")
    args = parser.parse_args()
    stem = Path(args.out) if args.out else RESULTS / ("dense-quick" if args.quick else "dense")
    if args.summarize:
        from ttakit._io import read_json

        results = read_json(stem.with_suffix(".json"))
        results["reading"] = reading(results["segmentation"], results["detection"])
        save_results(stem.with_suffix(".json"), results)
        atomic_write_text(stem.with_suffix(".md"), report(results))
        print(f"wrote {stem}.md")
        return
    args.repeats = args.repeats or 1
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    spec = settings(args)
    machine = machine_info(torch.device("cpu"))
    train = load_fashion_canvases("train", spec["train"], seed=spec["seed"])
    val = load_fashion_canvases("val", spec["val"], seed=spec["seed"])
    test = load_fashion_canvases("test", spec["test"], seed=spec["seed"])
    print(f"canvases: {len(train)} train, {len(val)} val, {len(test)} test", flush=True)
    # batches of 16: twice the steps of 32 for the same time, which the per-pixel classes need
    seg_config = DenseTrainConfig(epochs=spec["seg_epochs"], batch_size=16, lr=5e-3, seed=spec["seed"])
    det_config = DenseTrainConfig(epochs=spec["det_epochs"], lr=3e-3, seed=spec["seed"])
    unet, unet_meta, unet_seconds = get_model("unet", train, val, seg_config, args, spec)
    det, det_meta, det_seconds = get_model("centernet", train, val, det_config, args, spec)
    reused = unet_seconds + det_seconds > time.perf_counter() - started + 1

    print("segmentation on the test canvases", flush=True)
    seg = segmentation_rows(unet, val, test, args)
    add_ratios(seg, len(test), ["miou"])
    print("detection on the test canvases", flush=True)
    det_rows = detection_rows(det, val, test, args)
    add_ratios(det_rows, len(test), ["map", "map50"])

    results = {
        "format": RUN_FORMAT,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
        "repeats": args.repeats,
        "budget": args.budget,
        "settings": spec,
        "machine": machine,
        "params": {"unet": sum(p.numel() for p in unet.parameters()), "centernet": sum(p.numel() for p in det.parameters())},
        "train_seconds": {"unet": unet_seconds, "centernet": det_seconds},
        "train_metrics": {"unet": unet_meta.metrics, "centernet": det_meta.metrics},
        "reused": reused,
        "segmentation": seg,
        "detection": det_rows,
        "reading": reading(seg, det_rows),
        "seconds": time.perf_counter() - started,
    }
    stem.parent.mkdir(parents=True, exist_ok=True)
    save_results(stem.with_suffix(".json"), results)
    atomic_write_text(stem.with_suffix(".md"), report(results))
    print("\n".join(results["reading"]))
    print(f"wrote {stem}.md and .json ({results['seconds'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
