"""Speed and memory of test-time augmentation: plain inference vs ttakit vs ttach, side by side.

For each model (the seed CNN, ResNet-20; random weights: speed does not depend on them), batch
size (1, 2, 4, 8, 64, 256) and policy (hflip: 2 views, d4: 8, hflip x 5 shifts: 10), the
contenders classify the same Fashion-MNIST test images in batches of that size: plain inference,
ttakit with its default (fixed) pass plan, ttakit with ``pass_size="auto"`` (the plan chosen by
timing its first calls, opt-in) and ttach (ttakit's ``max_batch`` is 256; its default plan on
CPU stacks the views of a batch into passes of up to 32 images, runs one view of the whole batch
per pass for 33 to 255 images, and cuts a batch of 256 into chunks of 32; ttach runs one view of
the whole batch per pass). In each of ``--rounds``
rounds every contender classifies all the images, taking turns
batch by batch in a seeded random order, each timed call right after an untimed call of the same
contender on the previous batch, as a user's repeated calls of one wrapper run. The table shows
each contender's least disturbed run: every batch's fastest round, summed, since other jobs share
this machine's cores. ttakit's target: no slower than ttach anywhere (``ttakit/ttach <= 1``).

Why the untimed call: a call runs faster right after a call of the same shapes, whose data is
still in the CPU caches (``benchmarks/engine_profile.py`` measures it: a few per cent for the
seed CNN at batch 1). Without it (``--order shuffle``), ttach's passes of one image follow a call
of one image (plain inference's, the A/A copy's, its own) in 11 calls of 16, ttakit's stacked
passes follow their own shapes in 1 of 16: the order then favours ttach.

Each policy is timed in rounds of its own (plain, ttakit, ttach, and a second ttach wrapper as an
A/A control: ``ttach/ttach`` is how far two copies of the same code land apart, the noise floor
of a ratio), as a user's repeated calls of one policy would run; interleaving all three policies
in the same rounds made each call follow another policy's passes of 8 or 10 images.

Peak memory is measured in a fresh child process per configuration (resident set on CPU,
allocated tensors on CUDA), as the peak over the process's baseline after loading the model and
data. A 36-view policy is compared with a 2-view one at the same ``max_batch``: the engine keeps
at most ``max_batch`` augmented images at a time, whatever the number of views (target <= 1.2x).

Usage::

    python benchmarks/engine.py          # the full run (about 20-25 min on 2 CPU cores), writes
                                         # benchmarks/results/engine.{md,json}
    python benchmarks/engine.py --quick  # a smoke run (about 1 min; writes nothing unless --out is given)
"""

from __future__ import annotations

import argparse
import datetime
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
    least_disturbed,
    load_test_images,
    machine_info,
    make_model,
    peak_memory_mb,
    pick_device,
    reset_peak_memory,
    run_child,
    save_results,
    split_batches,
    sync,
    time_rounds,
)

ARCHS = ("seed-cnn", "resnet20")
POLICIES = ("hflip", "d4", "hflip-shift")
BATCH_SIZES = (1, 2, 4, 8, 64, 256)
MAX_BATCH = 256
CPU_PASS = 32  # ttakit.engine's default pass size on CPU
TUNING_CALLS = 15  # calls pass_size="auto" may spend choosing its pass plan for one input shape
RESULTS = Path(__file__).resolve().parent / "results"
ORDER_TEXT = {
    "after-itself": "In a round the contenders take turns batch by batch in a seeded random order, each timed "
    "call right after an untimed call of the same contender on the previous batch, as a user's repeated calls "
    "run (without it the order favoured ttach: a call runs faster right after a call of its own shapes, see "
    "engine-profile.md).",
    "shuffle": "In a round the contenders take turns batch by batch, in a seeded random order drawn at every "
    "batch (this order favours ttach at batch 1: a call runs faster right after a call of its own shapes, see "
    "engine-profile.md).",
}


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
    """``forward(batch)``: one contender's prediction for one batch, without autograd.
    ``ttakit``: the default (fixed) pass plan; ``ttakit-auto``: ``pass_size="auto"``."""
    import ttach

    import ttakit

    if method in ("ttakit", "ttakit-auto"):  # runs under inference_mode itself
        pass_size = "auto" if method == "ttakit-auto" else None
        return ttakit.ClassificationTTAWrapper(model, ttakit_policy(policy), max_batch=max_batch, pass_size=pass_size)
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


def default_pass(device: torch.device, batch_size: int) -> int:
    """Images per forward pass of the engine's default plan for this batch size (what it runs)."""
    import ttakit

    engine = ttakit.TTAEngine(torch.nn.Identity(), "hflip", max_batch=MAX_BATCH)
    return engine._default_pass(device, batch_size)


def make_plain_in_passes(model, size: int):
    def forward(batch):
        with torch.inference_mode():
            return torch.cat([model(part) for part in batch.split(size)])

    return forward


def time_configuration(arch, device, images, batch_size, policies, rounds, order="after-itself") -> list[dict[str, Any]]:
    """One model and batch size, one policy at a time: plain, ttakit and ttach (and a second ttach
    wrapper, the A/A control: how far two copies of the same code differ on this machine)
    taking turns batch by batch; per-image times of each contender's least disturbed run (each batch's fastest
    round, summed).

    Each policy gets its own rounds, as a user's repeated calls of one policy would run."""
    model = make_model(arch, device)
    batches = split_batches(images, batch_size)
    rows = []
    for policy in policies:
        contenders = {"plain": make_forward("plain", model, None, batch_size)}
        if batch_size > CPU_PASS and device.type == "cpu":
            # Plain inference in passes of CPU_PASS images, as ttakit's engine runs on CPU: where the
            # gain at a large batch comes from (a large pass runs slower per image here).
            contenders["plain-pass"] = make_plain_in_passes(model, CPU_PASS)
        contenders["ttakit"] = ours = make_forward("ttakit", model, policy, MAX_BATCH)
        contenders["ttakit-auto"] = auto = make_forward("ttakit-auto", model, policy, MAX_BATCH)
        contenders["ttach"] = theirs = make_forward("ttach", model, policy, batch_size)
        contenders["ttach-again"] = make_forward("ttach", model, policy, batch_size)
        agreement = float((ours(batches[0]) - theirs(batches[0])).abs().max())
        # pass_size="auto" times its pass plans on the first calls of each input shape (5 calls per
        # candidate, at most 3 candidates): let it settle, as a long-running user's calls would.
        for _ in range(TUNING_CALLS):
            auto(batches[0])
        tuned = auto.engine.tuned_pass_sizes.get(tuple(batches[0].shape))
        auto_agreement = float((auto(batches[0]) - ours(batches[0])).abs().max())
        times = time_rounds(contenders, batches, rounds, device, order=order)
        n_images = batch_size * len(batches)
        best = {name: least_disturbed(t) / n_images for name, t in times.items()}
        best.setdefault("plain-pass", best["plain"])
        k = len(ttakit_policy(policy))
        plain, ours_t, theirs_t, auto_t = best["plain"], best["ttakit"], best["ttach"], best["ttakit-auto"]
        rows.append({
            "arch": arch, "batch_size": batch_size, "max_batch": MAX_BATCH, "policy": policy, "views": k,
            "images": n_images, "rounds": rounds,
            "plain_us_per_image": plain * 1e6, "plain_pass_us_per_image": best["plain-pass"] * 1e6,
            "ttakit_us_per_image": ours_t * 1e6, "ttach_us_per_image": theirs_t * 1e6,
            "ttakit_auto_us_per_image": auto_t * 1e6, "ttakit_auto_over_ttach": auto_t / theirs_t,
            "ttakit_auto_over_ttakit": auto_t / ours_t, "max_abs_diff_auto_vs_default": auto_agreement,
            "ttach_again_us_per_image": best["ttach-again"] * 1e6,
            "ttakit_over_k_plain_pass": ours_t / (k * best["plain-pass"]),
            "ttakit_over_k_plain": ours_t / (k * plain), "ttach_over_k_plain": theirs_t / (k * plain),
            "ttakit_over_ttach": ours_t / theirs_t,
            "ttach_again_over_ttach": best["ttach-again"] / theirs_t,
            "ttakit_fixed_us_per_call": (ours_t - k * plain) * batch_size * 1e6,
            "ttach_fixed_us_per_call": (theirs_t - k * plain) * batch_size * 1e6,
            "max_abs_diff_vs_ttach": agreement,
            "ttakit_pass_size": default_pass(device, batch_size),
            "ttakit_auto_pass_size": tuned,
            "round_seconds": {name: [sum(r) for r in t] for name, t in times.items()},
        })
    return rows


def aa_noise_by_batch(rows: list[dict[str, Any]]) -> dict[int, float]:
    """Per batch size, the largest |ttach/ttach - 1| of the A/A control over its configurations."""
    out: dict[int, float] = {}
    for r in rows:
        b = r["batch_size"]
        out[b] = max(out.get(b, 0.0), abs(r["ttach_again_over_ttach"] - 1.0))
    return out


def fixed_cost(rounds: int, calls: int = 400) -> list[dict[str, Any]]:
    """Each wrapper's cost per call around a model that costs almost nothing (a linear layer on
    the flattened image): what a call costs besides the model. Per call, the minimum over
    ``rounds x calls`` calls, ttakit and ttach alternating call by call."""
    import ttach

    import ttakit

    torch.manual_seed(0)
    linear = torch.nn.Linear(28 * 28, 10).eval()

    def model(x):
        return linear(x.flatten(1))

    rows = []
    for policy in POLICIES:
        for batch_size in (1, 8):
            x = torch.rand(batch_size, 1, 28, 28)
            ours = ttakit.ClassificationTTAWrapper(model, ttakit_policy(policy), max_batch=MAX_BATCH)
            auto = ttakit.ClassificationTTAWrapper(model, ttakit_policy(policy), max_batch=MAX_BATCH, pass_size="auto")
            for _ in range(TUNING_CALLS):
                auto(x)
            theirs = ttach.ClassificationTTAWrapper(model, ttach_transforms(policy))

            def plain(x=x):
                with torch.inference_mode():
                    return model(x)

            def ttach_call(x=x, theirs=theirs):
                with torch.inference_mode():
                    return theirs(x)

            contenders = {"plain": plain, "ttakit": lambda x=x, ours=ours: ours(x),
                          "ttakit-auto": lambda x=x, auto=auto: auto(x), "ttach": ttach_call}
            best = dict.fromkeys(contenders, float("inf"))
            for name in contenders:
                contenders[name]()
            for _ in range(rounds * calls):
                for name, call in contenders.items():
                    start = time.perf_counter()
                    call()
                    best[name] = min(best[name], time.perf_counter() - start)
            rows.append({"policy": policy, "views": len(ttakit_policy(policy)), "batch_size": batch_size,
                         **{f"{name}_us_per_call": t * 1e6 for name, t in best.items()},
                         "ttakit_over_ttach": best["ttakit"] / best["ttach"],
                         "ttakit_auto_over_ttach": best["ttakit-auto"] / best["ttach"]})
    return rows


def timing_table(rows) -> str:
    headers = ["model", "batch", "policy", "K", "plain", "plain/32", "ttakit", "auto", "auto pass", "ttach",
               "ttakit/ttach", "auto/ttach", "ttach/ttach (A/A)", "ttakit/(K*plain)", "ttach/(K*plain)", "|diff|"]
    body = [
        [r["arch"], r["batch_size"], r["policy"], r["views"], f"{r['plain_us_per_image']:.0f}",
         f"{r['plain_pass_us_per_image']:.0f}",
         f"{r['ttakit_us_per_image']:.0f}", f"{r['ttakit_auto_us_per_image']:.0f}", r.get("ttakit_auto_pass_size"),
         f"{r['ttach_us_per_image']:.0f}", f"{r['ttakit_over_ttach']:.3f}", f"{r['ttakit_auto_over_ttach']:.3f}",
         f"{r['ttach_again_over_ttach']:.3f}", f"{r['ttakit_over_k_plain']:.3f}", f"{r['ttach_over_k_plain']:.3f}", f"{r['max_abs_diff_vs_ttach']:.0e}"]
        for r in rows
    ]
    return format_table(headers, body)


def markdown(results: dict[str, Any]) -> str:
    info, args, summary = results["machine"], results["args"], results["summary"]
    lines = [
        "# Engine benchmark: plain vs ttakit vs ttach",
        "",
        f"- date: {results['date']}",
        f"- machine: {info['cpu_count']} CPU cores ({info['platform']}), device {info['device']}, "
        f"torch {info['torch']}, {info['torch_threads']} torch thread(s); load average at start "
        f"{info.get('load_average_at_start')}. Other jobs were running on the same cores: timings are the "
        f"least disturbed: each batch's fastest of {args['small_rounds']} (batch < 32) or {args['rounds']} "
        "(batch >= 32) rounds, summed over the batches. "
        + ORDER_TEXT[args.get("order", "after-itself")]
        + " Each policy is timed in its own rounds (plain, ttakit, ttach and a second ttach wrapper, the A/A "
        "control).",
        f"- command: `python benchmarks/engine.py {' '.join(results['argv'])}`".rstrip(),
        f"- images per configuration: {args['small_images']} at batch < 32, {args['images']} at batch >= 32 "
        f"(Fashion-MNIST test set, 1x28x28); ttakit max_batch = {MAX_BATCH}; random weights.",
        "",
        "Microseconds per image (least disturbed run). ttakit/ttach <= 1 is the target; "
        "max diff = max abs(ttakit - ttach) on one batch (both merge raw logits). plain and ttach run the whole "
        "batch in one forward pass per view. `ttakit` is the engine's default, fixed plan (`pass`: images per "
        f"forward pass: up to {CPU_PASS} on CPU with the views of a small batch stacked, the whole batch for 33 to "
        f"{MAX_BATCH - 1} images (one view per pass, ttach's plan), chunks of {CPU_PASS} from {MAX_BATCH} images on). "
        "`auto` is `pass_size=\"auto\"` (opt-in): the engine chooses, per input shape, how many images a forward "
        f"pass holds by timing its first calls (up to {TUNING_CALLS}, run before the timed rounds) among passes of "
        f"{CPU_PASS}, the whole batch (one view per pass, ttach's plan) and max_batch; `auto pass` is its choice "
        "(its answers equal the default's to float rounding). "
        f"plain/32 is plain inference in passes of {CPU_PASS} images: at batch 64 and 256 much of ttakit's gain "
        "over ttach is the pass size (a large pass can run slower per image on this machine), not TTA.",
        "",
        "| model | batch | policy | K | pass | plain | plain/32 | ttakit | auto | auto pass | ttach | ttakit/ttach | auto/ttach | ttach/ttach (A/A) | ttakit/(K·plain/32) | max diff |",
        "|---|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in results["timing"]:
        lines.append(
            f"| {r['arch']} | {r['batch_size']} | {r['policy']} | {r['views']} | {r.get('ttakit_pass_size')} | "
            f"{r['plain_us_per_image']:.0f} | "
            f"{r['plain_pass_us_per_image']:.0f} | {r['ttakit_us_per_image']:.0f} | "
            f"{r['ttakit_auto_us_per_image']:.0f} | {r.get('ttakit_auto_pass_size')} | {r['ttach_us_per_image']:.0f} | "
            f"{r['ttakit_over_ttach']:.3f} | {r['ttakit_auto_over_ttach']:.3f} | {r['ttach_again_over_ttach']:.3f} | "
            f"{r['ttakit_over_k_plain_pass']:.3f} | "
            f"{r['max_abs_diff_vs_ttach']:.0e} |"
        )
    lines += [
        "",
        f"Worst ttakit/ttach: **{summary['worst_ttakit_over_ttach']:.3f}** "
        f"({summary['worst_ttakit_over_ttach_at']}); configurations above 1.0: "
        f"{summary['n_above_ttach']} of {len(results['timing'])}. A/A control: two ttach wrappers land up to "
        + ", ".join(f"{100 * v:.1f}% apart at batch {b}" for b, v in summary["aa_noise_by_batch"].items())
        + f" (the largest |ttach/ttach - 1| over that batch size's configurations); ttakit is above ttach by more "
        f"than that in {summary['n_above_ttach_beyond_noise']} of {len(results['timing'])} configurations.",
        f"Worst ttakit/(K·plain/32) at batch >= 64: {summary['worst_ttakit_over_k_plain_pass_at_large_batch']:.3f}.",
        f"What opt-in tuning adds: `pass_size=\"auto\"` took {summary['ttakit_auto_over_ttakit_median']:.3f} of the "
        f"default plan's time (median; range {summary['ttakit_auto_over_ttakit_range'][0]:.3f}–"
        f"{summary['ttakit_auto_over_ttakit_range'][1]:.3f}); worst auto/ttach "
        f"{summary['worst_ttakit_auto_over_ttach']:.3f}; largest |auto - default| "
        f"{summary['max_abs_diff_auto_vs_default']:.0e}.",
    ]
    if results.get("fixed_cost"):
        lines += ["", "Cost per call around a near-free model (a linear layer on the flattened image), so the "
                  "model costs almost nothing: what a call costs besides the model. Microseconds per call, the "
                  f"minimum over {args['rounds'] * 400} calls, contenders alternating call by call.", "",
                  "| policy | K | batch | plain | ttakit | auto | ttach | ttakit/ttach | auto/ttach |",
                  "|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
        for r in results["fixed_cost"]:
            lines.append(f"| {r['policy']} | {r['views']} | {r['batch_size']} | {r['plain_us_per_call']:.1f} | "
                         f"{r['ttakit_us_per_call']:.1f} | {r['ttakit-auto_us_per_call']:.1f} | "
                         f"{r['ttach_us_per_call']:.1f} | {r['ttakit_over_ttach']:.2f} | {r['ttakit_auto_over_ttach']:.2f} |")
    if results.get("memory"):
        lines += ["", f"Peak memory at batch size {MAX_BATCH} (fresh process each; MB over the baseline after setup):",
                  "", "| model | method | policy | peak MB | over baseline MB |", "|---|---|---|--:|--:|"]
        for m in results["memory"]:
            lines.append(f"| {m['arch']} | {m['method']} | {m.get('policy', '-')} | {m['peak_mb']:.0f} | "
                         f"{m['over_baseline_mb']:.1f} |")
    if results.get("views_memory"):
        v = results["views_memory"]
        lines += ["", f"36 views vs 2 views, {v[0]['arch']}, batch = max_batch = {v[0]['batch_size']}: "
                  f"{v[1]['over_baseline_mb']:.1f} MB vs {v[0]['over_baseline_mb']:.1f} MB over baseline = "
                  f"{summary['views_36_over_2_memory']:.2f}x (target <= 1.2x)."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when present")
    parser.add_argument("--batch-sizes", default=",".join(map(str, BATCH_SIZES)), help="comma-separated")
    parser.add_argument("--images", type=int, default=256, help="test images timed at batch sizes >= 32")
    parser.add_argument("--small-images", type=int, default=32, help="test images timed at batch sizes < 32")
    parser.add_argument("--rounds", type=int, default=5,
                        help="interleaved rounds at batch sizes >= 32; the table shows each batch's fastest")
    parser.add_argument("--small-rounds", type=int, default=10, help="interleaved rounds at batch sizes < 32")
    parser.add_argument("--order", choices=["after-itself", "shuffle"], default="after-itself",
                        help="after-itself: each timed call right after an untimed call of the same contender "
                             "(default); shuffle: without it (favours ttach at batch 1, see engine_profile.py)")
    parser.add_argument("--memory-batch", type=int, default=128, help="batch size = max_batch of the 36-view check")
    parser.add_argument("--archs", default=",".join(ARCHS))
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: steadier on a shared machine)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    parser.add_argument("--quick", action="store_true", help="a smoke run: seed CNN, few images, few configs")
    parser.add_argument("--out", help="JSON results here; the Markdown beside it (default: benchmarks/results/engine.json)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.archs = args.archs.split(",")
    args.policies = args.policies.split(",")
    if args.quick:
        args.archs, args.images, args.small_images, args.rounds, args.small_rounds = ["seed-cnn"], 128, 8, 2, 2
        args.batch_sizes = [1, 64]
        args.memory_batch = 32
    return args


def main(argv=None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return {}
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    info = machine_info(device)
    print(f"ttakit engine benchmark on {device} (torch {info['torch']}, {info['torch_threads']} thread(s), "
          f"{info['cpu_count']} CPUs, load average {info.get('load_average_at_start')})", flush=True)
    images_all = load_test_images(max(args.images, args.small_images), device)

    rows = []
    for arch in args.archs:
        for batch_size in args.batch_sizes:
            n = min(args.small_images if batch_size < 32 else args.images, images_all.shape[0])
            n = max(n, batch_size)
            rounds = args.small_rounds if batch_size < 32 else args.rounds
            rows += time_configuration(arch, device, images_all[:n], batch_size, args.policies, rounds, args.order)
            print(f"  timed {arch} at batch size {batch_size} on {n} images, {rounds} rounds "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
    fixed = fixed_cost(args.rounds)
    print(f"\nCost per call around a near-free model (a linear layer), minimum over {args.rounds * 400} calls:")
    print(format_table(["policy", "K", "batch", "plain us", "ttakit us", "auto us", "ttach us", "ttakit/ttach",
                        "auto/ttach"],
                       [[r["policy"], r["views"], r["batch_size"], f"{r['plain_us_per_call']:.1f}",
                         f"{r['ttakit_us_per_call']:.1f}", f"{r['ttakit-auto_us_per_call']:.1f}",
                         f"{r['ttach_us_per_call']:.1f}", f"{r['ttakit_over_ttach']:.2f}",
                         f"{r['ttakit_auto_over_ttach']:.2f}"] for r in fixed]))
    print(f"\nMicroseconds per image: each batch's fastest of {args.small_rounds} (batch < 32) or {args.rounds} "
          "interleaved rounds, summed "
          f"(ttakit max_batch = {MAX_BATCH}); |diff| = max |ttakit - ttach| on one batch.")
    print(timing_table(rows))

    memory, views = [], []
    if not args.no_memory:
        policies_mem = ("hflip",) if args.quick else args.policies
        for arch in args.archs:
            base = {"arch": arch, "device": str(device), "batch_size": MAX_BATCH, "max_batch": MAX_BATCH,
                    "images": MAX_BATCH}
            memory.append(measure_memory({**base, "method": "plain"}))
            for policy in policies_mem:
                for method in ("ttakit", "ttach"):
                    memory.append(measure_memory({**base, "method": method, "policy": policy}))
        print(f"  measured memory ({time.perf_counter() - started:.0f} s)")
        print(f"\nPeak memory at batch size {MAX_BATCH} (a fresh process each; over baseline = peak - use after setup):")
        print(format_table(
            ["model", "method", "policy", "peak MB", "over baseline MB"],
            [[m["arch"], m["method"], m.get("policy", "-"), f"{m['peak_mb']:.0f}", f"{m['over_baseline_mb']:.1f}"]
             for m in memory],
        ))
        arch = "seed-cnn" if args.quick else "resnet20"
        for policy in ("hflip", "same-size-36"):
            spec = {"arch": arch, "device": str(device), "batch_size": args.memory_batch,
                    "max_batch": args.memory_batch, "images": args.memory_batch, "method": "ttakit", "policy": policy}
            views.append(measure_memory(spec))

    large = [r for r in rows if r["batch_size"] >= 64]
    worst = max(rows, key=lambda r: r["ttakit_over_ttach"])
    aa_noise = aa_noise_by_batch(rows)
    ratio = views[1]["over_baseline_mb"] / max(views[0]["over_baseline_mb"], 1e-9) if views else None
    auto_ratios = sorted(r["ttakit_auto_over_ttakit"] for r in rows)
    summary = {
        "worst_ttakit_over_ttach": worst["ttakit_over_ttach"],
        "worst_ttakit_auto_over_ttach": max(r["ttakit_auto_over_ttach"] for r in rows),
        "ttakit_auto_over_ttakit_median": auto_ratios[len(auto_ratios) // 2],
        "ttakit_auto_over_ttakit_range": [auto_ratios[0], auto_ratios[-1]],
        "max_abs_diff_auto_vs_default": max(r["max_abs_diff_auto_vs_default"] for r in rows),
        "worst_ttakit_over_ttach_at": f"{worst['arch']}, batch {worst['batch_size']}, {worst['policy']}",
        "n_above_ttach": sum(r["ttakit_over_ttach"] > 1.0 for r in rows),
        "aa_noise_by_batch": aa_noise,
        "n_above_ttach_beyond_noise": sum(r["ttakit_over_ttach"] > 1.0 + aa_noise[r["batch_size"]] for r in rows),
        "worst_ttakit_over_k_plain_at_large_batch": max((r["ttakit_over_k_plain"] for r in large), default=float("nan")),
        "worst_ttakit_over_k_plain_pass_at_large_batch": max(
            (r["ttakit_over_k_plain_pass"] for r in large), default=float("nan")
        ),
        "views_36_over_2_memory": ratio,
        "targets_met": {"ttach_1.0": worst["ttakit_over_ttach"] <= 1.0,
                        "memory_1.2": None if ratio is None else ratio <= 1.2},
    }
    if ratio is not None:
        print(f"\n36 views vs 2 views: {ratio:.2f}x the memory over baseline (target <= 1.2x)")
    print(f"\nWorst ttakit/ttach: {summary['worst_ttakit_over_ttach']:.3f} ({summary['worst_ttakit_over_ttach_at']}); "
          f"{summary['n_above_ttach']} of {len(rows)} configurations above 1.0; "
          f"{summary['n_above_ttach_beyond_noise']} above 1.0 by more than the A/A control at their batch size")
    elapsed = time.perf_counter() - started
    print(f"Total time: {elapsed:.0f} s")
    results = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "argv": argv, "elapsed_s": elapsed, "machine": info,
               "args": {k: v for k, v in vars(args).items() if k != "child"},
               "timing": rows, "fixed_cost": fixed, "memory": memory, "views_memory": views, "summary": summary}
    out = Path(args.out) if args.out else (None if args.quick else RESULTS / "engine.json")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_results(out, results)
        from ttakit._io import atomic_write_text

        atomic_write_text(out.with_suffix(".md"), markdown(results))
        print(f"results written to {out} and {out.with_suffix('.md')}")
    return results


if __name__ == "__main__":
    main()
