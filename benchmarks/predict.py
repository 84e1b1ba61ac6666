"""Speed of ``ttakit predict`` on a folder of PNG files against the engine on the same images
preloaded as one tensor, same model and policy, side by side in one run.

The benchmark writes the 10,000 Fashion-MNIST test images as PNG files (reused when present),
saves a seed-CNN checkpoint (random weights: speed does not depend on them), and for each policy
(hflip, and d4: 8 views) times, in alternating rounds:

- preloaded: ``TTAEngine(model, policy).run(images)`` on the (10000, 1, 28, 28) tensor;
- predict:   ``ttakit.predict.predict_images`` on the folder (listing, decoding in DataLoader
  workers, the engine, uncertainty, CSV rows written and flushed per batch): the work behind
  ``ttakit predict``, without the interpreter start-up;
- and once per policy the CLI itself in a fresh process (``python -m ttakit.cli predict``), whose
  wall time includes Python and torch start-up.

First it sweeps decoding workers and batch size on hflip and keeps the fastest setting. Medians
of the rounds are reported; ratio = predict images/s / preloaded images/s (target >= 0.80).

    python benchmarks/predict.py                      # 10,000 images, writes benchmarks/results/predict.{md,json}
    python benchmarks/predict.py --n 2000 --rounds 2  # a quick look
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, format_table, machine_info, save_results  # noqa: E402
from ttakit.engine import TTAEngine  # noqa: E402
from ttakit.jobs.predict import predict_images  # noqa: E402
from ttakit.models import CheckpointMeta, create_model, save_checkpoint  # noqa: E402

POLICIES = ("hflip", "d4")


def write_pngs(folder: Path, n: int) -> list[Path]:
    """The first ``n`` Fashion-MNIST test images as PNG files in 10 sub-folders (reused if there)."""
    from ttakit.data import load_fashion_mnist

    marker = folder / f".complete-{n}"
    paths = [folder / f"{i % 10}" / f"{i:05d}.png" for i in range(n)]
    if marker.exists():
        return paths
    pixels = (load_fashion_mnist("test").images[:n] * 255).round().to(torch.uint8)
    for path, image in zip(paths, pixels, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[0].numpy(), mode="L").save(path)
    marker.touch()
    return paths


def make_checkpoint(folder: Path) -> tuple[Path, torch.nn.Module]:
    from ttakit.data import FASHION_MNIST_CLASSES

    torch.manual_seed(0)
    model = create_model("seed-cnn", in_channels=1, num_classes=10, image_size=(28, 28), mean=[0.286], std=[0.353])
    meta = CheckpointMeta(
        arch="seed-cnn", classes=list(FASHION_MNIST_CLASSES), in_channels=1, image_size=[28, 28], mean=[0.286], std=[0.353]
    )
    return save_checkpoint(folder / "run", model.eval(), meta), model.eval()


def load_pngs(paths: list[Path]) -> torch.Tensor:
    """The same files decoded once, as one (N, 1, 28, 28) tensor: the preloaded contender's input."""
    import numpy as np

    arrays = [np.asarray(Image.open(p).convert("L"), dtype=np.uint8) for p in paths]
    return torch.from_numpy(np.stack(arrays)).unsqueeze(1).float().div_(255.0)


def time_preloaded(model, images: torch.Tensor, policy: str, max_batch: int) -> float:
    engine = TTAEngine(model, policy, max_batch=max_batch)
    started = time.perf_counter()
    engine.run(images)
    return time.perf_counter() - started


def time_predict(run: Path, folder: Path, out: Path, policy: str, workers: int, batch_size: int, max_batch: int) -> float:
    started = time.perf_counter()
    summary = predict_images(
        run, folder, out=out, policy=policy, workers=workers, batch_size=batch_size, max_batch=max_batch, progress=False
    )
    seconds = time.perf_counter() - started
    assert summary["n_predicted"] == summary["n_images"], summary
    return seconds


def time_cli(
    run: Path, folder: Path, out: Path, policy: str, workers: int, batch_size: int, max_batch: int
) -> tuple[float, float]:
    """Wall seconds of the CLI in a fresh process, and the seconds it reports for the work itself."""
    command = [
        sys.executable, "-m", "ttakit.cli", "--no-progress", "predict", str(run), str(folder), "--policy", policy,
        "--out", str(out), "--workers", str(workers), "--batch-size", str(batch_size), "--max-batch", str(max_batch),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    started = time.perf_counter()
    done = subprocess.run(command, check=True, env=env, stdout=subprocess.PIPE, text=True)
    wall = time.perf_counter() - started
    work = float(re.search(r" in ([0-9.]+) s \(", done.stdout).group(1))
    return wall, work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="PNG files (Fashion-MNIST test images)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per policy")
    parser.add_argument("--workers", default="0,1,2", help="decoding workers to sweep (on hflip)")
    parser.add_argument("--batch-sizes", default="256,512", help="predict batch sizes to sweep (on hflip)")
    parser.add_argument("--max-batch", type=int, default=256)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "ttakit-bench-predict"))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "predict"))
    args = parser.parse_args()

    work = Path(args.workdir)
    folder = work / f"fashion-mnist-{args.n}"
    started_at = datetime.now(timezone.utc)
    info = machine_info(torch.device("cpu"))
    print(f"writing {args.n} PNG files to {folder} (reused when present)", flush=True)
    paths = write_pngs(folder, args.n)
    run, model = make_checkpoint(work)
    images = load_pngs(paths)
    out = work / "preds.csv"

    # Warm up both paths once (first-call allocations, worker start-up code paths).
    time_preloaded(model, images[:512], "hflip", args.max_batch)
    predict_images(run, paths[:512], out=out, policy="hflip", workers=1, progress=False)

    sweep = []
    workers_list = [int(w) for w in args.workers.split(",")]
    batch_list = [int(b) for b in args.batch_sizes.split(",")]
    print("sweep on hflip: workers x batch size", flush=True)
    preloaded_hflip = time_preloaded(model, images, "hflip", args.max_batch)
    for workers in workers_list:
        for batch in batch_list:
            seconds = time_predict(run, folder, out, "hflip", workers, batch, args.max_batch)
            sweep.append({"workers": workers, "batch_size": batch, "images_per_second": args.n / seconds})
            print(f"  workers={workers} batch={batch}: {args.n / seconds:.0f} img/s "
                  f"(preloaded {args.n / preloaded_hflip:.0f} img/s)", flush=True)
    best = max(sweep, key=lambda r: r["images_per_second"])
    workers, batch = best["workers"], best["batch_size"]
    print(f"using workers={workers}, batch size={batch}", flush=True)

    rows, records = [], []
    for policy in POLICIES:
        pre, pred = [], []
        for r in range(args.rounds):
            order = ("preloaded", "predict") if r % 2 == 0 else ("predict", "preloaded")
            for who in order:
                if who == "preloaded":
                    pre.append(time_preloaded(model, images, policy, args.max_batch))
                else:
                    pred.append(time_predict(run, folder, out, policy, workers, batch, args.max_batch))
        cli, cli_work = time_cli(run, folder, out, policy, workers, batch, args.max_batch)
        pre_rate = args.n / statistics.median(pre)
        pred_rate = args.n / statistics.median(pred)
        paired = [p / q for p, q in zip(pre, pred, strict=True)]  # per round: predict rate / preloaded rate
        record = {
            "policy": policy,
            "views": len(TTAEngine(model, policy).policy),
            "preloaded_images_per_second": pre_rate,
            "predict_images_per_second": pred_rate,
            "ratio": pred_rate / pre_rate,
            "paired_ratios": paired,
            "cli_wall_seconds": cli,
            "cli_work_seconds": cli_work,
            "cli_images_per_second": args.n / cli_work,
            "preloaded_seconds": pre,
            "predict_seconds": pred,
        }
        records.append(record)
        rows.append([policy, record["views"], f"{pre_rate:.0f}", f"{pred_rate:.0f}", f"{record['ratio']:.2f}",
                     " / ".join(f"{r:.2f}" for r in paired), f"{args.n / cli_work:.0f}", f"{cli - cli_work:.1f}"])
        print(f"{policy}: preloaded {pre_rate:.0f} img/s, predict {pred_rate:.0f} img/s, ratio {record['ratio']:.2f} "
              f"(per round {paired}); CLI {cli:.1f} s wall, {cli_work:.1f} s of work", flush=True)

    headers = ["policy", "views", "preloaded img/s", "predict img/s", "ratio", "ratio per round", "CLI img/s",
               "CLI start-up s"]
    table = format_table(headers, rows)
    info["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    results = {
        "benchmark": "predict",
        "date": started_at.isoformat(timespec="seconds"),
        "machine": info,
        "n_images": args.n,
        "model": "seed-cnn (Fashion-MNIST shape, random weights)",
        "max_batch": args.max_batch,
        "rounds": args.rounds,
        "chosen": {"workers": workers, "batch_size": batch},
        "sweep_hflip": sweep,
        "results": records,
        "target_ratio": 0.8,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_results(f"{args.out}.json", results)
    sweep_rows = [[s["workers"], s["batch_size"], f"{s['images_per_second']:.0f}"] for s in sweep]
    markdown = "\n".join([
        "# `ttakit predict` on PNG files vs the engine on preloaded images",
        "",
        f"Date: {results['date']}. Machine: {info['cpu_count']} CPU cores ({info['platform']}), torch {info['torch']}, "
        f"{info['torch_threads']} torch threads. Other jobs shared the CPU during the run (load average "
        f"{info['load_average_at_start'][0]} at the start, {info['load_average_at_end'][0]} at the end), so absolute "
        "figures are noisy; the two contenders ran in alternating rounds, so the ratio is the fairer number.",
        "",
        f"{args.n} Fashion-MNIST test images as PNG files; seed CNN; max_batch {args.max_batch}; medians of "
        f"{args.rounds} rounds. predict = `ttakit.predict.predict_images` (listing, decoding in {workers} DataLoader "
        f"worker process(es), batch {batch}, the engine with uncertainty, CSV rows flushed per batch); "
        "preloaded = `TTAEngine.run` on the same images held as one tensor. ratio = predict img/s / preloaded img/s "
        "(medians), and per round (the two ran back to back). CLI = `python -m ttakit.cli predict` in a fresh "
        "process: img/s over the run it reports, and the rest of its wall time (Python, torch and ttakit start-up).",
        "",
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---" if i == 0 else "--:" for i in range(len(headers))) + "|",
        *("| " + " | ".join(str(c) for c in row) + " |" for row in rows),
        "",
        "Sweep on hflip (predict img/s):",
        "",
        "| workers | batch size | img/s |",
        "|--:|--:|--:|",
        *(f"| {w} | {b} | {r} |" for w, b, r in sweep_rows),
        "",
    ])
    Path(f"{args.out}.md").write_text(markdown, encoding="utf-8")
    print()
    print(table)
    print(f"\nwritten to {args.out}.md and {args.out}.json")


if __name__ == "__main__":
    main()
