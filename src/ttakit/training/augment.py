"""Train-time augmentations on a batch: flips, shifts, crops and mixup."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .config import TrainConfig


def translate(images: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Shift each image by whole pixels with zero fill: ``out[b, :, y, x] = in[b, :, y - dy[b], x - dx[b]]``.

    Positive ``dx`` moves content right, positive ``dy`` moves it down.

    Shape:
        - images: ``(B, C, H, W)``; dx, dy: ``(B,)`` integers.
        - Output: ``(B, C, H, W)``.
    """
    _, _, height, width = images.shape
    pad = int(max(dx.abs().max(), dy.abs().max())) if len(dx) else 0
    if pad == 0:
        return images.clone()
    padded = F.pad(images, (pad, pad, pad, pad))  # (B, C, H+2p, W+2p)
    rows = torch.arange(height)[None, :] + pad - dy.long()[:, None]  # (B, H)
    cols = torch.arange(width)[None, :] + pad - dx.long()[:, None]  # (B, W)
    batch = torch.arange(images.shape[0])[:, None, None]  # (B, 1, 1)
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def random_flip(
    images: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.5
) -> torch.Tensor:
    """Flip each image horizontally with probability ``p``. ``(B, C, H, W) -> (B, C, H, W)``."""
    flip = torch.rand(images.shape[0], generator=generator) < p  # (B,)
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def random_shift(
    images: torch.Tensor, max_shift: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Translate each image by a random integer ``(dx, dy)`` in ``[-max_shift, max_shift]^2``, zero fill."""
    offsets = torch.randint(-max_shift, max_shift + 1, (2, images.shape[0]), generator=generator)
    return translate(images, offsets[0], offsets[1])


def random_crop(
    images: torch.Tensor, padding: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Zero-pad by ``padding`` and crop a random window of the original size.

    A crop at offset ``o`` in ``[0, 2 * padding]`` is a translation by ``padding - o``, so this
    is :func:`random_shift` with ``max_shift = padding``.
    """
    return random_shift(images, padding, generator)


def mixup(
    images: torch.Tensor,
    targets: torch.Tensor,
    alpha: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix each sample with a random partner: ``lam * x + (1 - lam) * x[perm]``, ``lam ~ Beta(alpha, alpha)``
    drawn per sample; the one-hot (or soft) ``targets`` ``(B, K)`` are mixed the same way."""
    batch = images.shape[0]
    perm = torch.randperm(batch, generator=generator)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    lam = torch.from_numpy(np.random.default_rng(seed).beta(alpha, alpha, size=batch)).to(
        images.dtype
    )
    mixed_images = lam[:, None, None, None] * images + (1 - lam[:, None, None, None]) * images[perm]
    mixed_targets = lam[:, None] * targets + (1 - lam[:, None]) * targets[perm]
    return mixed_images, mixed_targets


def augment_batch(
    images: torch.Tensor,
    labels: torch.Tensor,
    config: TrainConfig,
    num_classes: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply ``config.augment`` to a batch: geometric ops first, mixup last.

    Returns ``(images, targets)`` with targets ``(B,)`` class indices, or ``(B, K)``
    probabilities when mixup is on.
    """
    targets: torch.Tensor = labels
    for name in config.augment:
        if name == "flip":
            images = random_flip(images, generator)
        elif name == "shift":
            images = random_shift(images, config.max_shift, generator)
        elif name == "crop":
            images = random_crop(images, config.crop_padding, generator)
    if "mixup" in config.augment:
        images, targets = mixup(
            images, F.one_hot(labels, num_classes).float(), config.mixup_alpha, generator
        )
    return images, targets


# ----------------------------------------------------------------------------- inference
