"""Training engines: how a G&P step is taken on the ranks (plain DDP, or DeepSpeed).

An engine owns the wrapped model and the optimizer(s) and takes one step at a time:

    loss = criterion(engine.forward(images), labels)
    engine.backward(loss)
    mean_loss = engine.step(loss)   # None when the loss was not finite on some rank

``step`` all-reduces the codeword gradient sums of the quantized weights
(:class:`~gppq_dist.train.gp_update.GPUpdate`), the step's loss riding along in the same
message so that every rank sees the same finite/non-finite verdict, then steps the
quantized weights with the G&P update folded into SGD (:class:`~gppq_dist.pq.gp_sgd.GPSGD`)
and every other parameter with a plain SGD of the same hyperparameters, then clears the
gradients. ``optimizer`` is the quantized weights' ``GPSGD``, the optimizer the trainer's
lr scheduler drives; the other optimizer copies its lr before stepping.

With a straight-through method (CLIP-Q, TSQ: ``update`` manages no weights) there is no
GPSGD: ``optimizer`` is one SGD over every trainable parameter, all of them reduced by DDP
(or DeepSpeed).

``state_dict()`` returns plain containers (tensors, numbers, strings, lists, dicts) that
``torch.load(weights_only=True)`` reads back. When ``sharded`` is true the state differs
per rank (ZeRO partitions) and the trainer gathers every rank's to rank 0, which alone
writes checkpoints.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
from torch import nn

from gppq_dist.config import TrainConfig
from gppq_dist.pq.gp_sgd import GPSGD
from gppq_dist.train.gp_update import GPUpdate


class Engine(Protocol):
    model: nn.Module  # the unwrapped model (state_dict, evaluation)
    optimizer: torch.optim.Optimizer  # what the lr scheduler drives
    sharded: bool

    def forward(self, images: torch.Tensor) -> torch.Tensor: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self, loss: torch.Tensor) -> float | None: ...

    def restart(self) -> None: ...  # after the weights were replaced: forget the momentum

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def sgd(params, hp: TrainConfig) -> torch.optim.SGD:
    """The paper's optimizer: SGD with momentum and a little weight decay."""
    return torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)


def gp_sgd(update: GPUpdate, hp: TrainConfig) -> GPSGD:
    """The paper's optimizer for the quantized weights, with the G&P update folded in."""
    return update.sgd(lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)


def unquantized(model: nn.Module, update: GPUpdate) -> list[nn.Parameter]:
    """The trainable parameters of ``model`` that are not quantized weights, in model order."""
    quantized = {id(weight) for weight in update.weights}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in quantized]


def reduce_step(loss: torch.Tensor, update: GPUpdate) -> tuple[float | None, list[torch.Tensor]]:
    """The codeword gradient sums averaged over ranks, with ``loss`` riding along; returns the
    loss's mean over the ranks (None if it is not finite on some rank) and the sums."""
    value = loss.detach().float().reshape(1).clone()
    sums = update.reduced_gradient_sums(extra=value)
    # the step's one host sync: every rank reads the same verdict (a NaN on any rank makes
    # the mean NaN) before anything is stepped
    mean = float(value)
    return (mean if math.isfinite(mean) else None), sums


def copy_lr(source: torch.optim.Optimizer, target: torch.optim.Optimizer) -> None:
    lr = source.param_groups[0]["lr"]
    for group in target.param_groups:
        group["lr"] = lr


class DDPEngine:
    """GPSGD for the quantized weights, SGD for the rest; DDP for the unquantized ones (one
    process: none). Without G&P-managed weights: SGD and DDP for all."""

    sharded = False

    def __init__(self, model: nn.Module, update: GPUpdate, hp: TrainConfig, distributed: bool) -> None:
        self.model = model
        self.update = update
        self.gp = bool(update.weights)
        if distributed:
            if self.gp:
                update.exclude_from_ddp(model)
            self.wrapped: nn.Module = nn.parallel.DistributedDataParallel(model)
        else:
            self.wrapped = model
        rest = unquantized(model, update)
        if self.gp:
            self.optimizer: torch.optim.Optimizer = gp_sgd(update, hp)
            self.rest = sgd(rest, hp) if rest else None
        else:
            self.optimizer, self.rest = sgd(rest, hp), None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.wrapped(images)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, loss: torch.Tensor) -> float | None:
        mean, sums = reduce_step(loss, self.update)
        if mean is not None:
            self.optimizer.step(sums) if self.gp else self.optimizer.step()
            if self.rest is not None:
                copy_lr(self.optimizer, self.rest)
                self.rest.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.rest is not None:
            self.rest.zero_grad(set_to_none=True)
        return mean

    def restart(self) -> None:
        """The weights were replaced in place (a new phase): drop the momentum."""
        self.optimizer.state.clear()
        if self.rest is not None:
            self.rest.state.clear()

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(),
                "rest": self.rest.state_dict() if self.rest is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.rest is not None:
            self.rest.load_state_dict(state["rest"])
