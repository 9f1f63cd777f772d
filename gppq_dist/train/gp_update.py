"""The G&P update as a gradient transform on a live model, with codeword-gradient sync
across ranks (DESIGN §3): the reference the trainer's path is held to.

The trainer no longer steps through this module: G&P PQ trains as a reparametrization
(:mod:`gppq_dist.pq.reparam`: the codewords are the parameters, autograd gives their
gradients, DDP or DeepSpeed reduce them, torch's SGD steps them). The transform below, and
its closed form :class:`~gppq_dist.pq.gp_sgd.GPSGD`, are the paper's eq. 6 written out;
tests and benchmarks compare the reparametrization with them.

:class:`GPUpdate` holds each quantized layer's fixed assignment ``psi`` (from the initial
k-means) and, between ``loss.backward()`` and ``optimizer.step()``, replaces each quantized
weight's gradient by the eq. 6 gradient (:mod:`gppq_dist.pq.gp`). Across ranks it sums only
the K x d per-codeword gradient sums of every layer, in one bucketed all-reduce, instead of
the full gradient; the mu pull uses the replicated weights and needs no communication. The
quantized weights must therefore be left out of DDP's own reduction
(:meth:`GPUpdate.exclude_from_ddp`); every other parameter goes through DDP as usual.

Because the cluster mean is linear in the gradient, the result equals "all-reduce the full
gradients, then average per codeword" on the same global batch.

Two ways to step: :meth:`GPUpdate.transform_gradients_` writes the eq. 6 gradient into
``.grad`` for any torch optimizer; :meth:`GPUpdate.sgd` builds the closed form of eq. 6
followed by SGD (:class:`~gppq_dist.pq.gp_sgd.GPSGD`), which needs only the reduced sums and
no N x d pass of its own besides writing the weights. The engines use the latter (the
paper's optimizer is SGD); both give the same weights up to fp32 rounding.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from gppq_dist.pq.gp import Assignment, apply_gp_gradient, codeword_gradient_sums, quantization_error
from gppq_dist.pq.gp_sgd import GPSGD
from gppq_dist.distributed import Reducer
from gppq_dist.pq.kmeans import LocalReducer
from gppq_dist.pq.plan import LayerPlan


class GPUpdate:
    """The eq. 6 gradient transform for ``plans`` of ``model``, psi fixed from ``assignments``."""

    def __init__(
        self,
        model: nn.Module,
        plans: list[LayerPlan],
        assignments: Mapping[str, torch.Tensor],
        mu: float,
        reducer: Reducer | None = None,
        codebooks: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """``codebooks``: starting codewords for :meth:`sgd` (see :class:`GPSGD`); default the
        member means of the current weights."""
        modules = dict(model.named_modules())
        self.plans = list(plans)
        self.weights = [modules[plan.name].weight for plan in self.plans]
        self.assignments = [
            Assignment.from_psi(assignments[plan.name].to(weight.device), plan.k)
            for plan, weight in zip(self.plans, self.weights)
        ]
        self.mu = mu
        self.reducer = reducer or LocalReducer()
        self.codebooks = [codebooks[plan.name] for plan in self.plans] if codebooks is not None else None

    def exclude_from_ddp(self, model: nn.Module) -> None:
        """Keep DDP from all-reducing the quantized weights (call before wrapping in DDP)."""
        names = [f"{plan.name}.weight" for plan in self.plans]
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)

    @property
    def bytes_per_step(self) -> int:
        """Bytes one rank all-reduces per step for the quantized layers (fp32 sums)."""
        return sum(a.k * plan.d * 4 for a, plan in zip(self.assignments, self.plans))

    @torch.no_grad()
    def reduced_gradient_sums(self, extra: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Each quantized layer's codeword gradient sums (K x d), averaged over the ranks.

        One all-reduce for all layers. ``extra`` (a small fp32 tensor, e.g. the step's loss)
        rides along in the same message and is replaced in place by its mean over the ranks.
        """
        sums = []
        for weight, plan, assignment in zip(self.weights, self.plans, self.assignments):
            if weight.grad is None:
                weight.grad = torch.zeros_like(weight)
            sums.append(codeword_gradient_sums(weight.grad.reshape(-1, plan.d), assignment).reshape(-1))
        if extra is not None:
            sums.append(extra.detach().reshape(-1).to(torch.float32))
        flat = torch.cat(sums)
        self.reducer.all_reduce_sum(flat)  # also at world size 1 under a launcher (exercised, exact)
        if self.reducer.world_size > 1:
            flat /= self.reducer.world_size
        parts = list(flat.split([s.numel() for s in sums]))
        if extra is not None:
            extra.copy_(parts.pop().view_as(extra))
        return [part.view(a.k, plan.d) for part, a, plan in zip(parts, self.assignments, self.plans)]

    @torch.no_grad()
    def transform_gradients_(self, extra: torch.Tensor | None = None) -> None:
        """Replace each quantized weight's ``.grad`` by the eq. 6 gradient, averaged over ranks,
        for any torch optimizer to step (``extra`` as in :meth:`reduced_gradient_sums`).

        The engines take the faster road for SGD, :meth:`sgd`, which needs only the sums.
        """
        for weight, plan, assignment, grad_sums in zip(self.weights, self.plans, self.assignments,
                                                       self.reduced_gradient_sums(extra)):
            grad = weight.grad
            # The raw gradient has been summed: the eq. 6 gradient is written over it.
            in_place = grad.is_contiguous() and grad.dtype == grad_sums.dtype
            update = apply_gp_gradient(
                weight.detach().reshape(-1, plan.d), grad_sums, assignment, self.mu,
                out=grad.view(-1, plan.d) if in_place else None,
            )
            if not in_place:
                grad.copy_(update.view_as(grad))

    def sgd(self, lr: float, momentum: float = 0.0, weight_decay: float = 0.0) -> GPSGD:
        """SGD over the quantized weights with the G&P update folded in (:class:`GPSGD`):
        step it with :meth:`reduced_gradient_sums`, no ``transform_gradients_`` needed."""
        return GPSGD(self.weights, [plan.d for plan in self.plans], self.assignments, self.mu,
                     lr=lr, momentum=momentum, weight_decay=weight_decay, codewords=self.codebooks)

    @torch.no_grad()
    def gamma(self) -> float:
        """The quantization loss Gamma (eq. 7): mean over layers of the mean squared error."""
        errors = [
            quantization_error(weight.reshape(-1, plan.d), assignment)
            for weight, plan, assignment in zip(self.weights, self.plans, self.assignments)
        ]
        return float(torch.stack(errors).mean()) if errors else 0.0
