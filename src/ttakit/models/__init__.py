"""Architectures by name and self-describing checkpoints (safetensors weights + JSON metadata)."""

from . import resnet, seed_cnn  # noqa: F401  (registers seed-cnn, resnet20, resnet18/34/50)
from .checkpoint import (
    CheckpointMeta,
    check_compatible,
    load_checkpoint,
    read_checkpoint_meta,
    save_checkpoint,
)
from .registry import (
    Normalize,
    classifier_module,
    create_model,
    is_fixed_size,
    layer_groups,
    list_models,
    register_model,
)

__all__ = [
    "CheckpointMeta",
    "Normalize",
    "check_compatible",
    "classifier_module",
    "create_model",
    "is_fixed_size",
    "layer_groups",
    "list_models",
    "load_checkpoint",
    "read_checkpoint_meta",
    "register_model",
    "save_checkpoint",
]
