"""Loader for a Keras 3 model (``.keras`` or legacy ``.h5``), run on Keras' torch backend
(``ttakit[keras]``)."""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError, InvalidInputError
from ._build import _build, _shape_settings
from ._options import _missing
from .predictor import Predictor


def _import_keras(source: Any) -> Any:
    existing = sys.modules.get("keras")
    if existing is not None:
        backend = existing.backend.backend()
        if backend != "torch":
            raise InvalidInputError(
                f"Keras is already imported with the {backend!r} backend; ttakit runs Keras models on the torch "
                "backend: set KERAS_BACKEND=torch before anything imports keras (or load the model first)"
            )
        return existing
    os.environ["KERAS_BACKEND"] = "torch"
    try:
        import keras
    except ImportError as exc:
        raise _missing("keras", f"Keras model {source}", exc) from exc
    if keras.backend.backend() != "torch":  # pragma: no cover - keras reads the env var at import
        raise InvalidInputError(f"Keras started with the {keras.backend.backend()!r} backend; set KERAS_BACKEND=torch")
    return keras


def keras_outputs(model: Any) -> str | None:
    """``"probs"`` when a Keras model ends in a softmax, ``"logits"`` when it ends linear, else None."""
    keras = sys.modules["keras"]
    layer = model.layers[-1] if getattr(model, "layers", None) else None
    if layer is None:
        return None
    if isinstance(layer, keras.layers.Softmax):
        return "probs"
    activation = getattr(layer, "activation", None)
    name = getattr(activation, "__name__", None) or (activation if isinstance(activation, str) else None)
    if name == "softmax":
        return "probs"
    if name == "linear":
        return "logits"
    return None


class _KerasRunner:
    def __init__(self, model: Any):
        self.model = model

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x.detach().contiguous(), training=False)
        if not isinstance(out, torch.Tensor):
            out = torch.as_tensor(np.asarray(out))
        return out.detach()


def _load_keras(source: Any, options: dict[str, Any]) -> Predictor:
    try:
        import h5py  # noqa: F401  (needed for .h5; a clear message beats Keras' own)
    except ImportError as exc:
        if str(source).lower().endswith((".h5", ".hdf5")):
            raise _missing("keras", f"Keras model {source}", exc) from exc
    keras = _import_keras(source)
    try:
        model = keras.saving.load_model(str(source), compile=False, safe_mode=True)
    except Exception as exc:
        raise CheckpointError(
            f"{source} is not a loadable Keras model ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
        ) from exc
    shape = model.input_shape
    if isinstance(shape, list):
        if len(shape) != 1:
            raise InvalidInputError(f"Keras model {source} has {len(shape)} inputs; ttakit needs one image input")
        shape = shape[0]
    shape = [d if isinstance(d, int) else None for d in shape]
    if len(shape) != 4:
        raise InvalidInputError(f"Keras model {source} takes input of shape {tuple(shape)}; expected (B, H, W, C) images")
    layout = options.get("layout") or ("nchw" if keras.config.image_data_format() == "channels_first" else None)
    found = _shape_settings(shape, layout) or {"layout": "nhwc"}
    found["outputs"] = keras_outputs(model)
    if found.get("input_size") is None and options.get("input_size") is None:
        raise InvalidInputError(
            f"Keras model {source} has a dynamic input size (input shape {tuple(shape)}); pass input_size (--input-size HxW)"
        )
    return _build(_KerasRunner(model), "keras", source, options, found)
