# The batch-size / learning-rate rule of the multi-GPU scripts (sourced by scripts/slurm/train.sbatch
# and scripts/torchrun.sh; docs/cluster.md explains it).
#
#   batch_rule_args PROCESSES BATCH NOMINAL LR_NOMINAL
#
# PROCESSES = GPUs per node × nodes, BATCH = images per process (data.batch_size), NOMINAL = the
# nominal global batch the learning rate LR_NOMINAL was tuned for (64 and 0.01, as YOLOv3 recipes).
#   K  = max(1, round(NOMINAL / (PROCESSES·BATCH)))   gradient accumulation up to the nominal batch
#   B  = PROCESSES·BATCH·K                            global batch per optimizer step
#   LR = LR_NOMINAL · B / NOMINAL                     linear scaling rule (Goyal et al. 2017, arXiv 1706.02677)
# Weight decay is left as it is (per step it scales with LR already); the warm-up of
# model.warmup_epochs (counted in optimizer steps) keeps the first large-batch steps stable.
# Prints: --trainer.accumulate_grad_batches K --model.lr LR

batch_rule_args() {
  local arg
  if [[ $# -ne 4 ]]; then
    echo "batch_rule_args: expected PROCESSES BATCH NOMINAL LR_NOMINAL, got: $*" >&2
    return 2
  fi
  for arg in "$1" "$2" "$3"; do
    if ! [[ $arg =~ ^[1-9][0-9]*$ ]]; then
      echo "batch_rule_args: PROCESSES, BATCH and NOMINAL must be positive integers, got '$arg'" >&2
      return 2
    fi
  done
  if ! [[ $4 =~ ^[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?$ ]]; then
    echo "batch_rule_args: LR_NOMINAL must be a positive number, got '$4'" >&2
    return 2
  fi
  awk -v p="$1" -v b="$2" -v n="$3" -v lr="$4" 'BEGIN {
    k = int(n / (p * b) + 0.5); if (k < 1) k = 1
    printf "--trainer.accumulate_grad_batches %d --model.lr %.6g\n", k, lr * p * b * k / n
  }'
}
