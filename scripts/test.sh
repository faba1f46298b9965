#!/usr/bin/env bash
# README's test command (.ci/run calls this): set up, then run the fast suite (slow checks: add -m slow).
# Real evaluation data: $MINITRON_DATA_DIR, else ../shared/data beside the checkout when it exists.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -z "${MINITRON_DATA_DIR:-}" ] && [ -d ../shared/data ]; then
    export MINITRON_DATA_DIR="$(cd ../shared/data && pwd)"
fi
# one pytest worker per core (pytest-xdist; MINITRON_TEST_WORKERS=0 runs in this process), each with its share of
# the cores for torch (conftest); the 15 slowest tests are printed at the end (pyproject's addopts)
exec .venv/bin/python -m pytest -n "${MINITRON_TEST_WORKERS:-auto}" --dist worksteal "$@"
