"""Tests for ttakit.audit: the practitioner's rule by hand, confident learning equal to
cleanlab's own call, folds, the written outputs (issues.csv, contact sheet, cleaned data the
loaders read back), and bad input."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
import torch

from ttakit.data import ImageDataset, load_dataset
from ttakit.errors import InvalidInputError, UnknownNameError
from ttakit.jobs._audit_data import _load_audit_data, write_clean
from ttakit.label_issues import Issue, check_folds, flag_issues, fold_assignment, rows_to_remove
from ttakit.report.audit_md import contact_sheet, issues_to_csv


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
            [0.02, 0.90, 0.08],  # label 2: p(top) = 0.90 is not above 0.9 -> not flagged by "top"
            [0.58, 0.02, 0.40],  # label 2: ambiguous (top 0.58 is another class) -> suggest 0
            [0.97, 0.02, 0.01],  # label 0: fine
            [0.01, 0.99, 0.00],  # label 2: mislabelled, suggest 1 (p 0.99), ranked first
            [0.60, 0.40, 0.00],  # label 0: top 0.60 is inside [0.5, 0.6]
        ]
    )
    labels = torch.tensor([1, 0, 2, 2, 0, 2, 0])
    issues = flag_issues(probs, labels, methods=("rule",), mislabel_by="top")
    mis = [(i.row, i.suggested, i.rank) for i in issues if i.kind == "mislabelled"]
    amb = [(i.row, i.suggested, i.rank) for i in issues if i.kind == "ambiguous"]
    assert mis == [(5, 1, 1), (0, 0, 2)]
    # Ambiguous ranked by the margin of the top two: row 3 (0.18), row 6 (0.20), row 1 (0.15) -> 1, 3, 6
    assert amb == [(1, 1, 1), (3, 0, 2), (6, 1, 3)]
    assert issues[0].probability == pytest.approx(0.99)
    # Other thresholds move the flags.
    assert {i.row for i in flag_issues(probs, labels, methods=("rule",), mislabel_threshold=0.85, mislabel_by="top")
            if i.kind == "mislabelled"} == {0, 2, 5}  # row 2: class 1 at 0.90 > 0.85
    narrow = flag_issues(probs, labels, methods=("rule",), ambiguous_range=(0.5, 0.56), mislabel_by="top")
    assert [i.row for i in narrow if i.kind == "ambiguous"] == [1]
    # The default rule, on 1 - p(label), also flags row 2: 1 - 0.08 = 0.92 > 0.9 (ranked by it)
    default = flag_issues(probs, labels, methods=("rule",))
    assert [(i.row, i.rank) for i in default if i.kind == "mislabelled"] == [(5, 1), (0, 2), (2, 3)]


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
    assert list(rows[0]) == ["rank", "row", "file", "given", "suggested", "probability", "probability_of",
                             "p_suggested", "p_given", "kind", "method", "views"]
    # an Issue made without the judged probability: the column says it is p(suggested)
    assert rows[0] == {"rank": "1", "row": "12", "file": "", "given": "cat", "suggested": "dog",
                       "probability": "0.9700", "probability_of": "p(suggested)", "p_suggested": "0.9700",
                       "p_given": "", "kind": "mislabelled", "method": "rule", "views": ""}
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
    assert rows_to_remove(issues, "all") == [2, 5, 7]
    assert rows_to_remove(issues) == rows_to_remove(issues, "mislabelled") == [2, 7]  # the default
    # disputed: also ambiguous rows whose label is not the model's top class
    disputed = [*issues, Issue(9, 1, 0, 0.55, "ambiguous", "rule", 2, 0.55, "p(top)", 0.45, 0)]
    assert rows_to_remove(disputed, "disputed") == [2, 7, 9]
    assert rows_to_remove(disputed, "all") == [2, 5, 7, 9]
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
                 "--out", str(out), "--write-clean", str(clean), "--remove", "all", "--force"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "2-fold cross-validation" in printed
    rows = list(csv.DictReader(open(out / "issues.csv")))
    assert rows and set(rows[0]) == {"rank", "row", "file", "given", "suggested", "probability", "probability_of",
                                     "p_suggested", "p_given", "kind", "method", "views"}
    # trained with flips: train-aug has two views (identity, hflip); their votes where they disagree
    voted = [r["views"] for r in rows if r["views"]]
    assert voted and all(v.startswith("identity=") and "; hflip=" in v for v in voted)
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
    removed = {int(r["row"]) for r in rows}
    import json

    test_rows = set(json.loads((tmp_path / "cnn" / "checkpoint.json").read_text())["extra"]["data"]["test_index"])
    assert not removed & test_rows  # the held-out test rows are never audited nor removed
    assert len(back) == n - len(test_rows) - len(removed)
    assert len(load_dataset(clean, split="test")) == len(test_rows)  # kept apart as its own test split
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
    # Without --folds the images it trained on are audited by 5-fold cross-validation (test_audit_cli.py).


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
    top = [i.row for i in flag_issues(probs, labels, methods=("rule",), mislabel_by="top") if i.kind == "mislabelled"]
    others = [(i.row, i.suggested) for i in flag_issues(probs, labels, methods=("rule",), mislabel_by="others")
              if i.kind == "mislabelled"]
    assert top == [1]
    assert others == [(1, 0), (0, 0)]  # ranked by 1 - p(label): 0.97, 0.95
    # the default is the rule benchmarks/audit.py measures best: 1 - p(label)
    default = flag_issues(probs, labels, methods=("rule",))
    assert [(i.row, i.suggested) for i in default if i.kind == "mislabelled"] == others
    with pytest.raises(UnknownNameError, match="others, top"):
        flag_issues(probs, labels, mislabel_by="label")


# --------------------------------------------------------------------------- held-out rows (issue "sound answers")


def _noisy_data(tmp_path, kind: str, n: int = 48):
    """``n`` 12x12 images of 3 classes; rows ``i`` and ``i + n/2`` are identical (pixels and
    label), so a row can only be numbered from the recorded split, never by matching pixels."""
    rng = np.random.default_rng(0)
    half = rng.integers(0, 256, (n // 2, 12, 12)).astype(np.uint8)
    x = np.concatenate([half, half])
    y = np.concatenate([np.arange(n // 2) % 3, np.arange(n // 2) % 3])
    if kind == "npz":
        np.savez(tmp_path / "d.npz", x=x, y=y, classes=np.array(["a", "b", "c"]))
        return str(tmp_path / "d.npz"), x, y
    from PIL import Image

    root = tmp_path / "photos"
    for i in range(n):
        (root / "abc"[y[i]]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i]).save(root / "abc"[y[i]] / f"{i:03d}.png")
    return str(root), x, y


def _train_tiny(tmp_path, data: str):
    from ttakit.jobs.train import train_run
    from ttakit.training.config import TrainConfig

    config = TrainConfig(epochs=1, batch_size=16)
    return train_run(data, out_dir=tmp_path / "cnn", config=config, val_fraction=0.2, test_fraction=0.25,
                     progress=False)


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("kind", ["npz", "folder"])
def test_write_clean_keeps_the_checkpoints_test_rows_untouched_and_recorded(tmp_path, kind) -> None:
    from ttakit.data import has_own_test_split, load_split, make_splits
    from ttakit.jobs.audit import audit_checkpoint

    data, x, y = _noisy_data(tmp_path, kind)
    recipe = _train_tiny(tmp_path, data).meta.extra["data"]
    test_rows = set(recipe["test_index"])
    clean = tmp_path / ("clean.npz" if kind == "npz" else "clean.txt")
    result = audit_checkpoint(str(tmp_path / "cnn"), folds=2, epochs=1, methods=("rule",), mislabel_threshold=0.0,
                              ambiguous_range=(0.0, 1.0), out_dir=tmp_path / "audit", write_clean_to=clean,
                              remove="all", force=True, progress=False)
    rows = [int(r["row"]) for r in csv.DictReader(open(tmp_path / "audit" / "issues.csv"))]
    # every training row is flagged (threshold 0, range 0-1), and no test row is audited
    train_rows = set(load_split_rows(recipe, "train"))
    assert set(rows) == train_rows and not set(rows) & test_rows
    # the cleaned data keeps exactly the checkpoint's test images as its own test split
    assert has_own_test_split(str(clean))
    kept_test = load_dataset(str(clean), split="test")
    held = load_split(recipe, "test")
    torch.testing.assert_close(kept_test.images, held.images)
    assert kept_test.labels.tolist() == held.labels.tolist()
    # a model retrained on it is scored on those same images
    retrain = make_splits(str(clean), test_fraction=0.25, val_fraction=0.0)
    assert retrain.recipe["test_source"] == "own"
    torch.testing.assert_close(load_split(retrain.recipe, "test").images, held.images)
    # the rest: every non-test row of the data except the removed ones, in order
    rest = load_dataset(str(clean), split="train")
    given = load_dataset(data)  # the rows issues.csv numbers (a folder: sorted by class, then file)
    expected = [i for i in range(len(given)) if i not in test_rows and i not in set(rows)]
    assert rest.labels.tolist() == given.labels[expected].tolist()
    torch.testing.assert_close(rest.images, given.images[expected])
    # recorded: the manifest names the source, its test rows and the rows removed
    manifest = result["clean_manifest"]
    assert manifest["test_index"] == sorted(test_rows) and manifest["removed_rows"] == sorted(rows)
    assert manifest["source"] == data and manifest["format"] == "ttakit-clean"
    assert _stored_manifest(clean) == manifest


def load_split_rows(recipe, split):
    from ttakit.data.splits import split_rows

    return split_rows(recipe, split)[1].tolist()


def _stored_manifest(path):
    import json

    if str(path).endswith(".npz"):
        with np.load(path, allow_pickle=False) as archive:
            return json.loads(str(archive["manifest"]))
    line = next(line for line in open(path) if line.startswith("# ttakit-clean "))
    return json.loads(line[len("# ttakit-clean "):])


@pytest.mark.usefixtures("single_thread")
def test_issue_rows_come_from_the_recorded_split_and_are_refused_without_it(tmp_path, capsys) -> None:
    import json

    from ttakit.cli import main
    from ttakit.jobs.audit import audit_checkpoint

    data, x, y = _noisy_data(tmp_path, "npz")
    recipe = _train_tiny(tmp_path, data).meta.extra["data"]
    # --split val without folds: the model never trained on these rows; duplicates of training
    # rows must keep their own row numbers (the recorded val rows), not the first look-alike
    audit_checkpoint(str(tmp_path / "cnn"), split="val", methods=("rule",), mislabel_threshold=0.0,
                     ambiguous_range=(0.0, 1.0), out_dir=tmp_path / "audit", progress=False)
    rows = [int(r["row"]) for r in csv.DictReader(open(tmp_path / "audit" / "issues.csv"))]
    assert sorted(rows) == sorted(recipe["val_index"])
    # --write-clean never cleans the test rows
    with pytest.raises(InvalidInputError, match="--split test"):
        audit_checkpoint(str(tmp_path / "cnn"), split="test", out_dir=tmp_path / "a2",
                         write_clean_to=tmp_path / "c.npz", progress=False)
    assert main(["--no-progress", "audit", str(tmp_path / "cnn"), "--split", "test", "--out", str(tmp_path / "a2"),
                 "--write-clean", str(tmp_path / "c.npz")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--split test" in err
    # a checkpoint that does not record its split rows is refused, in one line
    meta_path = tmp_path / "cnn" / "checkpoint.json"
    meta = json.loads(meta_path.read_text())
    del meta["extra"]["data"]["val_index"]
    meta_path.write_text(json.dumps(meta))
    assert main(["--no-progress", "audit", str(tmp_path / "cnn"), "--split", "val", "--out", str(tmp_path / "a3")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "val_index" in err
    assert not (tmp_path / "a3" / "issues.csv").exists()


def _fitted_policy(path, ckpt, *, digest=None, held_out=None):
    """A policy as ``ttakit search`` writes it: a temperature fitted on the checkpoint's validation
    rows, the model's weights hash, and (``held_out``) the validation rows it never saw."""
    from ttakit.data import dataset_sha256
    from ttakit.jobs._eval_data import load_eval_data
    from ttakit.models import load_checkpoint
    from ttakit.policy import Policy, View

    _, meta = load_checkpoint(ckpt)
    val = load_eval_data(meta, None, "val")
    record = None
    if held_out is not None:
        record = {"split": "val", "n": len(val), "searched": len(val) - len(held_out), "sha256": dataset_sha256(val),
                  "conformal_holdout": 0.2, "holdout_seed": 0, "held_out": held_out}
    extra = {"validation_rows": record} if record is not None else {}
    policy = Policy([View.identity()], name="searched", temperature=1.5,
                    meta={"kind": "search", "weights_sha256": digest or meta.weights_sha256, "checkpoint": str(ckpt),
                          **extra})
    policy.save(path)
    return str(path), len(val)


@pytest.mark.usefixtures("single_thread")
def test_audit_checks_the_policy_belongs_to_the_checkpoint_and_skips_rows_it_was_fitted_on(tmp_path, capsys) -> None:
    """Issue "sound answers": ``audit --policy`` refuses a policy fitted on another checkpoint
    (``--allow-other-model`` allows it), and ``--split val`` audits only the validation rows the
    policy's fitted parameters never saw (refused when it does not record them)."""
    from ttakit.cli import main
    from ttakit.jobs.audit import audit_checkpoint

    data, x, y = _noisy_data(tmp_path, "npz")
    recipe = _train_tiny(tmp_path, data).meta.extra["data"]
    ckpt = tmp_path / "cnn"
    everything = {"methods": ("rule",), "mislabel_threshold": 0.0, "ambiguous_range": (0.0, 1.0), "progress": False}
    # fitted on another checkpoint: refused, in one line on the command line
    other, _ = _fitted_policy(tmp_path / "other.json", ckpt, digest="0" * 64, held_out=[0])
    with pytest.raises(InvalidInputError, match="--allow-other-model"):
        audit_checkpoint(str(ckpt), split="test", policy=other, out_dir=tmp_path / "a0", **everything)
    assert main(["--no-progress", "audit", str(ckpt), "--split", "test", "--policy", other,
                 "--out", str(tmp_path / "a0")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--allow-other-model" in err and "0000000000" in err
    assert not (tmp_path / "a0" / "issues.csv").exists()
    with pytest.warns(UserWarning, match="allowed by --allow-other-model"):
        audit_checkpoint(str(ckpt), split="test", policy=other, out_dir=tmp_path / "a1", allow_other_model=True,
                         **everything)
    # fitted here, on all but the validation rows 1 and 3: only those two are audited, by their rows
    own, n_val = _fitted_policy(tmp_path / "own.json", ckpt, held_out=[1, 3])
    result = audit_checkpoint(str(ckpt), split="val", policy=own, out_dir=tmp_path / "a2", **everything)
    rows = {int(r["row"]) for r in csv.DictReader(open(tmp_path / "a2" / "issues.csv"))}
    val_rows = sorted(recipe["val_index"])
    assert rows == {val_rows[1], val_rows[3]} and result["n_images"] == 2
    assert f"2 of {n_val} validation rows" in result["scored_by"]
    # a views-only policy still audits every validation row
    result = audit_checkpoint(str(ckpt), split="val", policy="hflip", out_dir=tmp_path / "a3", **everything)
    assert result["n_images"] == n_val
    # fitted but not recording which rows: refused, one line
    unrecorded, _ = _fitted_policy(tmp_path / "unrecorded.json", ckpt)
    assert main(["--no-progress", "audit", str(ckpt), "--split", "val", "--policy", unrecorded,
                 "--out", str(tmp_path / "a4")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--split val" in err and "fitted on it" in err
    assert not (tmp_path / "a4" / "issues.csv").exists()


class _LeftOrRight(torch.nn.Module):
    """Class 0 when the left half is brighter, class 1 when the right half is; class 2 never."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.shape[-1] // 2
        left, right = x[..., :w].mean(dim=(1, 2, 3)), x[..., w:].mean(dim=(1, 2, 3))
        return torch.stack([20 * left, 20 * right, torch.zeros_like(left)], dim=1)


def test_audit_keeps_each_views_vote_and_shows_it_where_they_disagree(tmp_path) -> None:
    """A policy of two views (identity, hflip) on a model that reads the left or the right half:
    the audit keeps each view's top class, writes them to issues.csv and the review page where
    the views disagree, and nowhere else."""
    import json

    from ttakit.aliases import get_policy
    from ttakit.jobs.audit import _policy_probs
    from ttakit.report.review_page import write_review_page

    images = torch.zeros(3, 1, 8, 8)
    images[0, :, :, :4] = 1.0  # bright left: identity says 0, the flipped view says 1
    images[1] = 0.5  # even: both views say 0
    images[2, :, :, 4:] = 1.0  # bright right: identity says 1, hflip 0
    labels = torch.tensor([2, 2, 2])  # never the top class: every row is flagged
    policies = {"none": get_policy("none"), "hflip": get_policy("hflip")}
    probs, votes = _policy_probs(_LeftOrRight(), images, policies, 2, False, "test", "hflip")
    assert set(probs) == {"none", "hflip"} and list(votes) == ["identity", "hflip"]
    assert votes["identity"].tolist() == [0, 0, 1] and votes["hflip"].tolist() == [1, 0, 0]
    assert probs["none"].argmax(1).tolist() == [0, 0, 1]
    # one view only: nothing kept
    assert _policy_probs(_LeftOrRight(), images, policies, 2, False, "test", "none")[1] == {}
    classes = ["T-shirt", "Trouser", "Shirt"]
    issues = flag_issues(probs["hflip"], labels, methods=("rule",), mislabel_threshold=0.0, ambiguous_range=(0.0, 1.0))
    rows = {int(r["row"]): r["views"] for r in csv.DictReader(io.StringIO(issues_to_csv(issues, classes,
                                                                                             view_votes=votes)))}
    assert rows == {0: "identity=T-shirt; hflip=Trouser", 1: "", 2: "identity=Trouser; hflip=T-shirt"}
    page = write_review_page(tmp_path / "review.html", images, probs["hflip"], labels, classes, view_probs=votes,
                             methods=("others",))
    text = page.read_text()
    data = json.loads(text.split('<script id="review-data" type="application/json">')[1].split("</script>")[0])
    views = {it["row"]: it["views"] for it in data["items"]}
    assert views[0] == [["identity", 0], ["hflip", 1]] and views[2] == [["identity", 1], ["hflip", 0]]
    assert views.get(1, []) == []
