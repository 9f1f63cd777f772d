"""Plain PQ and the vector-quantization codecs of Gong et al. 2014, for whole models.

Each function codes many layers at once (k-means of all of them in lockstep, with the
``reducer`` of :func:`gppq_dist.pq.kmeans.kmeans_many`, so they shard over ranks as PQ
does) and returns, per layer, the codebook tensor in the plan's ``codebook_shape`` and the
flat int64 indices (``plan.n_indices``), as the artifact stores them:

- :func:`joint_pq` (codec ``pq``): one K x d codebook per layer (direct PQ, G&P PQ's start).
- :func:`subspace_pq` (codec ``pq_subspace``): the rows ``Cout x (m*d)`` of a layer are cut
  into m sub-spaces of d columns; sub-space j gets a K x d codebook fitted on its Cout
  subvectors. Codebooks ``m x K x d``; indices in subvector order (row o, sub-space j at
  ``o*m + j``).
- :func:`residual_pq` (codec ``residual``): stage 1 is plain PQ; stage s fits a codebook
  on what stages 1..s-1 left. Codebooks ``S x K x d``; indices stage-major (``S x N``).

Scalar k-means (Gong's "kmeans") is :func:`joint_pq` with d = 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from gppq_dist.pq.kmeans import kmeans_many
from gppq_dist.pq.plan import LayerPlan
from gppq_dist.pq.subvectors import to_subvectors


@dataclass
class Coded:
    """One layer coded: ``codebook`` (the plan's ``codebook_shape``), flat ``indices``, and
    ``mse``, the mean squared error per subvector of the decoded weight (eq. 7's term)."""

    codebook: torch.Tensor
    indices: torch.Tensor
    mse: float


def joint_pq(weights: Sequence[torch.Tensor], plans: Sequence[LayerPlan], **kmeans: Any) -> list[Coded]:
    """One joint codebook for every layer (codec ``pq``)."""
    results = kmeans_many([to_subvectors(w, p.d) for w, p in zip(weights, plans)], [p.k for p in plans], **kmeans)
    return [Coded(r.codebook, r.assignments, r.mse) for r in results]


def subspace_pq(weights: Sequence[torch.Tensor], plans: Sequence[LayerPlan], **kmeans: Any) -> list[Coded]:
    """Per-sub-space codebooks for every layer (codec ``pq_subspace``)."""
    sets, owners = [], []
    for layer, (weight, plan) in enumerate(zip(weights, plans)):
        rows = to_subvectors(weight.detach(), plan.d).view(plan.shape[0], plan.n_codebooks, plan.d)
        for j in range(plan.n_codebooks):
            sets.append(rows[:, j])
            owners.append(layer)
    results = kmeans_many(sets, [plans[owner].k for owner in owners], **kmeans)
    coded, start = [], 0
    for weight, plan in zip(weights, plans):
        mine = results[start:start + plan.n_codebooks]
        start += plan.n_codebooks
        codebook = torch.stack([r.codebook for r in mine])
        indices = torch.stack([r.assignments for r in mine], dim=1).reshape(-1)  # row-major (o, j)
        error = sum(r.inertia for r in mine) / plan.n_subvectors
        coded.append(Coded(codebook, indices, error))
    return coded


def residual_pq(weights: Sequence[torch.Tensor], plans: Sequence[LayerPlan], **kmeans: Any) -> list[Coded]:
    """``stages`` joint codebooks per layer, each on the residual of the ones before (codec
    ``residual``); every stage is one lockstep k-means of all layers."""
    stages = {plan.stages for plan in plans}
    if len(stages) > 1:
        raise ValueError("all layers must have the same number of residual stages")
    residuals = [to_subvectors(w.detach(), p.d).float().clone() for w, p in zip(weights, plans)]
    codebooks: list[list[torch.Tensor]] = [[] for _ in plans]
    indices: list[list[torch.Tensor]] = [[] for _ in plans]
    seed = kmeans.pop("seed", 0)
    for stage in range(stages.pop() if stages else 0):
        results = kmeans_many(residuals, [p.k for p in plans], seed=seed + 7919 * stage, **kmeans)
        for layer, result in enumerate(results):
            residuals[layer] -= result.codebook[result.assignments]
            codebooks[layer].append(result.codebook)
            indices[layer].append(result.assignments)
    return [
        Coded(torch.stack(books), torch.cat(idx), float((residual ** 2).sum(1).mean()))
        for books, idx, residual in zip(codebooks, indices, residuals)
    ]
