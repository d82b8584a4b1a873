#!/usr/bin/env bash
# One short GPU check (< 10 min on one H100): bench.py for sd15 and sdxl in our default setting
# (the presets': ZeRO-2, bf16; sd15 micro-batch 4 without checkpointing, sdxl micro-batch 2 with
# activation checkpointing) and in the reference setting (fp32 ReferenceLoop,
# TF32 off, micro-batch 1), plus memory_plan's prediction next to the measured peak. A preset the
# plan says cannot fit the card (SDXL with ZeRO-2 on a single 80 GB GPU, ~97 GiB) is recorded, not
# run: SDXL needs several GPUs or ds_configs/zero3_offload.json.
# Writes bench/results/gpu_check_<host>_<date>.json: {"host", "date", "runs": [...]} where each run
# is {"name", "bench": [bench JSON lines], "plan": memory_plan JSON, "plan_vs_measured": ratio}.
#
#   bash tools/gpu_check.sh                 # real-size presets on cuda
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_PRESETS=tiny bash tools/gpu_check.sh   # dry run on CPU
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
PRESETS=${GPU_CHECK_PRESETS:-"sd15 sdxl"}
STEPS=${GPU_CHECK_STEPS:-3}
GPU_MEM_GIB=${GPU_MEM_GIB:-}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
[ "$DEVICE" = cpu ] && export DS_ACCELERATOR=cpu
if [ -z "$GPU_MEM_GIB" ]; then
  if [ "$DEVICE" = cuda ]; then
    GPU_MEM_GIB=$($PY -c 'import torch; print(torch.cuda.get_device_properties(0).total_memory / 2**30)')
  else
    GPU_MEM_GIB=16
  fi
fi
OUT=bench/results/gpu_check_$(hostname -s)_$(date +%Y%m%d-%H%M%S).json
TMP=$(mktemp -d)
mkdir -p bench/results

run_case() {  # name preset micro_batch [--grad-checkpointing]: memory plan, then ours vs the reference
  local name=$1 preset=$2 mb=$3 ckpt=${4:-}
  local plan_mb
  $PY tools/memory_plan.py --json --preset "$preset" --gpus 1 --zero 2 --micro-batch "$mb" --precision bf16 \
      $ckpt --gpu-mem-gib "$GPU_MEM_GIB" > "$TMP/$name.plan.json" 2> "$TMP/$name.plan.err"
  # a micro-batch the plan predicts not to fit is lowered to the largest that does (none: skipped)
  plan_mb=$($PY -c 'import json,sys; print(json.load(open(sys.argv[1]))["max_micro_batch"])' "$TMP/$name.plan.json" \
            2>/dev/null || echo "$mb")
  if [ "$plan_mb" = 0 ]; then  # e.g. SDXL with ZeRO-2 on one GPU (~97 GiB): record the plan, skip the bench
    echo "{\"config\": \"$preset\", \"error\": \"does not fit one GPU by the memory plan; not run\"}" \
      > "$TMP/$name.bench.jsonl"
    echo "gpu_check: $name skipped (the plan predicts no micro-batch fits)" >&2
    return
  fi
  if [ "$plan_mb" -gt 0 ] 2>/dev/null && [ "$plan_mb" -lt "$mb" ]; then mb=$plan_mb; fi
  $PY tools/memory_plan.py --json --preset "$preset" --gpus 1 --zero 2 --micro-batch "$mb" --precision bf16 \
      $ckpt --gpu-mem-gib "$GPU_MEM_GIB" > "$TMP/$name.plan.json" 2>> "$TMP/$name.plan.err"
  timeout 240 $PY tools/bench.py --preset "$preset" --device "$DEVICE" --zero 2 --precision bf16 \
      --micro-batch "$mb" $ckpt --steps "$STEPS" --warmup 1 --baseline reference \
      --baseline-micro-batch 1 > "$TMP/$name.bench.jsonl" 2> "$TMP/$name.bench.err"
  echo "gpu_check: $name (micro-batch $mb) exit $?" >&2
}

for preset in $PRESETS; do
  case $preset in
    sd15) run_case sd15 sd15 4 ;;
    sdxl) run_case sdxl sdxl 2 --grad-checkpointing ;;
    *) run_case "$preset" "$preset" 2 ;;
  esac
done

$PY - "$TMP" "$OUT" "$PRESETS" <<'EOF'
import json, socket, sys, time
from pathlib import Path
tmp, out, presets = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3].split()
runs = []
for name in presets:
    def read(path):
        return path.read_text() if path.is_file() else ""
    bench = [json.loads(line) for line in read(tmp / f"{name}.bench.jsonl").splitlines() if line.startswith("{")]
    plan = json.loads(read(tmp / f"{name}.plan.json") or "null")
    ours = next((b for b in bench if "/zero" in b.get("config", "")), {})
    measured = ours.get("device_peak_gib")
    run = {"name": name, "bench": bench, "plan": plan,
           "plan_vs_measured": (plan["total_gib"] / measured) if plan and measured else None,
           "errors": (read(tmp / f"{name}.bench.err")[-2000:] if not bench else "")}
    runs.append(run)
out.write_text(json.dumps({"host": socket.gethostname(), "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
                           "runs": runs}, indent=1))
print(out)
for r in runs:
    for b in r["bench"]:
        print(f"{b.get('config')}: {b.get('s_per_iter', float('nan')):.3f} s/it, {b.get('samples_per_s', 0):.2f} "
              f"samples/s, mfu {b.get('mfu')}, ratio vs reference {b.get('ratio_vs_reference')}, "
              f"peak {b.get('device_peak_gib')} GiB {b.get('error', '')}")
    total = r["plan"]["total_gib"] if r["plan"] else None
    print(f"{r['name']}: plan {total} GiB vs measured peak -> ratio {r['plan_vs_measured']}")
EOF
rm -rf "$TMP"
