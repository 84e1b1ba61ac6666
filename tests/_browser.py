"""Headless Chromium for the tests that open ttakit's HTML pages: Debian's ``chromium`` and
``chromium-driver`` (``make setup`` installs them where apt-get exists) through Selenium.

Without a browser these tests skip with a reason starting ``no headless browser``; under
``CI=true`` tests/conftest.py turns such a skip into a failure.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("TTAKIT_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("TTAKIT_CHROMEDRIVER", "/usr/bin/chromedriver")
SKIP_PREFIX = "no headless browser"

# Without the background-networking flags Chromium waits on network it cannot reach (closed network).
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,1000",
)


def browser_missing() -> str | None:
    """Why no browser can be driven here, or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return f"{SKIP_PREFIX}: selenium is not installed (pip install -e '.[dev]')"
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not (Path(path).is_file() and os.access(path, os.X_OK)):
            return f"{SKIP_PREFIX}: {path} is missing (make setup installs Debian's {package})"
    return None


def require_browser() -> None:
    reason = browser_missing()
    if reason:
        pytest.skip(reason)


class Browser:
    """A headless Chromium with a fresh profile and ``download_dir`` as its download folder."""

    def __init__(self, download_dir: str | os.PathLike):
        require_browser()
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.profile = tempfile.mkdtemp(prefix="ttakit-chromium-")
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={self.profile}")
        options.add_experimental_option("prefs", {
            "download.default_directory": str(download_dir),
            "download.prompt_for_download": False,
            "download.directory_upgrade": True,
            "safebrowsing.enabled": False,
        })
        try:
            self.driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        except Exception:
            shutil.rmtree(self.profile, ignore_errors=True)
            raise
        self.driver.set_page_load_timeout(60)
        self.driver.set_script_timeout(60)

    def open(self, path: str | os.PathLike) -> None:
        self.driver.get(Path(path).resolve().as_uri())

    def close(self) -> None:
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture
def browser(tmp_path):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    b = Browser(downloads)
    b.downloads = downloads
    try:
        yield b
    finally:
        b.close()
