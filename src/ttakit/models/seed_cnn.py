"""The seed CNN: two conv blocks and a dense head, the classic Fashion-MNIST baseline."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..errors import InvalidInputError
from .registry import Normalize, register_model


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
    nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
    nn.init.zeros_(conv.bias)
    return nn.Sequential(conv, nn.ReLU(inplace=True), nn.BatchNorm2d(out_channels), nn.MaxPool2d(2))


class SeedCNN(nn.Sequential):
    """Conv32-ReLU-BN-Pool, Conv64-ReLU-BN-Pool, Dense128-ReLU-BN, Dense(num_classes).

    Shape:
        - Input: ``(B, in_channels, H, W)`` raw images in ``[0, 1]``, ``H, W >= 4``.
        - Output: ``(B, num_classes)`` logits.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: tuple[int, int],
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        hidden: int = 128,
    ) -> None:
        height, width = image_size
        if height < 4 or width < 4:
            raise InvalidInputError(
                f"seed-cnn needs images of at least 4x4 pixels, got image_size={image_size}"
            )
        dense = nn.Linear(64 * (height // 4) * (width // 4), hidden)
        nn.init.kaiming_normal_(dense.weight, nonlinearity="relu")
        nn.init.zeros_(dense.bias)
        super().__init__(
            Normalize(mean, std, channels=in_channels),
            _conv_block(in_channels, 32),  # (B, 32, H/2, W/2)
            _conv_block(32, 64),  # (B, 64, H/4, W/4)
            nn.Flatten(),
            dense,
            nn.ReLU(inplace=True),
            nn.BatchNorm1d(hidden),
            nn.Linear(hidden, num_classes),
        )

    def layer_groups(self) -> list[list[nn.Module]]:
        """Conv block 1, conv block 2, and the head: the dense layers after the convolutions
        (Dense128 + its BatchNorm + the classifier), which transfer starts afresh when the
        classes change, as fastai cuts a body from its head at the pooling."""
        return [[self[1]], [self[2]], [self[4], self[6], self[7]]]


@register_model("seed-cnn", fixed_size=True)
def seed_cnn(
    *,
    in_channels: int,
    num_classes: int,
    image_size: tuple[int, int],
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    hidden: int = 128,
) -> nn.Module:
    return SeedCNN(in_channels, num_classes, image_size, mean, std, hidden=hidden)
