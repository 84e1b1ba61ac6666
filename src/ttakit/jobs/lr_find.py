"""The job behind ``ttakit lr-find``: run the range test on a data set and write its plot."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..data.splits import DEFAULT_TEST_FRACTION
from ..report.plots import plot_lr_find
from ..training.config import TrainConfig
from ..training.lr_find import lr_find
from ..training.resize import fit_image_size


def run_lr_find(
    data: str = "fashion-mnist",
    *,
    arch: str = "seed-cnn",
    config: TrainConfig | None = None,
    data_dir: str | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    plot: str | os.PathLike | None = "lr_find.png",
    progress: bool = True,
    image_size: int | tuple[int, int] | None = None,
    **sweep: Any,
) -> dict[str, Any]:
    """``ttakit lr-find``: sweep on exactly the rows ``ttakit train`` trains on.

    The rows come from :func:`ttakit.data.make_splits`, the split function ``train`` uses, with
    the same seed, ``val_fraction`` and ``test_fraction``: the validation split and the test
    split (the data's own, or the one carved from an ``.npz`` or a flat folder) are never swept
    on. ``image_size`` (``--image-size``) resizes them as ``train`` does. Writes the plot and returns
    ``{"result": LRFindResult, "plot": path or None, "size_note": which image size and why,
    **result.to_json(curve=False)}``."""
    from ..data import make_splits
    from ..data.splits import SPLIT_SEED

    splits = make_splits(data, data_dir, val_fraction=val_fraction, test_fraction=test_fraction, seed=SPLIT_SEED)
    splits, size_note = fit_image_size(splits, image_size, data)
    result = lr_find(splits.train, arch=arch, config=config, progress=progress, **sweep)
    shown = Path(str(data)).name or str(data)  # a file or folder by its name: a long path would crowd the title
    written = plot_lr_find(result, plot, title=f"lr-find: {arch} on {shown}") if plot is not None else None
    return {"result": result, "plot": str(written) if written else None, "size_note": size_note,
            **result.to_json(curve=False)}
