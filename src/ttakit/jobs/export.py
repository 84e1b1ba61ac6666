"""``ttakit export``: write a checkpoint's model as ONNX, a ``torch.export`` archive (``.pt2``) or
TorchScript, with its metadata, so what was evaluated can be deployed.

The exported model takes RAW images ``(B, C, H, W)`` in ``[0, 1]`` (any batch size) and returns
logits: the checkpoint's normalization is its first layer, so it travels inside the graph. The
metadata (classes, input size, channels, layout, pixel range, the normalization inside,
``outputs``, training augmentations) is one JSON document stored under ``ttakit.json``: an ONNX
``metadata_props`` entry, a TorchScript extra file, a ``.pt2`` extra file.
:func:`ttakit.predictors.load` reads it back.

Every export is checked before it is written: the exported file is loaded back and run on a
few seeded random inputs of the checkpoint's shape, and the largest absolute difference from the
original model's logits must stay within ``tolerance`` (default ``1e-4``); otherwise nothing is
written and :class:`ttakit.errors.ModelOutputError` names the difference.

Example:
    >>> export_checkpoint("runs/cnn", "onnx", "cnn.onnx")  # doctest: +SKIP
    PosixPath('cnn.onnx')
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import secrets
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._io import _fsync_dir, atomic_write, check_output_file
from ..errors import InvalidInputError, ModelOutputError, unknown_name
from ..predictors import EXPORT_FORMAT, METADATA_KEY, MissingExtraError

__all__ = ["FORMATS", "SUFFIXES", "check_out_suffix", "format_from_suffix", "metadata_location", "DEFAULT_OPSET", "DEFAULT_TOLERANCE", "export_checkpoint", "export_checked", "export_model",
           "export_metadata", "check_export"]

FORMATS = ("onnx", "pt2", "torchscript")
DEFAULT_OPSET = 18  # ONNX opset of exports (onnxruntime 1.14 and later run it)
DEFAULT_TOLERANCE = 1e-4  # largest absolute logit difference an export may show against its checkpoint
CHECK_BATCHES = (4, 1)  # the random inputs an export is checked on: a batch of 4 and one image
_SUFFIX = {"onnx": ".onnx", "pt2": ".pt2", "torchscript": ".pt"}


def export_metadata(meta: Any) -> dict[str, Any]:
    """The ``ttakit.json`` document for a :class:`ttakit.models.CheckpointMeta`."""
    return {
        "format": EXPORT_FORMAT,
        "format_version": 1,
        "arch": meta.arch,
        "task": getattr(meta, "task", "classification"),  # predictors read it: dense outputs pass through
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
    checkpoint: str | os.PathLike,
    format: str,
    out: str | os.PathLike,
    *,
    opset: int | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> Path:
    """Export the checkpoint at ``checkpoint`` to ``out`` as ``format`` (``onnx``, ``pt2`` or
    ``torchscript``), checked against the checkpoint (see :func:`export_checked`). Returns the
    written path.

    Raises:
        UnknownNameError: an unknown format.
        InvalidInputError: ``out`` in a folder that does not exist or cannot be written; a bad
            ``opset`` or ``tolerance``.
        CheckpointError: ``checkpoint`` is not a ttakit checkpoint.
        ModelOutputError: the exported model differs from the checkpoint by more than ``tolerance``.
    """
    return Path(export_checked(checkpoint, format, out, opset=opset, tolerance=tolerance)["out"])


def export_checked(
    checkpoint: str | os.PathLike,
    format: str | None,
    out: str | os.PathLike,
    *,
    opset: int | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    device: str | torch.device | None = None,
    amp: bool = False,
) -> dict[str, Any]:
    """Export the checkpoint, load the exported file back, compare it with the checkpoint's model
    on seeded random inputs of the checkpoint's shape, and only then move it to ``out``.

    Args:
        checkpoint: a ttakit checkpoint folder.
        format: ``onnx``, ``pt2`` or ``torchscript``; None: the one the suffix of ``out`` names
            (a suffix that contradicts ``format`` is refused: :func:`check_out_suffix`).
        out: the file to write (atomically: a failed check leaves what was there).
        opset: ONNX opset (``onnx`` only; default :data:`DEFAULT_OPSET`).
        tolerance: the largest absolute difference allowed between the exported model's and the
            checkpoint's logits.
        device: where the model is traced and exported (``--device``; default the CPU). The file
            written holds no device: it loads on the CPU, where it is checked against the checkpoint.
        amp: refused (``--amp``): an exported graph is traced in full precision; mixed precision
            is a choice of whoever runs it (``ttakit predict --amp``).

    Returns:
        ``{"out", "format", "opset", "bytes", "max_abs_diff", "tolerance", "n_inputs", "input_shape",
        "metadata"}`` (``metadata``: where the file keeps its metadata, in words).

    Raises:
        as :func:`export_checkpoint`.
    """
    from ..models import load_checkpoint

    if amp:
        raise InvalidInputError(
            "export --amp: an exported graph is traced in full precision (float32); run it with mixed precision "
            "where it is used (ttakit predict MODEL --amp), and export without --amp"
        )
    from ..engine import check_device

    target = check_device(device)
    format = check_out_suffix(out, format)
    opset = check_opset(opset, format)
    tolerance = check_tolerance(tolerance)
    out = check_output_file(out)
    model, meta = load_checkpoint(checkpoint)
    shape = (int(meta.in_channels), *(int(s) for s in meta.image_size))
    # Written beside ``out`` under a temporary name with the format's suffix (how it is loaded back).
    tmp = out.with_name(f".{out.name}.{secrets.token_hex(6)}.check{_SUFFIX[format]}")
    try:
        export_model(model, format, tmp, export_metadata(meta), input_shape=shape, opset=opset, device=target)
        diff, n_inputs = check_export(model, tmp, format, shape)
        if not diff <= tolerance:  # NaN fails too
            raise ModelOutputError(
                f"the {format} export of {checkpoint} differs from the checkpoint: largest absolute difference "
                f"{diff:.1e} on {n_inputs} random {'x'.join(map(str, shape))} inputs, more than --tolerance "
                f"{tolerance:g}; nothing was written to {out} (try another --format{' or --opset' if format == 'onnx' else ''}, "
                "or a larger --tolerance if that difference is acceptable)"
            )
        os.replace(tmp, out)
        _fsync_dir(out.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return {
        "out": str(out),
        "format": format,
        "opset": opset,
        "bytes": out.stat().st_size,
        "max_abs_diff": diff,
        "tolerance": tolerance,
        "n_inputs": n_inputs,
        "input_shape": list(shape),
        "metadata": metadata_location(format),
    }


def metadata_location(format: str) -> str:
    """Where an export of ``format`` keeps its metadata (inside the exported file: no side file)."""
    return {
        "onnx": f"inside the ONNX file (metadata_props entry {METADATA_KEY!r})",
        "pt2": f"inside the .pt2 archive (extra file {METADATA_KEY!r})",
        "torchscript": f"inside the TorchScript file (extra file {METADATA_KEY!r})",
    }[check_format(format)]


def check_export(model: nn.Module, path: str | os.PathLike, format: str, input_shape: tuple[int, int, int]
                 ) -> tuple[float, int]:
    """Largest absolute difference between ``model`` and the exported file at ``path`` (loaded
    as ``format`` by :func:`ttakit.predictors.load`) on seeded random inputs of ``input_shape``
    (batches of :data:`CHECK_BATCHES` images). Returns ``(difference, number of inputs)``."""
    from ..predictors import load

    exported = load(path)
    if exported.kind != format:
        raise ModelOutputError(f"the {format} export {path} loads back as a {exported.kind} model")
    generator = torch.Generator().manual_seed(0)
    largest, count = 0.0, 0
    model = model.to("cpu").eval()
    with torch.inference_mode():
        for batch in CHECK_BATCHES:
            x = torch.rand(batch, *input_shape, generator=generator)
            expected = model(x).float()
            got = exported(x).float()
            if got.shape != expected.shape:
                raise ModelOutputError(
                    f"the {format} export {path} returns shape {tuple(got.shape)} for {batch} images; the checkpoint "
                    f"returns {tuple(expected.shape)}"
                )
            largest = max(largest, float((got - expected).abs().max()))
            if not math.isfinite(largest):
                break
            count += batch
    return largest, count


def check_opset(opset: Any, format: str) -> int | None:
    """``opset`` checked for ``format``: an integer from 7 for ``onnx`` (default
    :data:`DEFAULT_OPSET`), None for the other formats."""
    if format != "onnx":
        if opset is not None:
            raise InvalidInputError(f"--opset applies to --format onnx only, got --opset {opset} with --format {format}")
        return None
    if opset is None:
        return DEFAULT_OPSET
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < 7:
        raise InvalidInputError(f"opset (--opset) must be an ONNX opset number like {DEFAULT_OPSET}, got {opset!r}")
    return opset


def check_tolerance(tolerance: Any) -> float:
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not math.isfinite(tolerance) \
            or tolerance < 0:
        raise InvalidInputError(
            f"tolerance (--tolerance) must be a finite number >= 0 (like {DEFAULT_TOLERANCE:g}), got {tolerance!r}"
        )
    return float(tolerance)


# The suffixes each format is written under (the first is suggested); ttakit.predictors.load
# tells ONNX and .pt2 files by their suffix, so another one would not load back as that format.
SUFFIXES = {"onnx": (".onnx",), "pt2": (".pt2",), "torchscript": (".pt", ".ts", ".pth", ".torchscript", ".jit")}


def format_from_suffix(out: str | os.PathLike) -> str | None:
    """The export format a file name's suffix stands for, or None."""
    suffix = Path(out).suffix.lower()
    return next((f for f, suffixes in SUFFIXES.items() if suffix in suffixes), None)


def check_out_suffix(out: str | os.PathLike, format: str | None) -> str:
    """The format to write ``out`` as: ``format`` checked against the suffix of ``out``, or, when
    ``format`` is None, the format the suffix names. A folder gets a file name suggested.

    Raises:
        InvalidInputError: ``out`` is a folder, its suffix contradicts ``format`` (ONNX written
            into a ``.pt2`` would not load back as ONNX), or no format is given and the suffix
            names none.
    """
    path = Path(out)
    if format is not None:
        check_format(format)
    if path.is_dir():
        suggest = path / f"model{_SUFFIX[format or 'onnx']}"
        raise InvalidInputError(f"--out {str(out)!r} is a folder; give a file path like {str(suggest)!r}")
    named = format_from_suffix(path)
    if format is None:
        if named is None:
            raise InvalidInputError(
                f"--out {str(out)!r}: cannot tell the format from its suffix {path.suffix or '(none)'!r}; name it "
                f"{', '.join(repr(path.stem + s[0]) for s in SUFFIXES.values())} or pass --format {'|'.join(FORMATS)}"
            )
        return named
    if named != format:
        what = f"is the suffix of {named} files" if named else "is not a suffix ttakit reads back"
        raise InvalidInputError(
            f"--out {str(out)!r}: --format {format} writes {_WHAT[format]}, but {path.suffix or '(no suffix)'!r} {what}; "
            f"name it {str(path.with_suffix(_SUFFIX[format]))!r}"
            + (f" or use --format {named}" if named else f" (accepted: {', '.join(SUFFIXES[format])})")
        )
    return format


_WHAT = {"onnx": "ONNX", "pt2": "a torch.export archive", "torchscript": "TorchScript"}


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
    device: str | torch.device | None = None,
) -> Path:
    """Export ``model`` (raw ``(B, C, H, W)`` in, outputs out; dynamic batch) with ``metadata``.

    Args:
        model: the module to export (put in eval mode and moved to the CPU).
        format: ``onnx``, ``pt2`` or ``torchscript``.
        out: the file to write (atomically).
        metadata: JSON-ready dict stored as ``ttakit.json``.
        input_shape: ``(C, H, W)`` of one image, for the example input.
        device: where the model is traced (default the CPU); a ``.pt2`` program is moved back to
            the CPU before it is saved, so the file loads anywhere.
    """
    check_format(format)
    target = torch.device(device) if device is not None else torch.device("cpu")
    model = model.to(target).eval()
    example = torch.rand(2, *input_shape, generator=torch.Generator().manual_seed(0)).to(target)
    text = json.dumps(metadata)
    if format == "pt2":
        program = _torch_export(model, example)
        if target.type != "cpu":
            from torch.export.passes import move_to_device_pass

            program = move_to_device_pass(program, "cpu")
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
    written = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and written != opset:
        raise InvalidInputError(
            f"opset (--opset) {opset}: torch {torch.__version__}'s ONNX exporter wrote opset {written} instead; "
            f"choose an opset it supports, like {DEFAULT_OPSET}"
        )
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, text
    data = proto.SerializeToString()
    return atomic_write(out, lambda tmp: tmp.write_bytes(data))


def default_suffix(format: str) -> str:
    """The usual file suffix of ``format``."""
    return _SUFFIX[check_format(format)]
