#!/usr/bin/env bash
# The GPU check: the real trainer (torchrun sidscale/train.py, NCCL) on a random-weight SD1.5-size teacher
# with a checkpoint, a SIGKILL, a resume, a preview, an export and a one-step sample; tools/bench.py and
# tools/memory_plan.py --measure; the big presets' memory plan against a measured peak. Exits 1 if any
# step failed. Details and options: tools/gpu_check.py (--help).
#
#   bash tools/gpu_check.sh --out DIR --part main   # one call of a lent 1-GPU machine (<= 8 min): SD1.5 main()
#   bash tools/gpu_check.sh --out DIR --part big    # the second call: big-preset memory check, NCCL, CUDA tests
#   bash tools/gpu_check.sh                         # everything in one go (a machine of your own)
#   bash tools/gpu_check.sh --cpu-smoke             # the same sequence on the CPU, tiny preset (~2 min)
#   bash tools/gpu_check.sh --dry-run --out DIR     # HERE: a fresh Python 3.12 venv, the wheelhouse installed
#                                                   # with --no-index into an empty target, every import, and
#                                                   # the main part on the CPU in that environment
#
# On a machine without deepspeed (a bare GPU image: README "GPU check"), the wheelhouse that
# tools/gpu_wheels.sh builds (.gpu_wheels/, carried by the device call) is installed first, with no
# index, into $GPU_CHECK_SITE (default /tmp/sidscale-site), which goes first on PYTHONPATH.
#   bash tools/gpu_check.sh --install-wheels DIR    # only that (the dry run uses it)
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
WHEELS=${GPU_CHECK_WHEELS:-.gpu_wheels}

install_wheels() {  # $1: an empty target folder
  if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "gpu_check: no wheels in $WHEELS: build them with bash tools/gpu_wheels.sh and carry the folder" >&2
    return 1
  fi
  mkdir -p "$1" && "$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir \
    --disable-pip-version-check --target "$1" "$WHEELS"/*.whl
}

if [ "${1:-}" = "--install-wheels" ]; then
  [ -n "${2:-}" ] || { echo "usage: $0 --install-wheels DIR" >&2; exit 2; }
  install_wheels "$2"
  exit
fi
if ! "$PY" -c "import deepspeed" >/dev/null 2>&1 && [ -d "$WHEELS" ]; then
  SITE=${GPU_CHECK_SITE:-/tmp/sidscale-site}
  echo "gpu_check: deepspeed missing: installing $WHEELS into $SITE"
  install_wheels "$SITE" || exit 1
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$PY" tools/gpu_check.py "$@"
