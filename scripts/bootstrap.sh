#!/usr/bin/env bash
# Create .venv and install greenqueue (editable) with the extras in $EXTRAS (default: all of them:
# examples, tests and benches; `make run` asks for the chat's alone).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -m venv --help >/dev/null 2>&1 || ! "$PYTHON" -c "import ensurepip" >/dev/null 2>&1; then
    # Debian splits venv out of python3; install it when we may.
    echo "bootstrap: installing python3-venv (Debian keeps venv in its own package)" >&2
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
EXTRAS=${EXTRAS:-examples,test,bench}
.venv/bin/python -m pip install -q -e ".[$EXTRAS]"
echo "bootstrap: .venv ready ($(.venv/bin/python --version))" >&2
