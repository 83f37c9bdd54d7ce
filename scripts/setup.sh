#!/usr/bin/env bash
# Install trojanscan and what it needs on a fresh Debian/Ubuntu-like machine.
#   scripts/setup.sh          the package with its optional extras for the demo
#   scripts/setup.sh dev      ... plus the test and lint tools
# torch is pinned to 2.13.0 explicitly: an unpinned torch pulls a multi-GB CUDA build
# where no torch is installed yet. Fashion-MNIST comes from Debian's
# dataset-fashion-mnist where apt is available (the demo falls back to scikit-learn's
# digits otherwise).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
EXTRAS="onnx,serve,plots"
if [ "${1:-}" = "dev" ]; then EXTRAS="dev,onnx,serve,plots"; fi

if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
    || { $SUDO apt-get update -qq >/dev/null 2>&1 && \
         $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; } \
    || echo "setup: could not install dataset-fashion-mnist; the demo will use digits" >&2
fi

# dev: a headless Chromium to check report.html in a real browser (tests skip without it)
if [ "${1:-}" = "dev" ] && ! command -v chromium >/dev/null 2>&1 \
    && command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null 2>&1 \
    || echo "setup: could not install chromium; the browser test will be skipped" >&2
fi

"$PY" -m pip install -q --disable-pip-version-check "torch==2.13.0"
"$PY" -m pip install -q --disable-pip-version-check -e ".[${EXTRAS}]"
