"""Encode, decode and snap weights coded with one joint codebook; pack codeword indices to
log2(K) bits. (Any codec's layer: :func:`gppq_dist.pq.codecs.decode_layer`.)"""

from __future__ import annotations

import numpy as np
import torch

from gppq_dist.pq.kmeans import nearest
from gppq_dist.pq.subvectors import from_subvectors, to_subvectors


def encode(weight: torch.Tensor, codebook: torch.Tensor, chunk_mb: int = 64) -> torch.Tensor:
    """Nearest codeword of every subvector: ``weight, K x d -> N`` (int64)."""
    _, assignments = nearest(to_subvectors(weight, codebook.shape[1]), codebook, chunk_mb=chunk_mb)
    return assignments


def decode(codebook: torch.Tensor, assignments: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The quantized weight: ``K x d, N -> shape`` with subvector j = ``codebook[assignments[j]]``."""
    return from_subvectors(codebook[assignments], shape)


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
