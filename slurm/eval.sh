#!/bin/bash
# FID / CLIP-score evaluation of every checkpoint and export of a run that has no metrics.json yet,
# one target per array task (tools/fid_eval.py does the work; see its docstring for the protocol).
#
#   slurm/eval.sh --list RUN_DIR
#       prints the pending targets with their array indices, freezes them in RUN_DIR/eval/pending.txt
#       (so pruned or newly written checkpoints cannot shift the indices) and prints the sbatch line:
#   sbatch --array=0-N slurm/eval.sh RUN_DIR [extra tools/fid_eval.py args]
#       task i evaluates line i of RUN_DIR/eval/pending.txt into RUN_DIR/eval/<name>/ (skips it if its
#       metrics.json appeared meanwhile; a rerun of a killed task resumes its images)
#
# Targets: RUN_DIR/export, then RUN_DIR/checkpoints/step_* (those with meta.json), ascending.
# Several GPUs per task: sbatch --ntasks-per-node=G --gpus-per-task=1 ...: srun starts G ranks and
# the generation is sharded over them (SLURM_PROCID / SLURM_NTASKS); rank 0 computes the metrics.
#
# Knobs (environment variables):
#   REPO               sidscale checkout (default: the directory sbatch was called from)
#   PYTHON             interpreter (default: $REPO/.venv/bin/python)
#   PROMPTS            prompt file (default: $REPO/../shared/data/coco2014_val_captions_30k.txt)
#   PROTOCOL           the published evaluation to reproduce (default sid_lsg_coco30k; also
#                      dmd2_coco10k_512, sid_dit_coco10k: see sidscale/eval/protocols.py)
#   NUM                number of prompts/images (default: the protocol's, 30k / 10k)
#   REF_STATS          reference statistics npz from tools/ref_stats.py (required)
#   INCEPTION_WEIGHTS  local inception-2015-12-05.pt (required)
#   CLIP_MODEL         open_clip architecture (default ViT-g-14)
#   CLIP_WEIGHTS       local weights for CLIP_MODEL (laion2b_s12b_b42k); empty: no CLIP score
#   BATCH              generation batch (default 16)
#   TEACHER_STEPS      > 0: also evaluate the teacher's own sampler (default 0), TEACHER_CFG (default 3)
#
# Afterwards: tools/fid_eval.py --plot RUN_DIR draws FID and CLIP score against kimg (RUN_DIR/eval/curves.png).
#
#SBATCH --job-name=sidscale-eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --output=slurm-eval-%A_%a.out
set -euo pipefail

list_targets() {  # every evaluable target of run $1, in a stable order
    local run=$1
    [[ -f "$run/export/sidscale.json" ]] && echo "$run/export"
    for d in "$run"/checkpoints/step_*; do
        [[ -f "$d/meta.json" ]] && echo "$d"
    done
    return 0
}

if [[ "${1:-}" == "--list" ]]; then
    run=$(realpath "${2:?usage: slurm/eval.sh --list RUN_DIR}")
    mkdir -p "$run/eval"
    tmp=$(mktemp "$run/eval/.pending.XXXXXX")
    while read -r target; do
        [[ -f "$run/eval/$(basename "$target")/metrics.json" ]] || echo "$target"
    done < <(list_targets "$run") > "$tmp"
    mv "$tmp" "$run/eval/pending.txt"
    n=$(wc -l < "$run/eval/pending.txt")
    awk '{print NR-1, $0}' "$run/eval/pending.txt"
    if (( n > 0 )); then
        echo "# submit: sbatch --array=0-$((n - 1)) slurm/eval.sh $run"
    else
        echo "# nothing to evaluate in $run"
    fi
    exit 0
fi

run=$(realpath "${1:?usage: sbatch --array=0-N slurm/eval.sh RUN_DIR [fid_eval args] (see slurm/eval.sh --list)}")
shift
pending="$run/eval/pending.txt"
[[ -f "$pending" ]] || { echo "$pending missing: run slurm/eval.sh --list $run first" >&2; exit 2; }
index=${SLURM_ARRAY_TASK_ID:?not an array task: submit with sbatch --array=...}
target=$(sed -n "$((index + 1))p" "$pending")
[[ -n "$target" ]] || { echo "array index $index: $pending has only $(wc -l < "$pending") targets" >&2; exit 2; }
out="$run/eval/$(basename "$target")"
if [[ -f "$out/metrics.json" ]]; then echo "$target: already evaluated ($out/metrics.json)"; exit 0; fi
[[ -d "$target" ]] || { echo "$target: gone (pruned checkpoint?), skipping"; exit 0; }

REPO=${REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
PROMPTS=${PROMPTS:-$REPO/../shared/data/coco2014_val_captions_30k.txt}
args=(--model "$target" --prompts "$PROMPTS" --out "$out"
      --ref-stats "${REF_STATS:?set REF_STATS (tools/ref_stats.py output)}"
      --inception-weights "${INCEPTION_WEIGHTS:?set INCEPTION_WEIGHTS (local inception-2015-12-05.pt)}"
      --protocol "${PROTOCOL:-sid_lsg_coco30k}" --clip-model "${CLIP_MODEL:-ViT-g-14}" --batch "${BATCH:-16}"
      --teacher-steps "${TEACHER_STEPS:-0}" --teacher-cfg "${TEACHER_CFG:-3}"
      --workers "${SLURM_CPUS_PER_TASK:-8}")
[[ -n "${NUM:-}" ]] && args+=(--num "$NUM")
[[ -n "${CLIP_WEIGHTS:-}" ]] && args+=(--clip-weights "$CLIP_WEIGHTS")
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
echo "task $index: $target -> $out"
if [[ -n "${SLURM_JOB_ID:-}" ]]; then
    srun "$PYTHON" "$REPO/tools/fid_eval.py" "${args[@]}" "$@"
else
    "$PYTHON" "$REPO/tools/fid_eval.py" "${args[@]}" "$@"
fi
