#!/usr/bin/env bash
# README's test command (.ci/run calls this): set up, then run the fast suite (slow checks: add -m slow).
# Real evaluation data: $MINITRON_DATA_DIR, else ../shared/data beside the checkout when it exists.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -z "${MINITRON_DATA_DIR:-}" ] && [ -d ../shared/data ]; then
    export MINITRON_DATA_DIR="$(cd ../shared/data && pwd)"
fi
exec .venv/bin/python -m pytest "$@"
