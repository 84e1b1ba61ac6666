"""A small U-Net for semantic segmentation (``unet-small``): three down-sampling stages, skip
connections, and one logit per class and pixel.

Any input size works: the image is padded on the right and bottom to a multiple of 8 and the
logits are cropped back, so a multi-scale TTA view of 72 or 120 pixels (or 97) runs as is.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidInputError
from .registry import Normalize, register_model

__all__ = ["UNet"]


def _double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    """Conv3x3-BN-ReLU twice; ``(B, in, H, W) -> (B, out, H, W)``."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """U-Net: ``widths`` channels at full, 1/2, 1/4 resolution and ``widths[3]`` at 1/8.

    Shape:
        - Input: ``(B, in_channels, H, W)`` raw images in ``[0, 1]``, any ``H, W >= 1``.
        - Output: ``(B, num_classes, H, W)`` logits (class 0 is the background in ttakit's canvases).

    Example:
        >>> net = UNet(1, 11)
        >>> net(torch.zeros(2, 1, 50, 36)).shape
        torch.Size([2, 11, 50, 36])
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        widths: Sequence[int] = (8, 16, 32, 64),
    ) -> None:
        super().__init__()
        widths = [int(w) for w in widths]
        if len(widths) != 4 or min(widths) < 1:
            raise InvalidInputError(f"widths must be 4 positive channel counts, got {widths!r}")
        w1, w2, w3, w4 = widths
        self.normalize = Normalize(mean, std, channels=in_channels)
        self.enc1 = _double_conv(in_channels, w1)
        self.enc2 = _double_conv(w1, w2)
        self.enc3 = _double_conv(w2, w3)
        self.bottom = _double_conv(w3, w4)
        self.up3 = nn.ConvTranspose2d(w4, w3, 2, stride=2)
        self.dec3 = _double_conv(2 * w3, w3)
        self.up2 = nn.ConvTranspose2d(w3, w2, 2, stride=2)
        self.dec2 = _double_conv(2 * w2, w2)
        self.up1 = nn.ConvTranspose2d(w2, w1, 2, stride=2)
        self.dec1 = _double_conv(2 * w1, w1)
        self.head = nn.Conv2d(w1, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2], x.shape[-1]
        x = self.normalize(x)
        pad_h, pad_w = (-height) % 8, (-width) % 8
        if pad_h or pad_w:  # reflect where it can: a zero border reads as an object edge
            mode = "reflect" if pad_h < height and pad_w < width else "replicate"
            x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
        e1 = self.enc1(x)  # (B, w1, H, W)
        e2 = self.enc2(F.max_pool2d(e1, 2))  # (B, w2, H/2, W/2)
        e3 = self.enc3(F.max_pool2d(e2, 2))  # (B, w3, H/4, W/4)
        b = self.bottom(F.max_pool2d(e3, 2))  # (B, w4, H/8, W/8)
        d3 = self.dec3(torch.cat([self.up3(b), e3], dim=1))
        d2 = self.dec2(torch.cat([self.up2(d3), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return self.head(d1)[..., :height, :width]

    def layer_groups(self) -> list[list[nn.Module]]:
        """Encoder, decoder, and the head (the 1x1 classifier)."""
        return [
            [self.enc1, self.enc2, self.enc3, self.bottom],
            [self.up3, self.dec3, self.up2, self.dec2, self.up1, self.dec1],
            [self.head],
        ]


@register_model("unet-small", task="segmentation")
def unet_small(
    *,
    in_channels: int,
    num_classes: int,
    image_size: tuple[int, int],
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    widths: Sequence[int] = (8, 16, 32, 64),
) -> nn.Module:
    return UNet(in_channels, num_classes, mean, std, widths=widths)
