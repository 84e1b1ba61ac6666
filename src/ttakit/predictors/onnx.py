"""Loader for an ONNX file, run with onnxruntime on the CPU (``ttakit[onnx]``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError, InvalidInputError
from ._build import _build, _from_metadata, _parse_metadata, _shape_settings
from ._options import METADATA_KEY, _missing
from .predictor import Predictor


class _OnnxRunner:
    """Calls an onnxruntime session on a torch batch (CPU NumPy in, torch out)."""

    def __init__(self, session: Any, input_name: str, input_type: str):
        self.session = session
        self.input_name = input_name
        self.dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
                      "tensor(uint8)": np.uint8}[input_type]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        if self.dtype == np.uint8:
            array = np.clip(np.rint(array), 0, 255)
        outputs = self.session.run(None, {self.input_name: array.astype(self.dtype, copy=False)})
        return torch.from_numpy(np.asarray(outputs[0], dtype=np.float32))


def _load_onnx(source: Any, options: dict[str, Any]) -> Predictor:
    try:
        import onnxruntime
    except ImportError as exc:
        raise _missing("onnx", f"ONNX model {source}", exc) from exc
    try:
        session_options = onnxruntime.SessionOptions()
        session_options.log_severity_level = 4  # fatal only: a failure is reported as one line below
        session = onnxruntime.InferenceSession(str(source), session_options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise CheckpointError(
            f"{source} is not a loadable ONNX model ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
        ) from exc
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise InvalidInputError(
            f"ONNX model {source} takes {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); ttakit needs one image input"
        )
    spec = inputs[0]
    if spec.type not in ("tensor(float)", "tensor(float16)", "tensor(double)", "tensor(uint8)"):
        raise InvalidInputError(f"ONNX model {source} takes {spec.type} input; ttakit feeds float or uint8 images")
    shape = [d if isinstance(d, int) and d > 0 else None for d in spec.shape]
    if len(shape) != 4:
        raise InvalidInputError(
            f"ONNX model {source} takes input of shape {spec.shape}; expected 4 dims (NCHW or NHWC)"
        )
    metadata = session.get_modelmeta().custom_metadata_map
    found = _from_metadata(_parse_metadata(metadata.get(METADATA_KEY), str(source)), str(source))
    detected = _shape_settings(shape, options.get("layout") or found.get("layout"))
    if not detected:
        raise InvalidInputError(
            f"cannot tell the layout of ONNX model {source} from its input shape {spec.shape}; pass layout='nchw' or 'nhwc' (--layout)"
        )
    found = {**detected, **found}
    if spec.type == "tensor(uint8)":
        found["pixel_range"] = "0-255"
    if "input_size" not in detected and options.get("input_size") is None and found.get("input_size") is None:
        raise InvalidInputError(
            f"ONNX model {source} has a dynamic input size (input shape {spec.shape}); pass input_size (--input-size HxW, like 224x224)"
        )
    if options.get("input_size") is not None and "input_size" in detected and detected["input_size"] != options["input_size"]:
        raise InvalidInputError(
            f"input_size {options['input_size']} does not match ONNX model {source}, whose input is fixed at {detected['input_size']}"
        )
    if isinstance(spec.shape[0], int) and spec.shape[0] > 0:
        found["fixed_batch"] = int(spec.shape[0])
    return _build(_OnnxRunner(session, spec.name, spec.type), "onnx", source, options, found)
