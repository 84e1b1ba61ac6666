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
from ttakit.metrics import McNemarResult
from ttakit.report import (
    format_mean_std,
    format_table,
    markdown_table,
    plot_candidate_lifts,
    plot_policy_metrics,
    plot_reliability_diagram,
    plot_views_curve,
    write_results,
)

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


def _curve(n: int, seed: int, temp: float) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 10, generator=g) * 3
    labels = torch.where(
        torch.rand(n, generator=g) < 0.8, logits.argmax(1), torch.randint(0, 10, (n,), generator=g)
    )
    return (logits * temp).softmax(1), labels


def test_plot_policy_metrics(tmp_path: Path) -> None:
    rows = [
        {"name": "none", "accuracy": 0.91, "accuracy_std": 0.002, "nll": 0.26},
        {"name": "hflip", "accuracy": 0.92, "accuracy_std": 0.003, "nll": 0.25, "nll_std": None},
        {"name": "greedy-8", "accuracy": 0.925, "nll": None},
    ]
    path = plot_policy_metrics(rows, str(tmp_path / "sub" / "policy.png"))
    assert isinstance(path, Path)
    assert_png(path)


def test_plot_policy_metrics_grouped_many_names(tmp_path: Path) -> None:
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


def test_plot_policy_metrics_validates(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"'name'"):
        plot_policy_metrics([{"accuracy": 0.9}], tmp_path / "x.png")
    with pytest.raises(InvalidInputError, match=r"`metrics`.*'ece'"):
        plot_policy_metrics([{"name": "a", "accuracy": 0.9}], tmp_path / "x.png", metrics=("ece",))
    with pytest.raises(InvalidInputError, match=r"`rows`.*empty"):
        plot_policy_metrics([], tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


def test_plot_reliability_diagram(tmp_path: Path) -> None:
    curves = {"no TTA": _curve(2000, 0, 1.5), "hflip": _curve(2000, 1, 0.8)}
    assert_png(plot_reliability_diagram(curves, tmp_path / "rel.png", n_bins=10))
    with pytest.raises(InvalidInputError, match=r"`labels`"):
        plot_reliability_diagram(
            {"bad": (curves["hflip"][0], torch.zeros(3, dtype=torch.long))}, tmp_path / "x.png"
        )
    with pytest.raises(InvalidInputError, match=r"`curves`"):
        plot_reliability_diagram({}, tmp_path / "x.png")


def test_plot_views_curve(tmp_path: Path) -> None:
    series = {"accuracy": [0.91, 0.915, 0.918, 0.92], "nll": [0.26, 0.25, 0.247, math.nan]}
    assert_png(plot_views_curve([1, 2, 3, 4], series, tmp_path / "views.png", title="Views"))
    with pytest.raises(InvalidInputError, match=r"`series\['nll'\]`.*\(4\).*3"):
        plot_views_curve([1, 2, 3, 4], {"nll": [1, 2, 3]}, tmp_path / "x.png")


def test_plot_candidate_lifts(tmp_path: Path) -> None:
    names = [f"transform-{i}(param={i / 10:.1f})" for i in range(40)]
    lifts = torch.linspace(-0.01, 0.02, 40).tolist()
    assert_png(plot_candidate_lifts(names, lifts, tmp_path / "lifts.png", xlabel="accuracy lift"))
    assert_png(plot_candidate_lifts(["a"], [0.0], tmp_path / "one.png"), min_size=(300, 100))
    with pytest.raises(InvalidInputError, match=r"`lifts`.*\(2\).*1"):
        plot_candidate_lifts(["a", "b"], [0.1], tmp_path / "x.png")
    with pytest.raises(InvalidInputError, match=r"`lifts`.*finite"):
        plot_candidate_lifts(["a"], [float("nan")], tmp_path / "x.png")
