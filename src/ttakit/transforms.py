"""Test-time transforms: thin classes over :mod:`ttakit.functional`.

The protocol is ttach's, so custom transforms written for ttach run unchanged: a transform has
``params`` (one view per value), ``pname`` (the keyword its methods take), ``identity_param``,
and methods ``apply_aug_image``, ``apply_deaug_mask``, ``apply_deaug_label`` and
``apply_deaug_keypoints``. ttakit adds:

* ``targets``: the targets the transform can map back (``image``, ``mask``, ``label``,
  ``keypoints``, ``boxes``), so a policy that needs an impossible inverse fails when a wrapper is
  built, not halfway through inference;
* ``apply_deaug_boxes`` for ``(B, N, 4)`` normalised boxes;
* ``uses_input_size``: when true, the de-augment methods receive ``input_size=(H, W)``, the size
  of the image the transform was applied to, recorded during augmentation (so inverses restore
  the stored size instead of recomputing it);
* ``step_name(param)`` and ``get_args()`` to name and serialise views;
* optionally ``apply_deaug_mask_weighted(mask, weight, **params)``, returning the mask in the
  input's frame and a weight map of the pixels the view saw (crops, shifts, tiles), and
  ``multiplies_batch`` (Tiles: one image becomes several) and ``loses_pixels`` flags, which the
  engine reads to plan passes and per-pixel merges.

This module is the public face; the code lives by job in private modules:
:mod:`ttakit._transform_base` (the protocol, the registry, shared argument checks),
:mod:`ttakit._geometric` (flips, quarter-turns, Scale/Resize, crops, Shift),
:mod:`ttakit._tiles` (Tiles: sliding-window inference as a view),
:mod:`ttakit._photometric` (Add, Multiply, Brightness, Contrast) and
:mod:`ttakit._affine_views` (Translate, Rotate, Zoom: resampled through ``grid_sample``).
Importing this module registers every transform.
"""

from __future__ import annotations

from ._affine_views import Rotate, Translate, Zoom
from ._geometric import (
    FiveCrops,
    HorizontalFlip,
    Resize,
    Rotate90,
    Scale,
    Shift,
    TenCrops,
    VerticalFlip,
)
from ._photometric import Add, Brightness, Contrast, Multiply
from ._tiles import Tiles
from ._transform_base import (
    TARGETS,
    BaseTransform,
    DualTransform,
    ImageOnlyTransform,
    get_transform_class,
    list_transforms,
    params_from_json,  # noqa: F401 - used by ttakit.policy, not in __all__
    params_to_json,  # noqa: F401
    register_transform,
)

__all__ = [
    "TARGETS",
    "BaseTransform",
    "ImageOnlyTransform",
    "DualTransform",
    "HorizontalFlip",
    "VerticalFlip",
    "Rotate90",
    "Scale",
    "Resize",
    "Add",
    "Multiply",
    "Brightness",
    "Contrast",
    "FiveCrops",
    "TenCrops",
    "Shift",
    "Tiles",
    "register_transform",
    "list_transforms",
    "get_transform_class",
    "Translate",
    "Rotate",
    "Zoom",
]
