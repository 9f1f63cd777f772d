"""CLIP-Q's in-parallel pruning and quantization of one layer (Tung & Mori, CVPR 2018).

Given the layer's full-precision weights, a pruning fraction p and a bit width b:

- prune: the ``floor(p * N)`` weights of smallest magnitude are set to zero (ties at the
  threshold are broken by :func:`torch.topk`, so exactly that many are pruned);
- quantize: the kept weights' range ``[min, max]`` is cut into 2^b intervals of equal width
  (linear partitioning) and every kept weight becomes the mean of the kept weights in its
  interval (an empty interval keeps its centre, which no weight uses); the levels are
  rounded to fp16, as stored.

The trainer recomputes both every step from the full-precision weights, which keep
training (:mod:`gppq_dist.methods.clipq_scheme`): a pruned weight still gets a gradient and comes
back once it outgrows the threshold.

Stored, a layer is its 2^b fp16 levels, one b-bit level index per kept weight (in flat
order) and the sparsity pattern as relative indices (the Deep Compression / CLIP-Q
convention): per kept weight the number of zeros before it, in ``r``-bit codes, the largest
code ``2^r - 1`` meaning "skip that many positions, no weight here" for longer runs. ``r``
(1 to 8) is chosen per layer to make the pattern smallest; with ``r = 1`` it is a bitmap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

GAP_BITS = range(1, 9)


def n_kept(n: int, prune: float) -> int:
    """Weights kept of ``n`` at pruning fraction ``prune``: ``n - floor(prune * n)``."""
    return n - int(math.floor(prune * n + 1e-9))


@dataclass
class PrunedLayer:
    mask: torch.Tensor  # N bool, True = kept
    levels: torch.Tensor  # 2^b fp32 values (fp16-exact)
    indices: torch.Tensor  # n_kept int64 level indices, flat order

    def weight(self, shape: tuple[int, ...]) -> torch.Tensor:
        return decode(self.mask, self.levels, self.indices, shape)


def keep_mask(weight: torch.Tensor, prune: float) -> torch.Tensor:
    """The ``n_kept`` weights of largest magnitude (flat bool mask)."""
    magnitude = weight.detach().reshape(-1).abs()
    n = magnitude.numel()
    keep = n_kept(n, prune)
    if keep == n:
        return torch.ones(n, dtype=torch.bool, device=weight.device)
    threshold = _kth_smallest(magnitude, n - keep)
    mask = magnitude > threshold
    if int(mask.sum()) != keep:  # ties at the threshold
        mask = torch.zeros(n, dtype=torch.bool, device=weight.device)
        mask[magnitude.topk(keep, sorted=False).indices] = True
    return mask


def _kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest value (1-based); numpy's introselect on the CPU, about 15x faster
    there than ``torch.kthvalue`` on a layer's weights."""
    if values.device.type == "cpu":
        return torch.tensor(np.partition(values.contiguous().numpy(), k - 1)[k - 1], dtype=values.dtype)
    return values.kthvalue(k).values


def linear_levels(values: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """2^b levels by equal-width partitioning of the values' range, each the mean of its
    interval's values (fp16-exact), and the interval index of every value."""
    k = 1 << bits
    values = values.float()
    if values.numel() == 0:
        return torch.zeros(k, device=values.device), torch.zeros(0, dtype=torch.long, device=values.device)
    low, high = values.min(), values.max()
    width = (high - low) / k
    if float(width) > 0:
        index = ((values - low) / width).floor().clamp_(0, k - 1).long()
    else:
        index = torch.zeros_like(values, dtype=torch.long)
    sums = torch.zeros(k, device=values.device).index_add_(0, index, values)
    counts = torch.bincount(index, minlength=k)
    centres = low + (torch.arange(k, device=values.device) + 0.5) * width
    levels = torch.where(counts > 0, sums / counts.clamp_min(1), centres)
    return levels.half().float(), index


def prune_quantize(weight: torch.Tensor, prune: float, bits: int) -> PrunedLayer:
    """CLIP-Q's pruned and quantized version of ``weight`` (see the module docstring)."""
    mask = keep_mask(weight, prune)
    levels, indices = linear_levels(weight.detach().reshape(-1)[mask], bits)
    return PrunedLayer(mask=mask, levels=levels, indices=indices)


def decode(mask: torch.Tensor, levels: torch.Tensor, indices: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    out = torch.zeros(mask.numel(), dtype=levels.dtype, device=levels.device)
    out[mask] = levels[indices]
    return out.view(shape)


def gap_codes(mask: np.ndarray, bits: int) -> np.ndarray:
    """The sparsity pattern as ``bits``-bit relative indices (module docstring)."""
    escape = (1 << bits) - 1
    positions = np.flatnonzero(mask)
    gaps = np.diff(positions, prepend=-1) - 1
    lengths = gaps // escape + 1
    codes = np.full(int(lengths.sum()), escape, dtype=np.int64)
    codes[np.cumsum(lengths) - 1] = gaps % escape
    return codes


def mask_from_gap_codes(codes: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`gap_codes`; raises ``ValueError`` if the codes do not fit ``n``."""
    escape = (1 << bits) - 1
    codes = codes.astype(np.int64)
    positions = np.cumsum(np.where(codes == escape, escape, codes + 1)) - 1
    kept = positions[codes != escape]
    if kept.size and kept[-1] >= n:
        raise ValueError(f"the sparsity pattern runs past the layer's {n} weights")
    mask = np.zeros(n, dtype=bool)
    mask[kept] = True
    return mask


def best_gap_bits(mask: np.ndarray) -> tuple[int, int]:
    """``(r, number of codes)`` with the fewest bits for ``mask``'s pattern."""
    gaps = np.diff(np.flatnonzero(mask), prepend=-1) - 1
    costs = [(int((gaps // ((1 << r) - 1) + 1).sum()) * r, r) for r in GAP_BITS]
    _, r = min(costs)
    return r, int((gaps // ((1 << r) - 1) + 1).sum())


def pattern_bytes(mask: np.ndarray) -> float:
    """Bytes of the smallest relative-index coding of ``mask`` (accounting: exact bits / 8)."""
    r, n_codes = best_gap_bits(mask)
    return n_codes * r / 8


def expected_pattern_bytes(n: int, keep: int, seed: int = 0) -> float:
    """:func:`pattern_bytes` of a uniformly random pattern of ``keep`` of ``n`` (the estimate
    before training; the artifact counts its own pattern)."""
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng(seed).choice(n, size=keep, replace=False)] = True
    return pattern_bytes(mask)
