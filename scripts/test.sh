#!/usr/bin/env bash
# The test command: creates or refreshes the local virtual environment .venv, installs the package with its
# test extra, and runs pytest on 8 simulated CPU devices. Extra arguments go to pytest.
#   bash scripts/test.sh                 # everything
#   bash scripts/test.sh tests/test_smoothing.py -k counts
#   bash scripts/test.sh -n 2            # two pytest-xdist workers, as CI runs it (faster on 2+ cores)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh test
# Subprocesses started by tests (scripts, kill-and-resume, two-process runs) see the same 8 CPU devices.
export JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES=8
exec "${VENV:-.venv}/bin/python" -m pytest "$@"
