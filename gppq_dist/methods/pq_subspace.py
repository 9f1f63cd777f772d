"""Gong et al. 2014, sub-space PQ: a K x d codebook of its own for every sub-space (column
block of a layer's rows), fitted on the layer's Cout rows; no training (codec ``pq_subspace``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Sequence

from pydantic import Field

from gppq_dist.methods.base import LayerQuant, MethodSpec, Strict

if TYPE_CHECKING:
    import torch

    from gppq_dist.pq.plan import LayerPlan
    from gppq_dist.pq.variants import Coded


class PQSubspaceMethod(Strict):
    """Gong et al. 2014: PQ with a codebook of its own per sub-space, no training."""

    name: Literal["pq_subspace"] = Field(description="Gong et al. 2014: PQ with a codebook of its own for every "
                                         "sub-space (column block of the rows), no training.")


def code(weights: Sequence[torch.Tensor], plans: Sequence[LayerPlan], **kmeans: Any) -> list[Coded]:
    from gppq_dist.pq.variants import subspace_pq

    return subspace_pq(weights, plans, **kmeans)


SPEC = MethodSpec(name="pq_subspace", config=PQSubspaceMethod, layer=LayerQuant, codec="pq_subspace", code=code)
