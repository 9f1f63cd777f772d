"""Encode, decode (any codec of :mod:`gppq_dist.pq.plan`) and snap weights; pack codeword
indices to log2(K) bits."""

from __future__ import annotations

import numpy as np
import torch

from gppq_dist.pq.clipq import decode as clipq_decode
from gppq_dist.pq.kmeans import nearest
from gppq_dist.pq.plan import LayerPlan
from gppq_dist.pq.subvectors import from_subvectors, to_subvectors


def encode(weight: torch.Tensor, codebook: torch.Tensor, chunk_mb: int = 64) -> torch.Tensor:
    """Nearest codeword of every subvector: ``weight, K x d -> N`` (int64)."""
    _, assignments = nearest(to_subvectors(weight, codebook.shape[1]), codebook, chunk_mb=chunk_mb)
    return assignments


def decode(codebook: torch.Tensor, assignments: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The quantized weight: ``K x d, N -> shape`` with subvector j = ``codebook[assignments[j]]``."""
    return from_subvectors(codebook[assignments], shape)


TERNARY = (0.0, 1.0, -1.0, 0.0)  # 2-bit code -> sign (code 3 is not used)


def decode_layer(plan: LayerPlan, codebook: torch.Tensor, indices: torch.Tensor,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """The coded weight of ``plan.shape`` from its codebook(s) and flat indices, any codec
    (``clipq`` needs the layer's ``mask`` of kept weights)."""
    if plan.codec == "clipq":
        if mask is None:
            raise ValueError(f"layer {plan.name!r} (clipq) needs its sparsity mask")
        return clipq_decode(mask.to(indices.device), codebook[:, 0], indices, plan.shape)
    if plan.codec == "ternary":
        signs = torch.tensor(TERNARY, dtype=codebook.dtype, device=indices.device)[indices]
        return (signs.view(plan.shape[0], -1) * codebook[:, :1]).view(plan.shape)
    if plan.codec == "pq":
        vectors = codebook[indices]
    elif plan.codec == "pq_subspace":
        subspace = torch.arange(indices.numel(), device=indices.device) % plan.n_codebooks
        vectors = codebook[subspace, indices]
    elif plan.codec == "residual":
        per_stage = indices.view(plan.stages, plan.n_subvectors)
        vectors = codebook[0][per_stage[0]]
        for stage in range(1, plan.stages):
            vectors = vectors + codebook[stage][per_stage[stage]]
    else:
        raise ValueError(f"unknown codec {plan.codec!r}")
    return from_subvectors(vectors, plan.shape)


def ternary_indices(signs: torch.Tensor) -> torch.Tensor:
    """{-1, 0, +1} -> the 2-bit codes of :data:`TERNARY` (flat int64)."""
    signs = signs.reshape(-1)
    return (signs > 0).long() + 2 * (signs < 0).long()


def snap(weight: torch.Tensor, codebook: torch.Tensor, assignments: torch.Tensor) -> torch.Tensor:
    """``weight`` with each subvector replaced by its codeword (same shape and dtype)."""
    return decode(codebook.to(weight.dtype), assignments, weight.shape)


def pack_indices(assignments: torch.Tensor, bits: int) -> np.ndarray:
    """``N`` indices in ``[0, 2**bits)`` -> ``ceil(N*bits/8)`` bytes, little-endian bit order.

    Index j occupies bits ``[j*bits, (j+1)*bits)`` of the stream, least significant first.
    """
    values = assignments.detach().cpu().numpy().astype(np.uint32, copy=False)
    if bits == 0:
        return np.zeros(0, dtype=np.uint8)
    if values.size and int(values.max()) >> bits:
        raise ValueError(f"an index does not fit in {bits} bits")
    shifts = np.arange(bits, dtype=np.uint32)
    stream = ((values[:, None] >> shifts) & 1).astype(np.uint8)
    return np.packbits(stream.reshape(-1), bitorder="little")


def unpack_indices(packed: np.ndarray, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_indices`: bytes -> ``count`` int64 indices."""
    if bits == 0:
        return torch.zeros(count, dtype=torch.int64)
    needed = (count * bits + 7) // 8
    if packed.size != needed:
        raise ValueError(f"expected {needed} bytes for {count} indices of {bits} bits, got {packed.size}")
    stream = np.unpackbits(packed, count=count * bits, bitorder="little").reshape(count, bits)
    weights = (1 << np.arange(bits, dtype=np.int64))
    return torch.from_numpy(stream.astype(np.int64) @ weights)
