"""Train / validation / test splits that are recorded exactly, so nothing is ever scored on
images the model trained on without saying so.

A data set with a test split of its own (a registered name such as ``fashion-mnist``, or an
image folder with ``train/`` and ``test/``) keeps it. A data set without one (a flat image
folder, an ``.npz`` file) gets a seeded, stratified test split carved out at training time.
The validation split is then carved from what is left. :func:`make_splits` returns the three
splits and a *recipe*, the JSON-ready record a checkpoint stores (under
``meta.extra["data"]``); :func:`load_split` rebuilds any split from that recipe and refuses when
the data on disk is not the data the recipe describes.

Recipe fields:
    ``spec``, ``data_dir``: where the data came from.
    ``split_seed``, ``val_fraction``, ``test_fraction``: how the splits were drawn.
    ``test_source``: ``"own"`` (the data's own test split) or ``"carved"``.
    ``n_images``, ``sha256``: size and content hash (images, labels, classes) of the pool the
        splits were drawn from (the data's training split, or all of it when carved).
    ``test_index``, ``val_index``: the held-out rows of the pool, when carved (exact lists).
    ``test_files``: the held-out files, for image folders.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import DataError, InvalidInputError
from .core import ImageDataset, stratified_indices
from .registry import _DATASETS, _normalise, load_dataset

__all__ = [
    "SPLITS",
    "SPLIT_SEED",
    "Splits",
    "check_recipe",
    "dataset_sha256",
    "has_own_test_split",
    "load_split",
    "make_splits",
    "split_rows",
]

SPLITS = ("train", "val", "test")
DEFAULT_TEST_FRACTION = 0.15
# The seed every split ttakit draws uses (train, lr-find, audit's carved test split): the
# validation and test splits are the same for every training seed, so searches compare.
SPLIT_SEED = 0


def dataset_sha256(dataset: ImageDataset) -> str:
    """SHA-256 (hex) of a data set's content: classes, image shape, pixels and labels.

    The same images in the same order with the same labels always give the same hash; any
    changed pixel, label, class name or order gives another.
    """
    digest = hashlib.sha256()
    header = {"classes": list(dataset.classes), "shape": list(dataset.images.shape), "dtype": str(dataset.images.dtype)}
    digest.update(json.dumps(header, sort_keys=True).encode())
    digest.update(dataset.images.detach().cpu().contiguous().numpy().data)
    digest.update(dataset.labels.detach().cpu().to(torch.int64).contiguous().numpy().data)
    return digest.hexdigest()


def has_own_test_split(spec: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> bool:
    """True when ``spec`` names data with a test split of its own: a registered data set, or an
    image folder holding ``train/`` and ``test/``, an ``.npz`` holding ``x_test`` or a file list
    marking ``test`` lines (the cleaned copies ``ttakit audit --write-clean`` writes). Other
    ``.npz`` files and flat folders have none."""
    text = str(os.fspath(spec))
    if _normalise(text) in _DATASETS:
        return True
    path = Path(text).expanduser()
    if path.is_file() and path.suffix.lower() == ".npz":
        from .npz import npz_has_test_split

        return npz_has_test_split(path)
    if path.is_file() and path.suffix.lower() == ".txt":
        from .file_list import file_list_has_test_split

        return file_list_has_test_split(path)
    return path.is_dir() and (path / "train").is_dir() and (path / "test").is_dir()


@dataclass
class Splits:
    """The splits :func:`make_splits` drew. ``test`` is None when the data has its own test
    split (load it with :func:`load_split`); ``val`` is None when ``val_fraction`` is 0."""

    train: ImageDataset
    val: ImageDataset | None
    test: ImageDataset | None
    recipe: dict[str, Any]


def _check_fraction(name: str, value: Any, allow_zero: bool) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and (0.0 < value < 1.0 or (allow_zero and value == 0)):
        return float(value)
    span = "in [0, 1) (0: none)" if allow_zero else "strictly between 0 and 1"
    raise InvalidInputError(f"{name} must lie {span}, got {value!r}")


def _same_spec(a: str, b: str) -> bool:
    if _normalise(a) == _normalise(b):
        return True
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except OSError:
        return False


def make_splits(
    spec: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    *,
    val_fraction: float = 0.1,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    seed: int = SPLIT_SEED,
) -> Splits:
    """Draw the training, validation and test splits of ``spec`` and the recipe recording them.

    Args:
        spec, data_dir: as for :func:`ttakit.data.load_dataset`.
        val_fraction: share of the non-test images held out for validation (0: none).
        test_fraction: share of all images held out for testing, stratified by class; used only
            when the data has no test split of its own.
        seed: the split seed (the same seed gives the same splits).

    Returns:
        :class:`Splits`; every image is in exactly one of train, val, test.

    Example:
        >>> splits = make_splits("photos/", test_fraction=0.2)  # doctest: +SKIP
        >>> splits.recipe["test_source"], len(splits.recipe["test_index"])
        ('carved', 40)
    """
    val_fraction = _check_fraction("val_fraction (--val-fraction)", val_fraction, allow_zero=True)
    own = has_own_test_split(spec, data_dir)
    if not own:
        test_fraction = _check_fraction("test_fraction (--test-fraction)", test_fraction, allow_zero=False)
    text = str(os.fspath(spec))
    pool = load_dataset(text, split="train", data_dir=data_dir)
    recipe: dict[str, Any] = {
        "spec": text,
        "data_dir": None if data_dir is None else str(data_dir),
        "val_fraction": val_fraction,
        "split_seed": int(seed),
        "test_source": "own" if own else "carved",
        "test_fraction": None if own else test_fraction,
        "n_images": len(pool),
        "sha256": dataset_sha256(pool),
    }
    base = pool.name or text
    rest = torch.arange(len(pool))
    test = None
    if not own:
        rest, held = stratified_indices(pool.labels, test_fraction, seed, name="test_fraction (--test-fraction)")
        recipe["test_index"] = held.tolist()
        if pool.files is not None:
            recipe["test_files"] = [pool.files[i] for i in recipe["test_index"]]
        test = pool.subset(held, f"{base}[test]")
    val = None
    train_index = rest
    if val_fraction > 0:
        keep, held = stratified_indices(pool.labels[rest], val_fraction, seed, name="val_fraction (--val-fraction)")
        train_index, val_index = rest[keep], rest[held]
        if not own:
            recipe["val_index"] = val_index.tolist()
        val = pool.subset(val_index, f"{base}[val]")
    train = pool.subset(train_index, f"{base}[train]")
    return Splits(train, val, test, recipe)


def check_recipe(recipe: Any) -> None:
    """Refuse a split recipe (``meta.extra["data"]``) whose fields have the wrong type or range.

    Raises:
        DataError: naming the field, what it must be and the value found.
    """
    if not isinstance(recipe, Mapping):
        raise DataError(f"the checkpoint's data recipe must be an object, got {type(recipe).__name__}")

    def bad(name: str, expected: str) -> DataError:
        return DataError(f"the checkpoint's data recipe field {name!r} must be {expected}, got {recipe.get(name)!r}")

    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    for name in ("spec", "data_dir", "sha256"):
        if recipe.get(name) is not None and not isinstance(recipe.get(name), str):
            raise bad(name, "a string or null")
    if recipe.get("val_fraction") is not None and not (number(recipe["val_fraction"]) and 0 <= recipe["val_fraction"] < 1):
        raise bad("val_fraction", "a number in [0, 1)")
    if recipe.get("test_fraction") is not None and not (number(recipe["test_fraction"]) and 0 < recipe["test_fraction"] < 1):
        raise bad("test_fraction", "null or a number strictly between 0 and 1")
    seed = recipe.get("split_seed")
    if seed is not None and not (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**63):
        raise bad("split_seed", "a non-negative integer")
    if recipe.get("test_source") not in (None, "own", "carved"):
        raise bad("test_source", "'own' or 'carved'")
    files = recipe.get("test_files")
    if files is not None and (not isinstance(files, list) or not all(isinstance(f, str) for f in files)):
        raise bad("test_files", "a list of file names")


def _index_list(recipe: Mapping[str, Any], key: str, n: int) -> torch.Tensor:
    values = recipe.get(key)
    if (
        not isinstance(values, list)
        or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < n for v in values)
        or len(set(values)) != len(values)
    ):
        raise DataError(f"the checkpoint's data recipe field {key!r} must list distinct row indices below {n}")
    return torch.tensor(sorted(values), dtype=torch.long)


def _complement(n: int, *parts: torch.Tensor) -> torch.Tensor:
    mask = torch.ones(n, dtype=torch.bool)
    for part in parts:
        mask[part] = False
    return torch.nonzero(mask).flatten()


def split_rows(
    recipe: Mapping[str, Any],
    split: str = "test",
    *,
    data: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
) -> tuple[ImageDataset, torch.Tensor, str]:
    """Where :func:`load_split`'s rows come from: ``(source, index, name)``.

    ``source`` is the data as loaded (the data's training part, or its own test split), and
    ``index`` ``(n,)`` the rows of ``source`` that make up ``split``, sorted: the recorded rows
    for a carved split, the seeded draw for a validation split of data with its own test split,
    every row for an own test split or for other data. ``source.subset(index, name)`` is the
    split; ``index`` numbers its rows in the data as given (issues.csv, cleaned copies).

    Raises: as :func:`load_split`.
    """
    if split not in SPLITS:
        raise InvalidInputError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    check_recipe(recipe)
    recorded_spec = str(recipe.get("spec") or "fashion-mnist")
    spec = str(os.fspath(data)) if data is not None else recorded_spec
    same_source = _same_spec(spec, recorded_spec)
    if data_dir is None and same_source:
        data_dir = recipe.get("data_dir")
    own_now = has_own_test_split(spec, data_dir)
    if split == "test" and own_now:
        test = load_dataset(spec, split="test", data_dir=data_dir)
        return test, torch.arange(len(test)), test.name

    pool = load_dataset(spec, split="train", data_dir=data_dir)
    recorded_hash = recipe.get("sha256")
    digest = dataset_sha256(pool) if (recorded_hash or not same_source) else None
    same_content = recorded_hash is not None and digest == recorded_hash
    if not same_content and not same_source:
        if split == "test":
            # other data, with no test split of its own and another content: never trained on
            return pool, torch.arange(len(pool)), f"{spec} (all {len(pool)} images; not the training data)"
        raise DataError(
            f"split {split!r} exists only for the data the checkpoint was trained on ({recorded_spec}); "
            f"{spec} holds other images (sha256 {digest[:12]}...), so use --split test or no --data"
        )
    if recorded_hash is not None and not same_content:
        raise DataError(
            f"{spec} has changed since the checkpoint was trained (its content hash is {digest[:12]}..., "
            f"the checkpoint recorded {str(recorded_hash)[:12]}...), so which images were held out cannot "
            "be proven; restore the data or retrain"
        )
    test_source = recipe.get("test_source") or ("own" if own_now else "none")
    n = len(pool)
    base = pool.name or spec
    seed = int(recipe.get("split_seed") or 0)
    val_fraction = float(recipe.get("val_fraction") or 0.0)

    if test_source == "carved":
        test_index = _index_list(recipe, "test_index", n)
        files = recipe.get("test_files")
        if files is not None and pool.files is not None and [pool.files[i] for i in test_index.tolist()] != list(files):
            raise DataError(
                f"{spec}: the files at the recorded test rows are not the files the checkpoint held out; "
                "the folder was reorganised since training, so restore it or retrain"
            )
        if split == "test":
            return pool, test_index, f"{base}[test]"
        rest = _complement(n, test_index)
        val_index = _index_list(recipe, "val_index", n) if val_fraction > 0 else torch.zeros(0, dtype=torch.long)
    else:
        if split == "test":  # a recipe from before test splits were carved, on data without one
            raise DataError(
                f"the checkpoint was trained on all of {spec} (it predates held-out test splits), so every "
                "image there is a training image; retrain it (ttakit train holds out --test-fraction), "
                "evaluate on other data with --data, or score the training images by name with --split train"
            )
        rest = torch.arange(n)
        val_index = torch.zeros(0, dtype=torch.long)
        if val_fraction > 0:
            _, val_index = stratified_indices(pool.labels, val_fraction, seed, name="val_fraction")
    if split == "val":
        if val_fraction <= 0:
            raise InvalidInputError(
                "split 'val' needs a checkpoint trained with a held-out validation split (ttakit train --val-fraction)"
            )
        return pool, val_index, f"{base}[val]"
    return pool, _complement(n, val_index, _complement(n, rest)), f"{base}[train]"


def load_split(
    recipe: Mapping[str, Any],
    split: str = "test",
    *,
    data: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
) -> ImageDataset:
    """Rebuild ``split`` (``"train"``, ``"val"`` or ``"test"``) of the data a checkpoint's
    ``recipe`` describes, or of other data ``data``.

    - ``"test"``: the data's own test split, or the test split carved at training time (the
      recorded rows). Other data without a test split of its own whose content differs from
      the training data is used whole: the model never saw it.
    - ``"val"``: the validation split held out at training time.
    - ``"train"``: the images the model trained on (only when asked for by name).

    :func:`split_rows` says which rows of the data these are.

    Raises:
        InvalidInputError: an unknown split, or ``"val"`` without a validation split.
        DataError: the data on disk is not the data the recipe was drawn from (its hash
            differs), or the recipe predates held-out test splits and the data has none, so
            every image is a training image.
    """
    source, index, name = split_rows(recipe, split, data=data, data_dir=data_dir)
    if len(index) == len(source) and bool((index == torch.arange(len(source))).all()):
        source.name = name
        return source
    return source.subset(index, name)
