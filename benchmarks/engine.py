"""Speed and memory of test-time augmentation: plain inference vs ttakit vs ttach.

For each model (the seed CNN, ResNet-20; random weights: speed does not depend on them), batch
size and policy (hflip: 2 views, d4: 8, hflip x 5 shifts: 10), the three contenders classify
the same Fashion-MNIST test images in batches of the same size (ttakit's ``max_batch`` equals
the batch size), side by side: each repetition runs every contender once, in a rotated order,
and the table shows medians. Targets: ttakit within 1.05 x (K x plain) and no slower than ttach.

Peak memory is measured in a fresh child process per configuration (resident set on CPU,
allocated tensors on CUDA), as the peak over the process's baseline after loading the model and
data. A 36-view policy is compared with a 2-view one at the same ``max_batch``: the engine keeps
at most ``max_batch`` augmented images at a time, whatever the number of views (target <= 1.2x).

Usage::

    python benchmarks/engine.py                    # the full run (a few minutes on 2 CPU cores)
    python benchmarks/engine.py --quick            # a smoke run
    python benchmarks/engine.py --images 10000 --batch-sizes 256 --out results/engine.json
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    format_table,
    load_test_images,
    machine_info,
    make_model,
    median,
    peak_memory_mb,
    pick_device,
    reset_peak_memory,
    run_child,
    save_results,
    split_batches,
    sync,
    time_side_by_side,
)

ARCHS = ("seed-cnn", "resnet20")
POLICIES = ("hflip", "d4", "hflip-shift")
SMALL_BATCH_POLICIES = ("hflip", "d4")


# --------------------------------------------------------------------------- the same views in ttach


def _ttach_shift_class():
    import ttach

    class Shift(ttach.base.DualTransform):
        """Whole-pixel shifts with zero padding, as a ttach transform (ttach has none)."""

        identity_param = (0, 0)

        def __init__(self, shifts):
            super().__init__("shift", [(0, 0), *shifts])

        def apply_aug_image(self, image, shift=(0, 0), **kwargs):
            dx, dy = shift
            if dx == 0 and dy == 0:
                return image
            h, w = image.shape[-2:]
            padded = F.pad(image, (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0)))
            return padded[..., max(-dy, 0) : max(-dy, 0) + h, max(-dx, 0) : max(-dx, 0) + w]

        def apply_deaug_mask(self, mask, **kwargs):
            raise ValueError("not needed here")

        def apply_deaug_label(self, label, **kwargs):
            return label

        def apply_deaug_keypoints(self, keypoints, **kwargs):
            raise ValueError("not needed here")

    return Shift


def ttach_transforms(policy: str):
    import ttach

    if policy == "hflip":
        return ttach.aliases.hflip_transform()
    if policy == "d4":
        return ttach.aliases.d4_transform()
    if policy == "hflip-shift":  # ttakit's hflip-shift, view for view
        return ttach.Compose([ttach.HorizontalFlip(), _ttach_shift_class()([(1, 0), (-1, 0), (0, 1), (0, -1)])])
    raise ValueError(policy)


def ttakit_policy(policy: str):
    import ttakit

    if policy == "same-size-36":  # 2 x 2 x 9 views that keep the image size
        return ttakit.Compose([ttakit.HorizontalFlip(), ttakit.Rotate90([0, 180]), ttakit.Shift.around((1,), 8)])
    return ttakit.get_policy(policy)


def make_forward(method: str, model, policy: str | None, max_batch: int):
    """``forward(batch)``: one contender's prediction for one batch, without autograd."""
    import ttach

    import ttakit

    if method == "ttakit":  # runs under inference_mode itself
        return ttakit.ClassificationTTAWrapper(model, ttakit_policy(policy), max_batch=max_batch)
    if method == "ttach":
        model = ttach.ClassificationTTAWrapper(model, ttach_transforms(policy))
    elif method != "plain":
        raise ValueError(method)

    def forward(batch):  # fair: no autograd bookkeeping for plain and ttach either
        with torch.inference_mode():
            return model(batch)

    return forward


# --------------------------------------------------------------------------- child: peak memory


def child(spec: dict[str, Any]) -> None:
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    images = load_test_images(spec["images"], device)
    model = make_model(spec["arch"], device)
    forward = make_forward(spec["method"], model, spec.get("policy"), spec["max_batch"])
    batches = split_batches(images, spec["batch_size"])
    gc.collect()
    sync(device)
    reset = reset_peak_memory(device)
    baseline = peak_memory_mb(device)
    for batch in batches:
        forward(batch)
    sync(device)
    peak = peak_memory_mb(device)
    print(json.dumps({"baseline_mb": baseline, "peak_mb": peak, "over_baseline_mb": peak - baseline,
                      "peak_was_reset": reset}))


def measure_memory(spec: dict[str, Any]) -> dict[str, Any]:
    spec = {**spec, "threads": torch.get_num_threads()}
    return {**spec, **run_child(Path(__file__), spec)}


# --------------------------------------------------------------------------- timing


def make_views_only(model, policy: str, batches):
    """The floor of any TTA: the model alone on each view of a batch, augmented beforehand.

    The views keep the memory layout augmentation gives them (a rotation is a strided view),
    since the model's speed can depend on it."""

    views = {b.data_ptr(): [t.augment_image(b) for t in ttakit_policy(policy)] for b in batches}

    def forward(batch):
        with torch.inference_mode():
            for view in views[batch.data_ptr()]:
                model(view)

    return forward


def time_configuration(arch, device, images, batch_size, max_batch, policies, repeats) -> list[dict[str, Any]]:
    model = make_model(arch, device)
    batches = split_batches(images, batch_size)
    contenders = {"plain": make_forward("plain", model, None, batch_size)}
    agreement = {}
    for policy in policies:
        contenders[f"views/{policy}"] = make_views_only(model, policy, batches)
        contenders[f"ttakit/{policy}"] = ours = make_forward("ttakit", model, policy, max_batch)
        contenders[f"ttach/{policy}"] = theirs = make_forward("ttach", model, policy, batch_size)
        agreement[policy] = float((ours(batches[0]) - theirs(batches[0])).abs().max())
    times = time_side_by_side(contenders, batches, repeats, device)
    per_image = {name: median(t) / batch_size for name, t in times.items()}
    rows = []
    for policy in policies:
        k = len(ttakit_policy(policy))
        plain, views = per_image["plain"], per_image[f"views/{policy}"]
        ours, theirs = per_image[f"ttakit/{policy}"], per_image[f"ttach/{policy}"]
        names = ("plain", f"views/{policy}", f"ttakit/{policy}", f"ttach/{policy}")
        rows.append({
            "arch": arch, "batch_size": batch_size, "max_batch": max_batch, "policy": policy, "views": k,
            "images": batch_size * len(batches), "repeats": repeats,
            "plain_us_per_image": plain * 1e6, "views_only_us_per_image": views * 1e6,
            "ttakit_us_per_image": ours * 1e6, "ttach_us_per_image": theirs * 1e6,
            "ttakit_over_k_plain": ours / (k * plain), "ttakit_over_views_only": ours / views,
            "ttakit_over_ttach": ours / theirs, "max_abs_diff_vs_ttach": agreement[policy],
            "batch_seconds": {name: times[name] for name in names},
        })
    return rows


def timing_table(rows) -> str:
    headers = ["model", "batch", "max_b", "policy", "K", "plain", "views", "ttakit", "ttach",
               "ttakit/(K*plain)", "ttakit/views", "ttakit/ttach", "|diff|"]
    body = [
        [r["arch"], r["batch_size"], r["max_batch"], r["policy"], r["views"], f"{r['plain_us_per_image']:.0f}",
         f"{r['views_only_us_per_image']:.0f}", f"{r['ttakit_us_per_image']:.0f}", f"{r['ttach_us_per_image']:.0f}",
         f"{r['ttakit_over_k_plain']:.3f}", f"{r['ttakit_over_views_only']:.3f}", f"{r['ttakit_over_ttach']:.3f}",
         f"{r['max_abs_diff_vs_ttach']:.0e}"]
        for r in rows
    ]
    return format_table(headers, body)


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when present")
    parser.add_argument("--batch-sizes", default="256,1,2,4,8",
                        help="comma-separated; the first is the main one (memory is measured there)")
    parser.add_argument("--images", type=int, default=512,
                        help="test images timed at the large batch sizes (10000 = the whole test set)")
    parser.add_argument("--small-images", type=int, default=16,
                        help="test images timed at batch sizes below 32 (one forward per batch is slow)")
    parser.add_argument("--repeats", type=int, default=3, help="repetitions; the table shows medians")
    parser.add_argument("--memory-batch", type=int, default=128, help="batch size = max_batch of the 36-view check")
    parser.add_argument("--archs", default=",".join(ARCHS))
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: seed CNN, few images, few configs")
    parser.add_argument("--out", help="write all results as JSON here (atomically)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.archs = args.archs.split(",")
    if args.quick:
        args.archs, args.images, args.small_images, args.repeats = ["seed-cnn"], 128, 16, 2
        args.batch_sizes = [64, 4]
        args.memory_batch = 32
    return args


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return {}
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    info = machine_info(device)
    print(f"ttakit engine benchmark on {device} (torch {info['torch']}, {info['torch_threads']} threads, "
          f"{info['cpu_count']} CPUs, load average {info.get('load_average_at_start')})")
    images_all = load_test_images(max(args.images, args.small_images), device)
    main_batch = args.batch_sizes[0]

    rows = []
    for arch in args.archs:
        for batch_size in args.batch_sizes:
            small = batch_size < 32
            n = min(args.small_images if small else args.images, images_all.shape[0])
            policies = SMALL_BATCH_POLICIES if small else POLICIES
            # Small batches: ttakit stacks views up to the main batch size, ttach cannot.
            max_batch = main_batch if small else batch_size
            rows += time_configuration(arch, device, images_all[:n], batch_size, max_batch, policies, args.repeats)
            print(f"  timed {arch} at batch size {batch_size} on {n} images "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
    print(f"\nMicroseconds per image: median over {args.repeats} passes of the batches, contenders taking "
          f"turns batch by batch ({args.images} test images at batch >= 32, {args.small_images} below).\n"
          "views = the model alone on the K pre-augmented views (the floor of any TTA); "
          "|diff| = max |ttakit - ttach| on one batch.")
    print(timing_table(rows))

    memory = []
    policies_mem = ("hflip",) if args.quick else POLICIES
    for arch in args.archs:
        base = {"arch": arch, "device": str(device), "batch_size": main_batch, "max_batch": main_batch,
                "images": main_batch}
        memory.append(measure_memory({**base, "method": "plain"}))
        for policy in policies_mem:
            for method in ("ttakit", "ttach"):
                memory.append(measure_memory({**base, "method": method, "policy": policy}))
    print(f"  measured memory ({time.perf_counter() - started:.0f} s)")
    print(f"\nPeak memory at batch size {main_batch} (a fresh process each; over baseline = peak - use after setup):")
    print(format_table(
        ["model", "method", "policy", "peak MB", "over baseline MB"],
        [[m["arch"], m["method"], m.get("policy", "-"), f"{m['peak_mb']:.0f}", f"{m['over_baseline_mb']:.1f}"]
         for m in memory],
    ))

    views = []
    arch = "seed-cnn" if args.quick else "resnet20"
    for policy in ("hflip", "same-size-36"):
        spec = {"arch": arch, "device": str(device), "batch_size": args.memory_batch, "max_batch": args.memory_batch,
                "images": args.memory_batch, "method": "ttakit", "policy": policy}
        views.append(measure_memory(spec))
    ratio = views[1]["over_baseline_mb"] / max(views[0]["over_baseline_mb"], 1e-9)
    print(f"\n36 views vs 2 views, {arch}, batch = max_batch = {args.memory_batch}: "
          f"{views[1]['over_baseline_mb']:.1f} MB vs {views[0]['over_baseline_mb']:.1f} MB over baseline "
          f"= {ratio:.2f}x (target <= 1.2x)")

    main_rows = [r for r in rows if r["batch_size"] >= 32]
    worst_k = max(r["ttakit_over_k_plain"] for r in main_rows)
    worst_ttach = max(r["ttakit_over_ttach"] for r in rows)
    summary = {
        "worst_ttakit_over_k_plain_at_large_batch": worst_k,
        "worst_ttakit_over_ttach": worst_ttach,
        "views_36_over_2_memory": ratio,
        "targets_met": {"k_plain_1.05": worst_k <= 1.05, "ttach_1.0": worst_ttach <= 1.0, "memory_1.2": ratio <= 1.2},
    }
    print(f"\nWorst ttakit/(K*plain) at batch >= 32: {worst_k:.3f} (target <= 1.05); "
          f"worst ttakit/ttach: {worst_ttach:.3f} (target <= 1.0)")
    elapsed = time.perf_counter() - started
    print(f"Total time: {elapsed:.0f} s")
    results = {"elapsed_s": elapsed, "machine": info, "args": {k: v for k, v in vars(args).items() if k != "child"},
               "timing": rows, "memory": memory, "views_memory": views, "summary": summary}
    if args.out:
        save_results(args.out, results)
        print(f"results written to {args.out}")
    return results


if __name__ == "__main__":
    main()
