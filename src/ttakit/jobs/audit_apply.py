"""Apply the decisions made on the audit's review page (``decisions.csv``) without losing a file.

``decisions.csv`` has one line per decided image: ``row`` (its row in the data as given, as
``issues.csv`` numbers it) and/or ``file`` (its path, for image folders), optionally ``given``
(the label the page showed, checked against the data), ``decision`` (``keep``, ``relabel``,
``remove``) and ``new_label`` (a class name, for ``relabel``).

* An ``.npz``: a new ``clean.npz`` in the output folder without the removed rows and with the new
  labels (the pixels are copied as stored), plus ``changes.csv`` and ``manifest.json`` listing every
  change. The data's own test split (``x_test``, ``y_test``) is copied unchanged; with ``model``,
  the test rows the checkpoint carved out of the data are kept apart, unchanged, as the new file's
  test split, and a decision that names one is refused.
* An image folder (``root/<class>/<image>``): ``files.txt``, a file list ``ttakit train --data``
  reads (``mode="list"``, the default); a new class-folder tree of symbolic links
  (``mode="links"``); or, ``mode="quarantine"``, the removed files moved into
  ``OUT/quarantine/`` and relabelled ones into their new class folder, with ``undo.sh`` that
  moves every one back. No mode deletes a file.

Every decision is checked before anything is written: rows or files not in the data, labels not
among the classes, unknown decisions and contradicting duplicates are refused, one line each
(:class:`DecisionsError`). Applying the same decisions twice gives the same output (byte for byte:
the ``.npz`` is written with fixed time stamps).
"""

from __future__ import annotations

import csv
import io
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._io import atomic_write, atomic_write_json, atomic_write_text
from ..errors import DataError, DataNotFoundError, InvalidInputError

__all__ = ["DECISIONS", "FOLDER_MODES", "Decision", "DecisionsError", "apply_decisions", "read_decisions"]

DECISIONS = ("keep", "relabel", "remove")
FOLDER_MODES = ("list", "links", "quarantine")
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


class DecisionsError(InvalidInputError):
    """Decisions that do not fit the data; ``lines`` holds one message per bad decision."""

    def __init__(self, lines: list[str]):
        self.lines = list(lines)
        super().__init__("\n".join(self.lines))


@dataclass(frozen=True)
class Decision:
    """One line of ``decisions.csv`` (``line`` is its line number, for messages)."""

    line: int
    row: int | None
    file: str
    given: str
    decision: str
    new_label: str


def read_decisions(path: str | os.PathLike) -> list[Decision]:
    """Parse ``decisions.csv``; a malformed line is refused (all of them, one line each)."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataNotFoundError(f"decisions file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"decisions file {path} cannot be read as UTF-8 text: {exc}") from None
    reader = csv.DictReader(io.StringIO(text))
    columns = [c.strip() for c in reader.fieldnames or []]
    if "decision" not in columns or not ({"row", "file"} & set(columns)):
        raise InvalidInputError(
            f"{path}: expected a CSV with columns row and/or file, decision, new_label (as the review page "
            f"exports), found columns {columns}"
        )
    decisions, problems = [], []
    for number, raw in enumerate(reader, 2):
        record = {str(k).strip(): (v or "").strip() for k, v in raw.items() if k is not None}
        if not any(record.values()):
            continue
        where = f"{path.name}:{number}"
        row: int | None = None
        if record.get("row", ""):
            try:
                row = int(record["row"])
            except ValueError:
                problems.append(f"{where}: row {record['row']!r} is not a row number")
                continue
        decision = record.get("decision", "").lower()
        if decision not in DECISIONS:
            problems.append(f"{where}: unknown decision {record.get('decision', '')!r}; expected one of: "
                            f"{', '.join(DECISIONS)}")
            continue
        new_label = record.get("new_label", "")
        if decision == "relabel" and not new_label:
            problems.append(f"{where}: relabel without a new_label")
            continue
        if row is None and not record.get("file", ""):
            problems.append(f"{where}: names neither a row nor a file")
            continue
        decisions.append(Decision(number, row, record.get("file", ""), record.get("given", ""), decision,
                                  new_label if decision == "relabel" else ""))
    if problems:
        raise DecisionsError(problems)
    return decisions


def _checkpoint_test_rows(model: str | os.PathLike | None, data: str) -> tuple[list[int], str | None]:
    """The rows of ``data`` the checkpoint ``model`` holds out as its test split (carved from it)."""
    if model is None:
        return [], None
    folder = Path(model).expanduser()
    meta_path = folder / "checkpoint.json" if folder.is_dir() else folder.with_name("checkpoint.json")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataNotFoundError(f"--model {model}: no checkpoint.json there (a ttakit checkpoint folder)") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"--model {model}: checkpoint.json cannot be read ({exc})") from None
    recipe = dict((meta.get("extra") or {}).get("data") or {})
    from ..data.splits import _same_spec

    if recipe.get("spec") and not _same_spec(str(data), str(recipe["spec"])):
        raise InvalidInputError(
            f"--model {model} trained on {recipe['spec']}, not on --data {data}; its test rows number other data"
        )
    if recipe.get("test_source") == "carved":
        return sorted(int(i) for i in recipe.get("test_index") or []), str(model)
    return [], str(model)


def _resolve(decisions: list[Decision], n: int, labels: list[int], classes: list[str], files: list[str] | None,
             root: Path | None, protected: set[int], data: str) -> dict[int, Decision]:
    """Decision per row of the data; every problem refused, one line each."""
    by_file: dict[str, int] = {}
    if files is not None and root is not None:
        for i, f in enumerate(files):
            by_file[f] = i
            by_file[str((root / f).resolve())] = i
            by_file[str(root / f)] = i
    problems: list[str] = []
    chosen: dict[int, Decision] = {}
    for d in decisions:
        where = f"line {d.line}"
        row = d.row
        if d.file and files is not None:
            key = d.file if d.file in by_file else str(Path(d.file).expanduser().resolve())
            if key not in by_file:
                problems.append(f"{where}: file {d.file} is not an image of {data}")
                continue
            if row is not None and row != by_file[key]:
                problems.append(f"{where}: row {row} and file {d.file} name different images of {data} "
                                f"(that file is row {by_file[key]})")
                continue
            row = by_file[key]
        if d.file and files is None:
            problems.append(f"{where}: names file {d.file}, but {data} is not an image folder; give rows")
            continue
        if not 0 <= row < n:
            problems.append(f"{where}: row {row} is not in {data} (rows 0-{n - 1})")
            continue
        if row in protected:
            problems.append(f"{where}: row {row} is a held-out test row of the checkpoint; cleaning never touches "
                            "the test rows")
            continue
        if d.given and d.given != classes[labels[row]]:
            problems.append(f"{where}: row {row} is labelled {classes[labels[row]]!r} in {data}, but the decisions "
                            f"say {d.given!r}; were they made on other data?")
            continue
        if d.decision == "relabel" and d.new_label not in classes:
            problems.append(f"{where}: new label {d.new_label!r} is not a class of {data}; expected one of: "
                            f"{', '.join(classes)}")
            continue
        if row in chosen and (chosen[row].decision, chosen[row].new_label) != (d.decision, d.new_label):
            problems.append(f"{where}: row {row} already has decision {chosen[row].decision} "
                            f"(line {chosen[row].line}); one decision per image")
            continue
        chosen.setdefault(row, d)
    if problems:
        raise DecisionsError(problems)
    return chosen


def _changes(chosen: dict[int, Decision], labels: list[int], classes: list[str],
             files: list[str] | None) -> list[dict[str, Any]]:
    out = []
    for row in sorted(chosen):
        d = chosen[row]
        old = classes[labels[row]]
        new = d.new_label if d.decision == "relabel" else ("" if d.decision == "remove" else old)
        out.append({"row": row, "file": files[row] if files is not None else "", "decision": d.decision,
                    "old_label": old, "new_label": new})
    return out


def _changes_csv(changes: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["row", "file", "decision", "old_label", "new_label", "new_row"],
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(changes)
    return buffer.getvalue()


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    """An ``.npz`` that ``np.load`` reads, with fixed time stamps (same arrays, same bytes)."""

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for name, array in arrays.items():
                info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_TIME)
                info.compress_type = zipfile.ZIP_DEFLATED
                buffer = io.BytesIO()
                np.lib.format.write_array(buffer, np.asarray(array), allow_pickle=False)
                archive.writestr(info, buffer.getvalue())

    return atomic_write(path, write)


def _check_out(out: Path, data: Path) -> None:
    if out.exists() and not out.is_dir():
        raise InvalidInputError(f"--out {out} is a file; give a folder for the cleaned data")
    if out.resolve() == data.resolve() or (data.is_dir() and out.resolve().is_relative_to(data.resolve())):
        raise InvalidInputError(f"--out {out} is inside the data {data}; give a folder outside it")


def apply_decisions(
    decisions: str | os.PathLike | list[Decision],
    data: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    model: str | os.PathLike | None = None,
    mode: str = "list",
) -> dict[str, Any]:
    """Apply ``decisions`` (a ``decisions.csv`` path or parsed :class:`Decision` s) to ``data``.

    Args:
        data: the audited data as given: an ``.npz`` or an image folder ``root/<class>/<image>``
            (or ``root/train/<class>/...`` beside ``root/test``; only ``train`` is changed).
        out_dir: the folder for the outputs (created; never the data's own folder).
        model: the audited checkpoint; its carved test rows are kept apart and refused as decisions.
        mode: image folders only, one of :data:`FOLDER_MODES`.

    Returns:
        A summary: ``kept``, ``removed``, ``relabelled``, ``changes`` and the written paths.
    """
    source = Path(data).expanduser()
    out = Path(out_dir).expanduser()
    if mode not in FOLDER_MODES:
        from ..errors import unknown_name

        raise unknown_name("--mode", mode, FOLDER_MODES)
    if not source.exists():
        raise DataNotFoundError(f"--data {data} does not exist")
    _check_out(out, source)
    parsed = decisions if isinstance(decisions, list) else read_decisions(decisions)
    if source.is_dir():
        return _apply_folder(parsed, source, out, mode=mode, model=model)
    if source.suffix.lower() != ".npz":
        raise InvalidInputError(f"--data {data}: expected an .npz file or an image folder with one sub-folder per class")
    return _apply_npz(parsed, source, out, model=model)


def _apply_npz(decisions: list[Decision], source: Path, out: Path, *, model: Any) -> dict[str, Any]:
    try:
        with np.load(source, allow_pickle=False) as archive:
            stored = {k: archive[k] for k in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"--data {source}: not a readable .npz archive ({exc})") from None
    if "x" not in stored or "y" not in stored:
        raise DataError(f"--data {source}: expected arrays 'x' and 'y', found {sorted(stored)}")
    x, y = stored["x"], np.asarray(stored["y"]).astype(np.int64).reshape(-1)
    n = len(y)
    classes = ([str(c) for c in stored["classes"].tolist()] if "classes" in stored
               else [str(i) for i in range(int(y.max()) + 1)])
    test_rows, model_name = _checkpoint_test_rows(model, str(source))
    bad = [r for r in test_rows if not 0 <= r < n]
    if bad:
        raise InvalidInputError(f"--model {model}: its test rows (such as {bad[0]}) are not rows of {source}")
    chosen = _resolve(decisions, n, y.tolist(), classes, None, None, set(test_rows), str(source))
    changes = _changes(chosen, y.tolist(), classes, None)
    new_y = y.copy()
    keep = np.ones(n, dtype=bool)
    for row, d in chosen.items():
        if d.decision == "remove":
            keep[row] = False
        elif d.decision == "relabel":
            new_y[row] = classes.index(d.new_label)
    held = np.zeros(n, dtype=bool)
    held[test_rows] = True
    kept_rows = np.nonzero(keep & ~held)[0]
    new_row = {int(r): k for k, r in enumerate(kept_rows)}
    for change in changes:
        change["new_row"] = new_row.get(change["row"], "")
    result: dict[str, np.ndarray] = {"x": x[kept_rows], "y": new_y[kept_rows].astype(stored["y"].dtype),
                                     "classes": np.array(classes)}
    if test_rows:
        if "x_test" in stored:
            raise DataError(f"--data {source} has its own test split, yet --model {model} carved test rows from it")
        result["x_test"], result["y_test"] = x[test_rows], y[test_rows].astype(stored["y"].dtype)
    for key in ("x_test", "y_test"):
        if key in stored:
            result[key] = stored[key]
    manifest = {
        "format": "ttakit-apply",
        "format_version": 1,
        "source": str(source),
        "checkpoint": model_name,
        "n_source": n,
        "n_kept": int(len(kept_rows)),
        "removed_rows": sorted(r for r, d in chosen.items() if d.decision == "remove"),
        "relabelled": {str(r): d.new_label for r, d in sorted(chosen.items()) if d.decision == "relabel"},
        "kept_rows": [int(r) for r in kept_rows],
        "test_index": test_rows or None,
        "n_test": int(len(result["y_test"])) if "y_test" in result else 0,
    }
    result["manifest"] = np.array(json.dumps(manifest, sort_keys=True))
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "clean": _write_npz(out / "clean.npz", result),
        "changes": atomic_write_text(out / "changes.csv", _changes_csv(changes)),
        "manifest": atomic_write_json(out / "manifest.json", {**manifest, "changes": changes}),
    }
    return _summary(chosen, changes, paths, manifest["n_kept"], manifest["n_test"])


def _summary(chosen: dict[int, Decision], changes: list[dict[str, Any]], paths: dict[str, Path], kept: int,
             n_test: int) -> dict[str, Any]:
    return {
        "kept": kept,
        "removed": sum(d.decision == "remove" for d in chosen.values()),
        "relabelled": sum(d.decision == "relabel" for d in chosen.values()),
        "kept_as_is": sum(d.decision == "keep" for d in chosen.values()),
        "n_test": n_test,
        "changes": changes,
        "paths": {k: str(v) for k, v in paths.items()},
    }


# --------------------------------------------------------------------------- image folders


def _folder_files(root: Path) -> tuple[list[str], list[int], list[str]]:
    """``(files relative to root, labels, classes)`` in the order ``load_image_folder`` numbers rows."""
    from ..data.image_folder import list_image_files

    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"--data {root}: no class sub-folders; expected {root}/<class name>/<image>")
    files, labels = [], []
    for index, name in enumerate(classes):
        for p in list_image_files(root / name):
            files.append(p.relative_to(root).as_posix())
            labels.append(index)
    return files, labels, classes


def _apply_folder(decisions: list[Decision], source: Path, out: Path, *, mode: str, model: Any) -> dict[str, Any]:
    root = source / "train" if (source / "train").is_dir() and (source / "test").is_dir() else source
    quarantine = out / "quarantine"
    files, labels, classes = _folder_files(root)
    moved_back, moved_to = _already_moved(decisions, root, quarantine) if mode == "quarantine" else ({}, set())
    keep_idx = [i for i, f in enumerate(files) if f not in moved_to]
    files, labels = [files[i] for i in keep_idx], [labels[i] for i in keep_idx]
    files_now = set(files)
    for rel, label in moved_back.items():  # applied before: count them as the data they were
        if rel not in files_now:
            files.append(rel)
            labels.append(label)
    order = sorted(range(len(files)), key=lambda i: (labels[i], files[i]))
    files = [files[i] for i in order]
    labels = [labels[i] for i in order]
    test_rows, model_name = _checkpoint_test_rows(model, str(source))
    chosen = _resolve(decisions, len(files), labels, classes, files, root, set(test_rows), str(source))
    changes = _changes(chosen, labels, classes, files)
    for change in changes:
        change["new_row"] = ""
    out.mkdir(parents=True, exist_ok=True)
    new_label = {row: (classes.index(d.new_label) if d.decision == "relabel" else labels[row])
                 for row, d in chosen.items()}
    removed = {row for row, d in chosen.items() if d.decision == "remove"}
    paths: dict[str, Path] = {}
    held = set(test_rows)
    if mode == "list":
        lines = ["# ttakit file list: image path <TAB> class name [<TAB> test]; read by ttakit train --data FILE"]
        for i, f in enumerate(files):
            if i in removed:
                continue
            mark = "\ttest" if i in held else ""
            lines.append(f"{(root / f).resolve()}\t{classes[new_label.get(i, labels[i])]}{mark}")
        if root != source:
            test_files, test_labels, test_classes = _folder_files(source / "test")
            for f, label in zip(test_files, test_labels, strict=True):
                lines.append(f"{(source / 'test' / f).resolve()}\t{test_classes[label]}\ttest")
        paths["files"] = atomic_write_text(out / "files.txt", "\n".join(lines) + "\n")
    elif mode == "links":
        paths["links"] = _write_links(out / "data", root, files, labels, classes, new_label, removed, held)
    else:
        paths["undo"] = _quarantine(root, quarantine, out, files, labels, classes, chosen)
    paths["changes"] = atomic_write_text(out / "changes.csv", _changes_csv(changes))
    manifest = {
        "format": "ttakit-apply", "format_version": 1, "source": str(source), "checkpoint": model_name,
        "mode": mode, "n_source": len(files), "n_kept": len(files) - len(removed) - len(held - removed),
        "removed": sorted(files[r] for r in removed), "test_index": test_rows or None,
        "relabelled": {files[r]: d.new_label for r, d in sorted(chosen.items()) if d.decision == "relabel"},
    }
    paths["manifest"] = atomic_write_json(out / "manifest.json", {**manifest, "changes": changes})
    return _summary(chosen, changes, paths, manifest["n_kept"], len(held))


def _link_name(folder: Path, name: str, origin: str) -> Path:
    target = folder / name
    return target if not target.exists() and not target.is_symlink() else folder / f"{origin}-{name}"


def _write_links(tree: Path, root: Path, files: list[str], labels: list[int], classes: list[str],
                 new_label: dict[int, int], removed: set[int], held: set[int]) -> Path:
    """``tree/<class>/<name>`` -> the image, for every kept image; ``tree/test/...`` for held rows."""
    import secrets
    import shutil

    building = tree.with_name(f".{tree.name}.{secrets.token_hex(6)}.tmp")
    for i, f in enumerate(files):
        if i in removed:
            continue
        cls = classes[new_label.get(i, labels[i])]
        folder = building / ("test" if i in held else "train") / cls if held else building / cls
        folder.mkdir(parents=True, exist_ok=True)
        link = _link_name(folder, Path(f).name, classes[labels[i]])
        link.symlink_to((root / f).resolve())
    building.mkdir(parents=True, exist_ok=True)
    if tree.exists():
        # replace only a tree of links this function wrote (never a user's files)
        entries = list(tree.rglob("*"))
        if any(not (p.is_symlink() or p.is_dir()) for p in entries):
            shutil.rmtree(building)
            raise InvalidInputError(f"--out: {tree} exists and holds files that are not links; choose another --out")
        old = tree.with_name(f".{tree.name}.{secrets.token_hex(6)}.old")
        os.replace(tree, old)
        os.replace(building, tree)
        shutil.rmtree(old)  # only links and folders, checked above
    else:
        os.replace(building, tree)
    return tree


def _already_moved(decisions: list[Decision], root: Path, quarantine: Path) -> tuple[dict[str, int], set[str]]:
    """Files a previous apply moved (to the quarantine or another class folder): ``(relative path ->
    label, the relative paths they were moved to inside root)``."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    back: dict[str, int] = {}
    moved_to: set[str] = set()
    for d in decisions:
        if not d.file:
            continue
        path = Path(d.file).expanduser()
        try:
            rel = path.resolve().relative_to(root.resolve()).as_posix() if path.is_absolute() else path.as_posix()
        except ValueError:
            continue
        cls = rel.split("/", 1)[0]
        if (root / rel).exists() or cls not in classes:
            continue
        if d.decision == "remove" and (quarantine / rel).exists():
            back[rel] = classes.index(cls)
        elif d.decision == "relabel" and d.new_label in classes and (root / d.new_label / Path(rel).name).exists():
            back[rel] = classes.index(cls)
            moved_to.add(f"{d.new_label}/{Path(rel).name}")
    return back, moved_to


def _quarantine(root: Path, quarantine: Path, out: Path, files: list[str], labels: list[int], classes: list[str],
                chosen: dict[int, Decision]) -> Path:
    """Move removed files into ``quarantine`` and relabelled ones into their new class folder; write
    ``undo.sh`` that moves them all back. Files already moved (a second apply) stay where they are."""
    import shlex

    moves: list[tuple[Path, Path]] = []
    for row, d in sorted(chosen.items()):
        src = root / files[row]
        if d.decision == "remove":
            dst = quarantine / files[row]
        elif d.decision == "relabel":
            dst = root / d.new_label / Path(files[row]).name
        else:
            continue
        moves.append((src, dst))
    problems = [f"{dst} exists already and {src} too; move one of them aside first"
                for src, dst in moves if src.exists() and (dst.exists() or dst.is_symlink())]
    if problems:
        raise DecisionsError(problems)
    for src, dst in moves:
        if src.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
    lines = ["#!/bin/sh", "# Undo ttakit audit-apply --mode quarantine: move every file back where it was.", "set -e"]
    for src, dst in moves:
        lines.append(f"mkdir -p {shlex.quote(str(src.parent.resolve()))}")
        lines.append(f"mv -n {shlex.quote(str(dst.resolve()))} {shlex.quote(str(src.parent.resolve()) + '/')}")
    undo = atomic_write_text(out / "undo.sh", "\n".join(lines) + "\n")
    undo.chmod(0o755)
    return undo
