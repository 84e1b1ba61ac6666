"""The data a checkpoint is evaluated on (its recorded recipe) and the retrained repeats, cached."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from ..data import ImageDataset, dataset_sha256, load_split
from ..data.splits import DEFAULT_TEST_FRACTION
from ..errors import CheckpointError
from ..models import CheckpointMeta, check_compatible, load_checkpoint
from ..models.checkpoint import weights_sha256
from ..policy import Policy
from ..progress import note
from ..training.config import TrainConfig
from ._policies import policy_fingerprint
from .train import train_run


def _data_recipe(meta: CheckpointMeta) -> dict[str, Any]:
    recipe = meta.extra.get("data") or {"spec": meta.dataset or "fashion-mnist", "val_fraction": 0.0}
    if not isinstance(recipe, dict):
        raise CheckpointError(
            f"checkpoint {meta.source or meta.arch}: checkpoint.json field extra.data must be an object "
            f"(the data split recipe), got {type(recipe).__name__}"
        )
    return dict(recipe)


def load_eval_data(
    meta: CheckpointMeta,
    data: str | None = None,
    split: str = "test",
    data_dir: str | None = None,
    limit: int | None = None,
) -> ImageDataset:
    """The held-out data a checkpoint is scored on: ``split`` of ``data`` (default: the
    checkpoint's own data), rebuilt from the split recipe the checkpoint recorded.

    ``split="test"``: the data's own test split, or the test split carved at training time;
    ``"val"``: the validation split held out at training time; ``"train"``: the images the
    model trained on (asked for by name only). Checks the data matches the checkpoint: channels,
    image size, and class names in the same order.

    This is the one function every command that scores a checkpoint (evaluate, search, audit,
    ensemble) uses to get its data, so none of them can score training images by accident.
    """
    recipe = _data_recipe(meta)
    dataset = load_split(recipe, split, data=data, data_dir=data_dir).head(limit)
    if recipe.get("image_size"):  # trained with --image-size: score at that size too
        from ..data.registry import resize_dataset

        dataset = resize_dataset(dataset, tuple(int(v) for v in recipe["image_size"]))
    check_compatible(meta, dataset.channels, dataset.image_size)
    if list(dataset.classes) != list(meta.classes):
        raise CheckpointError(
            f"checkpoint {meta.source or meta.arch} was trained on classes {list(meta.classes)} "
            f"but the data has classes {list(dataset.classes)} (names and order must match)"
        )
    return dataset


def _train_config_of(meta: CheckpointMeta) -> TrainConfig:
    saved = meta.extra.get("train_config") or {}
    if not isinstance(saved, dict) or not saved:
        raise CheckpointError(
            f"checkpoint {meta.source} does not record its training configuration as an object, "
            "so --repeats cannot retrain it"
        )
    try:
        saved = {**saved, "augment": tuple(saved.get("augment") or ())}
        return TrainConfig(**saved)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {meta.source}: its recorded train_config is not valid ({exc})") from exc


def _as_json(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), for comparing recipes."""
    return json.loads(json.dumps(value, default=str))


def _same_recipe(found: CheckpointMeta, expected: CheckpointMeta, config: TrainConfig) -> str | None:
    """None when ``found`` was trained with ``expected``'s recipe and ``config``, else what differs."""
    if found.arch != expected.arch or found.arch_kwargs != expected.arch_kwargs:
        return f"architecture {found.arch} {found.arch_kwargs} instead of {expected.arch} {expected.arch_kwargs}"
    if _as_json(found.extra.get("train_config")) != _as_json(asdict(config)):
        return "another training configuration"
    if _as_json(_data_recipe(found)) != _as_json(_data_recipe(expected)):
        return "another data recipe (data, splits or content)"
    return None


def _retrain(meta: CheckpointMeta, seed: int, out_dir: Path, progress: bool) -> tuple[Any, CheckpointMeta]:
    """Train the checkpoint's recipe again with another seed; a checkpoint already in
    ``out_dir`` is reused only when it was trained with exactly that recipe and seed."""
    config = replace(_train_config_of(meta), seed=seed)
    if (out_dir / "checkpoint.json").exists():
        try:
            model, found = load_checkpoint(out_dir)
            why = _same_recipe(found, meta, config)
            if why is None:
                return model, found
            note(f"retraining {out_dir}: the checkpoint there has {why}", enabled=progress)
        except CheckpointError:
            pass  # a half-written or foreign folder: train again
    recipe = _data_recipe(meta)
    result = train_run(
        recipe.get("spec", "fashion-mnist"),
        out_dir=out_dir,
        config=config,
        arch=meta.arch,
        data_dir=recipe.get("data_dir"),
        val_fraction=float(recipe.get("val_fraction") or 0.0),
        test_fraction=float(recipe.get("test_fraction") or DEFAULT_TEST_FRACTION),
        progress=progress,
    )
    return result.model, result.meta


def weights_digest(meta: CheckpointMeta) -> str | None:
    """SHA-256 of the checkpoint's weights file, or None for a model not loaded from disk."""
    if not meta.source:
        return None
    try:
        return weights_sha256(meta.source)
    except CheckpointError:
        return None


def _run_key(
    policies: Sequence[Policy], meta: CheckpointMeta, dataset: ImageDataset, split: str, seed: int
) -> dict[str, Any]:
    """What a repeat's results depend on, by content: each policy as it computes, the base
    checkpoint's weights and training recipe, the retraining seed, and the scored images."""
    recipe = {k: v for k, v in _data_recipe(meta).items() if k not in ("test_index", "val_index", "test_files")}
    return {
        "policies": [policy_fingerprint(p) for p in policies],
        "checkpoint_weights_sha256": weights_digest(meta),
        "arch": meta.arch,
        "train_config": meta.extra.get("train_config"),
        "data_recipe": recipe,
        "split": split,
        "eval_data_sha256": dataset_sha256(dataset),
        "n_images": len(dataset),
        "seed": seed,
    }


CONFORMAL_HOLDOUT = 0.2  # share of the validation rows ttakit search leaves for conformal calibration
HOLDOUT_SEED = 0
