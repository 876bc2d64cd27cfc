#!/bin/bash
# Resume-if-possible for the cluster scripts: a requeued (SLURM) or restarted (torchrun) job continues
# from the newest checkpoint of its run folder, and a first start, which has none, trains from scratch.
# (`--ckpt_path last` by itself is an error when nothing can be found, which a first start must not be.)
#   source scripts/resume.sh; newest_checkpoint runs/slurm-123     # prints the newest checkpoint, or nothing
#   bash scripts/resume.sh RUN_DIR python train.py ARGS...         # runs the command, adding --ckpt_path NEWEST
# The newest (by modification time) of RUN_DIR/hpc_ckpt_<n>.ckpt (Lightning's save on the SLURM requeue
# signal) and RUN_DIR/**/checkpoints/last*.ckpt (written every epoch and every 30 minutes).

newest_checkpoint() {
  [[ -d $1 ]] || return 0
  find "$1" -type f \( -path "$1/hpc_ckpt_*.ckpt" -o -path '*/checkpoints/last*.ckpt' \) -printf '%T@ %p\n' |
    sort -n | tail -n 1 | cut -d' ' -f2-
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  set -euo pipefail
  run_dir=${1:?usage: resume.sh RUN_DIR COMMAND [ARGS...]}
  shift
  ckpt=$(newest_checkpoint "$run_dir")
  resume=()
  if [[ -n $ckpt ]]; then resume=(--ckpt_path "$ckpt"); fi
  exec "$@" "${resume[@]}"
fi
