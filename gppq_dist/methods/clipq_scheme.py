"""CLIP-Q's training (:mod:`gppq_dist.methods.clipq`): the straight-through scheme.

Because the pruning is recomputed every step from weights that keep training, a weight
pruned early comes back when its full-precision value outgrows the others.
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
                              extras=masks)

    def state_dict(self) -> dict[str, Any]:
        return {}  # everything is recomputed from the weights
