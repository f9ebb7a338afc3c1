#!/usr/bin/env bash
# One command on a fresh machine: creates .venv, trains the digits score model and classifiers, certifies 100
# test digits six ways at sigma 0.25 and 0.5, prints the certified-accuracy table and writes the plots.
# About 15 minutes on 2 CPU cores from a fresh clone (13-14 once .venv exists). Extra arguments go to
# scripts/quickstart.py (e.g. --workdir DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh plot
exec "${VENV:-.venv}/bin/python" scripts/quickstart.py "$@"
