"""Loaders for Python callables: a function over NumPy batches, or ``module:function`` /
``file.py:function`` named on the command line (an ``nn.Module``, a factory, or a function)."""

from __future__ import annotations

import os
import sys
import zlib  # a stable module name: hash() is salted per process, and the name enters weights_digest
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import DataNotFoundError, InvalidInputError
from ._build import _build
from ._options import _FILE_SPEC
from .predictor import Predictor
from .torch_module import _load_module


class _NumpyRunner:
    def __init__(self, function: Callable[[np.ndarray], Any]):
        self.function = function

    def __call__(self, x: torch.Tensor) -> Any:
        return self.function(x.detach().to("cpu", torch.float32).contiguous().numpy())


def _load_callable(source: Callable[[np.ndarray], Any], options: dict[str, Any]) -> Predictor:
    return _build(_NumpyRunner(source), "callable", source, options, {})


def _import_target(source: str) -> Any:
    """The object ``file.py:name`` (by file path) or ``module:name`` (the current folder is
    searched first, as ``python -m`` does) names."""
    import importlib.util

    match = _FILE_SPEC.match(source)
    if match:
        file, attribute = Path(match["file"]), match["attribute"]
        if not file.is_file():
            raise DataNotFoundError(f"model {source!r}: file {str(file)!r} does not exist (expected FILE.py:FUNCTION)")
        module_name = f"_ttakit_user_model_{zlib.crc32(str(file.resolve()).encode()):08x}"
        spec = importlib.util.spec_from_file_location(module_name, file)
        target: Any = importlib.util.module_from_spec(spec)
        folder = str(file.resolve().parent)
        sys.path.insert(0, folder)  # its own imports of modules beside it
        try:
            spec.loader.exec_module(target)
        except Exception as exc:
            raise InvalidInputError(
                f"model {source!r}: running {str(file)!r} failed ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
            ) from exc
        finally:
            if sys.path and sys.path[0] == folder:
                sys.path.pop(0)
        where = f"file {str(file)!r}"
    else:
        module_name, _, attribute = source.partition(":")
        sys.path.insert(0, os.getcwd())  # module:function from the current folder without PYTHONPATH=.
        try:
            target = importlib.import_module(module_name)
        except ImportError as exc:
            raise InvalidInputError(
                f"model {source!r}: cannot import module {module_name!r} ({exc}); give FILE.py:FUNCTION, or put "
                "its folder on PYTHONPATH"
            ) from exc
        finally:
            if sys.path and sys.path[0] == os.getcwd():
                sys.path.pop(0)
        where = f"module {module_name!r}"
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise InvalidInputError(f"model {source!r}: {where} has no attribute {attribute!r}")
        target = getattr(target, part)
    return target


def _is_factory(target: Any) -> bool:
    """A class or a function called with no arguments (it builds the model), not a predict function."""
    import inspect

    if isinstance(target, type):
        return True
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return False
    return not any(
        p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        for p in signature.parameters.values()
    )


class _TorchRunner:
    """A callable over torch tensors (what a model factory may return instead of an nn.Module)."""

    def __init__(self, function: Callable[[torch.Tensor], Any]):
        self.function = function

    def __call__(self, x: torch.Tensor) -> Any:
        with torch.inference_mode():
            return self.function(x)


def _load_import(source: str, options: dict[str, Any]) -> Predictor:
    """``module:function`` or ``file.py:function``: an ``nn.Module``; a function of no arguments
    (or a class) that builds an ``nn.Module`` or returns a callable over torch tensors; or a
    function over NumPy batches (one argument: the batch)."""
    target = _import_target(source)
    if not isinstance(target, nn.Module) and callable(target) and _is_factory(target):
        try:
            built = target()
        except Exception as exc:
            raise InvalidInputError(
                f"model {source!r}: calling it to build the model failed ({type(exc).__name__}: "
                f"{' '.join(str(exc).split())[:200]})"
            ) from exc
        if isinstance(built, nn.Module):
            predictor = _load_module(built, options)
        elif callable(built):
            predictor = _build(_TorchRunner(built), "callable", source, options, {})
        else:
            raise InvalidInputError(
                f"model {source!r} returned a {type(built).__name__}; a function of no arguments must return an "
                "nn.Module or a callable over (B, C, H, W) torch tensors"
            )
    elif isinstance(target, nn.Module):
        predictor = _load_module(target, options)
    elif callable(target):
        predictor = _build(_NumpyRunner(target), "callable", source, options, {})
    else:
        raise InvalidInputError(f"model {source!r} is a {type(target).__name__}, not a callable or nn.Module")
    predictor.source = source
    return predictor
