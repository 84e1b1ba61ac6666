"""A labelled list of image files: one ``path<TAB>class`` line per image (``ttakit audit
--write-clean`` writes one for image folders, so ``ttakit train --data clean.txt`` retrains on
the folder without the flagged images)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import DataError, DataNotFoundError
from .core import ImageDataset
from .image_folder import load_images


def load_file_list(path: str | os.PathLike) -> ImageDataset:
    """Load the images a file list names, labelled by the class after each tab.

    Lines starting with ``#`` and blank lines are skipped; relative paths are relative to the
    list's folder. Classes are the distinct names, sorted (as for an image folder).

    Raises:
        DataNotFoundError: the list does not exist.
        DataError: a line without a tab-separated class, or no readable image.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataNotFoundError(f"file list {path} does not exist")
    entries: list[tuple[Path, str]] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if "\t" not in line:
            raise DataError(f"{path}:{number}: expected 'image path<TAB>class name', got {line[:80]!r}")
        file, label = line.rsplit("\t", 1)
        file_path = Path(file.strip()).expanduser()
        entries.append((file_path if file_path.is_absolute() else path.parent / file_path, label.strip()))
    if not entries:
        raise DataError(f"file list {path} names no images")
    classes = sorted({label for _, label in entries})
    label_of = {p: classes.index(label) for p, label in entries}
    images, loaded, skipped = load_images([p for p, _ in entries])
    labels = torch.tensor([label_of[p] for p in loaded], dtype=torch.int64)
    return ImageDataset(images, labels, classes, name=path.name, skipped=skipped, files=[str(p) for p in loaded])
