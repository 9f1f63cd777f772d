"""What the trainer trains: the method's handle on the live model (one object per run).

The trainer (:mod:`gppq_dist.train.trainer`) runs the same loop, checkpoints and reports
for every method that trains; a scheme says what is quantized and how:

- :class:`GPScheme` (G&P PQ, two-stage PQ): fixed assignments psi from the initial
  clustering, the quantized weights stepped through the codeword-gradient sync
  (``update``, :class:`~gppq_dist.train.gp_update.GPUpdate`), the shipped model snapped;
- :class:`SwapScheme` (CLIP-Q, TSQ; :mod:`gppq_dist.methods.clipq`, :mod:`~gppq_dist.methods.tsq`):
  straight-through training. Before each forward pass the full-precision weights of the
  coded layers are saved and replaced by their quantized version; after the backward pass
  they are put back, so the optimizer steps the full-precision weights with the gradient
  taken at the quantized ones. Every parameter is a plain SGD parameter then (``update``
  manages no weights; DDP or DeepSpeed reduce every gradient).

The loop per step: ``before_forward()``, forward, backward, ``after_backward()``, the
engine's step. ``begin_epoch(epoch)`` returns True when a new phase starts there (the lr
and its schedule start over); ``extra_epochs`` are added to ``train.epochs``.
``state_dict()`` is plain tensors and numbers (checkpoints load with ``weights_only``).
"""

from __future__ import annotations

import copy
from typing import Any, Protocol

import torch
from torch import nn

from gppq_dist.artifact import Artifact, build_artifact, snap_model_
from gppq_dist.pq.gp import cluster_means
from gppq_dist.pq.plan import LayerPlan
from gppq_dist.train.gp_update import GPUpdate


class Scheme(Protocol):
    update: GPUpdate
    plans: list[LayerPlan]
    label: str  # progress bar
    start_label: str  # the model before training, as scored ("direct PQ")
    extra_epochs: int

    def before_forward(self) -> None: ...

    def after_backward(self) -> None: ...

    def begin_epoch(self, epoch: int) -> bool: ...

    def quantized_copy(self) -> nn.Module: ...

    def gamma(self) -> float: ...

    def artifact(self, info: dict[str, Any]) -> Artifact: ...

    def state_dict(self) -> dict[str, Any]: ...


class GPScheme:
    """G&P PQ (``mu`` > 0) or two-stage PQ's codeword finetune (``mu`` = 0, from given
    codewords); ``psi`` fixed."""

    extra_epochs = 0

    def __init__(self, model: nn.Module, plans: list[LayerPlan], psi: dict[str, torch.Tensor], mu: float, reducer,
                 codebooks: dict[str, torch.Tensor] | None = None, two_stage: bool = False) -> None:
        self.model = model
        self.plans = plans
        self.update = GPUpdate(model, plans, psi, mu, reducer, codebooks=codebooks)
        self.label = "two-stage PQ" if two_stage else "G&P PQ"
        self.start_label = "two-stage PQ stage 1" if two_stage else "direct PQ"

    def before_forward(self) -> None:
        pass

    def after_backward(self) -> None:
        pass

    def begin_epoch(self, epoch: int) -> bool:
        return False

    def codebooks(self) -> dict[str, torch.Tensor]:
        """Current codewords of every quantized layer: the means of their members (eq. 5)."""
        update = self.update
        return {
            plan.name: cluster_means(weight.detach().reshape(-1, plan.d), assignment)
            for plan, weight, assignment in zip(update.plans, update.weights, update.assignments)
        }

    def psi(self) -> dict[str, torch.Tensor]:
        return {plan.name: a.psi for plan, a in zip(self.update.plans, self.update.assignments)}

    def quantized_copy(self) -> nn.Module:
        """A copy of the model with every quantized weight replaced by its codewords."""
        return snap_model_(copy.deepcopy(self.model), self.plans, self.codebooks(), self.psi())

    def gamma(self) -> float:
        return self.update.gamma()

    def artifact(self, info: dict[str, Any]) -> Artifact:
        final = self.quantized_copy().cpu()
        return build_artifact(final, self.plans, {n: c.cpu() for n, c in self.codebooks().items()},
                              {n: p.cpu() for n, p in self.psi().items()}, info)

    def state_dict(self) -> dict[str, Any]:
        return {"psi": {n: p.cpu() for n, p in self.psi().items()}}


class SwapScheme:
    """Straight-through training of the coded layers' weights (module docstring).

    Subclasses give ``quantize(index, weight) -> tensor`` (the forward pass's weight of
    layer ``index`` from its full-precision one) and the artifact.
    """

    extra_epochs = 0

    def __init__(self, model: nn.Module, plans: list[LayerPlan], reducer) -> None:
        self.model = model
        self.plans = plans
        self.update = GPUpdate(model, [], {}, 0.0, reducer)  # no G&P-managed weights
        modules = dict(model.named_modules())
        self.weights = [modules[plan.name].weight for plan in plans]
        self._full = [torch.empty_like(w) for w in self.weights]
        self._swapped = False

    def quantize(self, index: int, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def before_forward(self) -> None:
        for index, (weight, full) in enumerate(zip(self.weights, self._full)):
            full.copy_(weight)
            weight.copy_(self.quantize(index, weight))
        self._swapped = True

    @torch.no_grad()
    def after_backward(self) -> None:
        if self._swapped:
            for weight, full in zip(self.weights, self._full):
                weight.copy_(full)
            self._swapped = False

    def begin_epoch(self, epoch: int) -> bool:
        return False

    @torch.no_grad()
    def quantized_copy(self) -> nn.Module:
        quantized = copy.deepcopy(self.model)
        modules = dict(quantized.named_modules())
        for index, (plan, weight) in enumerate(zip(self.plans, self.weights)):
            modules[plan.name].weight.copy_(self.quantize(index, weight))
        return quantized

    @torch.no_grad()
    def gamma(self) -> float:
        """Mean over the coded layers of the mean squared quantization error."""
        errors = [float(((self.quantize(i, w) - w) ** 2).mean()) for i, w in enumerate(self.weights)]
        return sum(errors) / len(errors) if errors else 0.0
