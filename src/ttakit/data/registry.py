"""Data sets by name (``register_dataset`` / ``load_dataset`` / ``list_datasets``).

A spec given to :func:`load_dataset` is a registered name (``"fashion-mnist"``,
``"cifar10"``), a path to an ``.npz`` file, or a path to an image folder.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch.nn.functional as F

from ..errors import DataNotFoundError, InvalidInputError, unknown_name
from .cifar10 import load_cifar10
from .core import ImageDataset
from .fashion_mnist import load_fashion_mnist
from .image_folder import _check_size, load_image_folder
from .npz import load_npz

# loader(split, data_dir) -> ImageDataset
DatasetLoader = Callable[[str, "str | os.PathLike | None"], ImageDataset]

_DATASETS: dict[str, DatasetLoader] = {}


def _normalise(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def register_dataset(name: str) -> Callable[[DatasetLoader], DatasetLoader]:
    """Decorator: register ``loader(split, data_dir) -> ImageDataset`` under ``name``.

    Names are case-insensitive and ``_`` equals ``-``.

    Example:
        >>> @register_dataset("tiny")  # doctest: +SKIP
        ... def _tiny(split, data_dir):
        ...     return ImageDataset(torch.zeros(2, 1, 4, 4), torch.tensor([0, 1]), ["a", "b"])
    """
    key = _normalise(name)
    if not key:
        raise InvalidInputError(f"data set name must be a non-empty string, got {name!r}")

    def decorator(loader: DatasetLoader) -> DatasetLoader:
        if key in _DATASETS and _DATASETS[key] is not loader:
            raise InvalidInputError(f"data set name {key!r} is already registered")
        _DATASETS[key] = loader
        return loader

    return decorator


def list_datasets() -> list[str]:
    """The registered data set names, sorted."""
    return sorted(_DATASETS)


@register_dataset("fashion-mnist")
def _fashion_mnist(split: str, data_dir: str | os.PathLike | None) -> ImageDataset:
    return load_fashion_mnist(split, data_dir)  # type: ignore[arg-type]


@register_dataset("cifar10")
def _cifar10(split: str, data_dir: str | os.PathLike | None) -> ImageDataset:
    if data_dir is None:
        raise DataNotFoundError(
            "the cifar10 data set needs data_dir (--data-dir): the folder unpacked from "
            "cifar-10-python.tar.gz, holding data_batch_1..data_batch_5, test_batch and batches.meta"
        )
    return load_cifar10(data_dir, split)  # type: ignore[arg-type]


def resize_dataset(dataset: ImageDataset, image_size: tuple[int, int] | int | None) -> ImageDataset:
    """``dataset`` with images resized (bilinear, antialiased) to ``image_size`` ``(H, W)``.

    Returns ``dataset`` itself when ``image_size`` is None or already its size.
    """
    size = _check_size(image_size)
    if size is None or size == dataset.image_size:
        return dataset
    images = F.interpolate(
        dataset.images, size=size, mode="bilinear", align_corners=False, antialias=True
    )
    return ImageDataset(
        images.clamp_(0.0, 1.0),
        dataset.labels,
        list(dataset.classes),
        dataset.name,
        list(dataset.skipped),
        files=dataset.files,
    )


def _folder_for_split(root: Path, split: str) -> Path:
    """``root/split`` when ``root`` has both ``train/`` and ``test/``, else ``root`` itself."""
    if (root / "train").is_dir() and (root / "test").is_dir():
        chosen = root / split
        if not chosen.is_dir():
            raise DataNotFoundError(
                f"image folder {root} has train/ and test/ but no {split}/ for split={split!r}"
            )
        return chosen
    return root


def load_dataset(
    spec: str | os.PathLike,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    image_size: tuple[int, int] | int | None = None,
) -> ImageDataset:
    """Load a data set by registered name or by path.

    Args:
        spec: a name from :func:`list_datasets`, a path to an ``.npz`` file, or a path to an
            image folder (``<class>/<image>``; when it has ``train/`` and ``test/`` sub-folders,
            the one named by ``split`` is used, otherwise the whole folder for every split).
        split: ``"train"`` or ``"test"`` for registered names; ``.npz`` files and file lists
            with a test split of their own (``x_test``; lines marked ``test``) read it for
            ``"test"``, others ignore ``split``.
        data_dir: the folder holding a registered data set's files (required for ``cifar10``).
        image_size: resize to ``(H, W)`` (or an int, square); None keeps the stored size.

    Returns:
        An :class:`ImageDataset`, ``images`` ``(N, C, H, W)`` float32 in ``[0, 1]``.

    Raises:
        UnknownNameError: ``spec`` is neither registered nor an existing path.
        DataNotFoundError, DataError: as raised by the loaders.

    Example:
        >>> test = load_dataset("fashion-mnist", split="test")  # doctest: +SKIP
        >>> test.images.shape
        torch.Size([10000, 1, 28, 28])
    """
    if not isinstance(split, str) or not split:
        raise InvalidInputError(
            f"split must be a non-empty string such as 'train' or 'test', got {split!r}"
        )
    if not isinstance(spec, (str, os.PathLike)):
        raise InvalidInputError(
            f"spec must be a data set name or a path, got {type(spec).__name__}"
        )
    text = str(os.fspath(spec))
    key = _normalise(text)
    if key in _DATASETS:
        return resize_dataset(_DATASETS[key](split, data_dir), image_size)
    path = Path(text).expanduser()
    if path.is_file() and path.suffix.lower() == ".npz":
        return resize_dataset(load_npz(path, split), image_size)
    if path.is_file() and path.suffix.lower() == ".txt":  # a labelled file list (ttakit audit --write-clean)
        from .file_list import load_file_list

        return resize_dataset(load_file_list(path, split), image_size)
    if path.is_dir():
        return load_image_folder(_folder_for_split(path, split), image_size=image_size)
    if path.suffix.lower() == ".npz" or os.sep in text or path.exists():
        what = "is not an .npz file or a folder" if path.exists() else "does not exist"
        raise DataNotFoundError(
            f"data set path {text!r} {what}; expected a registered name "
            f"({', '.join(list_datasets())}), an .npz file or an image folder"
        )
    err = unknown_name("data set", text, list_datasets())
    raise type(err)(f"{err}; or a path to an .npz file or an image folder") from None


__all__ = ["DatasetLoader", "list_datasets", "load_dataset", "register_dataset", "resize_dataset"]
