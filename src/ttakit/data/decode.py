"""Image decoding for ``ttakit predict``: list the files to predict on, and decode one file into
the channels and size a model takes.

Pillow reads PNG, JPEG, WebP, BMP, TIFF and GIF (the first frame). EXIF orientation is applied.
Grayscale, RGB, RGBA, palette and CMYK images are converted to the model's channels (1: gray,
3: RGB, 4: RGBA; an alpha channel is dropped for 1 and 3), 16-bit grayscale is scaled to 8 bits,
and each image is resized (bilinear, as the image-folder loader does) to the model's input
size. A file that cannot be decoded raises :class:`DecodeError` with the reason; predict writes
it to its errors file and goes on.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from ..errors import DataError, DataNotFoundError, InvalidInputError

__all__ = [
    "PREDICT_EXTENSIONS",
    "CONVERTIBLE_CHANNELS",
    "DecodeError",
    "list_images",
    "decode_image",
    "ImageFiles",
    "collate_decoded",
    "check_channels",
]

PREDICT_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
)
CONVERTIBLE_CHANNELS = (1, 3, 4)
_MODE_FOR_CHANNELS = {1: "L", 3: "RGB", 4: "RGBA"}
_WIDE_GRAY = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_GLOB_CHARS = frozenset("*?[")


class DecodeError(Exception):
    """One file could not be decoded (the message is the reason). Not a ttakit input error:
    predict records it and goes on."""


def check_channels(channels: int | None, source: str = "the model") -> int:
    """``channels`` if images can be converted to it (1, 3 or 4), else a one-line error."""
    if channels is None:
        raise InvalidInputError(
            f"{source} does not say how many channels its images have; pass channels (--channels 1 or 3)"
        )
    if channels not in CONVERTIBLE_CHANNELS:
        raise InvalidInputError(
            f"{source} takes {channels}-channel images; image files convert only to 1 (gray), 3 (RGB) "
            "or 4 (RGBA) channels"
        )
    return channels


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in PREDICT_EXTENSIONS and not path.name.startswith(".")


def list_images(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The image files ``spec`` names, in a stable order.

    Args:
        spec: a folder (searched recursively for PNG, JPEG, WebP, BMP, TIFF and GIF files;
            hidden files and folders skipped), a glob pattern (``photos/*.jpg``,
            ``shots/**/*.png``), a text file listing one path a line (relative paths are
            relative to the text file's folder; blank lines and ``#`` comments skipped), a
            single image file, or a list of paths.

    Raises:
        DataNotFoundError: the folder or list file does not exist.
        DataError: the folder, glob or list holds no image files.
    """
    if isinstance(spec, (list, tuple)):
        paths = [Path(p) for p in spec]
        if not paths:
            raise DataError("the list of images is empty")
        return paths
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        found = []
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            found += [Path(root) / f for f in files if _is_image_name(Path(f))]
        if not found:
            raise DataError(
                f"folder {path} holds no image files (looked recursively for "
                f"{', '.join(sorted(PREDICT_EXTENSIONS))})"
            )
        return sorted(found)
    if path.is_file():
        if _is_image_name(path):
            return [path]
        return _read_list(path)
    if _GLOB_CHARS & set(text):
        matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(text), recursive=True))
        files = [p for p in matches if p.is_file()]
        if not files:
            raise DataError(f"the pattern {text!r} matches no files")
        return files
    raise DataNotFoundError(
        f"images {text} do not exist; expected a folder, a glob pattern (quote it) or a text file listing image paths"
    )


def _read_list(path: Path) -> list[Path]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(
            f"{path} is neither an image (by its extension) nor a readable text file listing image paths ({exc})"
        ) from exc
    base = path.parent
    paths = []
    for line in lines:
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        item = Path(entry).expanduser()
        paths.append(item if item.is_absolute() else base / item)
    if not paths:
        raise DataError(f"the image list {path} names no files (expected one path a line)")
    return paths


def _to_mode(image: Image.Image, mode: str) -> Image.Image:
    if image.mode in _WIDE_GRAY:
        array = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or (image.mode == "I" and array.max() > 255):
            array = array / 257.0
        elif image.mode == "F" and array.max() <= 1.0:
            array = array * 255.0
        image = Image.fromarray(np.clip(array, 0, 255).round().astype(np.uint8))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # Pillow wants palette transparency expanded first
    if image.mode != mode:
        image = image.convert(mode)
    return image


def _may_be_rotated(image: Image.Image) -> bool:
    # Parsing EXIF costs as much as decoding a small PNG: only where the file carries it.
    if "exif" not in image.info and image.format != "TIFF":
        return False
    return image.getexif().get(0x0112, 1) != 1


RESIZE_MODES = ("stretch", "fit", "crop")


def check_resize(resize: str) -> str:
    """``resize`` checked: ``stretch``, ``fit`` or ``crop`` (see :func:`decode_image`)."""
    if resize not in RESIZE_MODES:
        raise InvalidInputError(f"resize (--resize) must be one of {', '.join(RESIZE_MODES)}, got {resize!r}")
    return resize


def resize_image(image: Image.Image, size: tuple[int, int], resize: str = "stretch") -> Image.Image:
    """``image`` at ``size`` ``(H, W)``: ``stretch`` to it (the aspect ratio changes), ``fit`` it
    inside keeping the aspect ratio and pad the rest with black (letterbox, centred), or ``crop``:
    resize the short side to fill it and cut the centre."""
    height, width = size
    if image.size == (width, height):
        return image
    if resize == "stretch":
        return image.resize((width, height), Image.Resampling.BILINEAR)
    w, h = image.size
    scale = min(width / w, height / h) if resize == "fit" else max(width / w, height / h)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    scaled = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    if resize == "crop":
        left, top = (new_w - width) // 2, (new_h - height) // 2
        return scaled.crop((left, top, left + width, top + height))
    canvas = Image.new(image.mode, (width, height))  # black (zeros) in every mode
    canvas.paste(scaled, ((width - new_w) // 2, (height - new_h) // 2))
    return canvas


def decode_image(path: str | os.PathLike, channels: int, size: tuple[int, int], resize: str = "stretch") -> np.ndarray:
    """Decode ``path`` into a ``(H, W, channels)`` uint8 array of the model's ``size`` ``(H, W)``,
    resized as ``resize`` says (:func:`resize_image`: ``stretch``, ``fit`` or ``crop``).

    Raises:
        DecodeError: missing, unreadable, truncated or non-image file (the message says why).
    """
    mode = _MODE_FOR_CHANNELS[channels]
    height, width = size
    try:
        with Image.open(path) as image:
            if getattr(image, "n_frames", 1) > 1:
                image.seek(0)  # animated GIF/WebP/TIFF: the first frame
            image.load()  # decode now: a truncated file fails here
            if _may_be_rotated(image):
                image = ImageOps.exif_transpose(image)
            image = _to_mode(image, mode)
            image = resize_image(image, (height, width), resize)
            array = np.array(image, dtype=np.uint8)  # a writable copy (torch.from_numpy needs one)
    except FileNotFoundError:
        raise DecodeError("file not found") from None
    except Image.UnidentifiedImageError:
        raise DecodeError("not an image file Pillow can read") from None
    except Exception as exc:  # Pillow raises OSError, ValueError, SyntaxError, DecompressionBombError...
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise DecodeError(f"{type(exc).__name__}: {reason}") from None
    return array.reshape(height, width, channels)


class ImageFiles(torch.utils.data.Dataset):
    """Image files decoded on demand (in DataLoader workers): item ``i`` is ``(i, image, error)``
    with ``image`` a ``(C, H, W)`` uint8 tensor, or ``(i, None, reason)`` for a bad file."""

    def __init__(self, paths: Sequence[str | os.PathLike], channels: int, size: tuple[int, int],
                 resize: str = "stretch"):
        self.paths = list(paths)
        self.channels = check_channels(channels)
        self.size = (int(size[0]), int(size[1]))
        self.resize = check_resize(resize)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            array = decode_image(self.paths[index], self.channels, self.size, self.resize)
        except DecodeError as exc:
            return index, None, str(exc)
        return index, torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))), ""


def collate_decoded(
    items: Sequence[tuple[int, torch.Tensor | None, str]],
) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    """Batch decoded items: ``(indices, images (n, C, H, W) uint8 or None, [(index, reason)])``."""
    good = [(i, image) for i, image, _ in items if image is not None]
    errors = [(i, reason) for i, image, reason in items if image is None]
    images = torch.stack([image for _, image in good]) if good else None
    return [i for i, _ in good], images, errors
