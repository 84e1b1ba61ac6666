"""Image sizes: fit a data set to a training size, progressive resizing stages."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..data.core import ImageDataset
from ..errors import InvalidInputError
from ..models import (
    is_fixed_size,
    list_models,
)
from .config import TrainConfig

LARGE_SIDE = 128  # above this, training at the data's own size is slow: the size note says so


def fit_image_size(splits: Any, image_size: int | tuple[int, int] | None, spec: str | os.PathLike) -> tuple[Any, str]:
    """``splits`` at ``image_size`` (recorded in the recipe as ``image_size``) and one line saying
    which size training uses and why: ``--image-size``, or the data's own size (an image folder:
    its most common image size), with a hint when that is large."""
    from dataclasses import replace as _replace

    from ..data.registry import resize_dataset

    height, width = splits.train.image_size
    if image_size is None:
        folder = Path(os.fspath(spec)).is_dir()
        why = "the most common size among the folder's images" if folder else "the data's own size"
        text = f"image size {height}x{width}: {why} (--image-size to choose another)"
        if max(height, width) > LARGE_SIDE:
            text += ("; large for training: memory and time grow with the pixels, so consider --image-size 64 "
                     "(or the size your architecture expects)")
        return splits, text
    size = (image_size, image_size) if isinstance(image_size, int) else (int(image_size[0]), int(image_size[1]))

    def resized(dataset: ImageDataset | None) -> ImageDataset | None:
        return None if dataset is None else resize_dataset(dataset, size)

    recipe = {**splits.recipe, "image_size": list(size)}
    splits = _replace(splits, train=resized(splits.train), val=resized(splits.val), test=resized(splits.test),
                      recipe=recipe)
    same = size == (height, width)
    return splits, (f"image size {size[0]}x{size[1]}: --image-size"
                    + (" (the data's own size)" if same else f" (the data's images, {height}x{width}, resized)"))



def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize to height ``size`` keeping the aspect ratio (bilinear, antialiased).

    Shape:
        - images: ``(N, C, H, W)``; output ``(N, C, size, round(W * size / H))``.
    """
    height, width = images.shape[-2:]
    target = (int(size), max(1, int(round(width * size / height))))
    if target == (height, width):
        return images
    out = []
    for start in range(0, images.shape[0], 4096):  # bounded memory on big data sets
        out.append(F.interpolate(images[start : start + 4096], size=target, mode="bilinear", align_corners=False, antialias=True))
    return torch.cat(out).clamp_(0.0, 1.0)


def _stage_sizes(config: TrainConfig, native: int) -> list[int]:
    """The image height of every epoch: ``config.progressive`` split over the epochs in turn
    (later sizes get the remainder), or the native height throughout."""
    if not config.progressive:
        return [native] * config.epochs
    sizes = list(config.progressive)
    base, extra = divmod(config.epochs, len(sizes))
    counts = [base + (1 if i >= len(sizes) - extra else 0) for i in range(len(sizes))]
    return [size for size, count in zip(sizes, counts, strict=True) for _ in range(count)]


def _check_progressive(config: TrainConfig, arch: str, train_ds: ImageDataset) -> None:
    if not config.progressive:
        return
    height, width = train_ds.image_size
    if is_fixed_size(arch):
        raise InvalidInputError(
            f"progressive resizing ({','.join(map(str, config.progressive))}) needs a fully convolutional "
            f"architecture with global pooling, but {arch!r} is built for one input size ({height}x{width}); "
            f"use one of: {', '.join(m for m in list_models() if not is_fixed_size(m))}"
        )
    if config.progressive[-1] != height:
        raise InvalidInputError(
            f"progressive sizes must end at the data's own image size {height} (the model is evaluated "
            f"at that size), got {','.join(map(str, config.progressive))}"
        )
