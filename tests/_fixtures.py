"""Small data sets the tests write themselves (no test depends on the network)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_halves_npz(path: Path, n: int = 96, size: int = 8, channels: int = 1, seed: int = 0) -> Path:
    """Two classes: the bright half of the image is the left (class 0) or the right (class 1).

    A horizontal flip turns one class into the other, so flip TTA must hurt a model trained
    on this data: a property the tests use.
    """
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    x = rng.uniform(0.0, 0.2, size=(n, size, size, channels)).astype(np.float32)
    for i, label in enumerate(labels):
        if label == 0:
            x[i, :, : size // 2] += 0.7
        else:
            x[i, :, size // 2 :] += 0.7
    np.savez(path, x=x.squeeze(-1) if channels == 1 else x, y=labels, classes=np.array(["left", "right"]))
    return path


def chain_examples():
    """Transform name -> ``f(h, w)`` building an example sized for an ``h x w`` image: the views
    the box and keypoint chain property tests draw from (each test keeps those declaring its target)."""
    import ttakit.transforms as T

    return {
        "HorizontalFlip": lambda h, w: T.HorizontalFlip(),
        "VerticalFlip": lambda h, w: T.VerticalFlip(),
        "Rotate90": lambda h, w: T.Rotate90([90, 180, 270]),
        "Scale": lambda h, w: T.Scale([2, 3]),
        "Resize": lambda h, w: T.Resize([(2 * h, 3 * w), (h, 2 * w)]),
        "Shift": lambda h, w: T.Shift([(2, -1), (-2, 2)]),
        "FiveCrops": lambda h, w: T.FiveCrops(h - 4, w - 4),
        "TenCrops": lambda h, w: T.TenCrops(h - 4, w - 4),
        "Translate": lambda h, w: T.Translate([(1, 0), (0, -2)]),
        "Rotate": lambda h, w: T.Rotate([90, 180]),
        "Zoom": lambda h, w: T.Zoom([2.0]),
        "Tiles": lambda h, w: T.Tiles((min(h, 8), min(w, 8)), 0.5),
        "Add": lambda h, w: T.Add([0.5]),
        "Multiply": lambda h, w: T.Multiply([0.5]),
        "Brightness": lambda h, w: T.Brightness([0.2]),
        "Contrast": lambda h, w: T.Contrast([0.5]),
    }
