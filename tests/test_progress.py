"""Progress: a bar on a terminal, one line per stage in a log, nothing when disabled."""

from __future__ import annotations

import io

import pytest

from ttakit.progress import is_terminal, note, progress


class _Tty(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture(autouse=True)
def no_override(monkeypatch):
    monkeypatch.delenv("TTAKIT_PROGRESS", raising=False)


def test_a_log_gets_one_line_per_stage():
    log = io.StringIO()
    items = list(progress(range(500), desc="epoch 1/3", unit="batch", stream=log))
    assert items == list(range(500))
    lines = log.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("epoch 1/3: 500 batch in ")
    bar = progress(total=1200, desc="hflip", unit="img", stream=log)
    for _ in range(3):
        bar.update(400)
    bar.set_postfix(loss="0.41")
    bar.close()
    bar.close()  # closing twice writes nothing more
    assert log.getvalue().splitlines()[1].startswith("hflip: 1200 img in ")
    assert log.getvalue().splitlines()[1].endswith("(loss=0.41)")
    assert len(log.getvalue().splitlines()) == 2


def test_an_unfinished_stage_says_how_far_it_got():
    log = io.StringIO()
    with progress(total=10, desc="caching", unit="img", stream=log) as bar:
        bar.update(4)
    assert log.getvalue().startswith("caching: 4/10 img in ")


def test_a_terminal_gets_a_live_bar():
    tty = _Tty()
    assert is_terminal(tty)
    with progress(total=50, desc="d4", unit="img", stream=tty, leave=True) as bar:
        for _ in range(5):
            bar.update(10)
    out = tty.getvalue()
    assert "d4" in out and "50/50" in out and "\r" in out  # tqdm redraws in place


def test_disabled_or_log_false_prints_nothing(monkeypatch):
    log = io.StringIO()
    list(progress(range(10), desc="x", enabled=False, stream=log))
    list(progress(range(10), desc="x", log=False, stream=log))
    monkeypatch.setenv("TTAKIT_PROGRESS", "off")
    list(progress(range(10), desc="x", stream=_Tty()))
    note("hello", stream=log)
    assert log.getvalue() == ""


def test_environment_overrides_detection(monkeypatch):
    monkeypatch.setenv("TTAKIT_PROGRESS", "bar")
    assert is_terminal(io.StringIO())
    monkeypatch.setenv("TTAKIT_PROGRESS", "log")
    assert not is_terminal(_Tty())


def test_note_prints_one_line():
    out = io.StringIO()
    note("repeat 2/3: training seed 1", stream=out)
    note("hidden", enabled=False, stream=out)
    assert out.getvalue() == "repeat 2/3: training seed 1\n"


def test_a_piped_training_log_has_one_line_per_epoch(capsys):
    import torch

    from ttakit.data import ImageDataset
    from ttakit.training.config import TrainConfig
    from ttakit.training.loop import train_model

    g = torch.Generator().manual_seed(0)
    ds = ImageDataset(torch.rand(24, 1, 6, 6, generator=g), torch.arange(24) % 2, ["a", "b"])
    train_model(ds, TrainConfig(epochs=3, batch_size=12), progress=True)
    captured = capsys.readouterr()
    lines = [line for line in (captured.out + captured.err).splitlines() if line.strip()]
    assert len(lines) == 3 and all(line.startswith(f"epoch={i + 1},") for i, line in enumerate(lines))
    assert "\r" not in captured.err and "it/s" not in captured.err
