"""The subvector view of a weight (DESIGN §2).

A conv weight ``Cout x Cin x kh x kw`` is read per output filter as a row of length
``Cin*kh*kw`` in (Cin, kh, kw) order, cut into contiguous subvectors of length ``d``:
``Cout x Cin x kh x kw -> (Cout * Cin*kh*kw / d) x d``. A Linear ``Cout x Cin`` is cut the
same way along Cin. Subvector ``j`` of filter ``o`` is row ``o * (row_length // d) + j``.
"""

from __future__ import annotations

import math

import torch


def row_length(shape: tuple[int, ...] | torch.Size) -> int:
    """Elements per output filter: ``Cin*kh*kw`` for a conv, ``Cin`` for a Linear."""
    return math.prod(shape[1:])


def to_subvectors(weight: torch.Tensor, d: int) -> torch.Tensor:
    """``Cout x ... -> N x d`` with ``N = Cout * row_length / d`` (a view when contiguous)."""
    length = row_length(weight.shape)
    if d <= 0 or length % d:
        raise ValueError(f"subvector length d={d} does not divide the row length {length}")
    return weight.reshape(-1, d)


def from_subvectors(subvectors: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Inverse of :func:`to_subvectors`: ``N x d -> shape``."""
    if subvectors.numel() != math.prod(shape):
        raise ValueError(f"{tuple(subvectors.shape)} subvectors cannot fill a weight of shape {tuple(shape)}")
    return subvectors.reshape(shape)
