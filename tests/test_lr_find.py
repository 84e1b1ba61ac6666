"""The learning-rate finder: its suggestion on a toy problem with a known good range, early
stop on divergence, the plot, the suggestion rules, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ttakit.data.core import ImageDataset
from ttakit.errors import InvalidInputError
from ttakit.models import Normalize, registry
from ttakit.report.plots import plot_lr_find
from ttakit.training.config import TrainConfig
from ttakit.training.loop import train_model
from ttakit.training.lr_find import LRFindResult, centred_average, lr_find, suggest_rates

pytestmark = pytest.mark.usefixtures("single_thread")


def _linear(*, in_channels, num_classes, image_size, mean=None, std=None):
    height, width = image_size
    return nn.Sequential(
        Normalize(mean, std, channels=in_channels), nn.Flatten(), nn.Linear(in_channels * height * width, num_classes)
    )


@pytest.fixture
def toy_linear(monkeypatch):
    """A linear classifier registered as "toy-linear" for the duration of one test."""
    monkeypatch.setitem(registry._MODELS, "toy-linear", _linear)
    return "toy-linear"


def _blobs(n: int = 512, seed: int = 0) -> ImageDataset:
    """Four classes, each a fixed random 4x4 pattern plus noise, with a quarter of the labels
    redrawn at random: not separable, so too high a rate overshoots instead of just scaling
    the weights up."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(4, 1, 4, 4, generator=torch.Generator().manual_seed(99))
    labels = torch.arange(n) % 4
    images = (centres[labels] + 0.25 * torch.randn(n, 1, 4, 4, generator=g)).clamp(0, 1)
    noisy = torch.rand(n, generator=g) < 0.25
    labels = torch.where(noisy, torch.randint(0, 4, (n,), generator=g), labels)
    return ImageDataset(images, labels, ["a", "b", "c", "d"], name="blobs")


def test_suggestion_lies_in_the_known_good_range(toy_linear):
    data = _blobs()
    config = TrainConfig(batch_size=32, optimizer="sgd", schedule="constant", weight_decay=0.0)
    # The known good range: rates whose 2 epochs of SGD achieve at least half of the best loss
    # reduction from the chance level ln 4 found over a grid of rates.
    grid = [10.0**e for e in np.arange(-4, 1.01, 0.5)]
    final = {}
    for lr in grid:
        result = train_model(data, TrainConfig(**{**config.__dict__, "epochs": 2, "lr": lr}), arch=toy_linear, progress=False)
        final[lr] = result.history[-1]["train_loss"]
    best = min(final.values())
    good = [lr for lr in grid if final[lr] <= np.log(4) - 0.5 * (np.log(4) - best)]
    assert min(good) > grid[0] and max(good) < grid[-1]  # bad rates on both sides
    assert max(good) / min(good) < 1000  # a range that can be missed
    found = lr_find(data, arch=toy_linear, config=config, start_lr=1e-6, end_lr=1000.0, num_steps=60, progress=False)
    for name in ("steepest", "min10"):
        rate = getattr(found, name)
        assert min(good) <= rate <= max(good), (name, rate, good)
    assert found.stopped == "diverged" and len(found.lrs) < 60  # stopped early, well before 1000
    assert found.lrs[-1] < 1000.0
    # the sweep's rates grow geometrically from start_lr
    ratios = np.array(found.lrs[1:]) / np.array(found.lrs[:-1])
    np.testing.assert_allclose(ratios, (1000.0 / 1e-6) ** (1 / 59), rtol=1e-9)


def test_lr_find_refuses_a_data_set_smaller_than_one_batch():
    tiny = _blobs(20)
    with pytest.raises(InvalidInputError, match="at least one full batch: the data set has 20 images but batch_size is 32"):
        lr_find(tiny, arch="seed-cnn", config=TrainConfig(batch_size=32), progress=False)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"start_lr": 0.0}, "start_lr must be a finite number > 0"),
        ({"start_lr": 1.0, "end_lr": 0.1}, "end_lr must exceed start_lr"),
        ({"num_steps": 2}, "num_steps must be an integer >= 5"),
        ({"diverge": 1.0}, "diverge must be a number > 1"),
    ],
)
def test_lr_find_bad_settings(kwargs, match):
    with pytest.raises(InvalidInputError, match=match):
        lr_find(_blobs(64), arch="seed-cnn", config=TrainConfig(batch_size=16), progress=False, **kwargs)


def test_suggest_rates_on_a_known_curve():
    lrs = np.logspace(-6, 0, 61)
    # flat, then a drop centred at 1e-3, a minimum near 3e-2, then a blow-up
    loss = 2.0 - 1.0 / (1 + np.exp(-6 * (np.log10(lrs) + 3))) + np.where(lrs > 3e-2, 20 * (lrs - 3e-2), 0)
    steepest, min10 = suggest_rates(lrs, loss)
    assert steepest == pytest.approx(1e-3, rel=0.05)
    assert min10 == pytest.approx(lrs[int(np.argmin(loss))] / 10)
    assert centred_average([1.0, 2.0, 3.0, 4.0, 5.0], 3) == [1.5, 2.0, 3.0, 4.0, 4.5]


def test_plot_marks_both_suggestions(tmp_path, saved_figures):
    lrs = list(np.logspace(-6, 0, 40))
    losses = [2.0 - 0.03 * i if i < 30 else 1.1 + (i - 30) for i in range(40)]
    result = LRFindResult(lrs=lrs, losses=losses, smoothed=centred_average(losses, 5), steepest=1e-4, min10=1e-3, stopped="diverged", arch="toy")
    path = plot_lr_find(result, tmp_path / "out" / "lr_find.png")
    assert path.is_file()
    (ax,) = saved_figures["lr_find.png"].axes
    raw, smoothed, *marks = ax.get_lines()
    assert list(raw.get_ydata()) == losses and list(smoothed.get_ydata()) == result.smoothed
    assert ax.get_xscale() == "log" and "toy" in ax.get_title()
    # a dashed line and a labelled dot at each suggestion
    labels = [line.get_label() for line in marks if line.get_marker() == "o"]
    assert labels == ["steepest descent: 1.0e-04", "minimum/10: 1.0e-03"]
    assert sorted(line.get_xdata()[0] for line in marks if line.get_linestyle() == "--") == [1e-4, 1e-3]
    assert result.to_json()["suggestion"] == 1e-3 and "lrs" not in result.to_json(curve=False)
    assert "steepest descent 1.00e-04, minimum/10 1.00e-03" in result.summary()


def test_train_lr_auto_trains_at_the_suggestion(toy_linear):
    result = train_model(_blobs(128), TrainConfig(epochs=1, batch_size=32, lr="auto"), arch=toy_linear, progress=False)
    assert result.lr_find is not None
    assert result.meta.metrics["lr"] == result.lr_find.min10
    assert result.lr_history[0] == pytest.approx(result.lr_find.min10)
    assert result.meta.extra["train_config"]["lr"] == "auto"  # --repeats runs the finder again
    assert result.meta.extra["lr_find"]["min10"] == result.lr_find.min10


def _row_keys(dataset: ImageDataset) -> list[bytes]:
    """One key per row (pixels and label), to compare the rows of two data sets."""
    flat = (dataset.images.reshape(len(dataset), -1) * 255).round().to(torch.uint8).numpy()
    return [flat[i].tobytes() + bytes([int(dataset.labels[i])]) for i in range(len(dataset))]


@pytest.mark.parametrize("kind", ["npz", "folder"])
def test_lr_find_sweeps_exactly_the_rows_train_trains_on(tmp_path, monkeypatch, kind):
    """Issue "sound answers": lr-find draws its rows with train's own split (test and validation
    rows held out as train holds them out), never from the whole file or folder."""
    import ttakit.jobs.lr_find as lr_find_module
    import ttakit.jobs.train as experiment

    n = 60
    rng = np.random.default_rng(0)
    x = rng.permutation(256)[:n].astype(np.uint8)[:, None, None] * np.ones((1, 6, 6), np.uint8)  # distinct rows
    y = np.arange(n) % 3
    if kind == "npz":
        data = tmp_path / "d.npz"
        np.savez(data, x=x, y=y)
    else:
        from PIL import Image

        data = tmp_path / "photos"
        for i in range(n):
            (data / f"c{y[i]}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(x[i]).save(data / f"c{y[i]}" / f"{i:03d}.png")

    seen: dict[str, ImageDataset] = {}

    def fake_train_model(train_ds, config, *, arch, val_ds=None, progress=True):
        seen["train"], seen["val"] = train_ds, val_ds
        raise RuntimeError("stop after the split")

    def fake_lr_find(dataset, **kwargs):
        seen["swept"] = dataset
        raise RuntimeError("stop after the split")

    monkeypatch.setattr(experiment, "train_model", fake_train_model)
    monkeypatch.setattr(lr_find_module, "lr_find", fake_lr_find)
    with pytest.raises(RuntimeError, match="stop after the split"):
        experiment.train_run(str(data), out_dir=tmp_path / "run", val_fraction=0.2, test_fraction=0.25)
    with pytest.raises(RuntimeError, match="stop after the split"):
        lr_find_module.run_lr_find(str(data), val_fraction=0.2, test_fraction=0.25, plot=None, progress=False)
    swept, trained = _row_keys(seen["swept"]), _row_keys(seen["train"])
    assert swept == trained  # the same rows, in the same order
    assert len(swept) < n - 0.25 * n  # neither test nor validation rows
    assert not set(swept) & set(_row_keys(seen["val"]))
    if kind == "folder":
        assert seen["swept"].files == seen["train"].files
