"""``ttakit export``: write a checkpoint's model as ONNX, a ``torch.export`` archive (``.pt2``) or
TorchScript, with its metadata, so what was evaluated can be deployed.

The exported model takes RAW images ``(B, C, H, W)`` in ``[0, 1]`` (any batch size) and returns
logits: the checkpoint's normalization is its first layer, so it travels inside the graph. The
metadata (classes, input size, channels, layout, pixel range, the normalization inside,
``outputs``, training augmentations) is one JSON document stored under ``ttakit.json``: an ONNX
``metadata_props`` entry, a TorchScript extra file, a ``.pt2`` extra file.
:func:`ttakit.predictors.load` reads it back.

Example:
    >>> export_checkpoint("runs/cnn", "onnx", "cnn.onnx")  # doctest: +SKIP
    PosixPath('cnn.onnx')
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._io import atomic_write, check_output_file
from .errors import unknown_name
from .predictors import EXPORT_FORMAT, METADATA_KEY, MissingExtraError

__all__ = ["FORMATS", "export_checkpoint", "export_model", "export_metadata"]

FORMATS = ("onnx", "pt2", "torchscript")
_SUFFIX = {"onnx": ".onnx", "pt2": ".pt2", "torchscript": ".pt"}


def export_metadata(meta: Any) -> dict[str, Any]:
    """The ``ttakit.json`` document for a :class:`ttakit.models.CheckpointMeta`."""
    return {
        "format": EXPORT_FORMAT,
        "format_version": 1,
        "arch": meta.arch,
        "classes": list(meta.classes),
        "channels": int(meta.in_channels),
        "input_size": [int(s) for s in meta.image_size],
        "layout": "nchw",
        "pixel_range": "0-1",
        "mean": meta.mean,
        "std": meta.std,
        # The graph starts with the checkpoint's Normalize layer: mean/std are for information.
        "normalization": "model" if meta.mean is not None else None,
        "outputs": "logits",
        "train_augmentations": list(meta.train_augmentations),
        "dataset": meta.dataset,
    }


def export_checkpoint(
    checkpoint: str | os.PathLike, format: str, out: str | os.PathLike, *, opset: int | None = None
) -> Path:
    """Export the checkpoint at ``checkpoint`` to ``out`` as ``format`` (``onnx``, ``pt2`` or
    ``torchscript``). Returns the written path.

    Raises:
        UnknownNameError: an unknown format.
        InvalidInputError: ``out`` in a folder that does not exist or cannot be written.
        CheckpointError: ``checkpoint`` is not a ttakit checkpoint.
    """
    from .models import load_checkpoint

    check_format(format)
    out = check_output_file(out)
    model, meta = load_checkpoint(checkpoint)
    return export_model(model, format, out, export_metadata(meta), input_shape=(meta.in_channels, *meta.image_size), opset=opset)


def check_format(format: str) -> str:
    if format not in FORMATS:
        raise unknown_name("export format", format, FORMATS)
    return format


def export_model(
    model: nn.Module,
    format: str,
    out: str | os.PathLike,
    metadata: dict[str, Any],
    *,
    input_shape: tuple[int, int, int],
    opset: int | None = None,
) -> Path:
    """Export ``model`` (raw ``(B, C, H, W)`` in, outputs out; dynamic batch) with ``metadata``.

    Args:
        model: the module to export (put in eval mode and moved to the CPU).
        format: ``onnx``, ``pt2`` or ``torchscript``.
        out: the file to write (atomically).
        metadata: JSON-ready dict stored as ``ttakit.json``.
        input_shape: ``(C, H, W)`` of one image, for the example input.
    """
    check_format(format)
    model = model.to("cpu").eval()
    example = torch.rand(2, *input_shape, generator=torch.Generator().manual_seed(0))
    text = json.dumps(metadata)
    if format == "pt2":
        program = _torch_export(model, example)
        return _atomic_pt2(Path(out), program, text)
    if format == "torchscript":
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript was asked for by name
            scripted = torch.jit.trace(model, example)
            return atomic_write(out, lambda tmp: torch.jit.save(scripted, str(tmp), _extra_files={METADATA_KEY: text}))
    return _export_onnx(model, example, out, text, opset)


def _torch_export(model: nn.Module, example: torch.Tensor) -> Any:
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    return torch.export.export(model, (example,), dynamic_shapes=({0: batch},))


def _atomic_pt2(out: Path, program: Any, text: str) -> Path:
    # torch.export.save warns about names not ending in .pt2: keep the suffix on the temporary file.
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp.pt2")
    try:
        torch.export.save(program, tmp, extra_files={METADATA_KEY: text})
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


@contextlib.contextmanager
def _quiet_exporter():
    """torch's ONNX exporter prints its steps and warns about torchvision ops we do not use."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _export_onnx(model: nn.Module, example: torch.Tensor, out: str | os.PathLike, text: str, opset: int | None) -> Path:
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
    except ImportError as exc:
        raise MissingExtraError(
            f"exporting to ONNX needs the optional extra: pip install 'ttakit[onnx]' ({exc.name or exc} is not installed)"
        ) from exc
    with tempfile.TemporaryDirectory() as folder:
        raw = Path(folder) / "model.onnx"
        batch = torch.export.Dim("batch", min=1, max=1 << 20)
        with _quiet_exporter():
            program = torch.onnx.export(
                model,
                (example,),
                input_names=["images"],
                output_names=["outputs"],
                dynamic_shapes=({0: batch},),
                opset_version=opset,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
            program.save(str(raw), external_data=False)
        proto = onnx.load(str(raw))
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, text
    data = proto.SerializeToString()
    return atomic_write(out, lambda tmp: tmp.write_bytes(data))


def default_suffix(format: str) -> str:
    """The usual file suffix of ``format``."""
    return _SUFFIX[check_format(format)]
