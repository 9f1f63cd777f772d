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

import warnings
from dataclasses import dataclass, field

import torch


@dataclass
class Assignment:
    """``psi``: N int64 codeword of each subvector; ``counts``: K fp32 members per codeword.

    ``members`` is psi as a K x N 0/1 CSR matrix (int32 indices), built once by
    :meth:`from_psi` for CPU assignments (psi is fixed): ``members @ x`` sums each
    codeword's members in index order, as ``index_add_`` does, in parallel over the
    codewords. ``index_add_`` on CPU (a ``scatter_add_`` with an expanded index) was 3x
    slower with 2 threads than with 1 on d = 9 rows, and 7x slower than ``members @ x``.
    """

    psi: torch.Tensor
    counts: torch.Tensor
    members: torch.Tensor | None = field(default=None, repr=False)

    @classmethod
    def from_psi(cls, psi: torch.Tensor, k: int) -> "Assignment":
        counts = torch.bincount(psi, minlength=k)
        members = _members_csr(psi, counts) if psi.device.type == "cpu" else None
        return cls(psi=psi, counts=counts.to(torch.float32), members=members)

    @property
    def k(self) -> int:
        return self.counts.numel()


def _members_csr(psi: torch.Tensor, counts: torch.Tensor) -> torch.Tensor | None:
    """psi as a K x N fp32 0/1 CSR matrix; rows list their members in increasing order."""
    n = psi.numel()
    if n >= 2**31:
        return None
    rows = torch.zeros(counts.numel() + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=rows[1:])
    columns = torch.argsort(psi, stable=True)
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(
            rows.to(torch.int32), columns.to(torch.int32), torch.ones(n), size=(counts.numel(), n),
            check_invariants=False,
        )


def codeword_sums(subvectors: torch.Tensor, assignment: Assignment) -> torch.Tensor:
    """Per-codeword sums of ``subvectors``: ``N x d -> K x d``, summed in member order."""
    members = assignment.members
    if members is not None and subvectors.dtype == torch.float32 and subvectors.device.type == "cpu":
        return members @ subvectors
    sums = torch.zeros(assignment.k, subvectors.shape[1], dtype=subvectors.dtype, device=subvectors.device)
    return sums.index_add_(0, assignment.psi, subvectors)


def _divisor(assignment: Assignment, dtype: torch.dtype) -> torch.Tensor:
    return assignment.counts.clamp_min(1).unsqueeze(1).to(dtype)


def cluster_means(subvectors: torch.Tensor, assignment: Assignment) -> torch.Tensor:
    """Codewords as the means of their members (eq. 5): ``N x d -> K x d``; empty ones are 0."""
    sums = codeword_sums(subvectors, assignment)
    return sums / _divisor(assignment, sums.dtype)


def codeword_gradient_sums(grad_subvectors: torch.Tensor, assignment: Assignment) -> torch.Tensor:
    """Per-codeword sums of the subvector gradients: ``N x d -> K x d`` (what ranks reduce)."""
    return codeword_sums(grad_subvectors, assignment)


@torch.no_grad()
def apply_gp_gradient(
    weight_subvectors: torch.Tensor,
    grad_sums: torch.Tensor,
    assignment: Assignment,
    mu: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The eq. 6 gradient ``N x d`` from the (reduced) codeword gradient sums ``K x d``.

    Computed as ``table[psi] + mu * W`` with one K x d table, ``(S_k - mu * sum_{i in k} W_i)
    / n_k`` (= mean gradient - mu * c_k): one gather and one in-place pass over N x d instead
    of building the mean gradient, the codewords' gather and their difference separately.
    Equal to ``mean[psi] + mu * (W - c[psi])`` up to fp32 rounding (about one ulp). ``out``
    (N x d; may be the raw gradient itself, already summed) receives the result.
    """
    table = grad_sums if mu == 0 else grad_sums - mu * codeword_sums(weight_subvectors, assignment)
    table = table / _divisor(assignment, grad_sums.dtype)
    out = torch.index_select(table, 0, assignment.psi, out=out)
    return out if mu == 0 else out.add_(weight_subvectors, alpha=mu)


def quantization_error(subvectors: torch.Tensor, assignment: Assignment) -> torch.Tensor:
    """One layer's term of Gamma (eq. 7): mean over subvectors of ``||W_j - c_psi(j)||^2``."""
    codewords = cluster_means(subvectors, assignment)
    return ((subvectors - codewords[assignment.psi]) ** 2).sum(1).mean()
