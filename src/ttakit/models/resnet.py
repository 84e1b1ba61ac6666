"""ResNets: a CIFAR-style ResNet-20 (He et al. 2016: 3 stages of 3 basic blocks, widths
16/32/64), and ResNet-18/34/50 in plain torch whose parameter and buffer names follow
torchvision's layout exactly (``conv1``, ``bn1``, ``layer1.0.conv1``, ...,
``layer4.1.downsample.0``, ``fc``), so state dicts saved from torchvision load as they are.

Every model starts with a :class:`Normalize` stage (``normalize.mean``/``normalize.std``
buffers); those two keys are the only ones a torchvision state dict does not have.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .registry import Normalize, register_model


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 projection) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet; any channels, image size and number of classes.

    Shape:
        - Input: ``(B, in_channels, H, W)`` raw images in ``[0, 1]``.
        - Output: ``(B, num_classes)`` logits.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        blocks_per_stage: int = 3,
        widths: Sequence[int] = (16, 32, 64),
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std, channels=in_channels)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        layers: list[nn.Module] = []
        channels = widths[0]
        for stage, width in enumerate(widths):
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(BasicBlock(channels, width, stride))
                channels = width
        self.stages = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def layer_groups(self) -> list[list[nn.Module]]:
        """Stem + stage 1, stage 2, stage 3, head: the groups ``--lr-slice`` spreads rates over."""
        per_stage = len(self.stages) // 3
        blocks = list(self.stages)
        return [
            [self.stem, *blocks[:per_stage]],
            blocks[per_stage : 2 * per_stage],
            blocks[2 * per_stage :],
            [self.fc],
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(self.normalize(x))  # (B, 16, H, W)
        x = self.stages(x)  # (B, 64, H/4, W/4)
        return self.fc(torch.flatten(self.pool(x), 1))  # (B, num_classes)


@register_model("resnet20")
def resnet20(
    *,
    in_channels: int,
    num_classes: int,
    image_size: tuple[int, int],
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> nn.Module:
    del image_size  # global average pooling makes the network size-agnostic
    return ResNet(in_channels, num_classes, mean, std, blocks_per_stage=3)


# ----------------------------------------------------------------------------- torchvision layout


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class TVBasicBlock(nn.Module):
    """torchvision's ``BasicBlock``: conv1/bn1/conv2/bn2 and an optional ``downsample``
    (``Sequential(conv1x1, BatchNorm2d)``)."""

    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class TVBottleneck(nn.Module):
    """torchvision's ``Bottleneck`` (ResNet v1.5: the stride sits on the 3x3 ``conv2``)."""

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class TorchvisionResNet(nn.Module):
    """An ImageNet-style ResNet with torchvision's module names: 7x7/2 ``conv1``, ``bn1``,
    3x3/2 ``maxpool``, ``layer1``..``layer4`` (widths 64..512, x4 for bottlenecks), global
    average pooling, ``fc``. ``in_channels=1`` gives a grayscale ``conv1`` of shape
    ``(64, 1, 7, 7)``.

    Shape:
        - Input: ``(B, in_channels, H, W)`` raw images in ``[0, 1]``, any ``H, W >= 1``.
        - Output: ``(B, num_classes)`` logits.

    Example:
        >>> model = TorchvisionResNet(TVBasicBlock, (2, 2, 2, 2), in_channels=1, num_classes=10)
        >>> model(torch.rand(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        block: type[TVBasicBlock] | type[TVBottleneck],
        layers: Sequence[int],
        in_channels: int = 3,
        num_classes: int = 1000,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std, channels=in_channels)
        self.inplanes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _make_layer(
        self, block: type[TVBasicBlock] | type[TVBottleneck], planes: int, blocks: int, stride: int = 1
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers: list[nn.Module] = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def layer_groups(self) -> list[list[nn.Module]]:
        """Stem + layer1, layer2, layer3, layer4, head (``fc``)."""
        return [
            [self.conv1, self.bn1, self.layer1],
            [self.layer2],
            [self.layer3],
            [self.layer4],
            [self.fc],
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(self.normalize(x)))))  # (B, 64, H/4, W/4)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 512*e, H/32, W/32)
        return self.fc(torch.flatten(self.avgpool(x), 1))  # (B, num_classes)


_TV_CONFIGS: dict[str, tuple[type[TVBasicBlock] | type[TVBottleneck], tuple[int, int, int, int]]] = {
    "resnet18": (TVBasicBlock, (2, 2, 2, 2)),
    "resnet34": (TVBasicBlock, (3, 4, 6, 3)),
    "resnet50": (TVBottleneck, (3, 4, 6, 3)),
}


def _torchvision_factory(name: str):
    block, layers = _TV_CONFIGS[name]

    def factory(
        *,
        in_channels: int,
        num_classes: int,
        image_size: tuple[int, int],
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> nn.Module:
        del image_size  # global average pooling makes the network size-agnostic
        return TorchvisionResNet(block, layers, in_channels, num_classes, mean, std)

    factory.__name__ = name.replace("-", "_")
    factory.__doc__ = f"torchvision-layout {name} ({block.__name__[2:]} x {list(layers)})."
    return factory


for _name in _TV_CONFIGS:
    register_model(_name)(_torchvision_factory(_name))
