"""Training engines: how a G&P step is taken on the ranks (plain DDP, or DeepSpeed).

An engine owns the wrapped model and the optimizer(s) and takes one step at a time:

    loss = criterion(engine.forward(images), labels)
    engine.backward(loss)
    mean_loss = engine.step(loss)   # None when the loss was not finite on some rank

``step`` runs the G&P gradient transform (:class:`~gppq_dist.train.gp_update.GPUpdate`:
codeword-gradient sums all-reduced, the step's loss riding along in the same message so
that every rank sees the same finite/non-finite verdict), then the optimizer step, then
clears the gradients. ``optimizer`` is the torch optimizer the trainer's lr scheduler
drives; an engine that keeps a second optimizer copies its lr before stepping.

``state_dict()`` returns plain containers (tensors, numbers, strings, lists, dicts) that
``torch.load(weights_only=True)`` reads back. When ``sharded`` is true the state differs
per rank (ZeRO partitions) and the trainer gathers every rank's to rank 0, which alone
writes checkpoints.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from gppq_dist.config import TrainConfig
from gppq_dist.train.gp_update import GPUpdate


class Engine(Protocol):
    model: nn.Module  # the unwrapped model (state_dict, evaluation)
    optimizer: torch.optim.Optimizer  # what the lr scheduler drives
    sharded: bool

    def forward(self, images: torch.Tensor) -> torch.Tensor: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self, loss: torch.Tensor) -> float | None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def sgd(params, hp: TrainConfig) -> torch.optim.SGD:
    """The paper's optimizer: SGD with momentum and a little weight decay."""
    return torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)


def finite_mean(loss: torch.Tensor, update: GPUpdate) -> float | None:
    """Run the G&P transform with ``loss`` riding along; its mean over ranks, or None if not finite."""
    value = loss.detach().float().reshape(1).clone()
    update.transform_gradients_(extra=value)
    mean = float(value)
    return mean if torch.isfinite(value).all() else None


class DDPEngine:
    """One torch optimizer over all parameters; DDP for the unquantized ones (one process: none)."""

    sharded = False

    def __init__(self, model: nn.Module, update: GPUpdate, hp: TrainConfig, distributed: bool) -> None:
        self.model = model
        self.update = update
        if distributed:
            update.exclude_from_ddp(model)
            self.wrapped: nn.Module = nn.parallel.DistributedDataParallel(model)
        else:
            self.wrapped = model
        self.optimizer = sgd(model.parameters(), hp)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.wrapped(images)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, loss: torch.Tensor) -> float | None:
        mean = finite_mean(loss, self.update)
        if mean is not None:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return mean

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
