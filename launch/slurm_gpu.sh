#!/usr/bin/env bash
# Submits launch/slurm_gpu.sbatch for a multi-node GPU run.
#
#   launch/slurm_gpu.sh --nodes=4 --gpus-per-node=8 --partition=gpu --time=48:00:00 -- \
#       --config=configs/imagenet64.py --config.mesh.fsdp=8 --workdir=/shared/runs/imagenet64
#   launch/slurm_gpu.sh --dry-run ...   # prints the sbatch command and the srun it would run
#
# Options: --nodes=N (2) --gpus-per-node=G (8) --partition=P --account=A --time=T
#   --launch=auto|explicit: one process per GPU with SLURM auto-detection (default), or one
#   process per node driving all its GPUs with explicit coordinator flags.
#   --venv=DIR: activate this virtualenv on the nodes. --dry-run (or DRY_RUN=1).
# Everything after `--` goes to `python -m gdistill.main` on every process.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
NODES=2 GPUS=8 PARTITION="" ACCOUNT="" TIME="24:00:00" LAUNCH=auto VENV=""
DRY_RUN="${DRY_RUN:-0}"

show() {  # prints a command line, single-quoting words that need it
  local out="+" w q="'"
  for w in "$@"; do
    if [[ "$w" =~ ^[A-Za-z0-9_./=:,@%+-]+$ ]]; then out+=" $w"; else out+=" '${w//$q/$q\\$q$q}'"; fi
  done
  echo "$out"
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes=*) NODES="${1#*=}" ;;
    --gpus-per-node=*) GPUS="${1#*=}" ;;
    --partition=*) PARTITION="${1#*=}" ;;
    --account=*) ACCOUNT="${1#*=}" ;;
    --time=*) TIME="${1#*=}" ;;
    --launch=*) LAUNCH="${1#*=}" ;;
    --venv=*) VENV="${1#*=}" ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --) shift; break ;;
    *) echo "slurm_gpu.sh: unknown option $1 (gdistill.main flags go after --)" >&2; exit 2 ;;
  esac
  shift
done
if [[ $# -eq 0 ]]; then
  echo "slurm_gpu.sh: pass gdistill.main flags after --" >&2
  exit 2
fi
case "$LAUNCH" in
  auto) TASKS_PER_NODE="$GPUS" ;;
  explicit) TASKS_PER_NODE=1 ;;
  *) echo "slurm_gpu.sh: --launch=$LAUNCH is invalid: auto or explicit" >&2; exit 2 ;;
esac

cmd=(sbatch --nodes="$NODES" --gpus-per-node="$GPUS" --ntasks-per-node="$TASKS_PER_NODE"
     --time="$TIME" --export=ALL,GDISTILL_LAUNCH="$LAUNCH",GDISTILL_VENV="$VENV")
[[ -n "$PARTITION" ]] && cmd+=(--partition="$PARTITION")
[[ -n "$ACCOUNT" ]] && cmd+=(--account="$ACCOUNT")
cmd+=("$HERE/slurm_gpu.sbatch" "$@")

show "${cmd[@]}"
if [[ "$DRY_RUN" == 1 ]]; then
  # What the batch script runs on the first node, with a simulated allocation.
  SLURM_JOB_NUM_NODES="$NODES" SLURM_JOB_NODELIST="node[001-$(printf '%03d' "$NODES")]" \
  SLURM_SUBMIT_DIR="$(cd "$HERE/.." && pwd)" GDISTILL_LAUNCH="$LAUNCH" GDISTILL_VENV="" \
  DRY_RUN=1 bash "$HERE/slurm_gpu.sbatch" "$@"
  exit 0
fi
exec "${cmd[@]}"
