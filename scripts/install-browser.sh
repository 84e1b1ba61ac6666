#!/usr/bin/env bash
# Headless Chromium for the tests that open ttakit's HTML pages (review.html, report.html):
# Debian's chromium and chromium-driver where apt-get exists. Elsewhere nothing is installed and
# those tests skip (and fail under CI=true, see tests/conftest.py).
set -euo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  exit 0
fi
if command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; fi
  echo "Installing Debian packages chromium and chromium-driver (for the browser tests) ..."
  if $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver; then
    exit 0
  fi
  echo "apt-get could not install chromium; the browser tests will skip (and fail under CI=true)." >&2
  exit 0
fi
echo "No apt-get here: install Chromium and its chromedriver as /usr/bin/chromium and /usr/bin/chromedriver" \
  "(or set TTAKIT_CHROMIUM and TTAKIT_CHROMEDRIVER) to run the browser tests." >&2
