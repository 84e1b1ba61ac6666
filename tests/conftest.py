"""Shared fixtures: tiny models (a few hundred parameters) so the core tests stay fast on 2 CPU cores."""

from __future__ import annotations

import os
import re

import pytest
import torch
from torch import nn


class TinyClassifier(nn.Module):
    """``(B, C, H, W) -> (B, classes)``; any image size (global pooling). Softmax head optional."""

    def __init__(self, in_channels: int = 3, classes: int = 5, softmax: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 6, 3, padding=1)
        self.fc = nn.Linear(12, classes)
        self.softmax = softmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        # Mean and max pooling: the output depends on where features are, not only on their sum.
        h = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
        out = self.fc(h) * 3.0 + x[:, 0, 0, :1]  # the corner pixel breaks flip invariance
        return torch.softmax(out, dim=1) if self.softmax else out


class TinySegmenter(nn.Module):
    """``(B, C, H, W) -> (B, classes, H, W)``; ``sigmoid=True`` gives non-negative outputs."""

    def __init__(self, in_channels: int = 3, classes: int = 2, sigmoid: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, classes, 3, padding=1)
        self.sigmoid = sigmoid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A position-dependent term makes every view's output differ.
        ramp = torch.linspace(0, 1, x.shape[-1], device=x.device)
        out = self.conv2(torch.relu(self.conv1(x))) * 2.0 + ramp
        return torch.sigmoid(out) if self.sigmoid else out


class ExtremePixelModel(nn.Module):
    """A keypoint model whose answer is known exactly: 2 keypoints, the centroids of the pixels
    holding the image's maximum and its minimum (channels summed).

    Returns ``(B, 4)`` as ``[x_max, y_max, x_min, y_min]`` in pixels (pixel ``(row, col)`` has
    its centre at ``(col + 0.5, row + 0.5)``), or normalised to ``[0, 1]`` when ``scaled``.
    Every flip, rotation, shift and crop moves the extreme pixels exactly, so TTA with a correct
    inverse returns the original keypoints exactly.
    """

    def __init__(self, scaled: bool = False):
        super().__init__()
        self.scaled = scaled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.sum(dim=1)  # (B, H, W)
        h, w = s.shape[-2:]
        rows = torch.arange(h, dtype=x.dtype).view(1, h, 1) + 0.5
        cols = torch.arange(w, dtype=x.dtype).view(1, 1, w) + 0.5
        points = []
        for extreme in (s.amax(dim=(1, 2), keepdim=True), s.amin(dim=(1, 2), keepdim=True)):
            hit = (s == extreme).to(x.dtype)
            count = hit.sum(dim=(1, 2))
            px = (hit * cols).sum(dim=(1, 2)) / count
            py = (hit * rows).sum(dim=(1, 2)) / count
            if self.scaled:
                px, py = px / w, py / h
            points += [px, py]
        return torch.stack(points, dim=1)


def extreme_pixel_truth(x: torch.Tensor, scaled: bool = False) -> torch.Tensor:
    """What :class:`ExtremePixelModel` returns for ``x`` itself: the ground truth of TTA."""
    return ExtremePixelModel(scaled)(x)


@pytest.fixture
def single_thread():
    """Run a test with one intra-op thread. The core tests push tiny tensors through ops (pad,
    reductions) that open an OpenMP parallel region anyway; on a loaded 2-core machine each such
    region can stall for milliseconds waiting for a descheduled thread. Use it with
    ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def softmax_classifier() -> nn.Module:
    torch.manual_seed(0)
    return TinyClassifier(softmax=True).eval()


@pytest.fixture
def logits_classifier() -> nn.Module:
    torch.manual_seed(0)
    return TinyClassifier(softmax=False).eval()


@pytest.fixture
def segmenter() -> nn.Module:
    torch.manual_seed(1)
    return TinySegmenter(sigmoid=True).eval()


@pytest.fixture
def seg_logits_model() -> nn.Module:
    torch.manual_seed(1)
    return TinySegmenter(sigmoid=False).eval()


@pytest.fixture
def keypoint_model() -> nn.Module:
    return ExtremePixelModel(scaled=False).eval()


@pytest.fixture
def images() -> torch.Tensor:
    """A (3, 3, 8, 8) batch in [0, 1]."""
    return torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def make_keypoint_model():
    """Factory: ``make_keypoint_model(scaled=False)`` -> an :class:`ExtremePixelModel`."""
    return lambda scaled=False: ExtremePixelModel(scaled).eval()


@pytest.fixture
def keypoint_truth():
    """``keypoint_truth(x, scaled=False)``: the exact keypoints of ``x`` (see :class:`ExtremePixelModel`)."""
    return extreme_pixel_truth


@pytest.fixture
def make_classifier():
    """Factory: ``make_classifier(in_channels=3, classes=5, softmax=True)`` -> a seeded tiny classifier."""

    def make(in_channels: int = 3, classes: int = 5, softmax: bool = True) -> nn.Module:
        torch.manual_seed(0)
        return TinyClassifier(in_channels, classes, softmax).eval()

    return make


# --------------------------------------------------------------------------- CI: no silent data skips


def _on_ci(environ=os.environ) -> bool:
    return environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def data_skip_failure(reason: str, environ=os.environ) -> str | None:
    """The failure message for a skip with ``reason`` under ``CI=true`` when the skip is for a
    missing Fashion-MNIST or a missing headless browser, else None (the skip stands)."""
    if _on_ci(environ) and "fashion" in reason.lower():
        return f"skipped for a missing data set under CI=true (make setup installs it): {reason}"
    if _on_ci(environ) and "no headless browser" in reason.lower():  # tests/_browser.py
        return f"skipped for a missing browser under CI=true (make setup installs chromium): {reason}"
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under ``CI=true`` a test skipped because Fashion-MNIST is missing fails instead: ``make
    test`` installs the data, so such a skip there means a broken install, not a choice."""
    outcome = yield
    report = outcome.get_result()
    if not report.skipped or getattr(report, "wasxfail", None) is not None:
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    failure = data_skip_failure(reason)
    if failure is not None:
        report.outcome = "failed"
        report.longrepr = failure


# --------------------------------------------------------------------------- figures


@pytest.fixture
def saved_figures(monkeypatch):
    """``{file name: matplotlib Figure}`` of every figure saved during the test, so a test checks
    what a plot shows (its bars, lines, titles) rather than that a PNG exists."""
    from matplotlib.figure import Figure

    figures: dict = {}
    savefig = Figure.savefig

    def recording_savefig(fig, fname, *args, **kwargs):
        name = os.path.basename(str(fname))
        # atomic_write saves to ``.<name>.<12 hex>.tmp`` first: record it under the final name
        temporary = re.fullmatch(r"\.(.+)\.[0-9a-f]{12}\.tmp", name)
        figures[temporary.group(1) if temporary else name] = fig
        return savefig(fig, fname, *args, **kwargs)

    def keep_if_saved(fig, *args, **kwargs):  # the plots clear a figure once saved, to free it
        if not any(saved is fig for saved in figures.values()):
            clear(fig, *args, **kwargs)

    clear = Figure.clear
    monkeypatch.setattr(Figure, "savefig", recording_savefig)
    monkeypatch.setattr(Figure, "clear", keep_if_saved)
    return figures
