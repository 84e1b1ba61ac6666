"""report.html of evaluate, search and audit: one self-contained file per run, opened in headless
Chromium: every image loads and every table has its rows."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from ttakit.report.html import markdown_to_html, write_html_report

from ._browser import browser  # noqa: F401  (the fixture)

FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def test_markdown_to_html_tables_lists_code_and_escaping() -> None:
    md = "\n".join([
        "# Run `a` <b>", "", "Some **bold** text and *stress*.", "", "| policy | acc |", "| :--- | ---: |",
        "| none | 0.9 |", "| a\\|b | 0.8 |", "", "- one", "- two `x<y`", "", "```", "ttakit evaluate <x>", "```",
    ])
    page = markdown_to_html(md)
    assert "<h1>Run <code>a</code> &lt;b&gt;</h1>" in page
    assert "<strong>bold</strong>" in page and "<em>stress</em>" in page
    assert page.count("<tr>") == 3 and '<td class="num">0.9</td>' in page and "<td>a|b</td>" in page
    assert "<li>two <code>x&lt;y</code></li>" in page
    assert "<pre><code>ttakit evaluate &lt;x&gt;</code></pre>" in page


def test_report_embeds_the_folders_plots(tmp_path) -> None:
    from PIL import Image

    Image.new("RGB", (4, 3), "red").save(tmp_path / "plot.png")
    Image.new("RGB", (2, 2), "blue").save(tmp_path / "inline.png")
    path = write_html_report(tmp_path, "# T\n\n![inline](inline.png)\n", commands=["ttakit next"])
    page = path.read_text()
    assert page.count("data:image/png;base64,") == 2 and "plot.png" in page
    assert "ttakit next" in page and "src=\"inline.png\"" not in page


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """evaluate, search and audit of a 1-epoch checkpoint on 300 real Fashion-MNIST images."""
    if not FASHION.exists():
        pytest.skip("Fashion-MNIST is not installed (make setup installs it)")
    from ttakit.cli import main
    from ttakit.data import load_fashion_mnist

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("reports")
    ds = load_fashion_mnist("train")
    n = 300
    data = root / "d.npz"
    np.savez(data, x=(ds.images[:n, 0] * 255).round().to(torch.uint8).numpy(), y=ds.labels[:n].numpy(),
             classes=np.array(ds.classes))
    ckpt = root / "cnn"
    base = ["--no-progress"]
    assert main([*base, "train", "--data", str(data), "--epochs", "1", "--augment", "flip", "--out", str(ckpt)]) == 0
    assert main([*base, "evaluate", str(ckpt), "--policy", "none,hflip", "--no-uncertainty",
                 "--out", str(root / "eval")]) == 0
    assert main([*base, "search", str(ckpt), "--split", "val", "--budget", "2", "--out", str(root / "policy.json"),
                 "--report-dir", str(root / "search")]) == 0
    assert main([*base, "audit", str(ckpt), "--folds", "2", "--epochs", "1", "--out", str(root / "audit")]) == 0
    return root


@pytest.mark.parametrize("run,min_images,min_tables", [("eval", 1, 1), ("search", 2, 1), ("audit", 1, 1)])
def test_each_runs_report_opens_with_its_images_and_tables(runs, browser, run, min_images, min_tables):  # noqa: F811
    page = runs / run / "report.html"
    assert page.is_file()
    text = page.read_text()
    assert "http://" not in text and "https://" not in text
    assert "ttakit --no-progress" in text or "ttakit " in text  # the command that made it
    browser.open(page)
    images = browser.driver.execute_script(
        "return Array.from(document.images).map(function (i) { return [i.alt, i.complete, i.naturalWidth]; });")
    assert len(images) >= min_images, images
    assert all(complete and width > 0 for _, complete, width in images), images
    tables = browser.driver.execute_script(
        "return Array.from(document.querySelectorAll('table')).map(function (t) {"
        "return [t.querySelectorAll('thead th').length, t.querySelectorAll('tbody tr').length]; });")
    assert len(tables) >= min_tables and all(cols > 0 and rows > 0 for cols, rows in tables), tables
    shots = Path(os.environ.get("TTAKIT_ARTIFACTS") or runs)
    shots.mkdir(parents=True, exist_ok=True)
    browser.driver.save_screenshot(str(shots / f"report_{run}.png"))
