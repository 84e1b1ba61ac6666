"""Fashion-MNIST from its IDX files (gzipped or not), read with NumPy.

Where the files are looked for, in order: the ``data_dir`` argument (when given, only there),
the ``TTAKIT_FASHION_MNIST_DIR`` environment variable, Debian's ``dataset-fashion-mnist``
package (``/usr/share/datasets/fashion-mnist``) and the download cache
``~/.cache/ttakit/fashion-mnist``. Only :func:`ensure_fashion_mnist` ever downloads;
:func:`load_fashion_mnist` never touches the network.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.client
import os
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from .._io import atomic_write_bytes
from ..errors import DataError, DataNotFoundError, InvalidInputError
from .core import ImageDataset

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

ENV_VAR = "TTAKIT_FASHION_MNIST_DIR"
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
BASE_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
DOWNLOAD_TIMEOUT_S = 15.0

# The official .gz files, checked before a download lands on disk. MD5: as published in the
# zalandoresearch/fashion-mnist README ("Get the Data"). SHA-256: of those same files, as
# recorded by many independent projects beside the official MD5s (the README lists MD5 only).
# Debian's dataset-fashion-mnist ships re-compressed .gz files (other bytes, same IDX content),
# which apt verifies; these hashes apply to the download only.
OFFICIAL_SHA256: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
    "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
    "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
    "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
}
OFFICIAL_MD5: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}

IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension

# split -> (images file, labels file), without the optional ".gz"
SPLIT_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
ALL_FILES: tuple[str, ...] = tuple(name for pair in SPLIT_FILES.values() for name in pair)


def default_cache_dir() -> Path:
    """``~/.cache/ttakit/fashion-mnist``: where :func:`ensure_fashion_mnist` downloads to."""
    return Path.home() / ".cache" / "ttakit" / "fashion-mnist"


def _candidate_dirs(data_dir: str | os.PathLike | None) -> list[Path]:
    if data_dir is not None:
        return [Path(data_dir).expanduser()]
    dirs = []
    env = os.environ.get(ENV_VAR)
    if env:
        dirs.append(Path(env).expanduser())
    dirs += [SYSTEM_DIR, default_cache_dir()]
    return dirs


def _find_file(folder: Path, stem: str) -> Path | None:
    """``folder/stem.gz`` or ``folder/stem``, whichever exists (the ``.gz`` first)."""
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def _holds_all(folder: Path) -> bool:
    return folder.is_dir() and all(_find_file(folder, stem) is not None for stem in ALL_FILES)


def _not_found_message(looked_in: list[Path], reason: str | None = None) -> str:
    where = ", ".join(str(p) for p in looked_in)
    files = ", ".join(f"{stem}.gz" for stem in ALL_FILES)
    why = f" (download failed: {reason})" if reason else ""
    return (
        f"Fashion-MNIST not found in {where}{why}; to fix it, install Debian's dataset-fashion-mnist "
        f"(apt-get install dataset-fashion-mnist) or pass --data-dir to a folder holding {files} "
        f"(gzipped or not), or set {ENV_VAR} to such a folder"
    )


def ensure_fashion_mnist(data_dir: str | os.PathLike | None = None, download: bool = True) -> Path:
    """A folder that holds all four Fashion-MNIST IDX files, downloading them if need be.

    Args:
        data_dir: the one folder to use; None searches ``$TTAKIT_FASHION_MNIST_DIR``,
            ``/usr/share/datasets/fashion-mnist`` and ``~/.cache/ttakit/fashion-mnist``.
        download: when no folder holds the files, fetch the four ``.gz`` files from the
            official source into ``data_dir`` (or the cache folder); each is checked against
            the official SHA-256 and MD5 (:data:`OFFICIAL_SHA256`) before it is written,
            atomically.

    Raises:
        DataNotFoundError: the files are nowhere and could not (or may not) be downloaded;
            the message says how to install them.

    Example:
        >>> folder = ensure_fashion_mnist(download=False)  # doctest: +SKIP
    """
    candidates = _candidate_dirs(data_dir)
    for folder in candidates:
        if _holds_all(folder):
            return folder
    if not download:
        raise DataNotFoundError(_not_found_message(candidates))
    target = candidates[0] if data_dir is not None else default_cache_dir()
    try:
        _download_all(target)
    except (OSError, ValueError, http.client.HTTPException) as exc:
        # URLError, timeouts, disk errors, a cut-off response, a payload that is not the file
        reason = " ".join(str(getattr(exc, "reason", None) or exc).split()) or type(exc).__name__
        raise DataNotFoundError(_not_found_message(candidates, reason)) from exc
    return target


def _download_all(target: Path) -> None:
    for stem in ALL_FILES:
        if _find_file(target, stem) is not None:
            continue
        url = f"{BASE_URL}{stem}.gz"
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            payload = response.read()
        verify_download(f"{stem}.gz", payload, url)
        # check the payload is the gzipped IDX file we asked for before it lands on disk
        _parse_idx(
            _decompress(payload, url), url, LABELS_MAGIC if "labels" in stem else IMAGES_MAGIC
        )
        atomic_write_bytes(target / f"{stem}.gz", payload)


def verify_download(name: str, payload: bytes, source: str) -> None:
    """Refuse a downloaded ``name`` whose SHA-256 (and MD5) differ from the official file's.

    Raises:
        DataError: naming the file, where it came from, and the expected and found SHA-256.
    """
    expected = OFFICIAL_SHA256.get(name)
    if expected is None:
        raise DataError(f"no official checksum is known for {name}; refusing to use the download from {source}")
    found = hashlib.sha256(payload).hexdigest()
    md5 = hashlib.md5(payload, usedforsecurity=False).hexdigest()
    if found != expected or md5 != OFFICIAL_MD5.get(name, md5):
        raise DataError(
            f"{source} is not the official {name}: SHA-256 {found}, expected {expected} "
            f"({len(payload)} bytes); the download was damaged or tampered with, so it was not saved"
        )


def _decompress(raw: bytes, source: str) -> bytes:
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise DataError(f"{source} is not a valid gzip file ({exc or 'truncated'})") from exc


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return _decompress(raw, str(path)) if path.suffix == ".gz" else raw


def _parse_idx(raw: bytes, source: str, magic: int) -> np.ndarray:
    """Decode one IDX file: ``(N, rows, cols)`` uint8 for images, ``(N,)`` uint8 for labels."""
    ndim = 3 if magic == IMAGES_MAGIC else 1
    header_len = 4 * (1 + ndim)
    if len(raw) < header_len:
        raise DataError(
            f"{source} is truncated: {len(raw)} bytes, shorter than the {header_len}-byte IDX header"
        )
    header = np.frombuffer(raw, dtype=">u4", count=1 + ndim)
    found_magic, dims = int(header[0]), [int(d) for d in header[1:]]
    if found_magic != magic:
        kind = "images" if magic == IMAGES_MAGIC else "labels"
        raise DataError(
            f"{source} has IDX magic number {found_magic}, expected {magic} for an {kind} file "
            "(is it the right file, or a different format?)"
        )
    if dims[0] == 0 or any(d == 0 for d in dims[1:]):
        raise DataError(f"{source} declares dimensions {dims}; every dimension must be positive")
    expected = header_len + int(np.prod(dims, dtype=np.int64))
    if len(raw) < expected:
        raise DataError(
            f"{source} is truncated: dimensions {dims} need {expected} bytes, found {len(raw)}"
        )
    if len(raw) > expected:
        raise DataError(
            f"{source} has {len(raw) - expected} bytes after the data for dimensions {dims}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims)


@functools.lru_cache(maxsize=8)
def _decode_split(
    images_path: str, labels_path: str, _stamp: tuple[int, int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Cached, read-only ``(N, rows, cols)`` images and ``(N,)`` labels, both uint8.

    ``_stamp`` (sizes and mtimes) is part of the key so a rewritten file is read again.
    """
    images = _parse_idx(_read_bytes(Path(images_path)), images_path, IMAGES_MAGIC)
    labels = _parse_idx(_read_bytes(Path(labels_path)), labels_path, LABELS_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds "
            f"{labels.shape[0]} labels; the counts must match"
        )
    if int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise DataError(
            f"{labels_path} holds label {int(labels.max())}, expected labels in "
            f"[0, {len(FASHION_MNIST_CLASSES) - 1}]"
        )
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def load_fashion_mnist(
    split: Literal["train", "test"] = "train", data_dir: str | os.PathLike | None = None
) -> ImageDataset:
    """Load one Fashion-MNIST split; never downloads (see :func:`ensure_fashion_mnist`).

    Returns:
        An :class:`ImageDataset` with ``images`` ``(N, 1, 28, 28)`` float32 in ``[0, 1]``
        (N = 60000 for ``"train"``, 10000 for ``"test"``), ``labels`` ``(N,)`` int64 and the
        ten :data:`FASHION_MNIST_CLASSES`. The decoded files are cached in-process; every
        call returns fresh tensors, so callers may modify them freely.

    Raises:
        InvalidInputError: ``split`` is not ``"train"`` or ``"test"``.
        DataNotFoundError: no folder holds the files (the message says how to get them).
        DataError: a file is truncated, has the wrong magic number or mismatched counts.

    Example:
        >>> ds = load_fashion_mnist("test")  # doctest: +SKIP
        >>> ds.images.shape
        torch.Size([10000, 1, 28, 28])
    """
    if split not in SPLIT_FILES:
        raise InvalidInputError(f"split must be 'train' or 'test', got {split!r}")
    folder = ensure_fashion_mnist(data_dir, download=False)
    paths = []
    for stem in SPLIT_FILES[split]:
        path = _find_file(folder, stem)
        if path is None:  # removed since ensure_fashion_mnist looked
            raise DataNotFoundError(_not_found_message([folder]))
        paths.append(path.resolve())
    stats = [p.stat() for p in paths]
    stamp = (stats[0].st_size, stats[0].st_mtime_ns, stats[1].st_size, stats[1].st_mtime_ns)
    images, labels = _decode_split(str(paths[0]), str(paths[1]), stamp)
    pixels = torch.from_numpy(images.astype(np.float32)).div_(255.0).unsqueeze(1)
    return ImageDataset(
        pixels,
        torch.from_numpy(labels.astype(np.int64)),
        list(FASHION_MNIST_CLASSES),
        name=f"fashion-mnist/{split}",
    )
