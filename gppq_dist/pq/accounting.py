"""Storage accounting, the literature's convention (paper §3.2, DESIGN §2).

Indices cost log2(K) bits each, codebooks are fp16, a codec's extra tensor what the codec
says (:mod:`gppq_dist.pq.codecs`: CLIP-Q's sparsity pattern its relative-index coding,
TSQ's input quantizer three fp32 values), every parameter that is not quantized
(stem conv, BN weight and bias, biases) counts at fp32, buffers such as BN running
statistics are not counted, and MB = 2**20 bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from gppq_dist.pq.codecs import codec_for
from gppq_dist.pq.plan import LayerPlan

MiB = 2**20
FP32_BYTES = 4
FP16_BYTES = 2


@dataclass(frozen=True)
class LayerCost:
    plan: LayerPlan
    index_bytes: float
    codebook_bytes: int
    extra_bytes: float = 0.0  # the codec's extra tensor (CLIP-Q's sparsity pattern, TSQ's input quantizer)

    @property
    def total_bytes(self) -> float:
        return self.index_bytes + self.codebook_bytes + self.extra_bytes

    @property
    def extra_name(self) -> str | None:
        """What the extra bytes hold: the codec's extra tensor (``pattern``, ``activation``)."""
        extra = codec_for(self.plan.codec).extra
        return extra.name if extra is not None else None

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
            "extra_bytes": self.extra_bytes,
            **({f"{self.extra_name}_bytes": self.extra_bytes} if self.extra_name else {}),
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


def layer_cost(plan: LayerPlan, extra: torch.Tensor | None = None) -> LayerCost:
    """log2(K) bits per stored index; every codebook (one per sub-space or stage) in fp16;
    the codec's extra tensor as the codec counts it (``extra``: the layer's, e.g. a ``clipq``
    mask; without it, the codec's estimate before there is one).
    """
    coder = codec_for(plan.codec)
    return LayerCost(
        plan=plan,
        index_bytes=plan.n_indices * plan.index_bits / 8,
        codebook_bytes=math.prod(plan.codebook_shape) * FP16_BYTES,
        extra_bytes=coder.extra.cost(plan, extra) if coder.extra is not None else 0.0,
    )


def account(model: nn.Module, plans: list[LayerPlan], extras: Mapping[str, torch.Tensor] | None = None) -> SizeReport:
    """Accounted size of ``model`` compressed by ``plans`` (works on meta tensors);
    ``extras``: each layer's extra tensor (as :attr:`gppq_dist.artifact.Artifact.extras`)."""
    quantized = {f"{plan.name}.weight" if plan.name else "weight" for plan in plans}
    unquantized_names = [name for name, _ in model.named_parameters() if name not in quantized]
    params = dict(model.named_parameters())
    return SizeReport(
        layers=[layer_cost(plan, (extras or {}).get(plan.name)) for plan in plans],
        unquantized_params=sum(params[name].numel() for name in unquantized_names),
        total_params=sum(p.numel() for p in params.values()),
        unquantized_names=unquantized_names,
    )
