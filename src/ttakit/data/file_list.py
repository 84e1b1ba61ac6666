"""A labelled list of image files: one ``path<TAB>class`` line per image (``ttakit audit
--write-clean`` writes one for image folders, so ``ttakit train --data clean.txt`` retrains on
the folder without the flagged images).

A third column ``test`` marks the list's own test split (``audit --write-clean`` keeps a
checkpoint's held-out test images there); such a list is data with a test split of its own."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import DataError, DataNotFoundError
from .core import ImageDataset
from .image_folder import load_images


def _entries(path: Path) -> list[tuple[Path, str, str]]:
    """``(file, class, split)`` per line; ``split`` is ``"test"`` for lines marked so, else ``"train"``."""
    entries: list[tuple[Path, str, str]] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if "\t" not in line:
            raise DataError(f"{path}:{number}: expected 'image path<TAB>class name', got {line[:80]!r}")
        parts = line.split("\t")
        split = "train"
        if len(parts) >= 3 and parts[-1].strip() in ("train", "test"):
            split, line = parts[-1].strip(), "\t".join(parts[:-1])
        file, label = line.rsplit("\t", 1)
        file_path = Path(file.strip()).expanduser()
        entries.append((file_path if file_path.is_absolute() else path.parent / file_path, label.strip(), split))
    return entries


def file_list_has_test_split(path: str | os.PathLike) -> bool:
    """Whether the file list at ``path`` marks a test split of its own (a third column ``test``)."""
    try:
        return any(split == "test" for _, _, split in _entries(Path(path).expanduser()))
    except (OSError, UnicodeDecodeError, DataError):
        return False


def load_file_list(path: str | os.PathLike, split: str = "train") -> ImageDataset:
    """Load the images a file list names, labelled by the class after each tab.

    Lines starting with ``#`` and blank lines are skipped; relative paths are relative to the
    list's folder. Classes are the distinct names, sorted (as for an image folder), over every
    line. A line ``path<TAB>class<TAB>test`` belongs to the list's own test split: ``split="test"``
    reads those lines, any other split the rest. A list without such lines reads whole for
    every split.

    Raises:
        DataNotFoundError: the list does not exist.
        DataError: a line without a tab-separated class, or no readable image.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataNotFoundError(f"file list {path} does not exist")
    entries = _entries(path)
    if not entries:
        raise DataError(f"file list {path} names no images")
    classes = sorted({label for _, label, _ in entries})
    has_test = any(s == "test" for _, _, s in entries)
    if has_test:
        wanted = "test" if split == "test" else "train"
        entries = [e for e in entries if e[2] == wanted]
        if not entries:
            raise DataError(f"file list {path} names no images of its {wanted} split")
    label_of = {p: classes.index(label) for p, label, _ in entries}
    images, loaded, skipped = load_images([p for p, _, _ in entries])
    labels = torch.tensor([label_of[p] for p in loaded], dtype=torch.int64)
    name = f"{path.name}/test" if has_test and split == "test" else path.name
    return ImageDataset(images, labels, classes, name=name, skipped=skipped, files=[str(p) for p in loaded])
