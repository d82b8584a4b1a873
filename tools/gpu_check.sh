#!/usr/bin/env bash
# The GPU check, one command (< 10 min on one H100/H200): the real trainer (torchrun sidscale/train.py,
# NCCL) on a random-weight SD1.5-size teacher with a checkpoint, a SIGKILL, a resume, an export and a
# one-step sample; then tools/bench.py against the reference setting and tools/memory_plan.py --measure.
# Writes bench/results/gpu_check_<host>_<date>.json and exits 1 if any step failed. Details and
# options: tools/gpu_check.py (--help).
#
#   bash tools/gpu_check.sh                   # on the GPU machine (all visible GPUs)
#   bash tools/gpu_check.sh --cpu-smoke       # the same sequence on the CPU, tiny preset (~2 min)
#   GPU_CHECK_WORKDIR=/scratch/x bash tools/gpu_check.sh   # where the ~32 GB of checkpoints go
#   bash tools/gpu_check.sh --only big --big-preset sd35_large   # a big preset at the setting the memory plan
#                                             # says fits this machine (8+ x 80 GB), measured against the plan
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
exec "$PY" tools/gpu_check.py "$@"
