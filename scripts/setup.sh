#!/usr/bin/env bash
# Set up everything fedhive needs on a fresh Debian/Ubuntu machine: Mosquitto (if missing),
# a virtual environment in .venv with PyTorch (CPU) and fedhive with its dev tools.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

# Debian packages: mosquitto (the broker); with FEDHIVE_BROWSER=1 also chromium (the
# dashboard's browser tests, which skip with a reason without it).
missing=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
if [ "${FEDHIVE_BROWSER:-0}" = 1 ] && [ ! -x /usr/bin/chromium ]; then missing+=(chromium); fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> installing ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# The Debian package starts a system broker on 1883; fedhive starts its own on a free port.

if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/pip"
"$PIP" install -q --upgrade pip
# torch first, pinned to the CPU build: the [torch] extra's range then installs nothing more
# (an unpinned torch would pull gigabytes of CUDA packages).
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  echo "==> installing torch (CPU)"
  "$PIP" install -q "torch==2.13.0"
fi
echo "==> installing fedhive"
"$PIP" install -q -e ".[torch,tensorflow,dev]"
echo "==> ready: $VENV/bin/fedhive"
