"""Loader for a ``torch.export`` archive (``.pt2``) or an ``ExportedProgram``."""

from __future__ import annotations

import os
from typing import Any

import torch

from ..errors import CheckpointError
from ._build import _build, _from_metadata, _parse_metadata, _quiet_loader, _shape_settings
from ._options import METADATA_KEY
from .predictor import Predictor


def _load_pt2(source: Any, options: dict[str, Any]) -> Predictor:
    if isinstance(source, (str, os.PathLike)):
        extra = {METADATA_KEY: ""}
        # torch.export.load falls back to pickle for objects its weights-only loader refuses;
        # forcing weights-only keeps untrusted archives from running code.
        previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
        os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
        try:
            with _quiet_loader():
                program = torch.export.load(source, extra_files=extra)
        except Exception as exc:
            raise CheckpointError(
                f"{source} is not a readable torch.export archive ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
            ) from exc
        finally:
            if previous is None:
                os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
            else:
                os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous
        found = _from_metadata(_parse_metadata(extra.get(METADATA_KEY), str(source)), str(source))
    else:
        program, found = source, {}
    shape = _pt2_input_shape(program)
    if shape is not None and len(shape) == 4:
        found = {**_shape_settings(shape, options.get("layout") or found.get("layout")), **found}
    return _build(program.module(), "pt2", source, options, found)


def _pt2_input_shape(program: Any) -> list[Any] | None:
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in program.graph_signature.user_inputs:
            value = node.meta.get("val")
            if value is not None and hasattr(value, "shape"):
                return [int(d) if isinstance(d, int) or str(d).isdigit() else None for d in value.shape]
    return None
