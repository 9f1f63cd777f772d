"""Training engines: how a step is taken on the ranks (plain DDP, DeepSpeed, or FSDP2).

An engine owns the wrapped model and the optimizer and takes one step at a time:

    loss = criterion(engine.forward(images), labels)
    engine.backward(loss)
    mean_loss = engine.step(loss)   # None when the loss was not finite on some rank

The engines know nothing of the compression method. G&P PQ is a reparametrization
(:mod:`gppq_dist.pq.reparam`): each quantized layer's trainable parameter is its K x d
codeword tensor, so DDP (or DeepSpeed) reduces K x d gradients per layer in its own buckets,
overlapped with the backward pass, and one ``torch.optim.SGD`` over every trainable
parameter steps them (the method's scheme hooks the residual's scalar recursion onto that
optimizer). Straight-through methods (CLIP-Q, TSQ) swap weights around the forward and
backward passes and leave the step alone.

``step`` first all-reduces the step's loss (one fp32 number: the step's one host sync), so
that every rank reads the same finite/non-finite verdict, then steps the optimizer if the
loss was finite everywhere, then clears the gradients. ``optimizer`` is what the trainer's
lr scheduler drives.

``state_dict()`` returns plain containers (tensors, numbers, strings, lists, dicts) that
``torch.load(weights_only=True)`` reads back. When ``sharded`` is true the state differs
per rank (ZeRO partitions) and the trainer gathers every rank's to rank 0, which alone
writes checkpoints.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, ContextManager, Protocol

import torch
from torch import nn

from gppq_dist.config import TrainConfig


class Engine(Protocol):
    model: nn.Module  # the unwrapped model (state_dict, evaluation)
    optimizer: torch.optim.Optimizer  # what the lr scheduler drives (a torch.optim.SGD)
    sharded: bool

    def forward(self, images: torch.Tensor) -> torch.Tensor: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self, loss: torch.Tensor) -> float | None: ...

    def restart(self) -> None: ...  # after the weights were replaced: forget the momentum

    def gathered(self) -> ContextManager[None]: ...  # the whole model readable on every rank

    def model_state(self) -> dict[str, Any]: ...  # the model's state dict, whole (every rank calls)

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def sgd(params, hp: TrainConfig) -> torch.optim.SGD:
    """The paper's optimizer: SGD with momentum and a little weight decay."""
    return torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``model`` that train, in model order."""
    return [p for p in model.parameters() if p.requires_grad]


def loss_verdict(loss: torch.Tensor, reducer) -> float | None:
    """The step's loss averaged over the ranks, or None if it is not finite on some rank (a
    NaN or inf anywhere makes the mean so). The float is the step's one host sync: every
    rank reads the same verdict before anything is stepped."""
    value = loss.detach().float().reshape(1).clone()
    reducer.all_reduce_sum(value)  # also at world size 1 under a launcher (exercised, exact)
    if reducer.world_size > 1:
        value /= reducer.world_size
    mean = float(value)
    return mean if math.isfinite(mean) else None


class DDPEngine:
    """One SGD over every trainable parameter; DDP reduces the gradients (one process: none)."""

    sharded = False

    def __init__(self, model: nn.Module, hp: TrainConfig, distributed: bool, reducer) -> None:
        self.model = model
        self.reducer = reducer
        self.wrapped: nn.Module = nn.parallel.DistributedDataParallel(model) if distributed else model
        self.optimizer: torch.optim.Optimizer = sgd(trainable(model), hp)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.wrapped(images)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, loss: torch.Tensor) -> float | None:
        mean = loss_verdict(loss, self.reducer)
        if mean is not None:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return mean

    def restart(self) -> None:
        """The weights were replaced in place (a new phase): drop the momentum."""
        self.optimizer.state.clear()

    def gathered(self) -> ContextManager[None]:
        return contextlib.nullcontext()

    def model_state(self) -> dict[str, Any]:
        return self.model.state_dict()

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
