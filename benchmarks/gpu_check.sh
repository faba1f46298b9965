#!/usr/bin/env bash
# The ten-minute GPU check (issue 25; benchmarks/gpu_check.py says what it runs and checks). On one CUDA GPU: a
# random 1B Llama through importance, prune and 200 distillation steps in the GPU recipe's settings (bf16
# autocast, FSDP2 over 1 rank under torchrun, checkpointing, top-k cache, release_teacher), a kill and resume,
# tokens/s, measured vs estimated peak memory per stage and the collective audit, in one table. Without a GPU (or
# with --reduced) the same path on a tiny Llama on the CPU, in about a minute: CI runs it (tests/test_gpu_check.py).
#
#   bash benchmarks/gpu_check.sh [--reduced] [--work DIR] [--tolerance 0.2] [--budget 600]
#
# Python: $PYTHON, else .venv/bin/python, else python3 (a GPU machine's own torch); minitron from src/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
# CPU threads per process: at most 8 (the stage processes run one at a time)
cores="$(nproc 2>/dev/null || echo 2)"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( cores < 8 ? cores : 8 ))}"
exec "$PYTHON" "$ROOT/benchmarks/gpu_check.py" "$@"
