"""Tests for ttakit.audit: the practitioner's rule by hand, confident learning equal to
cleanlab's own call, folds, the written outputs (issues.csv, contact sheet, cleaned data the
loaders read back), and bad input."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
import torch

from ttakit.audit import (
    Issue,
    _load_audit_data,
    check_folds,
    contact_sheet,
    flag_issues,
    fold_assignment,
    issues_to_csv,
    rows_to_remove,
    write_clean,
)
from ttakit.data import ImageDataset, load_dataset
from ttakit.errors import InvalidInputError, UnknownNameError


def noisy_probs(n: int = 600, c: int = 4, noise: float = 0.1, seed: int = 0):
    """Confident, mostly right probabilities; ``noise`` of the labels flipped to another class."""
    g = torch.Generator().manual_seed(seed)
    true = torch.randint(0, c, (n,), generator=g)
    logits = torch.randn(n, c, generator=g) + 4.0 * torch.nn.functional.one_hot(true, c)
    probs = torch.softmax(logits, 1)
    labels = true.clone()
    flipped = torch.randperm(n, generator=g)[: int(noise * n)]
    labels[flipped] = (labels[flipped] + torch.randint(1, c, (len(flipped),), generator=g)) % c
    return probs, labels, flipped


def test_rule_by_hand() -> None:
    probs = torch.tensor(
        [
            [0.95, 0.03, 0.02],  # label 1: mislabelled, suggest 0 (p 0.95)
            [0.55, 0.40, 0.05],  # label 0: ambiguous, other likely class 1
            [0.02, 0.90, 0.08],  # label 2: p = 0.90 is not above 0.9 -> not flagged
            [0.58, 0.02, 0.40],  # label 2: ambiguous (top 0.58 is another class) -> suggest 0
            [0.97, 0.02, 0.01],  # label 0: fine
            [0.01, 0.99, 0.00],  # label 2: mislabelled, suggest 1 (p 0.99), ranked first
            [0.60, 0.40, 0.00],  # label 0: top 0.60 is inside [0.5, 0.6]
        ]
    )
    labels = torch.tensor([1, 0, 2, 2, 0, 2, 0])
    issues = flag_issues(probs, labels, methods=("rule",))
    mis = [(i.row, i.suggested, i.rank) for i in issues if i.kind == "mislabelled"]
    amb = [(i.row, i.suggested, i.rank) for i in issues if i.kind == "ambiguous"]
    assert mis == [(5, 1, 1), (0, 0, 2)]
    # Ambiguous ranked by the margin of the top two: row 3 (0.18), row 6 (0.20), row 1 (0.15) -> 1, 3, 6
    assert amb == [(1, 1, 1), (3, 0, 2), (6, 1, 3)]
    assert issues[0].probability == pytest.approx(0.99)
    # Other thresholds move the flags.
    assert {i.row for i in flag_issues(probs, labels, methods=("rule",), mislabel_threshold=0.85)
            if i.kind == "mislabelled"} == {0, 2, 5}  # row 2: class 1 at 0.90 > 0.85
    narrow = flag_issues(probs, labels, methods=("rule",), ambiguous_range=(0.5, 0.56))
    assert [i.row for i in narrow if i.kind == "ambiguous"] == [1]


def test_cleanlab_is_called_not_rewritten() -> None:
    from cleanlab.filter import find_label_issues

    probs, labels, flipped = noisy_probs()
    issues = flag_issues(probs, labels, methods=("cleanlab",))
    expected = find_label_issues(
        labels.numpy(), probs.double().numpy() / probs.double().numpy().sum(1, keepdims=True),
        return_indices_ranked_by="self_confidence", n_jobs=1,
    )
    assert [i.row for i in issues] == expected.tolist()
    assert [i.rank for i in issues] == list(range(1, len(issues) + 1))
    assert all(i.suggested != i.given and i.kind == "mislabelled" for i in issues)
    # On this easy synthetic noise both methods find most flips with few false alarms.
    flips = set(flipped.tolist())
    for method in ("cleanlab", "rule"):
        found = {i.row for i in flag_issues(probs, labels, methods=(method,)) if i.kind == "mislabelled"}
        assert len(found & flips) / len(flips) > 0.6, method
        assert len(found & flips) / len(found) > 0.9, method


def test_flag_issues_bad_arguments() -> None:
    probs, labels, _ = noisy_probs(20)
    with pytest.raises(UnknownNameError, match="cleanlab, rule"):
        flag_issues(probs, labels, methods=("vibes",))
    with pytest.raises(InvalidInputError, match="mislabel-threshold"):
        flag_issues(probs, labels, mislabel_threshold=1.5)
    with pytest.raises(InvalidInputError, match="ambiguous-range"):
        flag_issues(probs, labels, ambiguous_range=(0.6, 0.5))
    with pytest.raises(InvalidInputError, match="at least two classes"):
        flag_issues(probs, torch.zeros(20, dtype=torch.long), methods=("cleanlab",))


@pytest.mark.parametrize("folds", [1, 0, -3, True, 2.5])
def test_folds_below_two_are_refused(folds) -> None:
    with pytest.raises(InvalidInputError, match="--folds must be an integer of at least 2"):
        check_folds(folds)


def test_fold_assignment_is_stratified_and_seeded() -> None:
    labels = torch.arange(100) % 4
    folds = fold_assignment(labels, 5, seed=0)
    assert torch.equal(folds, fold_assignment(labels, 5, seed=0))
    assert not torch.equal(folds, fold_assignment(labels, 5, seed=1))
    for k in range(5):
        held = labels[folds == k]
        assert len(held) == 20
        assert torch.bincount(held, minlength=4).tolist() == [5, 5, 5, 5]


def dataset(n: int = 12, channels: int = 1) -> ImageDataset:
    g = torch.Generator().manual_seed(0)
    images = (torch.randint(0, 256, (n, channels, 6, 6), generator=g).float() / 255)
    return ImageDataset(images, torch.arange(n) % 3, ["cat", "dog", "eel"], name="toy")


def test_issues_csv_columns_and_rows() -> None:
    issues = [Issue(2, 0, 1, 0.97, "mislabelled", "rule", 1), Issue(5, 2, 0, 0.55, "ambiguous", "rule", 1)]
    text = issues_to_csv(issues, ["cat", "dog", "eel"], rows=[10, 11, 12, 13, 14, 15])
    rows = list(csv.DictReader(io.StringIO(text)))
    assert list(rows[0]) == ["rank", "row", "file", "given", "suggested", "probability", "kind", "method"]
    assert rows[0] == {"rank": "1", "row": "12", "file": "", "given": "cat", "suggested": "dog",
                       "probability": "0.9700", "kind": "mislabelled", "method": "rule"}
    assert rows[1]["row"] == "15" and rows[1]["kind"] == "ambiguous"
    with_files = issues_to_csv(issues[:1], ["cat", "dog", "eel"], files=[f"f{i}.png" for i in range(6)])
    assert "f2.png" in with_files


def test_rows_to_remove() -> None:
    issues = [
        Issue(2, 0, 1, 0.97, "mislabelled", "rule", 1),
        Issue(2, 0, 1, 0.97, "mislabelled", "cleanlab", 1),
        Issue(7, 1, 0, 0.8, "mislabelled", "cleanlab", 2),
        Issue(5, 2, 0, 0.55, "ambiguous", "rule", 1),
    ]
    assert rows_to_remove(issues) == [2, 5, 7]
    assert rows_to_remove(issues, "mislabelled") == [2, 7]
    assert rows_to_remove(issues, "rule") == [2, 5]
    assert rows_to_remove(issues, "cleanlab") == [2, 7]
    with pytest.raises(UnknownNameError):
        rows_to_remove(issues, "some")


def test_write_clean_npz_round_trips_through_the_loader(tmp_path) -> None:
    ds = dataset()
    path = write_clean(ds, [0, 4, 5], tmp_path / "clean.npz")
    back = load_dataset(path)
    keep = [i for i in range(12) if i not in (0, 4, 5)]
    assert len(back) == 9 and back.classes == ["cat", "dog", "eel"]
    torch.testing.assert_close(back.images, ds.images[keep])
    assert back.labels.tolist() == ds.labels[keep].tolist()
    rgb = ImageDataset(torch.rand(4, 3, 5, 5), torch.tensor([0, 1, 0, 1]), ["a", "b"])
    back = load_dataset(write_clean(rgb, [1], tmp_path / "rgb.npz"))
    torch.testing.assert_close(back.images, rgb.images[[0, 2, 3]])  # float pixels kept as float
    with pytest.raises(InvalidInputError, match="every image was flagged"):
        write_clean(rgb, [0, 1, 2, 3], tmp_path / "none.npz")
    with pytest.raises(InvalidInputError, match=r"\.npz"):
        write_clean(rgb, [1], tmp_path / "clean.csv")


def test_write_clean_file_list_for_folders_round_trips(tmp_path) -> None:
    from PIL import Image

    root = tmp_path / "photos"
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((6, 6), 40 * i + (100 if cls == "dog" else 0), np.uint8)).save(root / cls / f"{i}.png")
    ds = load_dataset(root)
    assert ds.files is not None
    path = write_clean(ds, [1, 4], tmp_path / "clean.txt", root=str(root))
    back = load_dataset(path)
    keep = [0, 2, 3, 5]
    assert len(back) == 4 and back.classes == ["cat", "dog"]
    assert back.labels.tolist() == ds.labels[keep].tolist()
    torch.testing.assert_close(back.images, ds.images[keep])
    with pytest.raises(InvalidInputError, match=r"\.txt"):
        write_clean(ds, [1], tmp_path / "clean.npz", root=str(root))


def test_split_without_labels_is_refused(tmp_path) -> None:
    np.savez(tmp_path / "unlabelled.npz", x=np.zeros((4, 6, 6), np.uint8))
    with pytest.raises(InvalidInputError, match="audit needs labelled images"):
        _load_audit_data(str(tmp_path / "unlabelled.npz"), "train", None)
    flat = tmp_path / "flat"
    flat.mkdir()
    from PIL import Image

    Image.fromarray(np.zeros((6, 6), np.uint8)).save(flat / "a.png")
    with pytest.raises(InvalidInputError, match="audit needs labelled images"):
        _load_audit_data(str(flat), "train", None)


def test_contact_sheet_png(tmp_path) -> None:
    ds = dataset(12)
    issues = [Issue(i, i % 3, (i + 1) % 3, 0.95, "mislabelled" if i < 6 else "ambiguous", "rule", i + 1)
              for i in range(10)]
    path = contact_sheet(ds.images, issues, ds.classes, tmp_path / "sheet.png", max_images=8, columns=4)
    from PIL import Image

    with Image.open(path) as image:
        width, height = image.size
    assert width > 300 and height > 300
    assert contact_sheet(ds.images, [], ds.classes, tmp_path / "none.png") is None


# --------------------------------------------------------------------------- the command (slow)


@pytest.mark.slow
def test_audit_command_end_to_end(tmp_path, capsys) -> None:
    from ttakit.cli import main
    from ttakit.data import load_fashion_mnist

    ds = load_fashion_mnist("train")
    n = 1200
    x = (ds.images[:n, 0] * 255).round().to(torch.uint8).numpy()
    y = ds.labels[:n].numpy().copy()
    rng = np.random.default_rng(0)
    flipped = rng.choice(n, 60, replace=False)
    y[flipped] = (y[flipped] + rng.integers(1, 10, 60)) % 10
    data = tmp_path / "noisy.npz"
    np.savez(data, x=x, y=y, classes=np.array(ds.classes))
    assert main(["--no-progress", "train", "--data", str(data), "--epochs", "1", "--augment", "flip",
                 "--out", str(tmp_path / "cnn")]) == 0
    capsys.readouterr()
    out = tmp_path / "audit"
    clean = tmp_path / "clean.npz"
    code = main(["--no-progress", "audit", str(tmp_path / "cnn"), "--folds", "2", "--epochs", "1",
                 "--out", str(out), "--write-clean", str(clean)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "2-fold cross-validation" in printed
    rows = list(csv.DictReader(open(out / "issues.csv")))
    assert rows and set(rows[0]) == {"rank", "row", "file", "given", "suggested", "probability", "kind", "method"}
    assert {r["method"] for r in rows} == {"rule", "cleanlab"}
    # Rows are rows of the file: given labels match the file's labels.
    for r in rows[:50]:
        assert r["given"] == ds.classes[y[int(r["row"])]]
    # Even these weak fold models (600 images, 1 epoch) find most flips, at several times the
    # precision of chance (5%).
    cl = {int(r["row"]) for r in rows if r["method"] == "cleanlab"}
    found = cl & set(flipped.tolist())
    assert len(found) / 60 > 0.5
    assert len(found) / len(cl) > 0.1
    assert (out / "contact_sheet.png").stat().st_size > 10_000
    back = load_dataset(clean)
    removed = len({int(r["row"]) for r in rows})
    assert len(back) == n - removed
    assert main(["--no-progress", "train", "--data", str(clean), "--epochs", "1", "--out", str(tmp_path / "re")]) == 0
    capsys.readouterr()
    # Bad input: one line, exit 2.
    with pytest.raises(SystemExit) as exit_info:
        main(["audit", str(tmp_path / "cnn"), "--folds", "1"])
    assert exit_info.value.code == 2
    assert "--folds" in capsys.readouterr().err
    np.savez(tmp_path / "unlabelled.npz", x=x[:20])
    assert main(["--no-progress", "audit", str(tmp_path / "cnn"), "--data", str(tmp_path / "unlabelled.npz"),
                 "--folds", "2", "--out", str(tmp_path / "a2")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "audit needs labelled images" in err
    # Without --folds the model may not audit the images it trained on.
    assert main(["--no-progress", "audit", str(tmp_path / "cnn"), "--out", str(tmp_path / "a3")]) == 2
    assert "--folds" in capsys.readouterr().err


def test_rule_by_probability_of_the_other_classes() -> None:
    probs = torch.tensor(
        [
            [0.60, 0.35, 0.05],  # label 2: top 0.60 (not > 0.9) but p(label) = 0.05: 1 - 0.05 = 0.95 > 0.9
            [0.95, 0.03, 0.02],  # label 1: flagged either way
            [0.50, 0.40, 0.10],  # label 2: 1 - 0.10 = 0.90 is not above 0.9
            [0.05, 0.02, 0.93],  # label 2: its own class, never flagged
        ]
    )
    labels = torch.tensor([2, 1, 2, 2])
    top = [i.row for i in flag_issues(probs, labels, methods=("rule",)) if i.kind == "mislabelled"]
    others = [(i.row, i.suggested) for i in flag_issues(probs, labels, methods=("rule",), mislabel_by="others")
              if i.kind == "mislabelled"]
    assert top == [1]
    assert others == [(1, 0), (0, 0)]  # ranked by 1 - p(label): 0.97, 0.95
    with pytest.raises(UnknownNameError, match="others, top"):
        flag_issues(probs, labels, mislabel_by="label")
