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
