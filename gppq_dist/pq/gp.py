"""The G&P PQ update (paper eq. 6) as a gradient transform, single-device.

For a quantized layer with fixed assignment ``psi`` (N subvectors of length d, K codewords)
the gradient of subvector j becomes

    g'_j = mean_{i: psi(i) = psi(j)} g_i  +  mu * (W_j - c_psi(j)),   c_k = mean_{i: psi(i) = k} W_i

and the optimizer then steps as usual. The cluster-mean gradient depends only on the K x d
per-codeword gradient sums (:func:`codeword_gradient_sums`), so data-parallel callers
reduce those instead of the full N x d gradient, then call :func:`apply_gp_gradient`; the
mu term uses the replicated weights and needs no communication. Counts are fixed with psi.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Assignment:
    """``psi``: N int64 codeword of each subvector; ``counts``: K fp32 members per codeword."""

    psi: torch.Tensor
    counts: torch.Tensor

    @classmethod
    def from_psi(cls, psi: torch.Tensor, k: int) -> "Assignment":
        return cls(psi=psi, counts=torch.bincount(psi, minlength=k).to(torch.float32))

    @property
    def k(self) -> int:
        return self.counts.numel()


def cluster_means(subvectors: torch.Tensor, assignment: Assignment) -> torch.Tensor:
    """Codewords as the means of their members (eq. 5): ``N x d -> K x d``; empty ones are 0."""
    sums = torch.zeros(assignment.k, subvectors.shape[1], dtype=subvectors.dtype, device=subvectors.device)
    sums.index_add_(0, assignment.psi, subvectors)
    return sums / assignment.counts.clamp_min(1).unsqueeze(1).to(sums.dtype)


def codeword_gradient_sums(grad_subvectors: torch.Tensor, assignment: Assignment) -> torch.Tensor:
    """Per-codeword sums of the subvector gradients: ``N x d -> K x d`` (what ranks reduce)."""
    return cluster_means(grad_subvectors, Assignment(assignment.psi, torch.ones_like(assignment.counts)))


def apply_gp_gradient(
    weight_subvectors: torch.Tensor,
    grad_sums: torch.Tensor,
    assignment: Assignment,
    mu: float,
) -> torch.Tensor:
    """The eq. 6 gradient ``N x d`` from the (reduced) codeword gradient sums ``K x d``."""
    counts = assignment.counts.clamp_min(1).unsqueeze(1).to(grad_sums.dtype)
    mean_grad = (grad_sums / counts)[assignment.psi]
    if mu == 0:
        return mean_grad
    codewords = cluster_means(weight_subvectors, assignment)
    return mean_grad + mu * (weight_subvectors - codewords[assignment.psi])


def quantization_error(subvectors: torch.Tensor, assignment: Assignment) -> torch.Tensor:
    """One layer's term of Gamma (eq. 7): mean over subvectors of ``||W_j - c_psi(j)||^2``."""
    codewords = cluster_means(subvectors, assignment)
    return ((subvectors - codewords[assignment.psi]) ** 2).sum(1).mean()
