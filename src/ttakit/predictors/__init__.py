"""Any image classifier as a :class:`Predictor`: NCHW float images in ``[0, 1]`` in, ``(B, classes)``
outputs out, plus what it knows about itself.

:func:`load` takes a ttakit checkpoint folder, an ``nn.Module``, a ``torch.export`` archive
(``.pt2``), a TorchScript file, an ONNX file (run with onnxruntime), a Keras 3 model (``.keras``
or legacy ``.h5``, run on Keras' torch backend) or a Python callable over NumPy arrays. Whatever
the source, the predictor takes RAW images ``(B, C, H, W)`` in ``[0, 1]`` and applies the
model's own preprocessing inside (pixel range, mean/std normalization, NHWC layout), so TTA
views act on raw images exactly as on a ttakit checkpoint (whose models normalize in their first
layer).

Where a file does not say, the caller does, with the same names as the CLI flags: ``layout``
(``"nchw"``/``"nhwc"``), ``input_size``, ``channels``, ``pixel_range`` (``"0-1"``/``"0-255"``),
``mean``/``std``, ``classes`` (a text file, one name a line, or a list) and ``outputs``
(``"logits"``/``"probs"``). ``outputs`` decides whether the engine applies softmax: a model that
already returns probabilities is merged in probability space without a second softmax. It is
read from the file where possible (ttakit metadata, a Keras model's last activation) and must be
given otherwise.

Example:
    >>> predictor = load(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)),
    ...                  outputs="logits", input_size=2, channels=1)
    >>> predictor(torch.rand(5, 1, 2, 2)).shape
    torch.Size([5, 3])

Modules: :mod:`.predictor` (the class), :mod:`.dispatch` (:func:`load`, :func:`model_kind`), one
loader each in :mod:`.torch_module` (checkpoint folder, ``nn.Module``), :mod:`.torch_export`
(``.pt2``), :mod:`.torchscript`, :mod:`.onnx`, :mod:`.keras` and :mod:`.python_callable`;
:mod:`.device` for ``--device``/``--amp``.
"""

from __future__ import annotations

# Names beyond __all__ (the spec patterns, EXPORT_FORMAT, keras_outputs) stay importable from
# here: the jobs (export, ensemble) use them.
from ._options import (  # noqa: F401
    _FILE_SPEC,
    _IMPORT_SPEC,
    EXPORT_FORMAT,
    LAYOUTS,
    METADATA_KEY,
    OUTPUTS,
    PIXEL_RANGES,
    Layout,
    MissingExtraError,
    Outputs,
    PixelRange,
    parse_input_size,
    read_classes,
)
from .device import prepare_model, resolve_device
from .dispatch import load, model_kind
from .keras import keras_outputs  # noqa: F401
from .predictor import Predictor

__all__ = [
    "Predictor",
    "MissingExtraError",
    "load",
    "model_kind",
    "METADATA_KEY",
    "read_classes",
    "parse_input_size",
    "resolve_device",
    "prepare_model",
]
