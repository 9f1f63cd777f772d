"""The training step on torch FSDP2 (``fully_shard``), equal to the DDP engine's step.

``train.engine: fsdp`` shards every child module that holds trainable parameters as one
FSDP unit and the model as the root (:func:`gppq_dist.distributed.fsdp_shard`): each rank
keeps a 1/world-size shard of every parameter, its gradient and its momentum; a unit's
parameters are all-gathered for its forward and backward and its gradients reduce-scattered.
G&P PQ needs nothing of its own here either: the quantized layers' parameters are their
K x d codewords (:mod:`gppq_dist.pq.reparam`), sharded like any other parameter, while psi
and R0 (the layers' extra state) and the buffers stay whole on every rank. One
``torch.optim.SGD`` over the sharded parameters steps them; the method's recursion hook
follows it.

Outside a forward or backward pass the parameters are DTensors (this rank's shard):
:meth:`FSDPEngine.model_state` all-gathers the whole model's state for checkpoints (every
rank calls it), and the G&P scheme all-gathers the codewords for the snapped copy and the
artifact. The optimizer state is saved as each rank's local shards (``sharded``: the trainer
gathers every rank's to rank 0) and restored onto the same layout, so a checkpoint resumes
with the same world size only. Straight-through methods (CLIP-Q, TSQ), which copy quantized
values into the weights around every step, are refused (the trainer says so).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gppq_dist.config import TrainConfig
from gppq_dist.distributed import ensure_process_group, fsdp_shard, full_tensor, local_shards, sharded_like
from gppq_dist.train.engine import DDPEngine, sgd, trainable


class FSDPEngine(DDPEngine):
    """FSDP2 over the whole model; one SGD over every (sharded) trainable parameter. The step
    is the DDP engine's, and so is ``gathered`` (nothing to do: whoever reads a parameter
    all-gathers it, ``full_tensor``); the state differs."""

    sharded = True

    def __init__(self, model: nn.Module, hp: TrainConfig, distributed: bool, reducer) -> None:
        # not DDPEngine's: FSDP shards the model in place instead of wrapping it in DDP
        ensure_process_group(distributed, next(model.parameters()).device)
        self.model = model
        self.reducer = reducer
        fsdp_shard(model)  # FSDP2 shards in place: the model is its own wrapper
        self.wrapped = model
        self.optimizer = sgd(trainable(model), hp)

    def model_state(self) -> dict[str, Any]:
        """The model's state dict with every parameter whole (all-gathered: every rank calls)."""
        return {name: full_tensor(value) if isinstance(value, torch.Tensor) else value
                for name, value in self.model.state_dict().items()}

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": local_shards(self.optimizer.state_dict())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["optimizer"]
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        restored = {index: {key: sharded_like(value, params[index]) if isinstance(value, torch.Tensor)
                            and value.dim() > 0 else value for key, value in entry.items()}
                    for index, entry in saved["state"].items()}
        self.optimizer.load_state_dict({**saved, "state": restored})
