"""ttakit: test-time augmentation for image models.

The public API is what this module exports. ttach users can ``import ttakit as tta`` and keep
their code: ``tta.ClassificationTTAWrapper(model, tta.aliases.d4_transform())``.
"""

from . import aliases, base, detection, functional, transforms, wrappers  # noqa: E402  (ttach's module paths)
from ._version import __version__  # the one place the version is written
from .aliases import get_policy, list_policies, register_policy  # noqa: E402
from .detection import Detections, DetectionTTAOutput, DetectionTTAWrapper  # noqa: E402
from .engine import TTAEngine, TTAOutput  # noqa: E402
from .errors import (  # noqa: E402
    CheckpointError,
    DataError,
    DataNotFoundError,
    InvalidInputError,
    ModelOutputError,
    NotInvertibleError,
    PolicyFormatError,
    TTAKitError,
    UnknownNameError,
)
from .merge import MERGE_MODES, Merger, merge  # noqa: E402
from .policy import Compose, Policy, Step, Transformer, View  # noqa: E402
from .transforms import (  # noqa: E402
    Add,
    BaseTransform,
    Brightness,
    Contrast,
    DualTransform,
    FiveCrops,
    HorizontalFlip,
    ImageOnlyTransform,
    Multiply,
    Resize,
    Rotate90,
    Scale,
    Shift,
    TenCrops,
    Tiles,
    VerticalFlip,
    register_transform,
)
from .wrappers import (  # noqa: E402
    ClassificationTTAWrapper,
    KeypointsTTAWrapper,
    SegmentationTTAWrapper,
)

__all__ = [
    "__version__",
    "aliases",
    "base",
    "detection",
    "functional",
    "transforms",
    "wrappers",
    "get_policy",
    "list_policies",
    "register_policy",
    "TTAEngine",
    "TTAOutput",
    "TTAKitError",
    "InvalidInputError",
    "NotInvertibleError",
    "ModelOutputError",
    "DataError",
    "DataNotFoundError",
    "CheckpointError",
    "PolicyFormatError",
    "UnknownNameError",
    "MERGE_MODES",
    "Merger",
    "merge",
    "Compose",
    "Policy",
    "Step",
    "Transformer",
    "View",
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
    "Tiles",
    "Shift",
    "register_transform",
    "ClassificationTTAWrapper",
    "SegmentationTTAWrapper",
    "KeypointsTTAWrapper",
    "DetectionTTAWrapper",
    "DetectionTTAOutput",
    "Detections",
]
