"""The search command's guard rails: it never selects on the test split."""

from __future__ import annotations

import pytest

from ttakit.cli import main
from ttakit.errors import InvalidInputError
from ttakit.experiment import search_checkpoint


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
