"""Atomic file output: a reader never sees a half-written file, and an interrupted run
leaves the previous version (or nothing) in place."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import InvalidInputError


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)``, flush it to disk, then rename ``tmp_path`` onto ``path``.

    The temporary file lives in the destination folder so the final rename never crosses
    file systems, and is created with mode ``0o666`` filtered by the process umask (by the
    kernel, as a plain ``open()`` would; the umask is never changed). The file's data is
    fsynced before the rename and the folder after it, so after a crash ``path`` holds the
    old content or the new, never a truncated file. The parent folder is created if needed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp(path)
    try:
        write(tmp)
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _create_temp(path: Path) -> Path:
    """A new, empty file ``.<name>.<random>.tmp`` beside ``path`` (never an existing one)."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"cannot create a temporary file beside {path}")


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on folders; the rename itself is still atomic
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    # Tensors, NumPy scalars and paths show up in results dicts; make them plain JSON.
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file; the caller turns ``OSError``/``JSONDecodeError`` into its own error."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def check_output_file(out: str | os.PathLike, name: str = "--out") -> Path:
    """``out`` as a Path to a file whose folder exists and is writable, else a one-line error
    naming ``name`` (checked before any work, so a long run never fails at its last write)."""
    path = Path(out)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise InvalidInputError(f"{name} {path} is a folder; give a file path like {path / 'out.csv'}")
    if not parent.is_dir():
        raise InvalidInputError(f"{name} {path}: folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise InvalidInputError(f"{name} {path}: cannot write there (permission denied)")
    return path
