"""Scaling over processes: ``ttakit predict`` and the search's view caching on 1 process against
2 processes under torchrun (gloo on loopback), one torch thread each, side by side in one run.

- predict: ``ttakit predict`` on N Fashion-MNIST test images written as PNG files (reused when
  present; a seed-CNN checkpoint with random weights: speed does not depend on them), policy d4
  (8 views), decoding in the predicting process (``--workers 0``), ``OMP_NUM_THREADS=1``. The
  rate is the one ``ttakit predict`` reports (images over the image loop's seconds; under
  torchrun all ranks' images over the slowest rank's seconds); the wall time of the whole
  command (Python, torch and the process group starting, the model loading, rank 0 merging the
  part files) is reported beside it. The two outputs are checked to be the same bytes.
- search caching: the search's candidate pool (:func:`ttakit.search.run.candidate_pool`) run
  over N validation images (:func:`ttakit.search.cache.run_views`), the views shared out among
  the ranks (:func:`ttakit.search.cache.split_views`) and gathered; the rate is forward passes
  of one image per second.

Each setting runs ``--rounds`` times in alternating order (1 then 2 processes, then 2 then 1);
medians are reported; ratio = 2-process rate / 1-process rate (target >= 1.7 on 2 free cores).

    python benchmarks/scale.py                  # 10,000 images, writes benchmarks/results/scale.{md,json}
    python benchmarks/scale.py --images 500     # a quick look, writes benchmarks/results/scale-quick.{md,json}
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, format_table, machine_info, save_results  # noqa: E402

RUN_FORMAT = 1  # bump when what a run measures changes
TARGET_RATIO = 1.7
POLICY = "d4"


def write_pngs(folder: Path, n: int) -> None:
    """The first ``n`` Fashion-MNIST test images as PNG files (reused if there)."""
    from PIL import Image

    from ttakit.data import load_fashion_mnist

    marker = folder / f".complete-{n}"
    if marker.exists():
        return
    pixels = (load_fashion_mnist("test").images[:n] * 255).round().to(torch.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(pixels):
        Image.fromarray(image[0].numpy(), mode="L").save(folder / f"{i:05d}.png")
    marker.touch()


def make_checkpoint(folder: Path) -> Path:
    from ttakit.data import FASHION_MNIST_CLASSES
    from ttakit.models import CheckpointMeta, create_model, save_checkpoint

    torch.manual_seed(0)
    model = create_model("seed-cnn", in_channels=1, num_classes=10, image_size=(28, 28), mean=[0.286], std=[0.353])
    meta = CheckpointMeta(arch="seed-cnn", classes=list(FASHION_MNIST_CLASSES), in_channels=1, image_size=[28, 28],
                          mean=[0.286], std=[0.353])
    return save_checkpoint(folder / "run", model.eval(), meta)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    return env


def _launch(nproc: int, tail: list[str]) -> list[str]:
    """``python ...`` for one process, ``python -m torch.distributed.run --nproc-per-node N ...`` for several."""
    if nproc == 1:
        return [sys.executable, *tail]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-port", str(_free_port()), *tail]


def time_predict(nproc: int, run: Path, folder: Path, out: Path, batch: int) -> dict[str, float]:
    """One ``ttakit predict`` command on ``nproc`` processes: its reported rate and its wall time."""
    out.unlink(missing_ok=True)
    started = time.perf_counter()
    done = subprocess.run(
        _launch(nproc, ["-m", "ttakit", "predict", str(run), str(folder), "--policy", POLICY, "--out", str(out),
                        "--workers", "0", "--batch-size", str(batch), "--no-progress", "--overwrite"]),
        env=_env(), capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"predict on {nproc} processes failed:\n{done.stderr[-2000:]}")
    found = re.search(r"([\d.]+) img/s predicting", done.stdout)
    return {"images_per_second": float(found.group(1)), "wall_seconds": wall}


def time_cache(nproc: int, n: int, max_batch: int) -> dict[str, float]:
    """The search's view caching over ``n`` images on ``nproc`` processes (this script as the child)."""
    done = subprocess.run(_launch(nproc, [str(Path(__file__).resolve()), "--child-cache", str(n),
                                          "--max-batch", str(max_batch)]),
                          env=_env(), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"caching on {nproc} processes failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def child_cache(n: int, max_batch: int) -> None:
    """Under torchrun or alone: cache the search's pool over ``n`` validation-shaped images, the
    views shared out among the ranks; rank 0 prints ``{"passes_per_second", "seconds", ...}``."""
    from ttakit.data import load_fashion_mnist
    from ttakit.jobs import _distributed
    from ttakit.models import create_model
    from ttakit.search.cache import ViewSplit, run_views, split_views
    from ttakit.search.run import candidate_pool

    ranks = _distributed.group()
    torch.manual_seed(0)
    model = create_model("seed-cnn", in_channels=1, num_classes=10, image_size=(28, 28), mean=[0.286], std=[0.353])
    model.eval()
    images = load_fashion_mnist("test").images[:n]
    views, _, _ = candidate_pool(model, images, fixed_size=True)
    sharing = ViewSplit(ranks.rank, ranks.world, lambda value: _distributed.gather(value, ranks))
    run_views(model, images[:64], views[:2], max_batch=max_batch)  # warm up
    _distributed.barrier(ranks)
    started = time.perf_counter()
    with split_views(sharing if ranks.distributed else None):
        logits = run_views(model, images, views, max_batch=max_batch)
    seconds = time.perf_counter() - started
    if ranks.main:
        print(json.dumps({"passes_per_second": len(views) * n / seconds, "seconds": seconds, "views": len(views),
                          "shape": list(logits.shape)}))
    _distributed.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=10_000, help="images for predict (Fashion-MNIST test PNGs)")
    parser.add_argument("--cache-images", type=int, default=None,
                        help="validation images for the search caching (default: --images / 5)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per setting")
    parser.add_argument("--batch-size", type=int, default=256, help="predict --batch-size")
    parser.add_argument("--max-batch", type=int, default=256)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "ttakit-bench-scale"))
    parser.add_argument("--out", default=None,
                        help="results path without suffix (default benchmarks/results/scale, scale-quick below 10,000)")
    parser.add_argument("--child-cache", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_cache is not None:
        child_cache(args.child_cache, args.max_batch)
        return

    quick = args.images < 10_000
    out_base = args.out or str(REPO / "benchmarks" / "results" / ("scale-quick" if quick else "scale"))
    cache_n = args.cache_images or max(100, args.images // 5)
    work = Path(args.workdir)
    folder = work / f"fashion-mnist-{args.images}"
    started_at = datetime.now(timezone.utc)
    info = machine_info(torch.device("cpu"))
    print(f"writing {args.images} PNG files to {folder} (reused when present)", flush=True)
    write_pngs(folder, args.images)
    run = make_checkpoint(work)

    records: dict[str, dict[int, list[dict[str, float]]]] = {"predict": {1: [], 2: []}, "cache": {1: [], 2: []}}
    for r in range(args.rounds):
        for nproc in ((1, 2) if r % 2 == 0 else (2, 1)):
            records["predict"][nproc].append(
                time_predict(nproc, run, folder, work / f"preds-{nproc}.csv", args.batch_size))
            records["cache"][nproc].append(time_cache(nproc, cache_n, args.max_batch))
            print(f"round {r + 1}, {nproc} process{'es' if nproc > 1 else ''}: predict "
                  f"{records['predict'][nproc][-1]['images_per_second']:.0f} img/s, caching "
                  f"{records['cache'][nproc][-1]['passes_per_second']:.0f} passes/s", flush=True)
    same_bytes = (work / "preds-1.csv").read_bytes() == (work / "preds-2.csv").read_bytes()

    def med(kind: str, nproc: int, key: str) -> float:
        return statistics.median(x[key] for x in records[kind][nproc])

    summary = {
        "predict": {"one": med("predict", 1, "images_per_second"), "two": med("predict", 2, "images_per_second"),
                    "wall_one": med("predict", 1, "wall_seconds"), "wall_two": med("predict", 2, "wall_seconds")},
        "cache": {"one": med("cache", 1, "passes_per_second"), "two": med("cache", 2, "passes_per_second")},
    }
    for item in summary.values():
        item["ratio"] = item["two"] / item["one"]
    summary["predict"]["wall_ratio"] = summary["predict"]["wall_one"] / summary["predict"]["wall_two"]
    info["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    results = {
        "benchmark": "scale",
        "format": RUN_FORMAT,
        "date": started_at.isoformat(timespec="seconds"),
        "machine": info,
        "quick": quick,
        "n_images": args.images,
        "cache_images": cache_n,
        "policy": POLICY,
        "batch_size": args.batch_size,
        "max_batch": args.max_batch,
        "rounds": args.rounds,
        "predict_same_bytes": same_bytes,
        "summary": summary,
        "runs": {kind: {str(k): v for k, v in per.items()} for kind, per in records.items()},
        "target_ratio": TARGET_RATIO,
    }
    Path(out_base).parent.mkdir(parents=True, exist_ok=True)
    save_results(f"{out_base}.json", results)
    p, c = summary["predict"], summary["cache"]
    table = format_table(
        ["work", "1 process", "2 processes", "ratio", "target"],
        [[f"predict, {POLICY} ({args.images} PNG files), img/s", f"{p['one']:.0f}", f"{p['two']:.0f}",
          f"{p['ratio']:.2f}", f">= {TARGET_RATIO}"],
         ["predict wall time of the command, s", f"{p['wall_one']:.1f}", f"{p['wall_two']:.1f}",
          f"{p['wall_ratio']:.2f}", ""],
         [f"search caching ({c_views(records)} views x {cache_n} images), passes/s", f"{c['one']:.0f}",
          f"{c['two']:.0f}", f"{c['ratio']:.2f}", f">= {TARGET_RATIO}"]])
    markdown = "\n".join([
        "# Scaling over processes: 1 process against 2 under torchrun",
        "",
        f"Date: {results['date']}. Machine: {info['cpu_count']} CPU cores ({info['platform']}), torch {info['torch']}; "
        f"every process runs one torch thread (OMP_NUM_THREADS=1), torchrun on loopback (gloo). Load average "
        f"{info['load_average_at_start'][0]} at the start, {info['load_average_at_end'][0]} at the end: other jobs on "
        "the machine slow the 2-process runs most, since they need both cores.",
        "",
        "```",
        table,
        "```",
        "",
        f"Medians of {args.rounds} alternating rounds. predict's rate is images over the image loop's seconds (all "
        "ranks' images over the slowest rank's seconds); the wall time adds starting Python, torch and the process "
        "group, loading the model and merging the part files. The 2-process output was "
        f"{'the same bytes as' if same_bytes else 'NOT the same bytes as'} the 1-process output.",
        "",
        f"Reproduce: `python benchmarks/scale.py{f' --images {args.images}' if quick else ''}`.",
        "",
    ])
    Path(f"{out_base}.md").write_text(markdown, encoding="utf-8")
    print("\n" + table)
    print(f"\nwritten to {out_base}.md and {out_base}.json")


def c_views(records: dict[str, dict[int, list[dict[str, float]]]]) -> int:
    return int(records["cache"][1][0]["views"])


if __name__ == "__main__":
    main()
