#!/bin/bash
# Multi-node DDP without SLURM: start this on every node with the same settings; torchrun starts one
# process per GPU and Lightning's TorchElasticEnvironment reads the ranks it sets (RANK, LOCAL_RANK,
# GROUP_RANK, WORLD_SIZE). The nodes must share the run folder (a network file system) to resume.
#   RUN_ID=exp1 NNODES=2 RDZV_HOST=node0 scripts/torchrun.sh                 # on node0 and on node1
#   RUN_ID=exp1 scripts/torchrun.sh --config configs/losses/focal.yaml      # one node, every GPU
# Arguments go to train.py last, so they win. Environment knobs (defaults):
#   RUN_ID (required: rendezvous id, W&B run id, run folder)   NNODES=1   NPROC=<GPUs on this node>
#   RDZV_HOST=localhost  RDZV_PORT=29500  MAX_RESTARTS=3   CONFIG=configs/default.yaml   RUNS=runs
#   BATCH=8  NOMINAL_BATCH=64  LR_NOMINAL=0.01 (scripts/batch_rule.sh)   TORCHRUN=torchrun   PYTHON=python
# A failed worker makes torchrun restart the whole group (up to MAX_RESTARTS times). Every worker starts
# through scripts/resume.sh, which adds --ckpt_path with the run's newest last.ckpt (written every epoch
# and every 30 minutes) when there is one: a restart resumes, a first start trains from scratch. Running
# this script again with the same RUN_ID (e.g. after the job was killed) resumes the same way.

set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/batch_rule.sh

run_id=${RUN_ID:?set RUN_ID to the same name on every node (rendezvous id, W&B run id and run folder)}
nnodes=${NNODES:-1}
nproc=${NPROC:-$(nvidia-smi --list-gpus 2>/dev/null | wc -l)}
if [[ $nproc -lt 1 ]]; then
  echo "torchrun.sh: no GPU found on this node; set NPROC" >&2
  exit 2
fi
run_dir=${RUNS:-runs}/$run_id
read -r -a rule <<<"$(batch_rule_args $((nnodes * nproc)) "${BATCH:-8}" "${NOMINAL_BATCH:-64}" "${LR_NOMINAL:-0.01}")"
echo "run $run_id: $nnodes nodes × $nproc GPUs, ${rule[*]}"

exec "${TORCHRUN:-torchrun}" --nnodes "$nnodes" --nproc-per-node "$nproc" --max-restarts "${MAX_RESTARTS:-3}" \
  --rdzv-backend c10d --rdzv-endpoint "${RDZV_HOST:-localhost}:${RDZV_PORT:-29500}" --rdzv-id "$run_id" \
  --no-python bash scripts/resume.sh "$run_dir" "${PYTHON:-python}" \
  train.py --config "${CONFIG:-configs/default.yaml}" --config configs/trainer/ddp.yaml \
  --trainer.num_nodes "$nnodes" --trainer.devices "$nproc" --data.batch_size "${BATCH:-8}" "${rule[@]}" \
  --trainer.default_root_dir "$run_dir" \
  --trainer.logger.init_args.save_dir "$run_dir" --trainer.logger.init_args.id "$run_id" "$@"
