"""Run ``ttakit demo`` as a user would and record what it printed and how long it took.

    python benchmarks/demo.py --quick     # -> benchmarks/results/demo-quick.md / .json
    python benchmarks/demo.py             # -> benchmarks/results/demo.md / .json (the README's table)

The demo runs in a child process (``python -m ttakit.cli --no-progress demo``) in a fresh
output folder, so no model is reused from an earlier run and the wall time is the whole
experiment: loading data, training both models, evaluating every policy, writing the plots.
The results file holds the table exactly as the demo printed it, the date, the machine (CPU
count, load average before and after) and the wall time: the README's demo table and its
``--quick`` timing are copied from here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, machine_info, save_results  # noqa: E402
from ttakit._io import atomic_write_text  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="ttakit demo --quick")
    parser.add_argument("--keep", default=None, help="also keep the demo's output folder here")
    args = parser.parse_args()
    name = "demo-quick" if args.quick else "demo"
    out = Path(tempfile.mkdtemp(prefix=f"ttakit-{name}-"))
    command = [sys.executable, "-m", "ttakit.cli", "--no-progress", "demo", "--out", str(out / "run")]
    if args.quick:
        command.insert(-2, "--quick")
    info = machine_info(torch.device("cpu"))
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    print(f"running: {' '.join(command[1:])}", flush=True)
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seconds = time.perf_counter() - started
    info["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"ttakit demo failed with exit code {proc.returncode}")
    printed = proc.stdout
    demo = json.loads((out / "run" / "results.json").read_text())
    results = {
        "benchmark": name,
        "date": started_at,
        "machine": info,
        "command": "ttakit --no-progress demo" + (" --quick" if args.quick else ""),
        "wall_seconds": round(seconds, 1),
        "demo_seconds": round(demo.get("seconds", seconds), 1),
        "stdout": printed,
        "demo_results": demo,
    }
    results_dir = REPO / "benchmarks" / "results"
    save_results(results_dir / f"{name}.json", results)
    load = info.get("load_average_at_start")
    markdown = "\n".join(
        [
            f"# `ttakit demo{' --quick' if args.quick else ''}`, as printed",
            "",
            f"Date: {started_at}. Machine: {info['cpu_count']} CPU cores, torch {info['torch']} "
            f"({info['torch_threads']} threads), {info['platform']}; load average {load} at the start, "
            f"{info['load_average_at_end']} at the end (other jobs shared the cores).",
            "",
            f"Wall time of the whole command (fresh output folder, nothing reused): {seconds:.0f} s.",
            "",
            "```",
            printed.rstrip(),
            "```",
            "",
        ]
    )
    atomic_write_text(results_dir / f"{name}.md", markdown)
    if args.keep:
        shutil.copytree(out / "run", args.keep, dirs_exist_ok=True)
    shutil.rmtree(out, ignore_errors=True)
    print(printed)
    print(f"{name}: {seconds:.0f} s wall; written to {results_dir / (name + '.md')}")


if __name__ == "__main__":
    main()
