#!/usr/bin/env bash
# G&P PQ training (gppq train) across nodes with torchrun. Run the same command on every node:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 NPROC_PER_NODE=8 \
#     launch/torchrun_multinode.sh --config configs/resnet18_small_blocks.yaml [--set KEY=VALUE ...]
#   NNODES         number of nodes (default 1)
#   NODE_RANK      this node's index, 0..NNODES-1 (default 0)
#   MASTER_ADDR    address of node 0, reachable from every node (default 127.0.0.1)
#   MASTER_PORT    a free TCP port on node 0 (default 29500)
#   NPROC_PER_NODE processes per node: one per GPU, or a few on CPU (default 1)
#   PYTHON         the interpreter with gppq_dist installed (default: .venv/bin/python)
# The trainer runs with --resume auto: started again (by hand, after a crash, by a SLURM
# requeue), it continues from the newest checkpoint in <run dir>/checkpoints. Later
# arguments win, so --resume none starts over (refused if the run folder has checkpoints).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$here/.venv/bin/python}
exec "$python" -m torch.distributed.run \
  --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" \
  --nproc_per_node="${NPROC_PER_NODE:-1}" \
  --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29500}" \
  -m gppq_dist.train --resume auto "$@"
