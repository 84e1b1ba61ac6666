"""Jobs under torchrun (ttakit.jobs._distributed): shards by block, part files merged in input
order, one-line rank failures; predict byte-identical to one process, evaluate's metrics and
search's policy equal to one process's."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from ttakit.errors import InvalidInputError
from ttakit.jobs._distributed import (
    Ranks,
    block_rows,
    blocks_of,
    detect,
    gather,
    rank_failure,
    timeout_seconds,
)
from ttakit.jobs._predict_resume import merge_parts, part_files, part_path

pytestmark = pytest.mark.usefixtures("single_thread")

# --------------------------------------------------------------------------- the helpers, in one process


@given(n=st.integers(0, 300), block=st.integers(1, 40), world=st.integers(1, 5))
@settings(max_examples=60, deadline=None)
def test_blocks_give_every_row_to_exactly_one_rank_in_whole_blocks(n, block, world):
    shares = [block_rows(n, block, Ranks(r, world)) for r in range(world)]
    assert sorted(i for share in shares for i in share) == list(range(n))
    for r, share in enumerate(shares):
        assert share == sorted(share)
        assert all((i // block) % world == r for i in share)  # block b to rank b % world
        # the loader's batches are the global blocks: what one process would run together
        groups = blocks_of(share, block)
        assert [[share[p] for p in g] for g in groups] == [
            [i for i in range(b * block, min(b * block + block, n))] for b in range(r, -(-n // block), world)
        ]


def test_blocks_of_a_resumed_share_keep_block_boundaries():
    assert blocks_of([0, 2, 3, 9, 10, 12], 4) == [[0, 1, 2], [3, 4], [5]]


def test_detect_reads_torchrun_variables_and_refuses_bad_ones():
    assert detect({}) == Ranks(0, 1, 0) and not detect({}).distributed
    assert detect({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}) == Ranks(3, 4, 1)
    with pytest.raises(InvalidInputError, match="RANK=4 and WORLD_SIZE=4"):
        detect({"WORLD_SIZE": "4", "RANK": "4"})
    with pytest.raises(InvalidInputError, match="WORLD_SIZE must be an integer"):
        detect({"WORLD_SIZE": "two"})


def test_timeout_comes_from_the_environment():
    assert timeout_seconds({}) == 1800.0
    assert timeout_seconds({"TTAKIT_DIST_TIMEOUT": "20"}) == 20.0
    with pytest.raises(InvalidInputError, match="TTAKIT_DIST_TIMEOUT must be a positive number"):
        timeout_seconds({"TTAKIT_DIST_TIMEOUT": "0"})


def test_rank_failure_names_the_rank_only_under_torchrun(monkeypatch):
    assert rank_failure("error: boom", Ranks(1, 2)) == "rank 1 of 2 failed: error: boom"
    assert rank_failure("error: boom", Ranks()) == "error: boom"
    assert gather({"a": 1}, Ranks()) == [{"a": 1}]


def test_merge_parts_orders_rows_by_input_and_keeps_each_path_once(tmp_path):
    out = tmp_path / "preds.csv"
    names = [f"img{i}.png" for i in range(6)]
    out.write_text("path,p\nold.png,0.5\nimg1.png,0.1\n")  # a resumed output: another image first
    part_path(out, 0, 2).write_text("path,p\nimg0.png,0.0\nimg4.png,0.4\n")
    part_path(out, 1, 2).write_text('path,p\nimg3.png,0.3\n"img,5.png",0.5\nimg1.png,0.9\nimg2.png,0.')  # torn tail
    assert merge_parts(out, "csv", [*names, "img,5.png"]) == 6
    assert out.read_text() == 'path,p\nold.png,0.5\nimg0.png,0.0\nimg1.png,0.1\nimg3.png,0.3\nimg4.png,0.4\n"img,5.png",0.5\n'
    assert part_files(out) == []
    assert merge_parts(out, "csv", names) == 0  # nothing to merge: the file is left as it is


def test_merge_parts_of_json_lines(tmp_path):
    out = tmp_path / "preds.jsonl"
    part_path(out, 1, 3).write_text(json.dumps({"path": "b"}) + "\n")
    part_path(out, 0, 3).write_text(json.dumps({"path": "c"}) + "\n" + json.dumps({"path": "a"}) + "\n")
    merge_parts(out, "jsonl", ["a", "b", "c"])
    assert [json.loads(line)["path"] for line in out.read_text().splitlines()] == ["a", "b", "c"]


def test_predict_refuses_part_files_left_by_an_unfinished_run(tmp_path):
    from ttakit.jobs.predict import predict_images

    out = tmp_path / "preds.csv"
    part_path(out, 0, 2).write_text("path\n")
    with pytest.raises(InvalidInputError, match="left 1 part files beside it.*--resume"):
        predict_images(torch.nn.Identity(), [tmp_path / "x.png"], out=out, progress=False)


# --------------------------------------------------------------------------- torchrun on loopback (gloo)

ROOT = Path(__file__).resolve().parents[1]
N_IMAGES = 60
BATCH = 8

# A model that records what it is given: every image is one grey level (2 * i + 10), which no
# flip changes, so the mean of each row names the image. Rank 1 can be killed halfway.
COUNTING_MODEL = '''
import os, signal, torch

class Counting(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                       torch.nn.Linear(4 * 26 * 26, 10))
        self.rank = os.environ.get("RANK", "0")
        self.seen = 0

    def forward(self, x):
        ids = (x.mean(dim=(1, 2, 3)) * 255).round().long().tolist()
        with open(os.environ["SEEN_DIR"] + f"/seen-{self.rank}.txt", "a") as handle:
            handle.write("".join(f"{i}\\n" for i in ids))
        self.seen += len(ids)
        die_after = int(os.environ.get("DIE_AFTER", "0"))
        if die_after and self.rank == "1" and self.seen >= die_after:
            os.kill(os.getpid(), signal.SIGKILL)
        if os.environ.get("FAIL_RANK") == self.rank:
            raise RuntimeError("the counting model was told to fail")
        if os.environ.get("HANG_RANK") == self.rank:
            import time
            time.sleep(600)
        return self.net(x)

def make():
    return Counting()
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", TTAKIT_DIST_TIMEOUT="60", SEEN_DIR=str(tmp_path), PYTHONPATH=str(ROOT / "src"),
               **extra)
    return env


def _ttakit(args: list[str], env: dict[str, str], nproc: int = 1, timeout: float = 120) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                "--master-port", str(_free_port()), "-m", "ttakit"] if nproc > 1 else [sys.executable, "-m", "ttakit"]
    return subprocess.run([*launcher, *args], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=env["SEEN_DIR"])


@pytest.fixture
def grey_images(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(N_IMAGES):
        Image.fromarray(torch.full((28, 28), 2 * i + 10, dtype=torch.uint8).numpy(), mode="L").save(
            folder / f"img{i:03d}.png")
    (folder / "img030.png").write_bytes(b"broken")  # unreadable, in the middle of rank 1's fourth block
    (tmp_path / "counting.py").write_text(COUNTING_MODEL)
    return folder


def _predict_args(out: str, *extra: str) -> list[str]:
    return ["predict", "counting.py:make", "imgs", "--policy", "hflip", "--out", out, "--batch-size", str(BATCH),
            "--workers", "0", "--input-size", "28", "--channels", "1", "--outputs", "logits", "--no-progress", *extra]


def _seen(tmp_path: Path, rank: int) -> Counter:
    path = tmp_path / f"seen-{rank}.txt"
    return Counter(int(line) for line in path.read_text().split()) if path.exists() else Counter()


def _rows(path: Path) -> dict[str, list[str]]:
    with open(path, newline="") as handle:
        return {row[0]: row[1:] for row in list(csv.reader(handle))[1:]}


@pytest.mark.slow
def test_torchrun_predict_is_byte_identical_and_each_rank_sees_only_its_blocks(tmp_path, grey_images):
    one = _ttakit(_predict_args("one.csv"), _env(tmp_path))
    assert one.returncode == 0, one.stderr
    (tmp_path / "seen-0.txt").unlink()
    two = _ttakit(_predict_args("two.csv"), _env(tmp_path), nproc=2)
    assert two.returncode == 0, two.stderr
    assert (tmp_path / "two.csv").read_bytes() == (tmp_path / "one.csv").read_bytes()
    assert (tmp_path / "two.csv.errors.csv").read_bytes() == (tmp_path / "one.csv.errors.csv").read_bytes()
    assert (tmp_path / "two.csv.errors.csv").read_text().count("img030.png") == 1  # reported once
    assert part_files(tmp_path / "two.csv") == [] and part_files(tmp_path / "two.csv.errors.csv") == []
    assert two.stdout.count("predicted 59 of 60 images") == 1  # rank 0 prints; rank 1 prints nothing
    for rank in (0, 1):  # each rank ran only its blocks, each image once per view (2 views)
        mine = {2 * i + 10 for i in block_rows(N_IMAGES, BATCH, Ranks(rank, 2))} - {2 * 30 + 10}
        assert _seen(tmp_path, rank) == Counter({i: 2 for i in mine})


@pytest.mark.slow
def test_a_rank_killed_halfway_ends_the_job_and_resume_completes_it(tmp_path, grey_images):
    one = _ttakit(_predict_args("one.csv"), _env(tmp_path))
    assert one.returncode == 0, one.stderr
    killed = _ttakit(_predict_args("two.csv"), _env(tmp_path, DIE_AFTER=str(2 * BATCH * 2)), nproc=2)
    assert killed.returncode != 0
    assert "rank" in killed.stderr and "SIGKILL" in killed.stderr  # torchrun names the rank and the signal
    assert part_files(tmp_path / "two.csv")  # the rows written so far are kept
    resumed = _ttakit(_predict_args("two.csv", "--resume"), _env(tmp_path), nproc=2)
    assert resumed.returncode == 0, resumed.stderr
    assert "already in two.csv" in resumed.stdout
    expected, got = _rows(tmp_path / "one.csv"), _rows(tmp_path / "two.csv")
    assert list(got) == list(expected)  # every image once, in input order
    for path, row in expected.items():  # a resumed block may run with fewer images: equal to 1e-6
        assert got[path][0::2][:5] == row[0::2][:5]
        assert [float(v) for v in got[path][1:10:2]] == pytest.approx([float(v) for v in row[1:10:2]], abs=1e-6)
    assert (tmp_path / "two.csv.errors.csv").read_text().count("img030.png") == 1


@pytest.mark.slow
def test_a_rank_that_fails_names_itself_and_its_cause(tmp_path, grey_images):
    failed = _ttakit(_predict_args("two.csv"), _env(tmp_path, FAIL_RANK="1"), nproc=2)
    assert failed.returncode != 0
    assert "ttakit predict: rank 1 of 2 failed: internal error: RuntimeError: the counting model was told to fail" \
        in failed.stderr


NET = '''
import torch

def make():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(),
                               torch.nn.Linear(8 * 13 * 13, 10))
'''


@pytest.fixture
def fashion_rows(tmp_path):
    """300 Fashion-MNIST test rows as an .npz (no split of its own: every row is scored or searched)."""
    import numpy as np

    from ttakit.data import FASHION_MNIST_CLASSES, load_fashion_mnist

    test = load_fashion_mnist("test")
    np.savez(tmp_path / "rows.npz", x=(test.images[:300, 0] * 255).round().byte().numpy(),
             y=test.labels[:300].numpy(), classes=np.array(FASHION_MNIST_CLASSES))
    (tmp_path / "net.py").write_text(NET)
    return tmp_path / "rows.npz"


MODEL_ARGS = ["--input-size", "28", "--channels", "1", "--outputs", "logits", "--no-progress"]


def _numbers_equal(a, b, path=""):
    """Two results trees equal, floats to 1e-6; timings skipped."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for key in a:
            if not any(word in key for word in ("seconds", "ms_per_image")):
                _numbers_equal(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for k, (x, y) in enumerate(zip(a, b, strict=True)):
            _numbers_equal(x, y, f"{path}[{k}]")
    elif isinstance(a, float):
        assert b == pytest.approx(a, abs=1e-6, nan_ok=True), path
    else:
        assert a == b, path


@pytest.mark.slow
def test_torchrun_evaluate_equals_one_process(tmp_path, fashion_rows):
    args = ["evaluate", "net.py:make", "--data", "rows.npz", "--policy", "none,hflip,d4", "--max-batch", "64",
            "--no-plots", *MODEL_ARGS]
    one = _ttakit([*args, "--out", "ev1"], _env(tmp_path))
    assert one.returncode == 0, one.stderr
    two = _ttakit([*args, "--out", "ev2"], _env(tmp_path), nproc=2)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("results written to ev2") == 1  # rank 0 prints and writes
    first, second = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("ev1", "ev2"))
    second["checkpoint"] = first["checkpoint"]
    _numbers_equal(first, second)  # accuracy, NLL, ECE, lift, McNemar p, bootstrap interval, uncertainty AUROC


@pytest.mark.slow
def test_torchrun_search_selects_the_same_policy(tmp_path, fashion_rows):
    args = ["search", "net.py:make", "--val-data", "rows.npz", "--budget", "3", *MODEL_ARGS]
    one = _ttakit([*args, "--out", "s1"], _env(tmp_path))
    assert one.returncode == 0, one.stderr
    two = _ttakit([*args, "--out", "s2"], _env(tmp_path), nproc=2)
    assert two.returncode == 0, two.stderr
    first, second = (json.loads((tmp_path / d / "policy.json").read_text()) for d in ("s1", "s2"))
    assert second["views"] == first["views"] and len(first["views"]) > 1
    _numbers_equal({k: v for k, v in first.items() if k != "meta"}, {k: v for k, v in second.items() if k != "meta"})
    assert second["meta"]["forward_passes"] == first["meta"]["forward_passes"]  # the same halving decisions


def test_split_views_gathers_every_ranks_share_in_view_order():
    from ttakit.aliases import get_policy
    from ttakit.search.cache import ViewSplit, run_views, split_views

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    images = torch.rand(5, 1, 4, 4)
    views = get_policy("d4").views[:3]
    whole = run_views(model, images, views)
    shares = {}

    def fake_gather(value):  # both ranks' shares, as all_gather_object returns them
        shares[0] = value
        return [value, ([1], whole[[1]])]

    with split_views(ViewSplit(0, 2, fake_gather)):
        gathered = run_views(model, images, views)
    assert shares[0][0] == [0, 2]  # rank 0 ran views 0 and 2 only
    assert torch.allclose(gathered, whole, atol=1e-6)


@pytest.mark.slow
def test_no_rank_waits_forever_for_a_stuck_one(tmp_path, grey_images):
    import time

    started = time.perf_counter()
    stuck = _ttakit(_predict_args("two.csv"), {**_env(tmp_path, HANG_RANK="1"), "TTAKIT_DIST_TIMEOUT": "4"}, nproc=2)
    assert stuck.returncode != 0 and time.perf_counter() - started < 90
    assert "ttakit predict: rank 0 of 2 failed: error: gave up waiting for the other ranks at the end of the images" \
        in stuck.stderr
    assert "TTAKIT_DIST_TIMEOUT higher" in stuck.stderr
