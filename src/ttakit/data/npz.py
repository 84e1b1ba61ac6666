"""Data sets stored as NumPy ``.npz`` archives: images ``x``, labels ``y``, optional ``classes``,
and optionally a test split of their own, ``x_test`` and ``y_test`` (``ttakit audit
--write-clean`` keeps a checkpoint's held-out test images there)."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError, DataNotFoundError
from .core import ImageDataset

_CHANNEL_COUNTS = (1, 3, 4)


def _to_nchw(x: np.ndarray, path: Path) -> np.ndarray:
    """``(N, H, W)``, ``(N, H, W, C)`` or ``(N, C, H, W)`` -> ``(N, C, H, W)``.

    A rank-4 array whose last axis is 1, 3 or 4 is read as NHWC, otherwise as NCHW.
    """
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4:
        if x.shape[3] in _CHANNEL_COUNTS:
            return x.transpose(0, 3, 1, 2)
        if x.shape[1] in _CHANNEL_COUNTS:
            return x
    raise DataError(
        f"{path}: 'x' must have shape (N, H, W), (N, H, W, C) or (N, C, H, W) with C in 1, 3, 4; "
        f"found shape {x.shape}"
    )


def _to_unit_float(x: np.ndarray, path: Path) -> np.ndarray:
    """uint8 -> ``x / 255``; float arrays must already lie in ``[0, 1]``."""
    if x.dtype == np.uint8:
        return x.astype(np.float32) / np.float32(255.0)
    if x.dtype.kind == "f":
        if not np.isfinite(x).all():
            raise DataError(f"{path}: 'x' holds NaN or infinite values")
        low, high = float(x.min()), float(x.max())
        if low < 0.0 or high > 1.0:
            raise DataError(
                f"{path}: float 'x' must already lie in [0, 1], found values in [{low:g}, {high:g}] "
                "(store uint8 0..255, or divide by 255 before saving)"
            )
        return x.astype(np.float32)
    raise DataError(f"{path}: 'x' must be uint8 or float in [0, 1], found dtype {x.dtype}")


def npz_has_test_split(path: str | os.PathLike) -> bool:
    """Whether the ``.npz`` archive at ``path`` holds a test split of its own (``x_test``)."""
    try:
        with np.load(Path(path).expanduser(), allow_pickle=False) as archive:
            return "x_test" in archive.files
    except (OSError, ValueError, EOFError, AttributeError, zipfile.BadZipFile):
        return False


def load_npz(path: str | os.PathLike, split: str = "train") -> ImageDataset:
    """Load images ``x`` and labels ``y`` (and optional ``classes``) from an ``.npz`` file.

    Layout:
        - ``x``: ``(N, H, W)``, ``(N, H, W, C)`` (C in 1, 3, 4) or ``(N, C, H, W)``;
          uint8 (divided by 255) or float already in ``[0, 1]``.
        - ``y``: ``(N,)`` integer class indices, non-negative.
        - ``classes`` (optional): ``(K,)`` strings; otherwise ``"0"`` .. ``"K-1"`` with
          ``K = max(y) + 1``.
        - ``x_test``, ``y_test`` (optional, together): the archive's own test split, returned for
          ``split="test"``; any other split reads ``x`` and ``y``. Without them every split
          reads ``x`` and ``y``.

    The file is read with ``allow_pickle=False``, so it cannot run code.

    Returns:
        An :class:`ImageDataset` with ``images`` ``(N, C, H, W)`` float32 in ``[0, 1]``.

    Raises:
        DataNotFoundError: ``path`` does not exist.
        DataError: not an ``.npz`` archive, a missing key, or a wrong shape, dtype or range.

    Example:
        >>> np.savez("tiny.npz", x=np.zeros((2, 8, 8), np.uint8), y=np.array([0, 1]))  # doctest: +SKIP
        >>> load_npz("tiny.npz").images.shape  # doctest: +SKIP
        torch.Size([2, 1, 8, 8])
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataNotFoundError(f"npz file {path} does not exist")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read {path} as an .npz archive: {exc}") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(
            f"{path} holds a single array (.npy), expected an .npz archive with 'x' and 'y'"
        )
    with archive:
        keys = ("x", "y")
        if "x_test" in archive.files or "y_test" in archive.files:
            missing = [k for k in ("x_test", "y_test") if k not in archive.files]
            if missing:
                raise DataError(f"{path} holds a test split but lacks {missing[0]!r}; expected both 'x_test' and 'y_test'")
            if split == "test":
                keys = ("x_test", "y_test")
        missing = [k for k in keys if k not in archive.files]
        if missing:
            found = ", ".join(archive.files) or "none"
            raise DataError(
                f"{path} lacks the array(s) {', '.join(repr(k) for k in missing)}; "
                f"expected 'x' (images) and 'y' (labels), found: {found}"
            )
        try:
            x = archive[keys[0]]
            y = archive[keys[1]]
            names = archive["classes"] if "classes" in archive.files else None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise DataError(f"cannot read the arrays in {path}: {exc}") from exc

    images = _to_unit_float(_to_nchw(x, path), path)
    if len(images) == 0:
        raise DataError(f"{path}: 'x' holds no images (shape {x.shape})")
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise DataError(
            f"{path}: 'y' must be a (N,) integer array, found {y.dtype} of shape {y.shape}"
        )
    if y.shape[0] != images.shape[0]:
        raise DataError(
            f"{path}: 'x' holds {images.shape[0]} images but 'y' holds {y.shape[0]} labels"
        )
    if y.min() < 0:
        raise DataError(f"{path}: 'y' holds negative label {int(y.min())}; labels must be >= 0")
    if names is None:
        classes = [str(i) for i in range(int(y.max()) + 1)]
    else:
        if names.ndim != 1 or names.dtype.kind not in "US":
            raise DataError(
                f"{path}: 'classes' must be a (K,) array of strings, found {names.dtype} of shape {names.shape}"
            )
        classes = [
            n.decode("utf-8", errors="replace") if isinstance(n, bytes) else str(n)
            for n in names.tolist()
        ]
        if int(y.max()) >= len(classes):
            raise DataError(
                f"{path}: 'y' holds label {int(y.max())} but 'classes' names only {len(classes)} classes"
            )
    return ImageDataset(
        torch.from_numpy(np.ascontiguousarray(images)),
        torch.from_numpy(y.astype(np.int64)),
        classes,
        name=path.name if keys[0] == "x" else f"{path.name}/test",
    )
