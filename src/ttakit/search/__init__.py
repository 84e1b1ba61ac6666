"""Policy search on held-out data, one module per job:

=================  ==========================================================================
``pool``           the candidate views (:func:`default_pool`), Keras random copies, fastai TTA
``cache``          the view cache ``(V, N, C)`` and its file format (:class:`ViewCache`)
``halving``        successive halving: score on a growing subset, cache only the survivors
``calibration``    the temperature and matrix scaling: fit (:func:`fit_temperature`,
                   :func:`fit_matrix_scaling`) and apply, in one place
``weights``        learned aggregation: per-view and class-by-view weights, cross-validated
``greedy``         greedy selection of views (:func:`greedy_search`)
``finish``         after the selection: weights, gate, matrix scaling, the never-worse check
``result``         what a search returns (:class:`SearchResult`)
``gate``           gate tuning (:func:`tune_gate_threshold`) and gated outputs from a cache
``run``            the orchestration ``ttakit search`` calls (:func:`search_policy`)
``refit``          a policy's fitted parameters refitted for another model (:func:`refit_policy`)
``dense``          segmentation and detection: views (and box-fusion settings) by mIoU or mAP
                   (:func:`dense_search`)
=================  ==========================================================================

Search takes tensors (a model, validation images and labels) or a cache, never datasets; the
Markdown/PNG report is :func:`ttakit.report.write_search_report` (the report layer, above
this one). Names load on first use, so
importing one module (``ttakit.search.gate``) does not import the rest.

Example:
    >>> from ttakit.search import default_pool
    >>> default_pool((28, 28))[0].name
    'identity'
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "OBJECTIVES": "greedy",
    "SearchResult": "result",
    "greedy_search": "greedy",
    "never_worse": "finish",
    "ViewCache": "cache",
    "cache_views": "cache",
    "default_pool": "pool",
    "random_copy_views": "pool",
    "random_copy_policy": "pool",
    "fastai_policy": "pool",
    "fastai_merge": "pool",
    "fit_temperature": "calibration",
    "apply_temperature": "calibration",
    "fit_matrix_scaling": "calibration",
    "compare_matrix_scaling": "calibration",
    "fit_view_weights": "weights",
    "fit_class_view_weights": "weights",
    "GateTuning": "gate",
    "tune_gate_threshold": "gate",
    "evaluate_gated_on_cache": "gate",
    "forward_passes": "gate",
    "successive_halving": "halving",
    "HalvingResult": "halving",
    "search_policy": "run",
    "refit_policy": "refit",
    "DenseSearchResult": "dense",
    "DETECTION_GRID": "dense",
    "detection_settings": "dense",
    "dense_search": "dense",
    "default_dense_pool": "dense",
    "detection_view_cache": "dense",
    "search_detection": "dense",
    "search_segmentation": "dense",
    "segmentation_view_cache": "dense",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
