#!/usr/bin/env bash
# Make Fashion-MNIST available: Debian's package where apt exists (apt verifies it), else the official
# download, each .gz file checked against its official SHA-256 and MD5 before it is saved.
set -euo pipefail
PY="${1:-python3}"
DEB_DIR=/usr/share/datasets/fashion-mnist
if [ -f "$DEB_DIR/t10k-labels-idx1-ubyte.gz" ] && [ -f "$DEB_DIR/train-images-idx3-ubyte.gz" ]; then
  exit 0
fi
if command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; fi
  echo "Installing Debian package dataset-fashion-mnist ..."
  if $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist; then
    exit 0
  fi
  echo "apt-get could not install dataset-fashion-mnist; trying the official download instead." >&2
fi
"$PY" -c "from ttakit.data import ensure_fashion_mnist; print(ensure_fashion_mnist(download=True))"
