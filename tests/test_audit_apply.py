"""ttakit audit-apply: the review page's decisions applied to an .npz or an image folder, never
losing a file, refusing decisions that do not fit the data (one line each), idempotent."""

from __future__ import annotations

import csv
import json
import subprocess

import numpy as np
import pytest

from ttakit.cli import main
from ttakit.data import load_dataset
from ttakit.jobs.audit_apply import DecisionsError, apply_decisions, read_decisions


def _npz(tmp_path, n: int = 12):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, 6, 6)).astype(np.uint8)
    y = np.arange(n) % 3
    path = tmp_path / "d.npz"
    np.savez(path, x=x, y=y, classes=np.array(["cat", "dog", "eel"]))
    return path, x, y


def _decisions(tmp_path, rows, name="decisions.csv"):
    path = tmp_path / name
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["row", "file", "given", "decision", "new_label"])
        writer.writerows(rows)
    return path


def test_npz_removed_relabelled_and_manifest(tmp_path) -> None:
    data, x, y = _npz(tmp_path)
    dec = _decisions(tmp_path, [[1, "", "dog", "remove", ""], [4, "", "dog", "relabel", "eel"],
                                [5, "", "eel", "keep", ""], [9, "", "cat", "remove", ""]])
    result = apply_decisions(dec, data, tmp_path / "out")
    assert (result["removed"], result["relabelled"], result["kept_as_is"], result["kept"]) == (2, 1, 1, 10)
    back = load_dataset(tmp_path / "out" / "clean.npz")
    rows = [r for r in range(12) if r not in (1, 9)]
    np.testing.assert_array_equal((back.images[:, 0] * 255).round().numpy().astype(np.uint8), x[rows])
    expected = y[rows].copy()
    expected[rows.index(4)] = 2
    assert back.labels.tolist() == expected.tolist()
    assert back.classes == ["cat", "dog", "eel"]
    changes = list(csv.DictReader(open(tmp_path / "out" / "changes.csv")))
    assert [(c["row"], c["decision"], c["old_label"], c["new_label"], c["new_row"]) for c in changes] == [
        ("1", "remove", "dog", "", ""), ("4", "relabel", "dog", "eel", "3"), ("5", "keep", "eel", "eel", "4"),
        ("9", "remove", "cat", "", "")]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["removed_rows"] == [1, 9] and manifest["relabelled"] == {"4": "eel"}
    # idempotent: the same decisions give the same bytes
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    apply_decisions(dec, data, tmp_path / "out")
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert data.exists()  # the data as given is untouched


def test_npz_own_test_split_is_copied_unchanged(tmp_path) -> None:
    data, x, y = _npz(tmp_path)
    np.savez(data, x=x, y=y, x_test=x[:3], y_test=y[:3], classes=np.array(["cat", "dog", "eel"]))
    apply_decisions(_decisions(tmp_path, [[0, "", "", "remove", ""]]), data, tmp_path / "out")
    test = load_dataset(tmp_path / "out" / "clean.npz", split="test")
    assert test.labels.tolist() == y[:3].tolist() and len(load_dataset(tmp_path / "out" / "clean.npz")) == 11


def test_bad_decisions_are_refused_one_line_each(tmp_path, capsys) -> None:
    data, _, _ = _npz(tmp_path)
    dec = _decisions(tmp_path, [[99, "", "", "remove", ""], [2, "", "", "relabel", "wolf"],
                                [3, "", "dog", "remove", ""], [4, "", "", "remove", ""], [4, "", "", "keep", ""],
                                [5, "a/b.png", "", "remove", ""]])
    with pytest.raises(DecisionsError) as info:
        apply_decisions(dec, data, tmp_path / "out")
    lines = info.value.lines
    assert len(lines) == 5, lines
    assert "row 99 is not in" in lines[0] and "rows 0-11" in lines[0]
    assert "'wolf' is not a class" in lines[1] and "cat, dog, eel" in lines[1]
    assert "labelled 'cat'" in lines[2] and "say 'dog'" in lines[2]  # row 3 is a cat: other data?
    assert "already has decision remove" in lines[3]
    assert "not an image folder" in lines[4]
    assert not (tmp_path / "out" / "clean.npz").exists()  # nothing written
    assert main(["audit-apply", str(dec), "--data", str(data), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 5 and all(line.startswith("ttakit audit-apply: error: line ") for line in err)
    bad = tmp_path / "bad.csv"
    bad.write_text("row,decision\n1,delete\nx,keep\n")
    with pytest.raises(DecisionsError) as info:
        read_decisions(bad)
    assert len(info.value.lines) == 2 and "unknown decision 'delete'" in info.value.lines[0]
    assert main(["audit", "apply", str(tmp_path / "none.csv"), "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


def _folder(tmp_path):
    from PIL import Image

    root = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (5, 5)).astype(np.uint8)).save(root / cls / f"{cls}{i}.png")
    return root


def _tree(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))


def test_folder_list_and_links(tmp_path) -> None:
    root = _folder(tmp_path)
    dec = _decisions(tmp_path, [["", str(root / "cat" / "cat1.png"), "cat", "remove", ""],
                                ["", str(root / "dog" / "dog0.png"), "dog", "relabel", "cat"]])
    apply_decisions(dec, root, tmp_path / "out")
    listed = load_dataset(tmp_path / "out" / "files.txt")
    names = [f.split("/")[-1] for f in listed.files]
    assert "cat1.png" not in names and len(listed) == 5
    assert listed.classes[listed.labels[names.index("dog0.png")]] == "cat"
    apply_decisions(dec, root, tmp_path / "out2", mode="links")
    tree = tmp_path / "out2" / "data"
    assert _tree(tree) == ["cat/cat0.png", "cat/cat2.png", "cat/dog0.png", "dog/dog1.png", "dog/dog2.png"]
    assert (tree / "cat" / "dog0.png").resolve() == (root / "dog" / "dog0.png").resolve()
    apply_decisions(dec, root, tmp_path / "out2", mode="links")  # again: the same tree
    assert _tree(tree) == ["cat/cat0.png", "cat/cat2.png", "cat/dog0.png", "dog/dog1.png", "dog/dog2.png"]
    assert len(_tree(root)) == 6  # the data untouched


def test_folder_quarantine_moves_and_undoes(tmp_path) -> None:
    root = _folder(tmp_path)
    before = {p: (root / p).read_bytes() for p in _tree(root)}
    dec = _decisions(tmp_path, [["", str(root / "cat" / "cat1.png"), "cat", "remove", ""],
                                ["", str(root / "dog" / "dog0.png"), "dog", "relabel", "cat"]])
    out = tmp_path / "out"
    apply_decisions(dec, root, out, mode="quarantine")
    assert _tree(root) == ["cat/cat0.png", "cat/cat2.png", "cat/dog0.png", "dog/dog1.png", "dog/dog2.png"]
    assert _tree(out / "quarantine") == ["cat/cat1.png"]
    undo = (out / "undo.sh").read_text()
    changes = (out / "changes.csv").read_text()
    apply_decisions(dec, root, out, mode="quarantine")  # again: nothing moves, the same outputs
    assert _tree(root) == ["cat/cat0.png", "cat/cat2.png", "cat/dog0.png", "dog/dog1.png", "dog/dog2.png"]
    assert (out / "undo.sh").read_text() == undo and (out / "changes.csv").read_text() == changes
    subprocess.run(["sh", str(out / "undo.sh")], check=True)
    assert {p: (root / p).read_bytes() for p in _tree(root)} == before  # every file back, unchanged
    with pytest.raises(DecisionsError, match="is not an image of"):
        apply_decisions(_decisions(tmp_path, [["", str(root / "cat" / "nope.png"), "", "remove", ""]], "b.csv"),
                        root, out)
