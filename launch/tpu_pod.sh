#!/usr/bin/env bash
# Train gdistill on a Cloud TPU VM pod slice: create (or queue) the TPU, copy this checkout to
# every worker, install the requirements, run gdistill.main on all workers at once.
#
#   launch/tpu_pod.sh --name=gd-pod --zone=us-central2-b --accelerator-type=v4-32 -- \
#       --config=configs/imagenet64.py --config.mesh.fsdp=4 \
#       --config.data.data_dir=/mnt/data --workdir=/mnt/runs/imagenet64
#   launch/tpu_pod.sh --dry-run ...   # prints every command instead of running it (DRY_RUN=1 too)
#
# Everything after `--` goes to `python3 -m gdistill.main` on every worker, with
# --distributed=cluster (JAX reads the workers from the TPU metadata). The workdir and the data
# must be at the same path on every worker (Filestore/NFS, or a gcsfuse mount: --mount-bucket).
# Options (or the environment variable in brackets):
#   --name [TPU_NAME]  --zone [ZONE]  --project [PROJECT]  --accelerator-type [ACCELERATOR_TYPE]
#   --version [RUNTIME_VERSION]  runtime image (default chosen from the accelerator type)
#   --queued           request through queued resources and wait until ACTIVE (else tpu-vm create)
#   --spot             spot capacity
#   --skip-create      the TPU exists already (also detected: describe succeeds)
#   --skip-setup       code and packages are in place: only run
#   --mount-bucket=B   gcsfuse-mount gs://B at /mnt/B on every worker before the run
#   --background       start the run with nohup on every worker (log: ~/gdistill.log) and return
#   --dry-run          print the commands, run nothing
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TPU_NAME="${TPU_NAME:-gdistill}"
ZONE="${ZONE:-}"
PROJECT="${PROJECT:-}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"
RUNTIME_VERSION="${RUNTIME_VERSION:-}"
DRY_RUN="${DRY_RUN:-0}"
QUEUED=0 SPOT=0 SKIP_CREATE=0 SKIP_SETUP=0 BACKGROUND=0 MOUNT_BUCKET=""
REMOTE_DIR="gdistill"

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit "${1:-0}"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --name=*) TPU_NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --accelerator-type=*) ACCELERATOR_TYPE="${1#*=}" ;;
    --version=*) RUNTIME_VERSION="${1#*=}" ;;
    --queued) QUEUED=1 ;;
    --spot) SPOT=1 ;;
    --skip-create) SKIP_CREATE=1 ;;
    --skip-setup) SKIP_SETUP=1 ;;
    --mount-bucket=*) MOUNT_BUCKET="${1#*=}" ;;
    --background) BACKGROUND=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "tpu_pod.sh: unknown option $1 (gdistill.main flags go after --)" >&2; usage 2 ;;
  esac
  shift
done
MAIN_ARGS=("$@")

if [[ -z "$ZONE" ]]; then echo "tpu_pod.sh: --zone (or ZONE) is required" >&2; exit 2; fi
if [[ ${#MAIN_ARGS[@]} -eq 0 ]]; then
  echo "tpu_pod.sh: pass gdistill.main flags after --, e.g. -- --config=configs/imagenet64.py --workdir=/mnt/runs/x" >&2
  exit 2
fi
if [[ -z "$RUNTIME_VERSION" ]]; then
  case "$ACCELERATOR_TYPE" in
    v5litepod-*|v5e-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
    v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
    *) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
  esac
fi

GCLOUD=(gcloud)
LOC=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && LOC+=(--project="$PROJECT")

show() {  # prints a command line, single-quoting words that need it
  local out="+" w q="'"
  for w in "$@"; do
    if [[ "$w" =~ ^[A-Za-z0-9_./=:,@%+-]+$ ]]; then out+=" $w"; else out+=" '${w//$q/$q\\$q$q}'"; fi
  done
  echo "$out"
}

# Prints a command (prefixed '+'); runs it unless this is a dry run.
run() {
  show "$@"
  if [[ "$DRY_RUN" != 1 ]]; then "$@"; fi
}

on_all_workers() {  # on_all_workers 'remote shell command'
  run "${GCLOUD[@]}" compute tpus tpu-vm ssh "$TPU_NAME" "${LOC[@]}" --worker=all --command="$1"
}

# 1. The TPU.
if [[ "$SKIP_CREATE" != 1 ]]; then
  if [[ "$DRY_RUN" != 1 ]] && "${GCLOUD[@]}" compute tpus tpu-vm describe "$TPU_NAME" "${LOC[@]}" \
      >/dev/null 2>&1; then
    echo "TPU $TPU_NAME exists in $ZONE: not creating it"
  elif [[ "$QUEUED" == 1 ]]; then
    extra=(); [[ "$SPOT" == 1 ]] && extra+=(--spot)
    run "${GCLOUD[@]}" compute tpus queued-resources create "$TPU_NAME-qr" "${LOC[@]}" \
        --node-id="$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE" \
        --runtime-version="$RUNTIME_VERSION" "${extra[@]}"
    echo "waiting for queued resource $TPU_NAME-qr to become ACTIVE"
    state_cmd=("${GCLOUD[@]}" compute tpus queued-resources describe "$TPU_NAME-qr" "${LOC[@]}"
               --format='value(state.state)')
    if [[ "$DRY_RUN" == 1 ]]; then
      run "${state_cmd[@]}"
    else
      until [[ "$("${state_cmd[@]}")" == ACTIVE ]]; do sleep 60; done
    fi
  else
    extra=(); [[ "$SPOT" == 1 ]] && extra+=(--spot)
    run "${GCLOUD[@]}" compute tpus tpu-vm create "$TPU_NAME" "${LOC[@]}" \
        --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" "${extra[@]}"
  fi
fi

# 2. Code and packages on every worker.
if [[ "$SKIP_SETUP" != 1 ]]; then
  TARBALL="${TMPDIR:-/tmp}/gdistill-src.tar.gz"
  printf '+ (cd %q && git ls-files -co --exclude-standard | tar czf %q -T -)\n' "$ROOT" "$TARBALL"
  if [[ "$DRY_RUN" != 1 ]]; then
    (cd "$ROOT" && git ls-files -co --exclude-standard | tar czf "$TARBALL" -T -)
  fi
  run "${GCLOUD[@]}" compute tpus tpu-vm scp "$TARBALL" "$TPU_NAME:gdistill-src.tar.gz" \
      "${LOC[@]}" --worker=all
  on_all_workers "mkdir -p ~/$REMOTE_DIR && tar xzf ~/gdistill-src.tar.gz -C ~/$REMOTE_DIR && \
cd ~/$REMOTE_DIR && pip install -q -r requirements.txt && pip install -q -U 'jax[tpu]'"
  if [[ -n "$MOUNT_BUCKET" ]]; then
    on_all_workers "sudo mkdir -p /mnt/$MOUNT_BUCKET && sudo chown \$USER /mnt/$MOUNT_BUCKET && \
(mountpoint -q /mnt/$MOUNT_BUCKET || gcsfuse --implicit-dirs $MOUNT_BUCKET /mnt/$MOUNT_BUCKET)"
  fi
fi

# 3. The run: the same command on every worker.
quoted="$(printf ' %q' "${MAIN_ARGS[@]}")"
cmd="cd ~/$REMOTE_DIR && python3 -m gdistill.main --distributed=cluster$quoted"
if [[ "$BACKGROUND" == 1 ]]; then
  cmd="cd ~/$REMOTE_DIR && nohup python3 -m gdistill.main --distributed=cluster$quoted \
> ~/gdistill.log 2>&1 &"
fi
on_all_workers "$cmd"
