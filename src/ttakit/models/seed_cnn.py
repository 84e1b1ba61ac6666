"""The seed CNN: two conv blocks and a dense head, the classic Fashion-MNIST baseline; and its
fully convolutional variant with global pooling (``seed-cnn-gap``), which takes any image size
(progressive resizing)."""

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


def _dense(in_features: int, out_features: int) -> nn.Linear:
    """A dense layer followed by ReLU: He-initialised, zero bias."""
    dense = nn.Linear(in_features, out_features)
    nn.init.kaiming_normal_(dense.weight, nonlinearity="relu")
    nn.init.zeros_(dense.bias)
    return dense


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
        dense = _dense(64 * (height // 4) * (width // 4), hidden)
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
        (Dense128 + its BatchNorm + the classifier), what ``--freeze-epochs`` trains alone. When
        the classes change, transfer starts only the classifier afresh and keeps the pretrained
        Dense128 (only the classifier's outputs mean the classes)."""
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


class SeedCNNGAP(nn.Sequential):
    """The seed CNN made size-agnostic: Conv32-ReLU-BN-Pool, Conv64-ReLU-BN-Pool,
    Conv128-ReLU-BN, global average pooling, Dense128-ReLU-BN, Dense(num_classes).

    A third conv block (no pooling) and a global average pool replace the flatten, so the dense
    head sees 128 features whatever the image size: it trains at 14x14 and predicts at 28x28
    (``--progressive 14,28``).

    Shape:
        - Input: ``(B, in_channels, H, W)`` raw images in ``[0, 1]``, ``H, W >= 4``.
        - Output: ``(B, num_classes)`` logits.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        hidden: int = 128,
        width: int = 128,
    ) -> None:
        block3 = _conv_block(64, width)[:3]  # Conv-ReLU-BN without the pooling
        dense = _dense(width, hidden)
        super().__init__(
            Normalize(mean, std, channels=in_channels),
            _conv_block(in_channels, 32),  # (B, 32, H/2, W/2)
            _conv_block(32, 64),  # (B, 64, H/4, W/4)
            block3,  # (B, width, H/4, W/4)
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),  # (B, width)
            dense,
            nn.ReLU(inplace=True),
            nn.BatchNorm1d(hidden),
            nn.Linear(hidden, num_classes),
        )

    def layer_groups(self) -> list[list[nn.Module]]:
        """Conv block 1, conv block 2, conv block 3, and the head (Dense128 + BatchNorm + classifier)."""
        return [[self[1]], [self[2]], [self[3]], [self[6], self[8], self[9]]]


@register_model("seed-cnn-gap")
def seed_cnn_gap(
    *,
    in_channels: int,
    num_classes: int,
    image_size: tuple[int, int],
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    hidden: int = 128,
    width: int = 128,
) -> nn.Module:
    if min(image_size) < 4:
        raise InvalidInputError(
            f"seed-cnn-gap needs images of at least 4x4 pixels, got image_size={image_size}"
        )
    return SeedCNNGAP(in_channels, num_classes, mean, std, hidden=hidden, width=width)
