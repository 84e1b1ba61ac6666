"""The model a run trains (architecture, weights to start from) and its autocast context."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..data.core import ImageDataset, normalization_stats
from ..models import (
    create_model,
)
from .config import TrainConfig
from .transfer import (
    InitReport,
    init_classes,
    load_init_weights,
)


def build_model(
    train_ds: ImageDataset,
    config: TrainConfig,
    arch: str = "seed-cnn",
    arch_kwargs: dict[str, Any] | None = None,
) -> tuple[nn.Module, InitReport | None]:
    """The model :func:`train_model` starts from: ``arch`` with the training data's
    normalization, ``config.init`` weights loaded, on ``config.device``; seeded by ``config.seed``."""
    torch.manual_seed(config.seed)
    mean, std = normalization_stats(train_ds.images)
    model = create_model(
        arch,
        in_channels=train_ds.channels,
        num_classes=train_ds.num_classes,
        image_size=train_ds.image_size,
        mean=mean,
        std=std,
        **dict(arch_kwargs or {}),
    )
    report = None
    if config.init:
        classes = init_classes(config.init)  # a ttakit checkpoint says which classes its head knows
        new_head = classes is not None and list(classes) != list(train_ds.classes)
        report = load_init_weights(model, config.init, arch, new_head=new_head)
    return model.to(torch.device(config.device)), report


def autocast(config: TrainConfig) -> Any:
    """The forward pass's autocast under ``config.amp`` (``--amp``): bfloat16 on CPU, float16 on
    CUDA and MPS; a no-op context otherwise."""
    from .._amp import autocast as amp_autocast

    return amp_autocast(torch.device(config.device).type, config.amp)
