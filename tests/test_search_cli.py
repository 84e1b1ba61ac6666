"""The search command's guard rails: it never selects on the test split."""

from __future__ import annotations

from dataclasses import replace

import pytest

from ttakit.cli import main
from ttakit.errors import InvalidInputError
from ttakit.jobs.search import search_checkpoint
from ttakit.policy import Policy


def test_search_checkpoint_refuses_the_test_split(tmp_path) -> None:
    with pytest.raises(InvalidInputError) as err:
        search_checkpoint(tmp_path / "no-such-checkpoint", split="test")  # refused before anything loads
    text = str(err.value)
    assert "\n" not in text and "must not see the test split (--split test)" in text and "'val'" in text


def test_cli_search_split_test_is_one_line_and_exit_2(tmp_path, capsys) -> None:
    code = main(["search", str(tmp_path / "no-such-checkpoint"), "--split", "test"])
    captured = capsys.readouterr()
    assert code == 2
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and "test split" in lines[0]
    assert "Traceback" not in captured.err


def test_cli_search_split_train_is_one_line_and_exit_2(tmp_path, capsys) -> None:
    """Issue "sound answers": a policy searched on the rows the model trained on is chosen by
    rows it fitted; refused before anything loads."""
    code = main(["search", str(tmp_path / "no-such-checkpoint"), "--split", "train"])
    captured = capsys.readouterr()
    assert code == 2
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and "--split train" in lines[0] and "'val'" in lines[0]
    assert "Traceback" not in captured.err


def test_check_search_split_refuses_train_and_test() -> None:
    from ttakit.search.run import check_search_split

    assert check_search_split("val") == "val"
    for split in ("train", "test"):
        with pytest.raises(InvalidInputError, match=f"--split {split}"):
            check_search_split(split)


def test_search_checkpoint_refuses_the_train_split(tmp_path) -> None:
    with pytest.raises(InvalidInputError, match="--split train"):
        search_checkpoint(tmp_path / "no-such-checkpoint", split="train")  # refused before anything loads


def test_demo_lesson_names_the_views_chosen() -> None:
    from ttakit.report.demo_md import _searched_lesson

    search = {
        "views": ["identity", "hflip+shift(-1,+0)", "zoom1.05"],
        "gate_threshold": 0.8,
        "validation_images": 2000,
        "forward_passes": 50_000,
        "full_caching_passes": 238_000,
        "pool_size": 119,
    }
    row = {"accuracy": 0.9112, "lift_accuracy": 0.0101, "lift_mcnemar_p": 0.001, "passes_per_image": 1.9, "nll": 0.25}
    text = _searched_lesson("flip+shift", search, row, {"nll": 0.27})
    assert "hflip+shift(-1,+0), zoom1.05 besides the identity" in text
    assert "91.12% (+1.01 points" in text and "1.90 passes per image" in text and "NLL 0.2700 -> 0.2500" in text
    assert "21% of caching all 119 candidates" in text and "gated at plain confidence < 0.800" in text
    plain = _searched_lesson("no-aug", {"views": ["identity"], "gate_threshold": None}, {**row, "lift_accuracy": 0.0}, {"nll": 0.27})
    assert "kept the identity view alone" in plain
    assert "matrix" not in text
    control = {"accuracy": 0.9050, "lift_accuracy": 0.0039}
    scaled = _searched_lesson("flip+shift", search, row, {"nll": 0.27}, control)
    assert "none (matrix-scaled) gives 90.50% (+0.39 points)" in scaled
    assert "the views' own share is +0.62 points" in scaled


def test_the_demo_control_is_the_identity_with_the_searched_calibration() -> None:
    from ttakit.jobs.demo import _matrix_control

    matrix = {"weight": [[1.0, 0.1], [0.0, 1.0]], "bias": [0.2, 0.0]}
    searched = Policy.identity()
    assert _matrix_control(searched) is None
    searched = replace(searched, matrix_scaling=matrix, meta={"demo_search": {"control": {"temperature": 1.3, "matrix_scaling": matrix}}})
    control = _matrix_control(searched)
    assert control.name == "none (matrix-scaled)" and control.view_names == ["identity"]
    assert (control.temperature, control.matrix_scaling) == (1.3, matrix)


# --------------------------------------------------------------------------- --out is a folder


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from tests._fixtures import write_halves_npz

    root = tmp_path_factory.mktemp("search-out")
    data = write_halves_npz(root / "halves.npz", n=120)
    assert main(["--no-progress", "train", "--data", str(data), "--epochs", "1", "--batch-size", "16",
                 "--out", str(root / "ckpt")]) == 0
    return root / "ckpt"


def _copy(source, target):
    target.mkdir()
    for f in source.iterdir():
        if f.is_file():
            (target / f.name).write_bytes(f.read_bytes())
    return target


@pytest.mark.usefixtures("single_thread")
def test_search_out_is_a_folder_for_the_policy_and_its_report(tiny_checkpoint, tmp_path, capsys):
    """Issue "The first hour of a user": ``--out`` is a folder for every job that writes several
    files; ``--out FILE.json`` is still the policy file, and the default stays CHECKPOINT/policy.json
    (where predict and ensemble look) with the report in CHECKPOINT/search."""
    ckpt = _copy(tiny_checkpoint, tmp_path / "ckpt")
    capsys.readouterr()
    out = tmp_path / "runs" / "searched"
    assert main(["--no-progress", "search", str(ckpt), "--budget", "2", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert f"policy written to {out / 'policy.json'}; report in {out / 'search.md'}" in said
    assert Policy.load(out / "policy.json").name == "searched"
    assert (out / "search.json").exists() and not (ckpt / "policy.json").exists() and not (ckpt / "search").exists()
    # the old spelling: a .json path is the policy file, the report in CHECKPOINT/search
    assert main(["--no-progress", "search", str(ckpt), "--budget", "2", "--out", str(tmp_path / "p.json")]) == 0
    said = capsys.readouterr().out
    assert f"policy written to {tmp_path / 'p.json'}; report in {ckpt / 'search' / 'search.md'}" in said
    # the default: next to the checkpoint
    assert main(["--no-progress", "search", str(ckpt), "--budget", "2"]) == 0
    assert f"policy written to {ckpt / 'policy.json'}" in capsys.readouterr().out
    # --out an existing file that is not .json: one line, exit 2, before any work
    (tmp_path / "a-file").write_text("x")
    assert main(["--no-progress", "search", str(ckpt), "--out", str(tmp_path / "a-file")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--out" in err and "expected a folder" in err, err
