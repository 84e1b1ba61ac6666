"""Architectures by name and self-describing checkpoints (safetensors weights + JSON metadata).

Classifiers (seed-cnn, seed-cnn-gap, resnet20, resnet18/34/50), a segmentation U-Net
(``unet-small``) and a CenterNet-style detector (``centernet-small``); ``list_models(task)``.
"""

from . import centernet, resnet, seed_cnn, unet  # noqa: F401  (registers the architectures)
from .checkpoint import (
    CheckpointMeta,
    check_compatible,
    load_checkpoint,
    read_checkpoint_meta,
    save_checkpoint,
)
from .registry import (
    TASKS,
    Normalize,
    classifier_module,
    create_model,
    is_fixed_size,
    layer_groups,
    list_models,
    model_task,
    register_model,
)

__all__ = [
    "TASKS",
    "CheckpointMeta",
    "Normalize",
    "check_compatible",
    "classifier_module",
    "create_model",
    "is_fixed_size",
    "layer_groups",
    "list_models",
    "load_checkpoint",
    "model_task",
    "read_checkpoint_meta",
    "register_model",
    "save_checkpoint",
]
