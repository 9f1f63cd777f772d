"""Storage accounting, the literature's convention (paper §3.2, DESIGN §2).

Indices cost log2(K) bits each, codebooks are fp16, CLIP-Q's sparsity pattern costs its
relative-index coding (:mod:`gppq_dist.pq.clipq`), TSQ's activation quantizers three fp32
values per layer, every parameter that is not quantized
(stem conv, BN weight and bias, biases) counts at fp32, buffers such as BN running
statistics are not counted, and MB = 2**20 bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from torch import nn

from gppq_dist.pq.clipq import expected_pattern_bytes
from gppq_dist.pq.plan import LayerPlan

MiB = 2**20
FP32_BYTES = 4
FP16_BYTES = 2


@dataclass(frozen=True)
class LayerCost:
    plan: LayerPlan
    index_bytes: float
    codebook_bytes: int
    pattern_bytes: float = 0.0  # clipq: the sparsity pattern
    activation_bytes: int = 0  # ternary (TSQ): the input's quantizer

    @property
    def total_bytes(self) -> float:
        return self.index_bytes + self.codebook_bytes + self.pattern_bytes + self.activation_bytes

    @property
    def fp32_bytes(self) -> int:
        return math.prod(self.plan.shape) * FP32_BYTES

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.plan.to_dict(),
            "n_subvectors": self.plan.n_subvectors,
            "index_bits": self.plan.index_bits,
            "index_bytes": self.index_bytes,
            "codebook_bytes": self.codebook_bytes,
            "pattern_bytes": self.pattern_bytes,
            "activation_bytes": self.activation_bytes,
            "fp32_bytes": self.fp32_bytes,
        }


@dataclass(frozen=True)
class SizeReport:
    layers: list[LayerCost]
    unquantized_params: int
    total_params: int
    unquantized_names: list[str] = field(default_factory=list)

    @property
    def unquantized_bytes(self) -> int:
        return self.unquantized_params * FP32_BYTES

    @property
    def quantized_bytes(self) -> float:
        return sum(layer.total_bytes for layer in self.layers)

    @property
    def total_bytes(self) -> float:
        return self.quantized_bytes + self.unquantized_bytes

    @property
    def size_mb(self) -> float:
        return self.total_bytes / MiB

    @property
    def fp32_bytes(self) -> int:
        return self.total_params * FP32_BYTES

    @property
    def fp32_mb(self) -> float:
        return self.fp32_bytes / MiB

    @property
    def ratio(self) -> float:
        return self.fp32_bytes / self.total_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "size_mb": self.size_mb,
            "size_bytes": self.total_bytes,
            "fp32_mb": self.fp32_mb,
            "ratio": self.ratio,
            "quantized_bytes": self.quantized_bytes,
            "unquantized_bytes": self.unquantized_bytes,
            "unquantized_params": self.unquantized_params,
            "total_params": self.total_params,
            "layers": [layer.to_dict() for layer in self.layers],
        }


ACTIVATION_QUANTIZER_BYTES = 3 * FP32_BYTES  # eps, step, levels


def layer_cost(plan: LayerPlan, pattern_bytes: float | None = None) -> LayerCost:
    """log2(K) bits per stored index; every codebook (one per sub-space or stage) in fp16.

    ``pattern_bytes``: a ``clipq`` layer's sparsity pattern as coded; without it, that of a
    random pattern of the same density (the estimate before training).
    """
    if plan.codec == "clipq" and pattern_bytes is None:
        pattern_bytes = expected_pattern_bytes(plan.n_subvectors, plan.n_indices)
    return LayerCost(
        plan=plan,
        index_bytes=plan.n_indices * plan.index_bits / 8,
        codebook_bytes=math.prod(plan.codebook_shape) * FP16_BYTES,
        pattern_bytes=pattern_bytes or 0.0,
        activation_bytes=ACTIVATION_QUANTIZER_BYTES if plan.codec == "ternary" else 0,
    )


def account(model: nn.Module, plans: list[LayerPlan], patterns: Mapping[str, float] | None = None) -> SizeReport:
    """Accounted size of ``model`` compressed by ``plans`` (works on meta tensors);
    ``patterns``: bytes of each ``clipq`` layer's coded sparsity pattern."""
    quantized = {f"{plan.name}.weight" if plan.name else "weight" for plan in plans}
    unquantized_names = [name for name, _ in model.named_parameters() if name not in quantized]
    params = dict(model.named_parameters())
    return SizeReport(
        layers=[layer_cost(plan, (patterns or {}).get(plan.name)) for plan in plans],
        unquantized_params=sum(params[name].numel() for name in unquantized_names),
        total_params=sum(p.numel() for p in params.values()),
        unquantized_names=unquantized_names,
    )
