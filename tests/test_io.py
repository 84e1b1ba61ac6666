"""Atomic writes: durable (fsync), default permissions without touching the umask, never half-written."""

from __future__ import annotations

import json
import os
import stat

import pytest

from ttakit import _io
from ttakit._io import (
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    read_json,
)


def test_atomic_write_fsyncs_the_file_and_its_folder(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def record(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", record)
    atomic_write_text(tmp_path / "out.txt", "hello")
    assert (tmp_path / "out.txt").read_text() == "hello"
    assert synced == [False, True]  # the data before the rename, the folder after it


def test_permissions_follow_the_umask_which_is_never_changed(tmp_path, monkeypatch):
    old = os.umask(0o027)
    try:
        def no_umask(*args):
            raise AssertionError("atomic_write must not read or set the umask")

        monkeypatch.setattr(os, "umask", no_umask)
        path = atomic_write_bytes(tmp_path / "a.bin", b"x")
        assert stat.S_IMODE(path.stat().st_mode) == 0o640  # 0o666 & ~0o027, as open() would
    finally:
        monkeypatch.undo()
        os.umask(old)


def test_an_interrupted_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = atomic_write_json(tmp_path / "r.json", {"run": 1})

    def crash(tmp):
        tmp.write_text('{"run": 2, "trunc')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, crash)
    assert read_json(path) == {"run": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_json_of_tensors_and_paths(tmp_path):
    import torch

    path = atomic_write_json(tmp_path / "sub" / "x.json", {"t": torch.tensor([1, 2]), "p": tmp_path})
    assert json.loads(path.read_text()) == {"t": [1, 2], "p": str(tmp_path)}
    with pytest.raises(TypeError, match="object"):
        atomic_write_json(tmp_path / "y.json", {"o": object()})
    assert not (tmp_path / "y.json").exists()


def test_temporary_names_never_collide(tmp_path, monkeypatch):
    names = iter(["aaaaaaaaaaaa", "aaaaaaaaaaaa", "bbbbbbbbbbbb"])
    monkeypatch.setattr(_io.secrets, "token_hex", lambda n: next(names))
    (tmp_path / ".f.txt.aaaaaaaaaaaa.tmp").write_text("someone else's")
    atomic_write_text(tmp_path / "f.txt", "mine")
    assert (tmp_path / "f.txt").read_text() == "mine"
    assert (tmp_path / ".f.txt.aaaaaaaaaaaa.tmp").read_text() == "someone else's"
