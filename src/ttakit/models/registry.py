"""Architectures by name (timm-style ``register_model`` / ``create_model`` / ``list_models``).

Every registered model takes RAW images in ``[0, 1]`` and begins with a :class:`Normalize`
module, so the normalization statistics computed at training time travel with the weights
and are reused unchanged at test time. Models return logits (no softmax).

Each architecture serves one task (:data:`TASKS`): ``"classification"`` (``(B, classes)``
logits; the default, and all that :func:`list_models` lists unless asked), ``"segmentation"``
(``(B, classes, H, W)`` logits) or ``"detection"`` (``(B, max_det, 6)`` boxes, see
:mod:`ttakit.models.centernet`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import nn

from ..errors import InvalidInputError, unknown_name

ModelFactory = Callable[..., nn.Module]

_MODELS: dict[str, ModelFactory] = {}
_FIXED_SIZE: set[str] = set()
_TASK: dict[str, str] = {}
TASKS = ("classification", "segmentation", "detection")
Task = Literal["classification", "segmentation", "detection"]


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std``; the identity when ``mean`` and ``std`` are None.

    The statistics are buffers, so they are saved in the state dict with the weights.

    Shape:
        - Input: ``(B, C, H, W)`` raw images in ``[0, 1]``.
        - Output: ``(B, C, H, W)``.

    Example:
        >>> norm = Normalize([0.5], [0.25])
        >>> norm(torch.ones(1, 1, 2, 2)).flatten().tolist()
        [2.0, 2.0, 2.0, 2.0]
    """

    def __init__(
        self,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        channels: int | None = None,
    ) -> None:
        super().__init__()
        if (mean is None) != (std is None):
            raise InvalidInputError("mean and std must be given together or both left as None")
        if mean is None or std is None:
            # (x - 0) / 1 is exactly x: the identity, with buffers of the same shape as a real one
            n = channels or 1
            mean_t = torch.zeros(n)
            std_t = torch.ones(n)
        else:
            mean_t = torch.as_tensor(list(mean), dtype=torch.float32).flatten()
            std_t = torch.as_tensor(list(std), dtype=torch.float32).flatten()
            if mean_t.numel() != std_t.numel():
                raise InvalidInputError(
                    f"mean and std must have one value per channel, got {mean_t.numel()} means "
                    f"and {std_t.numel()} stds"
                )
            if channels is not None and mean_t.numel() != channels:
                raise InvalidInputError(
                    f"mean/std must have {channels} values (one per channel), got {mean_t.numel()}"
                )
            if not bool((std_t > 0).all()):
                raise InvalidInputError(f"std must be positive, got {std_t.tolist()}")
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1))
        self.register_buffer("std", std_t.view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def register_model(
    name: str, *, fixed_size: bool = False, task: Task = "classification"
) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator that registers a model factory under ``name``.

    The factory is called as ``factory(in_channels=, num_classes=, image_size=, mean=, std=,
    **kwargs)`` and must return an ``nn.Module`` whose first stage is a :class:`Normalize`.
    ``fixed_size=True`` marks an architecture that only takes the image size it was built for
    (a dense layer after the convolutions); progressive resizing refuses those. ``task`` is
    one of :data:`TASKS`.
    """
    if task not in TASKS:
        raise unknown_name("task", task, list(TASKS))

    def decorate(factory: ModelFactory) -> ModelFactory:
        if name in _MODELS:
            raise InvalidInputError(f"model name {name!r} is already registered")
        _MODELS[name] = factory
        _TASK[name] = task
        if fixed_size:
            _FIXED_SIZE.add(name)
        return factory

    return decorate


def is_fixed_size(name: str) -> bool:
    """Whether the registered architecture ``name`` only takes the image size it was built for."""
    if name not in _MODELS:
        raise unknown_name("architecture", name, list_models(None))
    return name in _FIXED_SIZE


def layer_groups(model: nn.Module) -> list[list[nn.Parameter]]:
    """The model's parameters split into layer groups, from the input side to the head.

    Uses ``model.layer_groups()`` (a list of module lists) when the architecture defines it;
    otherwise every top-level child holding parameters is one group. The last group is the
    head: what ``--freeze-epochs`` trains alone and what gets the highest rate of ``--lr-slice``.
    Groups hold no parameter twice and every trainable parameter once.
    """
    if hasattr(model, "layer_groups"):
        module_groups = model.layer_groups()
    else:
        module_groups = [[child] for child in model.children() if any(True for _ in child.parameters())]
        if not module_groups:
            module_groups = [[model]]
    seen: set[int] = set()
    groups: list[list[nn.Parameter]] = []
    for modules in module_groups:
        params = []
        for module in modules:
            for param in module.parameters():
                if id(param) not in seen:
                    seen.add(id(param))
                    params.append(param)
        if params:
            groups.append(params)
    rest = [p for p in model.parameters() if id(p) not in seen]
    if rest:  # parameters outside every named group join the first (body) group
        groups[0].extend(rest)
    return groups


def classifier_module(model: nn.Module) -> nn.Module:
    """The classifier: the layer that outputs one logit per class, the last module of the head
    group (``model.layer_groups()[-1][-1]``), else the last top-level child holding parameters.

    Transfer to other classes starts only this layer afresh; every other tensor whose name and
    shape match is kept (the pretrained dense layers of a head included).

    Example:
        >>> model = create_model("seed-cnn", in_channels=1, num_classes=5, image_size=(28, 28))
        >>> classifier_module(model).out_features
        5
    """
    if hasattr(model, "layer_groups"):
        groups = [g for g in model.layer_groups() if g]
        if groups:
            return groups[-1][-1]
    children = [child for child in model.children() if any(True for _ in child.parameters())]
    return children[-1] if children else model


def list_models(task: Task | None = "classification") -> list[str]:
    """Names of the registered architectures for ``task``, sorted (``task=None``: every one).

    Example:
        >>> "unet-small" in list_models("segmentation"), "unet-small" in list_models()
        (True, False)
    """
    if task is not None and task not in TASKS:
        raise unknown_name("task", task, list(TASKS))
    return sorted(name for name in _MODELS if task is None or _TASK[name] == task)


def model_task(name: str) -> str:
    """The task the registered architecture ``name`` serves: one of :data:`TASKS`."""
    if name not in _MODELS:
        raise unknown_name("architecture", name, list_models(None))
    return _TASK[name]


def create_model(
    name: str,
    *,
    in_channels: int,
    num_classes: int,
    image_size: tuple[int, int] | Sequence[int] = (28, 28),
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **kwargs,
) -> nn.Module:
    """Build the architecture registered as ``name``.

    Args:
        name: a name from :func:`list_models`, e.g. ``"seed-cnn"`` or ``"resnet20"``.
        in_channels: image channels ``C``.
        num_classes: number of output logits.
        image_size: ``(H, W)`` of the input images.
        mean, std: per-channel normalization statistics (``None`` for none).
        **kwargs: architecture-specific options.

    Returns:
        A module mapping ``(B, C, H, W)`` raw images in ``[0, 1]`` to ``(B, num_classes)`` logits
        (a segmentation model: ``(B, num_classes, H, W)``; a detector: ``(B, max_det, 6)`` boxes).

    Example:
        >>> model = create_model("seed-cnn", in_channels=1, num_classes=10, image_size=(28, 28))
        >>> model(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    if name not in _MODELS:
        raise unknown_name("architecture", name, list_models(None))
    if not isinstance(in_channels, int) or isinstance(in_channels, bool) or in_channels < 1:
        raise InvalidInputError(f"in_channels must be a positive integer, got {in_channels!r}")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise InvalidInputError(f"num_classes must be a positive integer, got {num_classes!r}")
    size = tuple(image_size)
    if len(size) != 2 or not all(isinstance(s, int) and s >= 1 for s in size):
        raise InvalidInputError(f"image_size must be (H, W) positive integers, got {image_size!r}")
    return _MODELS[name](
        in_channels=in_channels,
        num_classes=num_classes,
        image_size=(int(size[0]), int(size[1])),
        mean=mean,
        std=std,
        **kwargs,
    )
