"""CIFAR-10 from its "python version" batches, read with a restricted unpickler.

The batches (``data_batch_1`` .. ``data_batch_5``, ``test_batch``, ``batches.meta``) are
pickles. Unpickling an untrusted file can run arbitrary code, so :class:`_RestrictedUnpickler`
resolves only the few globals the format needs (NumPy array reconstruction) and raises
:class:`DataError` for anything else.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ..errors import DataError, DataNotFoundError, InvalidInputError
from .core import ImageDataset

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
SPLIT_FILES: dict[str, tuple[str, ...]] = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}
META_FILE = "batches.meta"
SUBFOLDER = "cifar-10-batches-py"  # what cifar-10-python.tar.gz unpacks to

# NumPy's array-rebuilding functions, taken from this NumPy whatever module it keeps them in;
# pickles name them under numpy.core (NumPy 1) or numpy._core (NumPy 2). _frombuffer is what
# pickle protocol 5 uses for contiguous arrays (a file re-saved by Python 3 with NumPy >= 1.16);
# like _reconstruct it only builds an array from bytes, dtype and shape.
_RECONSTRUCT = np.ndarray((0,)).__reduce__()[0]
_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild NumPy arrays and plain containers, and nothing else.

    Globals outside ``_ALLOWED_GLOBALS`` (``os.system``, ``builtins.eval``, any class) raise
    :class:`DataError` before anything is called.
    """

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise DataError(
                f"refusing to load {module}.{name} from a CIFAR-10 pickle; a CIFAR-10 batch "
                "holds only NumPy arrays, lists, numbers and strings"
            ) from None


def _unpickle(path: Path) -> dict:
    try:
        with path.open("rb") as handle:
            obj = _RestrictedUnpickler(handle, encoding="bytes").load()
    except DataError as exc:
        raise DataError(f"{path}: {exc}") from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except Exception as exc:  # UnpicklingError, EOFError, ValueError, ... from a corrupt file
        raise DataError(
            f"{path} is not a readable CIFAR-10 pickle ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(obj, dict):
        raise DataError(f"{path} holds a {type(obj).__name__}, expected a dict of arrays")
    return obj


def _get(batch: dict, key: str, path: Path) -> Any:
    for candidate in (key.encode(), key):  # bytes keys from Python 2 pickles, str from Python 3
        if candidate in batch:
            return batch[candidate]
    found = ", ".join(repr(k) for k in batch) or "none"
    raise DataError(f"{path} has no {key!r} entry (found keys: {found})")


def _decode_text(value: Any) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _read_batch(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """``(N, 3, 32, 32)`` uint8 images and ``(N,)`` int64 labels from one batch file."""
    batch = _unpickle(path)
    data = _get(batch, "data", path)
    labels = _get(batch, "labels", path)
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != 3072
    ):
        found = (
            f"{data.dtype} array of shape {data.shape}"
            if isinstance(data, np.ndarray)
            else type(data).__name__
        )
        raise DataError(f"{path}: 'data' must be a (N, 3072) uint8 array, found {found}")
    try:
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: 'labels' must be a list of integers ({exc})") from exc
    if labels.shape[0] != data.shape[0]:
        raise DataError(f"{path} holds {data.shape[0]} images but {labels.shape[0]} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"{path} holds labels in [{labels.min()}, {labels.max()}], expected [0, {num_classes - 1}]"
        )
    return data.reshape(-1, 3, 32, 32), labels


def _read_classes(folder: Path) -> list[str]:
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        return list(CIFAR10_CLASSES)
    names = _get(_unpickle(meta_path), "label_names", meta_path)
    if not isinstance(names, (list, tuple)) or not names:
        raise DataError(f"{meta_path}: 'label_names' must be a non-empty list of strings")
    return [_decode_text(n) for n in names]


def _resolve_folder(data_dir: str | os.PathLike, split: str) -> Path:
    folder = Path(data_dir).expanduser()
    if not (folder / SPLIT_FILES[split][0]).is_file() and (folder / SUBFOLDER).is_dir():
        folder = folder / SUBFOLDER
    expected = ", ".join((*SPLIT_FILES[split], META_FILE))
    if not folder.is_dir():
        raise DataNotFoundError(
            f"CIFAR-10 folder {folder} does not exist; pass data_dir (--data-dir) to the folder "
            f"unpacked from cifar-10-python.tar.gz, holding {expected}"
        )
    missing = [name for name in SPLIT_FILES[split] if not (folder / name).is_file()]
    if missing:
        raise DataNotFoundError(
            f"CIFAR-10 folder {folder} lacks {', '.join(missing)}; expected the 'python version' "
            f"batches ({expected}) as unpacked from cifar-10-python.tar.gz"
        )
    return folder


def load_cifar10(
    data_dir: str | os.PathLike, split: Literal["train", "test"] = "train"
) -> ImageDataset:
    """Load one CIFAR-10 split from the python-version batch files in ``data_dir``.

    ``data_dir`` may be the ``cifar-10-batches-py`` folder itself or the folder holding it.
    Class names come from ``batches.meta`` (the standard ten when it is absent).

    Returns:
        An :class:`ImageDataset` with ``images`` ``(N, 3, 32, 32)`` float32 in ``[0, 1]``
        (N = 50000 for ``"train"``, 10000 for ``"test"``) and ``labels`` ``(N,)`` int64.

    Raises:
        InvalidInputError: ``split`` is not ``"train"`` or ``"test"``.
        DataNotFoundError: the folder or one of the split's batch files is missing.
        DataError: a file is corrupt, malformed, or names anything but NumPy array types.

    Example:
        >>> ds = load_cifar10("~/data/cifar-10-batches-py", "test")  # doctest: +SKIP
        >>> ds.images.shape
        torch.Size([10000, 3, 32, 32])
    """
    if split not in SPLIT_FILES:
        raise InvalidInputError(f"split must be 'train' or 'test', got {split!r}")
    folder = _resolve_folder(data_dir, split)
    classes = _read_classes(folder)
    parts = [_read_batch(folder / name, len(classes)) for name in SPLIT_FILES[split]]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    pixels = torch.from_numpy(images.astype(np.float32)).div_(255.0)
    return ImageDataset(pixels, torch.from_numpy(labels), classes, name=f"cifar10/{split}")
