"""Tests for ttakit.report: exact table output, results files, and real PNG plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ttakit.errors import InvalidInputError
from ttakit.metrics import McNemarResult, expected_calibration_error, reliability_bins
from ttakit.report.plots import (
    lift_plot_layout,
    plot_candidate_lifts,
    plot_policy_metrics,
    plot_reliability_diagram,
    plot_views_curve,
)
from ttakit.report.results import write_results
from ttakit.report.tables import format_mean_std, format_table, markdown_table

ROWS = [
    {"name": "none", "accuracy": 0.91523, "views": 1, "note": None},
    {"name": "hflip+shift", "accuracy": 0.9201, "views": 4, "note": "best"},
]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- tables


def test_format_table_exact() -> None:
    assert format_table(ROWS) == (
        "name         accuracy  views  note\n"
        "-----------  --------  -----  ----\n"
        "none           0.9152      1  -\n"
        "hflip+shift    0.9201      4  best"
    )


def test_format_table_columns_title_and_floatfmt() -> None:
    out = format_table(
        ROWS, columns=["accuracy", "name", "missing"], floatfmt=".1%", title="Policies"
    )
    assert out == (
        "Policies\n"
        "accuracy  name         missing\n"
        "--------  -----------  -------\n"
        "   91.5%  none         -\n"
        "   92.0%  hflip+shift  -"
    )


def test_format_table_mixed_column_and_scalars() -> None:
    rows = [
        {"k": "x", "v": 1.5, "ok": True},
        {"k": "yy", "v": "n/a", "ok": False},
        {"k": "z", "v": torch.tensor(0.25), "ok": None},
        {"k": "w", "v": np.float32(2.0), "ok": None},
    ]
    assert format_table(rows, floatfmt=".2f") == (
        "k   v     ok\n--  ----  -----\nx   1.50  True\nyy  n/a   False\nz   0.25  -\nw   2.00  -"
    )


def test_format_table_empty_and_invalid() -> None:
    assert format_table([]) == ""
    assert format_table([], title="T") == "T"
    assert format_table([], columns=["a", "bb"]) == "a  bb\n-  --"
    with pytest.raises(InvalidInputError, match=r"`rows`.*list of dicts.*str"):
        format_table("abc")
    with pytest.raises(InvalidInputError, match=r"`columns`.*'name'"):
        format_table(ROWS, columns="name")
    with pytest.raises(InvalidInputError, match=r"`floatfmt`.*'q'"):
        format_table(ROWS, floatfmt="q")


def test_markdown_table_exact() -> None:
    assert markdown_table(ROWS) == (
        "| name        | accuracy | views | note |\n"
        "| :---------- | -------: | ----: | :--- |\n"
        "| none        |   0.9152 |     1 | -    |\n"
        "| hflip+shift |   0.9201 |     4 | best |"
    )


def test_markdown_table_escapes_and_short_columns() -> None:
    rows = [{"a": "x|y", "b": 1}, {"a": "two\nlines", "b": None}]
    assert markdown_table(rows, floatfmt=".2f") == (
        "| a         |   b |\n| :-------- | --: |\n| x\\|y      |   1 |\n| two lines |   - |"
    )
    assert markdown_table([]) == ""


def test_format_mean_std() -> None:
    assert format_mean_std(0.91523, 0.0031, scale=100) == "91.52 ± 0.31"
    assert format_mean_std(0.25, 0.01) == "0.25 ± 0.01"
    assert format_mean_std(0.123456, 0.000123, fmt=".4f") == "0.1235 ± 0.0001"
    assert format_mean_std(0.9, None, scale=100) == "90.00"
    assert format_mean_std(-0.4667, 0.0471, fmt="+.2f", scale=100) == "-46.67 ± 4.71"
    assert format_mean_std(torch.tensor(0.5), np.float64(0.1)) == "0.50 ± 0.10"
    with pytest.raises(InvalidInputError, match=r"`mean`.*'a'"):
        format_mean_std("a", 0.1)
    with pytest.raises(InvalidInputError, match=r"`fmt`.*'zz'"):
        format_mean_std(0.1, 0.1, fmt="zz")


# --------------------------------------------------------------------------- results files


def _strict_json(path: Path) -> object:
    def reject(name: str) -> None:
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=reject)


def test_write_results(tmp_path: Path) -> None:
    results = {
        "accuracy": 0.91,
        "per_class": torch.tensor([0.5, 1.0]),
        "counts": np.array([1, 2]),
        "nan": float("nan"),
        "test": McNemarResult(n01=1, n10=5, statistic=1.0, p_value=0.21875, method="exact"),
        "out": tmp_path / "x",
        "nested": [{"n": np.int64(3), "ok": True, "none": None}],
    }
    out = tmp_path / "run" / "eval"
    json_path, md_path = write_results(out, results, "# Results\n\n" + markdown_table(ROWS))
    assert (json_path, md_path) == (out / "results.json", out / "results.md")
    data = _strict_json(json_path)
    assert data == {
        "accuracy": 0.91,
        "per_class": [0.5, 1.0],
        "counts": [1, 2],
        "nan": None,
        "test": {"n01": 1, "n10": 5, "statistic": 1.0, "p_value": 0.21875, "method": "exact"},
        "out": str(tmp_path / "x"),
        "nested": [{"n": 3, "ok": True, "none": None}],
    }
    text = md_path.read_text(encoding="utf-8")
    assert text.startswith("# Results\n\n| name") and text.endswith("| best |\n")
    # Overwrite in place; no temporary files left behind.
    write_results(out, {"accuracy": 0.5}, "x\n")
    assert _strict_json(json_path) == {"accuracy": 0.5}
    assert md_path.read_text(encoding="utf-8") == "x\n"
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.md"]


def test_write_results_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"`results`.*object"):
        write_results(tmp_path, {"x": object()}, "")
    with pytest.raises(InvalidInputError, match=r"`results`.*dict.*list"):
        write_results(tmp_path, [1], "")
    with pytest.raises(InvalidInputError, match=r"`markdown`.*str"):
        write_results(tmp_path, {}, None)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- plots


def assert_png(path: Path, min_size: tuple[int, int] = (300, 200)) -> None:
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert path.stat().st_size > 5_000
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG"
        assert im.size[0] >= min_size[0] and im.size[1] >= min_size[1]
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []
    assert_drawn(path)


def assert_drawn(path: Path, min_ink: float = 0.02, min_colors: int = 3) -> np.ndarray:
    """Something was drawn: enough non-white pixels, in several colours (not a blank canvas
    with a title). Returns the RGB pixels ``(H, W, 3)``."""
    with Image.open(path) as im:
        pixels = np.asarray(im.convert("RGB"))
    ink = (pixels < 235).any(axis=2).mean()
    assert ink > min_ink, f"{path.name}: only {ink:.1%} of pixels are not white"
    colors = {tuple(c) for c in pixels[::3, ::3].reshape(-1, 3)[:: 7].tolist()}
    assert len(colors) >= min_colors, f"{path.name}: {len(colors)} colours"
    return pixels


def _pixels_of(pixels: np.ndarray, hex_color: str, tol: int = 12) -> int:
    target = np.array([int(hex_color[i : i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(pixels.astype(int) - target).max(axis=2) <= tol).sum())


def _curve(n: int, seed: int, temp: float) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 10, generator=g) * 3
    labels = torch.where(
        torch.rand(n, generator=g) < 0.8, logits.argmax(1), torch.randint(0, 10, (n,), generator=g)
    )
    return (logits * temp).softmax(1), labels


def _bar_heights(ax) -> list[float]:
    return [round(p.get_height(), 6) for p in ax.patches]


def test_plot_policy_metrics(tmp_path: Path, saved_figures) -> None:
    rows = [
        {"name": "none", "accuracy": 0.91, "accuracy_std": 0.002, "nll": 0.26},
        {"name": "hflip", "accuracy": 0.92, "accuracy_std": 0.003, "nll": 0.25, "nll_std": None},
        {"name": "greedy-8", "accuracy": 0.925, "nll": None},
    ]
    path = plot_policy_metrics(rows, str(tmp_path / "sub" / "policy.png"))
    assert isinstance(path, Path)
    assert_png(path)
    fig = saved_figures["policy.png"]
    accuracy, nll = fig.axes
    assert fig._suptitle.get_text() == "Metrics per TTA policy"
    assert (accuracy.get_title(), nll.get_title()) == ("accuracy", "nll")
    assert _bar_heights(accuracy) == [0.91, 0.92, 0.925]
    assert _bar_heights(nll) == [0.26, 0.25]  # greedy-8 has no NLL: no bar
    assert [t.get_text() for t in nll.get_xticklabels()] == ["none", "hflip", "greedy-8"]
    assert [t.get_text() for t in accuracy.texts] == ["0.910", "0.920", "0.925"]  # the bar labels


def test_plot_policy_metrics_grouped_many_names(tmp_path: Path, saved_figures) -> None:
    rows = [
        {
            "name": f"policy-{i:02d}",
            "model": model,
            "accuracy": 0.9 + 0.001 * i,
            "brier": 0.15 - 0.001 * i,
        }
        for model in ("seed-cnn", "resnet")
        for i in range(40)
    ]
    assert_png(plot_policy_metrics(rows, tmp_path / "grouped.png", metrics=["accuracy", "brier"]))
    accuracy, brier = saved_figures["grouped.png"].axes
    assert len(accuracy.patches) == len(brier.patches) == 80  # 40 policies x 2 models
    assert [t.get_text() for t in accuracy.get_legend().get_texts()] == ["seed-cnn", "resnet"]
    # one colour per model, and the values of each model's bars in policy order
    blue = [p for p in accuracy.patches if p.get_facecolor() == accuracy.patches[0].get_facecolor()]
    assert [round(p.get_height(), 6) for p in blue] == [round(0.9 + 0.001 * i, 6) for i in range(40)]
    assert len(accuracy.texts) == 0  # 80 bars are too many to label


def _lift_rows() -> list[dict]:
    rows = []
    for model, d4 in (("no-aug", -0.412), ("flip+shift", -0.05)):
        rows += [
            {"name": "none", "model": model, "accuracy": 0.91, "nll": 0.2571},
            {"name": "hflip", "model": model, "accuracy": 0.9135, "nll": 0.2533, "lift": 0.0035,
             "lift_nll": -0.0038, "lift_ci_low": 0.0010, "lift_ci_high": 0.0060},
            {"name": "d4", "model": model, "accuracy": 0.91 + d4, "nll": 2.93, "lift": d4,
             "lift_nll": 2.6729, "lift_ci_low": d4 - 0.01, "lift_ci_high": d4 + 0.01},
        ]
    return rows


def test_lift_layout_keeps_a_small_lift_visible_beside_a_collapse() -> None:
    layout = lift_plot_layout(_lift_rows())
    entries = {(e["model"], e["name"]): e for e in layout["entries"]}
    assert len(entries) == 4  # plain rows are the reference, not bars
    hflip, d4 = entries[("no-aug", "hflip")], entries[("no-aug", "d4")]
    # the axis is zoomed to the small lifts and their intervals, not set by d4's -41 points
    assert 0.6 < layout["lift_limit"] < 1.0
    assert hflip["lift_shown"] == pytest.approx(0.35) and not hflip["lift_clipped"]
    assert hflip["lift_shown"] / layout["lift_limit"] > 0.35  # a third of the half-width, visible
    assert d4["lift_clipped"] and d4["lift_shown"] == -layout["lift_limit"]
    assert hflip["lift_text"] == "+0.35 [+0.10, +0.60]"
    assert d4["lift_text"] == "-41.20 [-42.20, -40.20]"
    assert entries[("flip+shift", "d4")]["lift_text"] == "-5.00 [-6.00, -4.00]"
    # NLL labelled to 4 decimals with its change, so 0.2533 and 0.2571 never both read "0.3"
    assert hflip["nll_text"] == "0.2533 (-0.0038)" and d4["nll_text"] == "2.9300 (+2.6729)"
    assert d4["nll_clipped"] and not hflip["nll_clipped"]


def test_plot_policy_metrics_draws_lifts(tmp_path: Path, saved_figures) -> None:
    path = plot_policy_metrics(_lift_rows(), tmp_path / "lift.png", title="lift")
    assert_png(path, min_size=(900, 500))
    fig = saved_figures["lift.png"]
    ax_lift, ax_nll = fig.axes
    assert fig._suptitle.get_text() == "lift"
    limit = lift_plot_layout(_lift_rows())["lift_limit"]
    # one bar per TTA row (plain rows are the reference): hflip +0.35 points, d4 clipped to the axis
    widths = [round(p.get_width(), 4) for p in ax_lift.patches]
    assert limit < 5 and widths == [0.35, round(-limit, 4)] * 2  # both d4 bars clipped to the axis
    assert [t.get_text() for t in ax_lift.get_yticklabels()] == ["hflip", "d4", "hflip", "d4"]
    assert "-41.20 [-42.20, -40.20]  (off scale)" in [t.get_text() for t in ax_lift.texts]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        "no-aug (plain 91.00%)", "flip+shift (plain 91.00%)"
    ]
    assert len(ax_nll.patches) == 4
    pixels = assert_drawn(path, min_colors=6)
    # both models' bars are there, in their colours (C0 blue, C1 orange)
    assert _pixels_of(pixels, "#1f77b4") > 2_000 and _pixels_of(pixels, "#ff7f0e") > 2_000
    # the same rows without the +0.35 lift draw less blue: the small bar is really drawn
    fewer = [r for r in _lift_rows() if not (r["name"] == "hflip" and r["model"] == "no-aug")]
    small = plot_policy_metrics(fewer, tmp_path / "fewer.png", title="lift")
    assert _pixels_of(assert_drawn(small), "#1f77b4") < _pixels_of(pixels, "#1f77b4") - 1_000


def test_plot_policy_metrics_validates(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"'name'"):
        plot_policy_metrics([{"accuracy": 0.9}], tmp_path / "x.png")
    with pytest.raises(InvalidInputError, match=r"`metrics`.*'ece'"):
        plot_policy_metrics([{"name": "a", "accuracy": 0.9}], tmp_path / "x.png", metrics=("ece",))
    with pytest.raises(InvalidInputError, match=r"`rows`.*empty"):
        plot_policy_metrics([], tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


def test_plot_reliability_diagram(tmp_path: Path, saved_figures) -> None:
    curves = {"no TTA": _curve(2000, 0, 1.5), "hflip": _curve(2000, 1, 0.8)}
    assert_png(plot_reliability_diagram(curves, tmp_path / "rel.png", n_bins=10))
    ax, hist = saved_figures["rel.png"].axes
    diagonal, *lines = ax.get_lines()
    assert list(diagonal.get_ydata()) == [0, 1] and len(lines) == 2
    for line, (name, (probs, labels)) in zip(lines, curves.items(), strict=True):
        bins = reliability_bins(probs, labels, 10)
        kept = [j for j, c in enumerate(bins["count"]) if c > 0]
        assert list(line.get_ydata()) == pytest.approx([bins["accuracy"][j] for j in kept])
        assert line.get_label() == f"{name} (ECE {expected_calibration_error(probs, labels, 10):.4f})"
    shares = [p.get_height() for p in hist.patches]
    assert len(shares) == 20 and sum(shares) == pytest.approx(2.0)  # each curve's shares sum to 1
    with pytest.raises(InvalidInputError, match=r"`labels`"):
        plot_reliability_diagram(
            {"bad": (curves["hflip"][0], torch.zeros(3, dtype=torch.long))}, tmp_path / "x.png"
        )
    with pytest.raises(InvalidInputError, match=r"`curves`"):
        plot_reliability_diagram({}, tmp_path / "x.png")


def test_plot_views_curve(tmp_path: Path, saved_figures) -> None:
    series = {"accuracy": [0.91, 0.915, 0.918, 0.92], "nll": [0.26, 0.25, 0.247, math.nan]}
    assert_png(plot_views_curve([1, 2, 3, 4], series, tmp_path / "views.png", title="Views"))
    fig = saved_figures["views.png"]
    assert fig._suptitle.get_text() == "Views"
    for ax, (name, values) in zip(fig.axes, series.items(), strict=True):
        (line,) = ax.get_lines()
        assert ax.get_ylabel() == name and list(line.get_xdata()) == [1, 2, 3, 4]
        np.testing.assert_array_equal(line.get_ydata(), values)  # NaN stays a gap
    with pytest.raises(InvalidInputError, match=r"`series\['nll'\]`.*\(4\).*3"):
        plot_views_curve([1, 2, 3, 4], {"nll": [1, 2, 3]}, tmp_path / "x.png")


def test_plot_candidate_lifts(tmp_path: Path, saved_figures) -> None:
    names = [f"transform-{i}(param={i / 10:.1f})" for i in range(40)]
    lifts = torch.linspace(-0.01, 0.02, 40).tolist()
    assert_png(plot_candidate_lifts(names, lifts, tmp_path / "lifts.png", xlabel="accuracy lift"))
    (ax,) = saved_figures["lifts.png"].axes
    assert ax.get_xlabel() == "accuracy lift" and ax.get_title() == "Lift per candidate view"
    assert [p.get_width() for p in ax.patches] == sorted(lifts)  # largest on top
    assert [t.get_text() for t in ax.get_yticklabels()][-1] == names[-1]
    negative = [p for p in ax.patches if p.get_width() < 0]
    assert len(negative) == sum(v < 0 for v in lifts) and {p.get_facecolor() for p in negative} == {
        ax.patches[0].get_facecolor()
    } != {ax.patches[-1].get_facecolor()}
    assert_png(plot_candidate_lifts(["a"], [0.0], tmp_path / "one.png"), min_size=(300, 100))
    with pytest.raises(InvalidInputError, match=r"`lifts`.*\(2\).*1"):
        plot_candidate_lifts(["a", "b"], [0.1], tmp_path / "x.png")
    with pytest.raises(InvalidInputError, match=r"`lifts`.*finite"):
        plot_candidate_lifts(["a"], [float("nan")], tmp_path / "x.png")


LONG_TITLE = "Accuracy lift over plain inference of every candidate view, searched on validation, flip+shift model seed 0"


@pytest.fixture
def title_extents(monkeypatch: pytest.MonkeyPatch) -> list[tuple[float, float, float]]:
    """(left, right, figure width) in pixels of every title and suptitle of each figure saved."""
    from matplotlib.figure import Figure

    extents: list[tuple[float, float, float]] = []
    savefig = Figure.savefig

    def measuring_savefig(fig, *args, **kwargs):
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        texts = [ax.title for ax in fig.axes if ax.get_title()] + [t for t in fig.texts if t.get_text()]
        for text in texts:
            box = text.get_window_extent(renderer)
            extents.append((box.x0, box.x1, fig.bbox.width))
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", measuring_savefig)
    return extents


def test_long_titles_wrap_instead_of_running_off_the_figure(tmp_path: Path, title_extents) -> None:
    # A long candidate name narrows the axes and pushes them right, under a long title.
    names = ["transform-with-a-rather-long-name(param=0.1)", "hflip", "shift(1, 0)"]
    plot_candidate_lifts(names, [0.01, -0.002, 0.004], tmp_path / "lifts.png", title=LONG_TITLE)
    plot_views_curve([1, 2, 3], {"accuracy": [0.9, 0.91, 0.915]}, tmp_path / "views.png", title=LONG_TITLE)
    assert len(title_extents) == 2
    for left, right, width in title_extents:
        assert 0 <= left and right <= width, (left, right, width)


def test_lr_find_plot_title_wraps(tmp_path: Path, title_extents) -> None:
    from ttakit.report.plots import plot_lr_find
    from ttakit.training.lr_find import LRFindResult

    lrs = np.logspace(-7, 0, 30).tolist()
    losses = [2.3 - 1.5 / (1 + math.exp(-2 * (math.log10(lr) + 3))) for lr in lrs]
    result = LRFindResult(lrs=lrs, losses=losses, smoothed=losses, steepest=1e-3, min10=1e-2,
                          stopped="end", arch="seed-cnn", optimizer="adam", batch_size=128)
    plot_lr_find(result, tmp_path / "lr.png", title=LONG_TITLE)
    (left, right, width), = title_extents
    assert 0 <= left and right <= width
