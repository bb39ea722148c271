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
# The compiled request path (setup.py) needs a C compiler and Python's headers; without them
# greenqueue still installs and runs its Python source, only slower.
if ! command -v cc >/dev/null 2>&1 || ! "$PYTHON" -c "import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h')))"; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    if [ -z "$SUDO" ] || command -v sudo >/dev/null 2>&1; then
        echo "bootstrap: installing gcc and python3-dev (the compiled request path is built with them)" >&2
        $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq gcc python3-dev >/dev/null \
            || echo "bootstrap: could not install them; the request path will run as Python" >&2
    fi
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
EXTRAS=${EXTRAS:-examples,test,bench}
# Cython in the venv too: `make run` and `make test` rebuild the compiled request path after an edit.
.venv/bin/python -m pip install -q -e ".[$EXTRAS]" "Cython>=3.0,<4"
echo "bootstrap: .venv ready ($(.venv/bin/python --version))" >&2
