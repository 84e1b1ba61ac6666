"""Loaders for a ttakit checkpoint folder, an ``nn.Module`` and a :class:`Predictor` (as it is)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ._build import _build
from .predictor import Predictor


def _load_predictor(source: Predictor, options: dict[str, Any]) -> Predictor:
    return source


def _load_checkpoint(source: Any, options: dict[str, Any]) -> Predictor:
    from ..models import load_checkpoint

    model, meta = load_checkpoint(source)
    found = {
        "classes": meta.classes,
        "input_size": (int(meta.image_size[0]), int(meta.image_size[1])),
        "channels": meta.in_channels,
        "layout": "nchw",
        "pixel_range": "0-1",
        "mean": meta.mean,
        "std": meta.std,
        "normalization": "model",  # the model's first layer normalizes (models.registry.Normalize)
        "outputs": "logits",
        "train_augmentations": meta.train_augmentations,
        "task": recorded_task(meta),
    }
    predictor = _build(model, "checkpoint", source, options, found)
    predictor.meta = meta
    return predictor


def recorded_task(meta: Any) -> str | None:
    """The task a ttakit checkpoint records (a ``task`` field, or ``extra["task"]``); None: classification."""
    task = getattr(meta, "task", None) or (getattr(meta, "extra", None) or {}).get("task")
    return str(task) if task else None


def _load_module(source: nn.Module, options: dict[str, Any]) -> Predictor:
    found: dict[str, Any] = {}
    children = list(source.children())
    last = children[-1] if children else None
    if isinstance(last, nn.Softmax):
        found["outputs"] = "probs"
    from ..models.registry import Normalize

    first = children[0] if children else None
    if isinstance(first, Normalize):  # a ttakit architecture: normalizes itself, returns logits
        found.update(
            outputs="logits",
            normalization="model",
            mean=first.mean.flatten().tolist(),
            std=first.std.flatten().tolist(),
            channels=int(first.mean.numel()),
        )
    return _build(source.eval(), "module", source, options, found)
