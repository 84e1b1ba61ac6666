"""The :class:`Predictor`: any classifier behind one calling convention (raw NCHW images in
``[0, 1]`` in, ``(B, classes)`` out), with the model's own preprocessing inside."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import InvalidInputError, ModelOutputError, TTAKitError
from ._options import LAYOUTS, OUTPUTS, PIXEL_RANGES, TASKS, _choice


class Predictor(nn.Module):
    """A classifier behind one calling convention: ``(B, C, H, W)`` float images in ``[0, 1]`` ->
    ``(B, classes)`` logits or probabilities (``outputs`` says which).

    Inside, in this order: the pixels are scaled to ``pixel_range``; ``(x - mean) / std`` is
    applied when ``normalization == "predictor"`` (``mean``/``std`` in ``pixel_range`` units);
    the batch is permuted to NHWC when ``layout == "nhwc"``; the backend runs; its output comes
    back as a float tensor on the input's device. A ttakit checkpoint normalizes in its first
    layer (``normalization == "model"``), so ``mean``/``std`` are recorded there for
    information only.

    Attributes:
        kind: ``"checkpoint"``, ``"module"``, ``"pt2"``, ``"torchscript"``, ``"onnx"``,
            ``"keras"`` or ``"callable"``.
        source: where it was loaded from (for messages).
        input_size: ``(H, W)`` the model takes, or None when any size works / is unknown.
        channels: ``C``, or None when unknown.
        layout, pixel_range, mean, std, normalization, classes, outputs: as described above.
        train_augmentations: the training augmentations a ttakit model records (for
            ``train-aug`` policies); empty otherwise.
        task: ``"classification"`` (the output checks below), or ``"segmentation"``,
            ``"detection"``, ``"keypoints"``: a dense output, checked only as far as the task
            fixes its form (``(B, classes, H, W)``; one entry per image; ``(B, 2N)`` or
            ``(B, N, 2)``) and passed on to the task's wrapper.

    Shape:
        - Input: ``(B, C, H, W)`` float in ``[0, 1]``.
        - Output: ``(B, classes)`` float32.
    """

    def __init__(
        self,
        backend: Callable[[torch.Tensor], Any],
        *,
        kind: str,
        source: str = "",
        outputs: str,
        input_size: tuple[int, int] | None = None,
        channels: int | None = None,
        layout: str = "nchw",
        pixel_range: str = "0-1",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        normalization: str | None = None,
        classes: Sequence[str] | None = None,
        train_augmentations: Sequence[dict[str, Any]] = (),
        fixed_batch: int | None = None,
        task: str = "classification",
    ) -> None:
        super().__init__()
        if isinstance(backend, nn.Module):
            self.model = backend  # registered: .to(device), .eval() and parameters reach it
        else:
            self._backend = backend
        self.kind = kind
        self.source = source
        self.outputs = _choice("outputs", outputs, OUTPUTS)
        self.input_size = input_size
        self.channels = channels
        self.layout = _choice("layout", layout, LAYOUTS)
        self.pixel_range = _choice("pixel_range", pixel_range, PIXEL_RANGES)
        self.mean = list(mean) if mean is not None else None
        self.std = list(std) if std is not None else None
        if (self.mean is None) != (self.std is None):
            raise InvalidInputError("mean and std must be given together (one value per channel each), or neither")
        if self.std is not None and not all(s > 0 for s in self.std):
            raise InvalidInputError(f"std must be positive, got {self.std}")
        if self.mean is not None and len(self.mean) != len(self.std):
            raise InvalidInputError(f"mean and std need one value per channel each, got {len(self.mean)} and {len(self.std)}")
        if self.mean is not None and channels is not None and len(self.mean) not in (1, channels):
            raise InvalidInputError(
                f"mean/std must have 1 or {channels} values (one per channel), got {len(self.mean)}"
            )
        self.normalization = normalization if self.mean is not None else None
        if self.normalization == "predictor":
            self.register_buffer("_mean", torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
            self.register_buffer("_std", torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.classes = list(classes) if classes is not None else None
        self.train_augmentations = list(train_augmentations)
        self.fixed_batch = fixed_batch
        self.task = _choice("task", task, TASKS)

    @property
    def num_classes(self) -> int | None:
        return len(self.classes) if self.classes is not None else None

    def describe(self) -> dict[str, Any]:
        """What the predictor knows, as plain JSON-ready values."""
        return {
            "kind": self.kind,
            "source": self.source,
            "input_size": list(self.input_size) if self.input_size else None,
            "channels": self.channels,
            "layout": self.layout,
            "pixel_range": self.pixel_range,
            "mean": self.mean,
            "std": self.std,
            "normalization": self.normalization,
            "classes": self.classes,
            "outputs": self.outputs,
            # Only dense models say: classification predictors describe themselves as before,
            # so resumed classification outputs keep matching their recorded settings.
            **({"task": self.task} if self.task != "classification" else {}),
        }

    def weights_digest(self) -> str:
        """SHA-256 of what the model computes with: its weights and buffers (torch models), its
        file (ONNX, Keras) or its code (a Python callable). A policy searched on this model records
        it, so the policy is recognised as this model's wherever the model is loaded from."""
        digest = hashlib.sha256()
        module = self._modules.get("model")
        if module is not None:
            digest.update(f"{type(module).__module__}.{type(module).__qualname__}".encode())
            for name, tensor in sorted(module.state_dict().items()):
                if isinstance(tensor, torch.Tensor):
                    digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
                    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
                    digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
            return digest.hexdigest()
        source = Path(self.source) if self.source else None
        if source is not None and source.is_file():
            with open(source, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            return digest.hexdigest()
        backend = getattr(self, "_backend", None)
        function = getattr(backend, "function", backend)
        code = getattr(function, "__code__", None)
        digest.update(f"{getattr(function, '__module__', '')}.{getattr(function, '__qualname__', type(function).__name__)}".encode())
        if code is not None:
            digest.update(code.co_code)
            digest.update(repr(code.co_consts).encode())
        return digest.hexdigest()

    def extra_repr(self) -> str:
        size = "x".join(map(str, self.input_size)) if self.input_size else "any"
        return (
            f"kind={self.kind}, source={self.source!r}, input={self.channels or '?'}x{size} {self.layout}, "
            f"pixel_range={self.pixel_range}, normalization={self.normalization}, outputs={self.outputs}"
        )

    def check_input(self, images: Any, name: str = "images") -> None:
        """Refuse a batch this model cannot take, naming the batch's own shape: not ``(B, C, H, W)``
        (a 3-D batch is told which axis to add), other channels than :attr:`channels`, another
        size than :attr:`input_size`, or float pixels above 1 (0-255 images: the predictor takes
        ``[0, 1]`` and scales to its ``pixel_range`` itself; they would saturate silently, so they
        are refused rather than warned about).

        Raises:
            InvalidInputError: naming ``name``, the shape or range found and the expected form.
        """
        if not isinstance(images, torch.Tensor):
            raise InvalidInputError(f"{name} must be a (B, C, H, W) tensor, got {type(images).__name__}")
        shape = tuple(images.shape)
        if images.ndim == 3:
            raise InvalidInputError(f"{name} must have shape (B, C, H, W), got 3-D shape {shape}{_axis_hint(shape, self.channels)}")
        if images.ndim != 4:
            raise InvalidInputError(f"{name} must have shape (B, C, H, W), got {images.ndim}-D shape {shape}")
        if self.channels is not None and shape[1] != self.channels:
            raise InvalidInputError(
                f"{self._name()} takes {self.channels}-channel images (B, {self.channels}, H, W), got {name} of shape {shape}"
            )
        if self.input_size is not None and tuple(shape[2:]) != tuple(self.input_size):
            h, w = self.input_size
            raise InvalidInputError(
                f"{self._name()} takes {h}x{w} images (B, {self.channels or 'C'}, {h}, {w}), got {name} of shape "
                f"{shape}; resize them to {h}x{w} first (ttakit predict does)"
            )
        if images.is_floating_point() and images.numel():
            high = float(images.detach().amax())
            if high > 1.0 + 1e-3:
                low = float(images.detach().amin())
                raise InvalidInputError(
                    f"{name} hold values in [{low:g}, {high:g}]; {self._name()} takes float images in [0, 1] (it "
                    f"scales to its pixel range {self.pixel_range} itself): divide 0-255 images by 255"
                )

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Raw ``(B, C, H, W)`` images in ``[0, 1]`` -> what the backend takes."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            hint = _axis_hint(shape, self.channels) if isinstance(images, torch.Tensor) and images.ndim == 3 else ""
            raise InvalidInputError(f"images must be a (B, C, H, W) tensor, got {shape}{hint}")
        if self.channels is not None and images.shape[1] != self.channels:
            raise InvalidInputError(
                f"{self._name()} takes {self.channels}-channel images, got a batch of shape {tuple(images.shape)}"
            )
        x = images if images.is_floating_point() else images.float()
        if self.pixel_range == "0-255":
            x = x * 255.0
        if self.normalization == "predictor":
            x = (x - self._mean.to(x.device)) / self._std.to(x.device)
        if self.layout == "nhwc":
            x = x.permute(0, 2, 3, 1)
        return x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(images)
        backend = self.model if "model" in self._modules else self._backend
        try:
            if self.fixed_batch and x.shape[0] != self.fixed_batch:
                out = torch.cat([self._fixed_call(backend, part) for part in x.split(self.fixed_batch)])
            else:
                out = self._call(backend, x)
        except (RuntimeError, ModelOutputError) as exc:
            # A batch of another size than the model records (a size-agnostic model may take it,
            # so it is tried) fails inside the model with a raw shape error: say what it takes.
            if self.input_size is not None and tuple(images.shape[2:]) != tuple(self.input_size):
                h, w = self.input_size
                raise InvalidInputError(
                    f"{self._name()} takes {h}x{w} images, got a batch of shape {tuple(images.shape)} "
                    f"({type(exc).__name__} inside the model); resize the images to {h}x{w}"
                ) from exc
            raise
        return self._postprocess(out, images)

    def _fixed_call(self, backend: Callable[[torch.Tensor], Any], part: torch.Tensor) -> torch.Tensor:
        """One chunk through a graph that takes exactly ``fixed_batch`` images: a short (last)
        chunk is padded with copies of its last image and the padded rows are dropped."""
        rows = part.shape[0]
        if rows < self.fixed_batch:
            part = torch.cat([part, part[-1:].expand(self.fixed_batch - rows, *part.shape[1:])])
        out = self._call(backend, part)
        if isinstance(out, (list, tuple)) and len(out) == 1:
            out = out[0]
        if not isinstance(out, torch.Tensor):
            out = torch.as_tensor(np.asarray(out))
        if out.ndim < 1 or out.shape[0] != self.fixed_batch:
            raise ModelOutputError(
                f"{self._name()} returned shape {tuple(out.shape)} for a batch of {self.fixed_batch} images "
                "(its fixed batch size); expected (B, classes)"
            )
        return out[:rows]

    def _call(self, backend: Callable[[torch.Tensor], Any], x: torch.Tensor) -> Any:
        if self.kind in ("checkpoint", "module", "pt2", "torchscript"):
            return backend(x)  # torch errors here are the model's own: let them through
        try:
            return backend(x)
        except TTAKitError:
            raise
        except Exception as exc:  # onnxruntime, keras or user code: one line that says which model
            detail = " ".join(str(exc).split())[:300]
            raise ModelOutputError(
                f"{self._name()} failed on a batch of shape {tuple(x.shape)} ({self.layout}): {type(exc).__name__}: {detail}"
            ) from exc

    def _postprocess(self, out: Any, images: torch.Tensor) -> Any:
        if self.task != "classification":
            return self._dense_postprocess(out, images)
        out = self._one_tensor(out, "(B, classes)")
        if out.ndim != 2 or out.shape[0] != images.shape[0]:
            raise ModelOutputError(
                f"{self._name()} returned shape {tuple(out.shape)} for {images.shape[0]} images; expected (B, classes)"
            )
        if self.classes is not None and out.shape[1] != len(self.classes):
            raise ModelOutputError(
                f"{self._name()} returned {out.shape[1]} outputs per image but {len(self.classes)} class names were given"
            )
        if out.device != images.device:
            out = out.to(images.device)
        return out if out.dtype == torch.float32 or images.dtype != torch.float32 else out.float()

    def _dense_postprocess(self, out: Any, images: torch.Tensor) -> Any:
        """A dense model's output, checked only as far as its task fixes the form: segmentation
        ``(B, classes, H, W)``, keypoints ``(B, 2N)`` or ``(B, N, 2|3)``, detection anything with
        one entry per image (the detection wrapper reads its form). Tensors come back on the
        input's device, as float32 for float32 input."""
        rows = images.shape[0]
        if self.task == "detection":
            if isinstance(out, torch.Tensor) or (isinstance(out, (list, tuple)) and len(out) == rows):
                return _to_device(out, images)
            if isinstance(out, tuple) and all(isinstance(o, torch.Tensor) for o in out):
                return _to_device(out, images)  # (boxes, scores, labels) batched
            raise ModelOutputError(
                f"{self._name()} returned {type(out).__name__} for {rows} images; a detector returns one entry per "
                "image (a list of dicts or (N, 6) tensors, or a padded (B, N, 6) tensor)"
            )
        expected = "(B, classes, H, W)" if self.task == "segmentation" else "(B, 2N) or (B, N, 2)"
        out = self._one_tensor(out, expected)
        ranks = (4,) if self.task == "segmentation" else (2, 3)
        if out.ndim not in ranks or out.shape[0] != rows:
            raise ModelOutputError(
                f"{self._name()} returned shape {tuple(out.shape)} for {rows} images; a {self.task} model returns "
                f"{expected}"
            )
        if self.task == "segmentation" and self.classes is not None and out.shape[1] != len(self.classes):
            raise ModelOutputError(
                f"{self._name()} returned {out.shape[1]} class maps per image but {len(self.classes)} class names "
                "were given"
            )
        out = _to_device(out, images)
        return out if out.dtype == torch.float32 or images.dtype != torch.float32 else out.float()

    def _one_tensor(self, out: Any, expected: str) -> torch.Tensor:
        """The model's output as one tensor (a one-element list or tuple unwrapped, arrays converted)."""
        if isinstance(out, (list, tuple)) and len(out) == 1:
            out = out[0]
        if isinstance(out, torch.Tensor):
            return out
        try:
            return torch.as_tensor(np.asarray(out))
        except (TypeError, ValueError) as exc:
            raise ModelOutputError(f"{self._name()} must return a {expected} array, got {type(out).__name__}") from exc

    def _name(self) -> str:
        return f"the {self.kind} model {self.source}".rstrip() if self.source else f"the {self.kind} model"


def _to_device(out: Any, images: torch.Tensor) -> Any:
    """Tensors in ``out`` (nested in lists, tuples and dicts) moved to the images' device."""
    if isinstance(out, torch.Tensor):
        return out if out.device == images.device else out.to(images.device)
    if isinstance(out, dict):
        return {k: _to_device(v, images) for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return type(out)(_to_device(v, images) for v in out)
    return out


def _axis_hint(shape: tuple[int, ...], channels: int | None = None) -> str:
    """Which axis a 3-D batch lacks: ``(C, H, W)`` one image -> ``unsqueeze(0)``; ``(B, H, W)``
    grayscale images -> ``unsqueeze(1)``."""
    first = shape[0]
    batch = f" (a batch of {first} grayscale images (B, H, W): add the channel axis with x.unsqueeze(1))"
    single = f" (one {first}-channel image (C, H, W): add the batch axis with x.unsqueeze(0))"
    if channels is not None:
        return single if first == channels else batch
    if first in (3, 4):
        return single + " or" + batch
    if first == 1:
        return single
    return batch
