"""The data a checkpoint is evaluated on (its recorded recipe) and the retrained repeats, cached."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from ..data import ImageDataset, dataset_sha256, load_split
from ..data.splits import DEFAULT_TEST_FRACTION
from ..errors import CheckpointError, InvalidInputError
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


def at_recorded_size(dataset: ImageDataset, recipe: dict[str, Any] | None) -> ImageDataset:
    """``dataset`` at the image size a checkpoint trained at (``ttakit train --image-size``,
    recorded in its split recipe as ``image_size``), resized the way training resized it; as it
    is when the recipe records no size. Every job that scores a checkpoint's rows (evaluate,
    search, audit) goes through this one helper."""
    size = (recipe or {}).get("image_size")
    if not size:
        return dataset
    from ..data.registry import resize_dataset

    return resize_dataset(dataset, (int(size[0]), int(size[1])))


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
    dataset = at_recorded_size(load_split(recipe, split, data=data, data_dir=data_dir).head(limit), recipe)
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


# --------------------------------------------------------------------------- models that are not ttakit checkpoints

NO_SPLIT = "the model records no split"


def is_checkpoint(model: Any) -> bool:
    """Whether ``model`` is a ttakit checkpoint (a folder with ``checkpoint.json``); anything
    :func:`ttakit.predictors.load` reads otherwise (``.onnx``, ``.pt2``, TorchScript, Keras,
    ``file.py:function``) is not. A path that does not exist counts as a checkpoint, so the
    checkpoint loader says what is wrong with it, as before."""
    from ..errors import TTAKitError
    from ..predictors import model_kind

    try:
        return model_kind(model) == "checkpoint"
    except TTAKitError:
        return True


def load_other_model(model: Any, model_options: dict[str, Any] | None, data: str | None, command: str) -> Any:
    """A model that is not a ttakit checkpoint as a :class:`~ttakit.predictors.Predictor`; it
    records no data, so ``data`` (``--data``) is required."""
    from ..predictors import load

    if data is None:
        raise InvalidInputError(
            f"{model} is not a ttakit checkpoint, so it records no data: give the labelled images to {command} "
            "with --data (fashion-mnist, an .npz file, an image folder or a file list)"
        )
    return load(model, **(model_options or {}))


def own_data_split(data: str, split: str, data_dir: str | None = None) -> ImageDataset | None:
    """``split`` of ``data`` as the data itself defines it, for a model that records no split:
    ``"test"``: its own test split (an ``.npz`` with ``x_test``, a file list with ``test`` lines,
    an image folder with ``train/`` and ``test/``, a registered data set); ``"val"``: an image
    folder's ``val/`` sub-folder. None when the data has no such split."""
    from ..data import load_dataset
    from ..data.splits import has_own_test_split

    if split == "test":
        return load_dataset(data, "test", data_dir) if has_own_test_split(data, data_dir) else None
    if split == "val":
        path = Path(str(data)).expanduser()
        if path.is_dir() and (path / "val").is_dir():
            from ..data.image_folder import load_image_folder

            found = load_image_folder(path / "val")
            found.name = f"{data}[val]"
            return found
    return None


def fit_to_model(dataset: ImageDataset, predictor: Any, what: str) -> ImageDataset:
    """``dataset`` as ``predictor`` takes it: resized (stretched, bilinear) to the input size the
    model records or ``--input-size`` gives; refused in one line when the channels, the class
    names (``--classes``) or the number of outputs differ from the data's."""
    import torch

    from ..data.registry import resize_dataset

    name = getattr(predictor, "source", "") or "the model"
    if predictor.channels is not None and int(predictor.channels) != dataset.channels:
        raise InvalidInputError(
            f"{name} takes {predictor.channels}-channel images but {what} has {dataset.channels}-channel images; "
            "give data of the model's channels (or --channels if the model file says wrong)"
        )
    if predictor.input_size is not None:
        dataset = resize_dataset(dataset, tuple(int(v) for v in predictor.input_size))
    if predictor.classes is not None and list(predictor.classes) != list(dataset.classes):
        raise InvalidInputError(
            f"{name} predicts classes {list(predictor.classes)[:6]} but {what} has classes {list(dataset.classes)[:6]} "
            "(names and order must match)"
        )
    if len(dataset):
        with torch.inference_mode():
            predictor.eval()
            outputs = predictor(dataset.images[:1])
        if outputs.shape[1] != dataset.num_classes:
            raise InvalidInputError(
                f"{name} returns {outputs.shape[1]} outputs per image but {what} has {dataset.num_classes} classes; "
                "give data with the classes the model predicts"
            )
    return dataset


def other_model_meta(predictor: Any, dataset: ImageDataset, model: Any, data: str) -> CheckpointMeta:
    """What a job needs to know of a model that is not a checkpoint, as checkpoint metadata: its
    kind, input channels and size (the data's, fitted to the model), the data's classes; no split,
    no training augmentations; as its weights hash the digest ``ttakit search`` records for it (a
    policy searched on this model file is this model's)."""
    return CheckpointMeta(
        weights_sha256=predictor.weights_digest(),
        arch=str(predictor.kind),
        classes=list(dataset.classes),
        in_channels=dataset.channels,
        image_size=list(dataset.image_size),
        mean=predictor.mean,
        std=predictor.std,
        dataset=str(data),
        extra={"data": {"spec": str(data)}, "model_kind": str(predictor.kind), "records_split": False},
        source=str(model),
    )


def other_model_out(model: Any, suffix: str) -> Path:
    """Where a job writes for a model that is not a checkpoint folder: ``<name>-<suffix>`` beside
    the model file (``file.py:function``: beside the file)."""
    text = str(model)
    path = Path(text)
    if not path.exists() and ":" in text:
        path = Path(text.rsplit(":", 1)[0])
    return path.with_name(f"{path.stem or 'model'}-{suffix}")


def refuse_other_model_options(checkpoint: Any, model_options: dict[str, Any] | None, val_data: str | None) -> None:
    """A ttakit checkpoint records how it reads images and its own validation split: the options
    for other models are refused with it rather than silently ignored."""
    if model_options:
        flags = ", ".join("--" + name.replace("_", "-") for name in model_options)
        raise InvalidInputError(
            f"{flags}: for models that do not record how they read images; checkpoint {checkpoint} records its own "
            "(drop them)"
        )
    if val_data is not None:
        raise InvalidInputError(
            f"--val-data: for models that record no split; checkpoint {checkpoint} records its own validation split "
            "(drop --val-data)"
        )
