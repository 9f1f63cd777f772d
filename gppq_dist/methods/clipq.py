"""CLIP-Q (Tung & Mori, CVPR 2018): pruning and quantization in parallel with finetuning.

Every step, each coded layer's full-precision weights are pruned (fraction ``prune`` of
the smallest magnitudes) and their survivors quantized to 2^``bits`` levels
(:mod:`gppq_dist.pq.clipq`); the forward and backward passes see that weight, and the
full-precision copy takes the step (straight-through, :class:`~gppq_dist.train.schemes.SwapScheme`).
Because the pruning is recomputed from weights that keep training, a weight pruned early
comes back when its full-precision value outgrows the others. The shipped model is the
final full-precision weights pruned and quantized once more; its artifact stores the
sparsity pattern, the level indices of the kept weights and the fp16 levels.

(prune, bits) per layer come from ``method.prune`` / ``method.bits`` and ``method.layers``;
the paper chooses them with Bayesian optimisation against a target size, which is left to
the user (``gppq size`` tells the size of a setting before any training).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from gppq_dist.artifact import Artifact, build_artifact
from gppq_dist.pq.clipq import PrunedLayer, prune_quantize
from gppq_dist.pq.plan import LayerPlan
from gppq_dist.train.schemes import SwapScheme


class ClipQScheme(SwapScheme):
    label = "CLIP-Q"
    start_label = "CLIP-Q of the baseline"

    def __init__(self, model: nn.Module, plans: list[LayerPlan], reducer) -> None:
        super().__init__(model, plans, reducer)
        self.bits = [plan.index_bits for plan in plans]

    def coded(self, index: int, weight: torch.Tensor) -> PrunedLayer:
        return prune_quantize(weight, self.plans[index].prune, self.bits[index])

    def quantize(self, index: int, weight: torch.Tensor) -> torch.Tensor:
        return self.coded(index, weight).weight(tuple(weight.shape)).to(weight.dtype)

    def masks(self) -> dict[str, torch.Tensor]:
        """Each coded layer's kept weights, as they stand now."""
        return {plan.name: self.coded(i, w.detach()).mask for i, (plan, w) in enumerate(zip(self.plans, self.weights))}

    @torch.no_grad()
    def artifact(self, info: dict[str, Any]) -> Artifact:
        final = self.quantized_copy().cpu()
        codebooks, indices, masks = {}, {}, {}
        for i, (plan, weight) in enumerate(zip(self.plans, self.weights)):
            coded = self.coded(i, weight.detach().cpu())
            codebooks[plan.name] = coded.levels.unsqueeze(1)
            indices[plan.name], masks[plan.name] = coded.indices, coded.mask
        kept = sum(int(m.sum()) for m in masks.values())
        total = sum(math.prod(p.shape) for p in self.plans)
        return build_artifact(final, self.plans, codebooks, indices, {**info, "kept_fraction": kept / max(1, total)},
                              masks=masks)

    def state_dict(self) -> dict[str, Any]:
        return {}  # everything is recomputed from the weights
