"""Running a job on several processes started by ``torchrun`` (``torch.distributed``).

``torchrun`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` in each process it starts; without
them (or with ``WORLD_SIZE=1``) nothing here does anything and every job runs as one process.
With them, :func:`group` starts the process group once (gloo on the CPU, nccl on CUDA with
``LOCAL_RANK`` choosing the GPU), and the jobs use the helpers below to split their work:

* :func:`block_rows`: a rank's share of ``n`` ordered items, cut into blocks of ``block`` by
  global index (block ``b`` goes to rank ``b % world``), so every item runs in the same batch
  of the same items as in one process (a conv net's output differs in the last bits with the
  batch it runs in);
* :func:`gather` / :func:`barrier`: collectives that end after :func:`timeout_seconds`
  (``TTAKIT_DIST_TIMEOUT``, default 30 minutes), so no rank waits forever on one that died;
* :func:`rank_failure`: the one-line message a failing rank ends with, naming itself.
"""

from __future__ import annotations

import atexit
import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InvalidInputError, TTAKitError

__all__ = ["Ranks", "RanksLostError", "detect", "group", "block_rows", "blocks_of", "gather", "barrier", "is_main",
           "timeout_seconds", "rank_failure", "shutdown", "TIMEOUT_ENV", "DEFAULT_TIMEOUT_S"]

TIMEOUT_ENV = "TTAKIT_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0  # long jobs: a rank may legitimately wait for another's slow last batch


@dataclass(frozen=True)
class Ranks:
    """Where this process stands: ``rank`` of ``world`` (``local_rank`` on its machine)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _env_int(environ: Any, name: str, default: int) -> int:
    text = environ.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise InvalidInputError(f"environment variable {name} must be an integer (torchrun sets it), got {text!r}") from None


def detect(environ: Any = os.environ) -> Ranks:
    """The ranks ``torchrun`` set in the environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``);
    one process of one without them.

    Raises:
        InvalidInputError: a value that is not an integer, or a rank outside ``[0, WORLD_SIZE)``.
    """
    world = _env_int(environ, "WORLD_SIZE", 1)
    rank = _env_int(environ, "RANK", 0)
    local = _env_int(environ, "LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise InvalidInputError(f"RANK={rank} and WORLD_SIZE={world}: expected 0 <= RANK < WORLD_SIZE (torchrun sets both)")
    return Ranks(rank, world, local)


def timeout_seconds(environ: Any = os.environ) -> float:
    """How long a collective waits for the other ranks: ``TTAKIT_DIST_TIMEOUT`` seconds (default 1800)."""
    text = environ.get(TIMEOUT_ENV)
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise InvalidInputError(f"{TIMEOUT_ENV} must be a positive number of seconds such as 600, got {text!r}")
    return value


def _backend(device: Any) -> str:
    """nccl when the job runs on CUDA, else gloo (the CPU, MPS)."""
    kind = str(device or "cpu").split(":")[0].strip().lower()
    return "nccl" if kind == "cuda" and torch.cuda.is_available() else "gloo"


def group(device: Any = None) -> Ranks:
    """This process's ranks, the process group started if ``torchrun`` asked for several (once,
    with :func:`timeout_seconds`; destroyed at exit). On CUDA, ``LOCAL_RANK`` picks the GPU."""
    ranks = detect()
    if not ranks.distributed:
        return ranks
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return ranks
    backend = _backend(device)
    if backend == "nccl":
        torch.cuda.set_device(ranks.local_rank)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_seconds()))
    atexit.register(shutdown)
    return ranks


def shutdown() -> None:
    """Destroy the process group if this process started one (safe to call twice)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_main() -> bool:
    """Whether this process writes the job's files and prints its results (rank 0, or no torchrun)."""
    return detect().main


def block_rows(n: int, block: int, ranks: Ranks) -> list[int]:
    """The indices of ``n`` ordered items this rank takes: blocks of ``block`` consecutive items,
    block ``b`` to rank ``b % world`` (strided), in order. Every item goes to exactly one rank.

    >>> block_rows(10, 3, Ranks(1, 2))
    [3, 4, 5, 9]
    """
    if block < 1:
        raise InvalidInputError(f"block must be a positive number of items, got {block}")
    return [i for start in range(ranks.rank * block, n, ranks.world * block) for i in range(start, min(start + block, n))]


def blocks_of(rows: Sequence[int], block: int) -> list[list[int]]:
    """``rows`` (positions ``0..len(rows)-1`` of a rank's list) grouped by the global block of
    their values: ``[[positions in block b], ...]`` in order, empty blocks left out. A loader
    that runs these groups as its batches cuts exactly where one process would."""
    groups: list[list[int]] = []
    last = None
    for position, value in enumerate(rows):
        b = value // block
        if b != last:
            groups.append([])
            last = b
        groups[-1].append(position)
    return groups


class RanksLostError(TTAKitError, RuntimeError):
    """A collective gave up: another rank died, failed or did not arrive within the timeout."""


def _lost(what: str, err: Exception) -> RanksLostError:
    cause = " ".join(str(err).split())[:300] or type(err).__name__
    return RanksLostError(
        f"gave up waiting for the other ranks at {what} ({cause}); another rank failed (its own line says why) or "
        f"is still working after {timeout_seconds():g} s: set {TIMEOUT_ENV} higher if its work takes that long"
    )


def gather(value: Any, ranks: Ranks, what: str = "a gather") -> list[Any]:
    """Every rank's ``value`` (any picklable object), in rank order, on every rank; ``[value]``
    in one process. Waits at most :func:`timeout_seconds` for the others.

    Raises:
        RanksLostError: a rank died or did not arrive in time.
    """
    if not ranks.distributed:
        return [value]
    import torch.distributed as dist

    found: list[Any] = [None] * ranks.world
    try:
        dist.all_gather_object(found, value)
    except RuntimeError as err:  # gloo and nccl report a lost peer or a timeout as RuntimeError
        raise _lost(what, err) from err
    return found


def barrier(ranks: Ranks, what: str = "a barrier") -> None:
    """Wait for every rank (at most :func:`timeout_seconds`); nothing in one process.

    Raises:
        RanksLostError: a rank died or did not arrive in time (gloo names it in the cause).
    """
    if not ranks.distributed:
        return
    import torch.distributed as dist

    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout_seconds()))
        else:
            dist.barrier()
    except RuntimeError as err:
        raise _lost(what, err) from err


def rank_failure(cause: str, ranks: Ranks | None = None) -> str:
    """The one line a failing rank ends with: ``rank R of W failed: <cause>`` (the cause alone in
    one process)."""
    if ranks is None:
        try:
            ranks = detect()
        except InvalidInputError:  # the environment itself is the error being reported
            return cause
    return f"rank {ranks.rank} of {ranks.world} failed: {cause}" if ranks.distributed else cause
