"""Shared helpers for the benchmarks: devices, data, timing side by side, peak memory in a
child process, tables and JSON results.

Timing lets the contenders take turns batch by batch (rotated, shuffled, or shuffled with each
timed call right after an untimed call of the same contender: :func:`time_rounds`), so on a
shared machine a slow moment hits every contender alike, and keeps each batch's fastest round
(:func:`least_disturbed`) or the median (:func:`time_side_by_side`). Peak memory is read
in a fresh child process per configuration (the resident set's high-water mark on CPU: VmHWM,
or ``ru_maxrss`` where there is no /proc; ``max_memory_allocated`` on CUDA), with the mark reset
after setup, so loading the data does not count.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent


def pick_device(name: str | None) -> torch.device:
    """``cuda`` when present unless ``name`` says otherwise."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return torch.device(name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_test_images(n: int | None, device: torch.device) -> torch.Tensor:
    """The first ``n`` Fashion-MNIST test images ``(n, 1, 28, 28)`` in [0, 1] (all 10,000 for None)."""
    from ttakit.data import load_fashion_mnist

    images = load_fashion_mnist("test").images
    if n is not None:
        images = images[:n]
    return images.float().contiguous().to(device)


def make_model(arch: str, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """A Fashion-MNIST-shaped model by name, random weights (speed does not depend on them)."""
    from ttakit.models import create_model

    torch.manual_seed(seed)
    model = create_model(arch, in_channels=1, num_classes=10, image_size=(28, 28))
    return model.to(device).eval()


def split_batches(images: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Full batches only (a short last batch would time differently)."""
    n = max(images.shape[0] // batch_size, 1) * batch_size
    return list(images[:n].split(batch_size))


def time_side_by_side(
    contenders: dict[str, Callable[[torch.Tensor], Any]],
    batches: Sequence[torch.Tensor],
    repeats: int,
    device: torch.device,
    warmup: int = 1,
) -> dict[str, list[float]]:
    """Seconds per batch of every contender, over ``repeats`` passes through ``batches``.

    Contenders take turns batch by batch, in an order rotated at every batch, so a slow
    moment of a shared machine hits all of them alike; summarise with the median.
    """
    rounds = time_rounds(contenders, batches, repeats, device, warmup)
    return {name: [t for one_round in spent for t in one_round] for name, spent in rounds.items()}


def time_rounds(
    contenders: dict[str, Callable[[torch.Tensor], Any]],
    batches: Sequence[torch.Tensor],
    rounds: int,
    device: torch.device,
    warmup: int = 1,
    order: str = "rotate",
) -> dict[str, list[list[float]]]:
    """Seconds each contender takes for each batch, in each round: ``{name: [round][batch]}``.

    ``order`` says how the contenders take turns within a round:

    - ``"rotate"``: batch by batch, in an order rotated at every batch (as
      :func:`time_side_by_side`), so a slow moment hits all of them alike.
    - ``"shuffle"``: batch by batch, in a seeded random order drawn at every batch, so each
      contender follows each other one about equally often.
    - ``"after-itself"``: batch by batch, in a seeded random order drawn at every batch, each
      contender's timed call right after an untimed call of its own (on the previous batch), as a
      user's repeated calls of one wrapper run. A call runs faster right after a call of the same
      shapes, whose data is still in the CPU caches (a few per cent for the seed CNN at batch 1,
      measured in ``benchmarks/engine_profile.py``): in the orders above, a contender whose passes have the
      shapes of the others' (ttach's batch-1 passes, like plain inference's) follows calls of its
      own shapes more often than one whose passes have shapes no other contender runs (ttakit's
      stacked views), and so gains from the order alone. Taking turns batch by batch keeps a slow
      moment of a shared machine from landing on one contender's calls only.

    Summarise with :func:`least_disturbed`: on a shared machine the fastest of a call's
    repetitions is the one least disturbed by other jobs.
    """
    if order not in ("rotate", "shuffle", "after-itself"):
        raise ValueError(f"order must be 'rotate', 'shuffle' or 'after-itself', got {order!r}")
    names = list(contenders)
    rng = random.Random(0)
    for _ in range(warmup):
        for name in names:
            contenders[name](batches[0])
    times: dict[str, list[list[float]]] = {name: [] for name in names}

    def timed(name: str, batch: torch.Tensor) -> float:
        sync(device)
        start = time.perf_counter()
        contenders[name](batch)
        sync(device)
        return time.perf_counter() - start

    turn = 0
    for _ in range(rounds):
        spent: dict[str, list[float]] = {name: [] for name in names}
        previous = batches[-1]
        for batch in batches:
            if order == "rotate":
                turns = names[turn % len(names) :] + names[: turn % len(names)]
            else:
                turns = rng.sample(names, len(names))
            for name in turns:
                if order == "after-itself":
                    contenders[name](previous)
                spent[name].append(timed(name, batch))
            turn += 1
            previous = batch
        for name in names:
            times[name].append(spent[name])
    return times


def least_disturbed(per_round: Sequence[Sequence[float]]) -> float:
    """Seconds for one pass over the batches: each batch's fastest round, summed."""
    return sum(min(batch_times) for batch_times in zip(*per_round, strict=True))


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def reset_peak_memory(device: torch.device) -> bool:
    """Reset the peak-memory mark to the current use; False where that is not possible."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    gc.collect()
    try:  # hand freed heap memory back first, so the reset starts from the memory in use
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:  # Linux: "5" resets the resident-set high-water mark that ru_maxrss reports
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory_mb(device: torch.device) -> float:
    """This process's peak memory so far: resident set on CPU, allocated tensors on CUDA."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # Linux: VmHWM is this process's own high-water mark. ru_maxrss also keeps the mark a process
    # had before exec (so a child started by a big parent starts out "peaking" at its parent's
    # size) and ignores the reset below.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def run_child(script: Path, spec: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
    """Run ``script --child JSON`` in a fresh interpreter; it prints one JSON line last.

    The child's glibc serves every allocation of 64 KiB or more with its own mapping and hands it
    back on free, so its resident set follows the memory in use (a measurement, not a speed, setting).
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(64 * 1024))
    done = subprocess.run(
        [sys.executable, str(script), "--child", json.dumps(spec)],
        capture_output=True, text=True, timeout=timeout, env=env, check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"benchmark child {spec} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table with right-aligned columns (the first left-aligned)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def machine_info(device: torch.device) -> dict[str, Any]:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = [round(v, 2) for v in os.getloadavg()]
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def save_results(path: str | os.PathLike, results: dict[str, Any]) -> None:
    """Write results as JSON atomically (a reader never sees half a file)."""
    from ttakit._io import atomic_write_json

    atomic_write_json(path, results)
