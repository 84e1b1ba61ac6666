"""The job behind ``ttakit train``: load the data, train, save a checkpoint that records its recipe."""

from __future__ import annotations

import os

from ..data import make_splits
from ..data.splits import DEFAULT_TEST_FRACTION, SPLIT_SEED
from ..models import save_checkpoint
from ..progress import note
from ..training.config import TrainConfig
from ..training.loop import TrainResult, train_model
from ..training.resize import fit_image_size


def train_run(
    data: str = "fashion-mnist",
    *,
    out_dir: str | os.PathLike,
    config: TrainConfig | None = None,
    arch: str = "seed-cnn",
    data_dir: str | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    progress: bool = True,
    image_size: int | tuple[int, int] | None = None,
) -> TrainResult:
    """Train ``arch`` on the training split of ``data`` and save the checkpoint in ``out_dir``.

    ``image_size`` (``--image-size``): train at this ``(H, W)`` (an int: square), resizing every
    split; recorded in the split recipe, so evaluate and search resize the same way. Without it
    the data's own size is kept. ``result.size_note`` says which size was chosen and why.

    Held out from training, with a fixed seed and stratified by class: a validation split
    (``val_fraction`` of the non-test images, for search) and, when the data has no test split
    of its own (a flat image folder, an ``.npz`` file), a test split (``test_fraction`` of all
    images). The checkpoint records the recipe exactly (seed, fractions, content hash, held-out
    rows and files; see :mod:`ttakit.data.splits`), so ``evaluate`` scores only held-out images,
    ``search`` finds the same validation split, and ``evaluate --repeats`` retrains the same recipe.
    """
    config = config or TrainConfig()
    splits = make_splits(data, data_dir, val_fraction=val_fraction, test_fraction=test_fraction, seed=SPLIT_SEED)
    splits, size_note = fit_image_size(splits, image_size, data)
    if progress:
        note(size_note)
    result = train_model(splits.train, config, arch=arch, val_ds=splits.val, progress=progress)
    result.size_note = size_note
    result.meta.extra["data"] = splits.recipe
    if image_size is not None or splits.train.files is not None:
        # image files (folders, file lists) and --image-size reach the model's size stretched (bilinear):
        # recorded, so predict resizes new images the same way by default
        result.meta.extra["resize"] = "stretch"
    result.meta.dataset = data
    result.checkpoint_dir = save_checkpoint(out_dir, result.model, result.meta)
    result.meta.source = str(result.checkpoint_dir)
    return result
