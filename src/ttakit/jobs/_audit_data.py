"""The data an audit reads and the cleaned copy it writes."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._io import atomic_write, atomic_write_text
from ..errors import DataError, InvalidInputError


def write_clean(dataset: Any, remove: Sequence[int], path: str | os.PathLike, *, root: str | None = None,
                test: Any = None, manifest: dict[str, Any] | None = None) -> Path:
    """Write ``dataset`` without the rows ``remove`` to ``path``, and ``test`` as its own test split.

    An ``.npz`` (``x`` uint8 when the pixels are multiples of 1/255, else float32 in [0, 1];
    ``y``; ``classes``; ``x_test``, ``y_test`` for ``test``; ``manifest``, ``manifest`` as JSON)
    for array data; for data loaded from image files (``dataset.files``), a file list (``.txt``:
    one ``path<TAB>class`` line per image, ``path<TAB>class<TAB>test`` for ``test``, paths
    absolute, the manifest on a ``# ttakit-clean {json}`` line) that ``ttakit train --data``
    reads with :func:`ttakit.data.load_file_list`. Either way the written data has ``test`` as a
    test split of its own, so a model trained on it is scored on exactly those images.
    """
    import json

    path = Path(path)
    keep = torch.ones(len(dataset), dtype=torch.bool)
    if len(remove):
        keep[torch.as_tensor(list(remove), dtype=torch.long)] = False
    if int(keep.sum()) == 0:
        raise InvalidInputError("--write-clean: every image was flagged, so the cleaned data would be empty")
    kept = torch.nonzero(keep).flatten()
    files = getattr(dataset, "files", None)
    if files is not None:
        if path.suffix.lower() != ".txt":
            raise InvalidInputError(
                f"--write-clean {str(path)!r}: the data are image files, so the cleaned data is a file list; "
                "give a path ending in .txt"
            )
        base = Path(root) if root is not None else Path(".")
        lines = ["# ttakit file list: image path <TAB> class name [<TAB> test]; read by ttakit train --data FILE"]
        if manifest is not None:
            lines.append("# ttakit-clean " + json.dumps(manifest, sort_keys=True))
        parts = [(dataset, kept.tolist(), "")]
        if test is not None:
            if getattr(test, "files", None) is None:
                raise InvalidInputError("--write-clean: the test split of image files must name its files")
            parts.append((test, list(range(len(test))), "\ttest"))
        for part, rows, mark in parts:
            for i in rows:
                file = Path(part.files[i])
                full = file if file.is_absolute() else (base / file)
                lines.append(f"{full.resolve()}\t{part.classes[int(part.labels[i])]}{mark}")
        return atomic_write_text(path, "\n".join(lines) + "\n")
    if path.suffix.lower() != ".npz":
        raise InvalidInputError(f"--write-clean {str(path)!r}: expected a path ending in .npz for array data")

    def arrays(images: torch.Tensor) -> np.ndarray:
        scaled = images * 255.0
        as_uint8 = bool(torch.allclose(scaled, scaled.round(), atol=1e-3))
        x = scaled.round().clamp(0, 255).to(torch.uint8) if as_uint8 else images.float()
        x = x.permute(0, 2, 3, 1).numpy()  # NHWC, which the .npz loader reads for C in 1, 3, 4
        return x[..., 0] if x.shape[-1] == 1 else x

    stored: dict[str, np.ndarray] = {
        "x": arrays(dataset.images[kept]),
        "y": dataset.labels[kept].numpy().astype(np.int64),
        "classes": np.array(list(dataset.classes)),
    }
    if test is not None:
        stored["x_test"] = arrays(test.images)
        stored["y_test"] = test.labels.numpy().astype(np.int64)
    if manifest is not None:
        stored["manifest"] = np.array(json.dumps(manifest, sort_keys=True))

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, **stored)

    return atomic_write(path, write)


# --------------------------------------------------------------------------- the command


def _load_audit_data(spec: str, split: str, data_dir: str | None) -> Any:
    from ..data import load_dataset

    try:
        dataset = load_dataset(spec, split=split, data_dir=data_dir)
    except DataError as err:
        text = str(err)
        if "'y'" in text or "no class sub-folders" in text:
            raise InvalidInputError(
                f"--data {spec}: audit needs labelled images (an .npz with labels 'y', or a folder with one "
                f"sub-folder per class); {text}"
            ) from None
        raise
    _require_labels(dataset, spec)
    return dataset


def _require_labels(dataset: Any, spec: str) -> None:
    labels = getattr(dataset, "labels", None)
    if labels is None or len(labels) == 0 or int(labels.min()) < 0 or getattr(dataset, "labelled", True) is False:
        raise InvalidInputError(
            f"--data {spec}: this split has no labels, and an audit compares labels with predictions; "
            "give labelled data (an .npz with 'y', or a folder with one sub-folder per class)"
        )


def _rows_not_fitted_on(policy: Any, source: Any, positions: list[int]) -> tuple[list[int], str]:
    """The rows of the checkpoint's validation split (``positions`` in ``source``) that nothing in
    ``policy`` was fitted on, and a note for the report ("" when every row is kept).

    Raises:
        InvalidInputError: the policy was fitted on labelled rows but does not record which, or
            records another validation split, or leaves no row unseen.
    """
    from ..data.splits import dataset_sha256
    from ..policy import fitted_on_labelled_data, fitted_parameters, unused_validation_rows

    if not fitted_on_labelled_data(policy):
        return positions, ""
    what = ", ".join(fitted_parameters(policy)) or "views searched"
    n = len(positions)
    try:
        unused = unused_validation_rows(policy, n, dataset_sha256(source.subset(positions, "val")))
    except InvalidInputError:
        raise InvalidInputError(
            f"audit --split val --policy {policy.name!r}: its {what} were fitted on this checkpoint's validation rows "
            f"and no row of the {n} is proven unseen (the policy records none, records another validation split, or "
            "was searched on all of them), so each row would be flagged by something fitted on it; audit with a "
            "views-only policy (--policy none or hflip), --split test, or search again with ttakit search (it keeps "
            "--conformal-holdout 0.2 of the rows unseen and records them)"
        ) from None
    if unused is None:
        return positions, ""
    kept = [positions[r] for r in unused]
    return kept, f"; the {len(kept)} of {n} validation rows the policy's {what} were not fitted on"


def _same_source(a: str, b: str) -> bool:
    from ..data.splits import _same_spec

    return _same_spec(a, b)


def _require_recorded_split(recipe: dict[str, Any], split: str, model: str) -> None:
    """Refuse a checkpoint whose recipe does not record the rows of ``split`` (and of its test
    split): without them the audited rows could be numbered, and the test rows kept apart,
    only by guessing."""
    carved = recipe.get("test_source") == "carved"
    needed = []
    if carved:
        needed.append("test_index")
        if split == "val":
            needed.append("val_index")
        if split == "train" and float(recipe.get("val_fraction") or 0) > 0:
            needed.append("val_index")
    elif split != "test" and recipe.get("test_source") == "own" and not recipe.get("sha256"):
        needed.append("sha256")
    missing = [k for k in needed if not recipe.get(k) and not isinstance(recipe.get(k), list)]
    if missing:
        raise DataError(
            f"checkpoint {model} does not record its split ({', '.join(missing)} missing from checkpoint.json "
            "extra.data), so the audited rows cannot be numbered nor its test rows kept apart; retrain it with "
            "ttakit train"
        )


def _absolute_files(dataset: Any, root: Path) -> Any:
    """``dataset`` with its files as absolute paths (image folders store them relative to ``root``)."""
    files = getattr(dataset, "files", None)
    if files is None:
        return dataset
    dataset = dataset.subset(torch.arange(len(dataset)), dataset.name)
    dataset.files = [f if Path(f).is_absolute() else str((root / f).resolve()) for f in files]
    return dataset


def _write_clean_copy(source: Any, removed_rows: list[int], path: str | os.PathLike, *, spec: str,
                      data_dir: str | None, split: str, model: str, test_index: list[int] | None, root: Path,
                      recipe: dict[str, Any] | None) -> tuple[Path, dict[str, Any]]:
    """The data as given, without ``removed_rows`` and with its test split kept whole and apart:
    the recorded (or carved) ``test_index`` rows of ``source``, or the data's own test split."""
    from ..data import load_dataset
    from ..data.splits import dataset_sha256

    base = Path(spec).expanduser()
    source = _absolute_files(source, root)
    if test_index is not None:
        test = source.subset(torch.tensor(test_index, dtype=torch.long), f"{spec}[test]")
        test_source = "carved"
    else:
        if not _has_own_test(spec, data_dir):
            raise DataError(f"--write-clean: {spec} has no test split to keep apart; retrain the checkpoint on it first")
        test = load_dataset(spec, split="test", data_dir=data_dir)
        test_source = "own"
        if (base / "train").is_dir() and (base / "test").is_dir():
            test = _absolute_files(test, base / "test")
    manifest = {
        "format": "ttakit-clean",
        "format_version": 1,
        "source": spec,
        "source_sha256": (recipe or {}).get("sha256") or dataset_sha256(source),
        "checkpoint": model,
        "audited_split": split,
        "removed_rows": sorted(removed_rows),
        "test_source": test_source,
        "test_index": sorted(test_index) if test_index is not None else None,
        "n_test": len(test),
    }
    dropped = sorted(set(removed_rows) | set(test_index or []))
    manifest["n_kept"] = len(source) - len(dropped)
    written = write_clean(source, dropped, path, test=test, manifest=manifest)
    return written, manifest


def _has_own_test(spec: str, data_dir: str | None) -> bool:
    try:
        from ..data.splits import has_own_test_split
    except ImportError:  # pragma: no cover
        return True
    return has_own_test_split(spec, data_dir)
