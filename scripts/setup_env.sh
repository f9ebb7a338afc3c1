#!/usr/bin/env bash
# Creates (or refreshes) the virtual environment .venv with this package installed in editable mode and the
# extras named in $1 (default "test"), e.g. `bash scripts/setup_env.sh plot`. VENV and PYTHON override the
# location and the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[${1:-test}]"
