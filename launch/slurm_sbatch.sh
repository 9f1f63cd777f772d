#!/usr/bin/env bash
# G&P PQ training on SLURM without submitit: plain sbatch + srun + torchrun, one torchrun
# agent per node and one rank per GPU. Submit from the repository root:
#   sbatch launch/slurm_sbatch.sh --config configs/resnet18_small_blocks.yaml [--set KEY=VALUE ...]
#   sbatch --nodes=4 --time=08:00:00 launch/slurm_sbatch.sh --config ...   (flags beat the #SBATCH lines)
#   NPROC_PER_NODE=2 sbatch --gpus-per-node=0 --cpus-per-task=2 launch/slurm_sbatch.sh ...   (CPU ranks)
# Each node's launch/torchrun_multinode.sh gets, from SLURM's variables:
#   NNODES         $SLURM_JOB_NUM_NODES
#   NODE_RANK      $SLURM_NODEID (set per node, inside srun)
#   MASTER_ADDR    the first host of $SLURM_JOB_NODELIST
#   MASTER_PORT    20000 + job id mod 20000, unless set when submitting
#   NPROC_PER_NODE $SLURM_GPUS_ON_NODE, unless set when submitting (1 without GPUs)
#   GPPQ_ROOT      the repository (default: the folder sbatch ran in, $SLURM_SUBMIT_DIR)
# Requeue-friendly: --requeue lets SLURM requeue the job after a preemption or a node
# failure, and --signal=B:USR1@120 warns this script 120 s before the time limit, which then
# requeues the job itself. Either way the job starts again from the top and the trainer,
# run with --resume auto, continues from its newest checkpoint (at most
# train.checkpoint_every steps are done again). $SLURM_RESTART_COUNT counts the requeues.
#SBATCH --job-name=gppq
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --open-mode=append
#SBATCH --output=gppq-%j.out
set -uo pipefail

root=${GPPQ_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
NNODES=$SLURM_JOB_NUM_NODES
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
gpus=${SLURM_GPUS_ON_NODE:-0}
[ "$gpus" -gt 0 ] 2>/dev/null || gpus=1
NPROC_PER_NODE=${NPROC_PER_NODE:-$gpus}
export NNODES MASTER_ADDR MASTER_PORT NPROC_PER_NODE
echo "gppq: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $NNODES node(s) x $NPROC_PER_NODE rank(s)," \
  "rendezvous at $MASTER_ADDR:$MASTER_PORT" >&2

# shellcheck disable=SC2329  # called by the USR1 trap below
requeue() {
  echo "gppq: job $SLURM_JOB_ID is near its time limit: requeueing it (it resumes from its newest checkpoint)" >&2
  scontrol requeue "$SLURM_JOB_ID"
}
trap requeue USR1

# One task per node; each becomes one torchrun agent with its node's rank.
# shellcheck disable=SC2016  # $SLURM_NODEID is expanded by each task's shell, not here
srun --kill-on-bad-exit=1 --ntasks-per-node=1 \
  bash -c 'NODE_RANK=$SLURM_NODEID exec "$0" "$@"' "$root/launch/torchrun_multinode.sh" "$@" &
step=$!
# wait returns early (status > 128) when the trap runs; keep waiting while srun lives
while :; do
  wait "$step"
  status=$?
  kill -0 "$step" 2>/dev/null || break
done
exit "$status"
