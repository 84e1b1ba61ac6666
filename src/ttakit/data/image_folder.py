"""Image files via Pillow: a folder per class (:func:`load_image_folder`) or a plain list of
files (:func:`load_images`). Unreadable files are skipped, listed and warned about."""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import DataError, DataNotFoundError, InvalidInputError
from .core import ImageDataset

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp"})
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_MAX_WARNED = 5  # skipped files named in the warning; all of them are in the returned list


def list_image_files(folder: str | os.PathLike) -> list[Path]:
    """The image files directly in ``folder`` (PNG, JPEG, BMP, WebP by extension), sorted.

    Hidden files (names starting with ``.``) and sub-folders are left out.

    Raises:
        DataNotFoundError: ``folder`` does not exist or is not a folder.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataNotFoundError(f"image folder {folder} does not exist or is not a folder")
    return sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()
    )


def _check_size(image_size: tuple[int, int] | int | None) -> tuple[int, int] | None:
    """``(H, W)`` from an int (square) or a pair; None stays None."""
    if image_size is None:
        return None
    if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool):
        size = (int(image_size), int(image_size))
    elif (
        isinstance(image_size, Sequence)
        and len(image_size) == 2
        and all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in image_size)
    ):
        size = (int(image_size[0]), int(image_size[1]))
    else:
        raise InvalidInputError(
            f"image_size must be an int or a (height, width) pair of ints, got {image_size!r}"
        )
    if min(size) < 1:
        raise InvalidInputError(f"image_size must be positive, got {image_size!r}")
    return size


def _check_channels(channels: int | None) -> int | None:
    if channels is not None and channels not in (1, 3):
        raise InvalidInputError(
            f"channels must be 1 (grayscale), 3 (RGB) or None, got {channels!r}"
        )
    return channels


def _open(path: Path) -> Image.Image:
    """Decode ``path`` fully, as mode ``"L"`` (grayscale sources) or ``"RGB"`` (all others)."""
    with Image.open(path) as image:
        image.load()  # decode now, so a truncated file fails here, not later
        if image.mode in _GRAY_MODES:
            if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
                # wide grayscale (16-bit PNG, TIFF-like modes): scale 16-bit values to 8 bits
                array = np.asarray(image, dtype=np.float64)
                if image.mode.startswith("I;16") or (image.mode == "I" and array.max() > 255):
                    array = array / 257.0
                return Image.fromarray(np.clip(array, 0, 255).round().astype(np.uint8))
            return image.convert("L")
        return image.convert("RGB")


def load_images(
    paths: Iterable[str | os.PathLike],
    image_size: tuple[int, int] | int | None = None,
    channels: int | None = None,
) -> tuple[torch.Tensor, list[Path], list[str]]:
    """Read image files into one tensor, skipping (and warning about) unreadable ones.

    Args:
        paths: image files, in the order wanted.
        image_size: ``(H, W)`` or an int for square images; None uses the most common size
            among the readable images. Images of another size are resized (bilinear).
        channels: 1 (grayscale) or 3 (RGB); None gives 1 when every image is grayscale,
            else 3.

    Returns:
        ``(images, loaded, skipped)``: ``images`` ``(N, C, H, W)`` float32 in ``[0, 1]``,
        ``loaded`` the N paths read (in input order, row ``i`` from ``loaded[i]``), and
        ``skipped`` one ``"path: reason"`` line per file that could not be read.

    Raises:
        DataError: none of the files could be read (or ``paths`` is empty).

    Example:
        >>> images, loaded, skipped = load_images(["a.png", "b.jpg"], image_size=32)  # doctest: +SKIP
        >>> images.shape
        torch.Size([2, 3, 32, 32])
    """
    size = _check_size(image_size)
    channels = _check_channels(channels)
    decoded: list[Image.Image] = []
    loaded: list[Path] = []
    skipped: list[str] = []
    for raw_path in paths:
        path = Path(raw_path)
        try:
            decoded.append(_open(path))
        # Pillow raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
        except Exception as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            skipped.append(f"{path}: {reason}")
            continue
        loaded.append(path)
    if skipped:
        shown = "; ".join(skipped[:_MAX_WARNED])
        more = f" (and {len(skipped) - _MAX_WARNED} more)" if len(skipped) > _MAX_WARNED else ""
        warnings.warn(
            f"skipped {len(skipped)} unreadable image file(s): {shown}{more}", stacklevel=2
        )
    if not decoded:
        detail = f"; skipped: {'; '.join(skipped[:_MAX_WARNED])}" if skipped else ""
        raise DataError(f"no readable images among {len(skipped)} file(s){detail}")

    if channels is None:
        channels = 1 if all(im.mode == "L" for im in decoded) else 3
    if size is None:
        # PIL sizes are (W, H); the most common one, ties broken by first seen
        width, height = Counter(im.size for im in decoded).most_common(1)[0][0]
        size = (height, width)
    height, width = size
    mode = "L" if channels == 1 else "RGB"
    out = torch.empty(len(decoded), channels, height, width, dtype=torch.float32)
    for i, image in enumerate(decoded):
        if image.mode != mode:
            image = image.convert(mode)
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.BILINEAR)
        array = np.asarray(image, dtype=np.uint8).reshape(height, width, channels)
        out[i] = torch.from_numpy(array.transpose(2, 0, 1).astype(np.float32))
        decoded[i] = None  # type: ignore[call-overload]  # free memory as we go
    return out.div_(255.0), loaded, skipped


def load_image_folder(
    root: str | os.PathLike,
    image_size: tuple[int, int] | int | None = None,
    channels: int | None = None,
    classes: list[str] | None = None,
) -> ImageDataset:
    """Load ``root/<class>/<image>`` files: one sub-folder per class.

    Args:
        root: the folder holding one sub-folder per class.
        image_size, channels: as for :func:`load_images`.
        classes: the class folders to use, in label order; None uses every non-hidden
            sub-folder, sorted by name.

    Returns:
        An :class:`ImageDataset`; ``skipped`` lists unreadable files (also warned about).

    Raises:
        DataNotFoundError: ``root`` or a named class folder does not exist.
        DataError: ``root`` has no class sub-folders, or a class folder holds no readable image.

    Example:
        >>> ds = load_image_folder("photos", image_size=64)  # doctest: +SKIP
        >>> ds.classes
        ['cat', 'dog']
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataNotFoundError(f"image folder {root} does not exist or is not a folder")
    if classes is None:
        classes = sorted(
            p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
        )
        if not classes:
            raise DataError(
                f"image folder {root} has no class sub-folders; expected {root}/<class name>/<image>"
                " (for a plain folder of images use load_images)"
            )
    else:
        classes = [str(c) for c in classes]
        if not classes:
            raise InvalidInputError("classes must name at least one class folder, got []")
        absent = [c for c in classes if not (root / c).is_dir()]
        if absent:
            raise DataNotFoundError(
                f"image folder {root} has no class folder(s) {', '.join(absent)}"
            )
    _check_size(image_size)
    _check_channels(channels)

    files: list[Path] = []
    labels: list[int] = []
    for index, name in enumerate(classes):
        members = list_image_files(root / name)
        if not members:
            raise DataError(
                f"class folder {root / name} holds no images "
                f"(expected files ending in {', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        files += members
        labels += [index] * len(members)
    images, loaded, skipped = load_images(files, image_size, channels)

    label_of = dict(zip(files, labels, strict=True))
    found = Counter(label_of[p] for p in loaded)
    for index, name in enumerate(classes):
        if found[index] == 0:
            prefix = f"{root / name}{os.sep}"
            reasons = "; ".join(s for s in skipped if s.startswith(prefix))
            raise DataError(
                f"class folder {root / name} holds no readable images; skipped: {reasons}"
            )
    return ImageDataset(
        images,
        torch.tensor([label_of[p] for p in loaded], dtype=torch.int64),
        classes,
        name=str(root),
        skipped=skipped,
        files=[p.relative_to(root).as_posix() for p in loaded],
    )
