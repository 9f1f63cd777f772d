"""TSQ's training (:mod:`gppq_dist.methods.tsq`): the straight-through scheme of its
two steps and the finetune.

- Start: every coded layer's input gets a sparse quantizer (:mod:`gppq_dist.pq.ternary`),
  fitted layer by layer in network order on ``method.calibration_batches`` train batches
  per rank with the quantizers before it in place (``eps`` and ``step`` averaged over the
  ranks, so every rank holds the same ones). It is a forward pre-hook on the live model and
  stays on for the whole run and in the shipped model.
- Step 1 (epochs 1 to ``method.code_epochs``): the network learns with quantized inputs and
  full-precision weights (the gradient straight through the quantizers). Its "quantized"
  scores quantize the inputs only.
- Step 2 (at the start of the next epoch): layer by layer in network order, each coded
  layer becomes ``alpha * t`` per output row, ``t`` ternary, by iterative least squares
  against its response to its input codes (the d x d moment of the unfolded codes summed
  over the ranks; earlier layers already ternary), alpha rounded to fp16 as stored.
- Finetune (``train.epochs`` more, momentum, lr and schedule started over): the
  full-precision weights, starting at the ternary solution, train straight-through with
  the forward pass at ``alpha * clip(round(w / alpha), -1, 1)`` (alpha fixed from step 2).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn

from gppq_dist.artifact import Artifact, build_artifact
from gppq_dist.config import RunConfig
from gppq_dist.data.manifest import Manifest
from gppq_dist.distributed import DistContext
from gppq_dist.methods.two_stage import calibration_batches, for_each_input
from gppq_dist.pq.plan import LayerPlan
from gppq_dist.pq.ternary import (
    InputQuantizer,
    fit_sparse_quantizer,
    ternary_codes,
    ternary_indices,
    ternary_least_squares,
)
from gppq_dist.pq.weighted import input_slices, second_moment
from gppq_dist.train.schemes import SwapScheme

log = logging.getLogger(__name__)

SAMPLES_PER_BATCH = 100_000  # input values per batch the quantizer is fitted on


class TSQScheme(SwapScheme):
    label = "TSQ"
    start_label = "TSQ input codes on the baseline"

    def __init__(self, model: nn.Module, plans: list[LayerPlan], cfg: RunConfig, context: DistContext, reducer,
                 state: dict[str, Any] | None, manifest: Manifest) -> None:
        super().__init__(model, plans, reducer)
        self.cfg, self.context, self.reducer, self.manifest = cfg, context, reducer, manifest
        self.method = cfg.method
        self.extra_epochs = self.method.code_epochs
        self.modules = [dict(model.named_modules())[plan.name] for plan in plans]
        self.alpha: list[torch.Tensor] | None = None
        if state is not None:
            self.quantizers = [InputQuantizer.from_tensor(row) for row in state["quantizers"]]
            for module, quantizer in zip(self.modules, self.quantizers):
                module.register_forward_pre_hook(quantizer)  # for the whole run
            if state["ternary"]:
                self.alpha = [state["alpha"][plan.name].to(w.device) for plan, w in zip(plans, self.weights)]
        else:
            self.quantizers = []
            self._fit_quantizers()

    # -- step 1 -----------------------------------------------------------------------------
    @torch.no_grad()
    def _fit_quantizers(self) -> None:
        start = time.perf_counter()
        batches = calibration_batches(self.cfg, self.context, self.method.calibration_batches, self.manifest)
        generator = torch.Generator().manual_seed(self.cfg.seed)
        was_training = self.model.training
        self.model.eval()
        levels = (1 << self.method.activation_bits) - 1
        for module in self.modules:
            samples: list[torch.Tensor] = []

            def add(inputs, samples=samples):
                flat = inputs.detach().reshape(-1).float().cpu()
                if flat.numel() > SAMPLES_PER_BATCH:
                    flat = flat[torch.randperm(flat.numel(), generator=generator)[:SAMPLES_PER_BATCH]]
                samples.append(flat)

            for_each_input(self.model, module, batches, add)
            eps, step = fit_sparse_quantizer(torch.cat(samples), self.method.activation_bits,
                                             self.method.activation_sparsity)
            values = torch.tensor([eps, step], dtype=torch.float64, device=self.context.device)
            self.reducer.all_reduce_sum(values)
            values /= self.reducer.world_size
            quantizer = InputQuantizer(float(values[0]), float(values[1]), levels)
            self.quantizers.append(quantizer)
            module.register_forward_pre_hook(quantizer)  # the next layers are fitted behind it
        self.model.train(was_training)
        log.info("TSQ: input quantizers of %d layers (%d bits, sparsity %.2f) fitted on %d batches per rank: %.1f s",
                 len(self.modules), self.method.activation_bits, self.method.activation_sparsity, len(batches),
                 time.perf_counter() - start)

    # -- step 2 -----------------------------------------------------------------------------
    @torch.no_grad()
    def _ternarize(self) -> None:
        start = time.perf_counter()
        batches = calibration_batches(self.cfg, self.context, self.method.calibration_batches, self.manifest)
        was_training = self.model.training
        self.model.eval()
        self.alpha = []
        for plan, module, weight in zip(self.plans, self.modules, self.weights):
            n = weight[0].numel()
            moment = torch.zeros(n, n, dtype=torch.float64, device=self.context.device)

            def add(inputs, module=module, moment=moment, n=n):
                moment.add_(second_moment(input_slices(module, inputs, n))[0])

            for_each_input(self.model, module, batches, add)
            self.reducer.all_reduce_sum(moment)
            # on the CPU: the coordinate descent is a loop over columns, each with a test
            t, alpha = ternary_least_squares(weight.detach().cpu(), moment.cpu(), iterations=self.method.ls_iterations,
                                             ridge=self.method.ridge)
            alpha = alpha.half().float().to(weight.device)
            weight.copy_((alpha.unsqueeze(1) * t.to(weight.device)).view_as(weight))
            self.alpha.append(alpha)
        self.model.train(was_training)
        log.info("TSQ step 2: %d layers ternary by iterative least squares: %.1f s", len(self.plans),
                 time.perf_counter() - start)

    def begin_epoch(self, epoch: int) -> bool:
        if self.alpha is None and epoch > self.method.code_epochs:
            self._ternarize()
            return True
        return False

    # -- the straight-through weights --------------------------------------------------------
    def quantize(self, index: int, weight: torch.Tensor) -> torch.Tensor:
        if self.alpha is None:
            return weight  # step 1: full-precision weights
        alpha = self.alpha[index].to(weight.device)
        return (alpha.unsqueeze(1) * ternary_codes(weight, alpha)).view_as(weight).to(weight.dtype)

    def before_forward(self) -> None:
        if self.alpha is not None:
            super().before_forward()

    @torch.no_grad()
    def artifact(self, info: dict[str, Any]) -> Artifact:
        if self.alpha is None:  # no finetune epochs after step 1 were run
            self._ternarize()
        final = self.quantized_copy().cpu()
        codes, alphas, quantizers = {}, {}, {}
        for plan, weight, alpha, quantizer in zip(self.plans, self.weights, self.alpha, self.quantizers):
            codes[plan.name] = ternary_indices(ternary_codes(weight.detach(), alpha)).cpu()
            alphas[plan.name] = alpha.cpu().unsqueeze(1)
            quantizers[plan.name] = quantizer.to_tensor()
        return build_artifact(final, self.plans, alphas, codes, info, extras=quantizers)

    def state_dict(self) -> dict[str, Any]:
        return {
            "quantizers": torch.stack([q.to_tensor() for q in self.quantizers]) if self.quantizers
            else torch.zeros(0, 3),
            "ternary": self.alpha is not None,
            "alpha": {plan.name: a.cpu() for plan, a in zip(self.plans, self.alpha or [])},
        }
