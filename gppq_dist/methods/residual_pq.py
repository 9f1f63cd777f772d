"""Gong et al. 2014, residual PQ: ``stages`` joint codebooks per layer, each fitted on what
the ones before left; no training (codec ``residual``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Sequence

from pydantic import Field

from gppq_dist.methods.base import LayerQuant, MethodSpec, Strict

if TYPE_CHECKING:
    import torch

    from gppq_dist.pq.plan import LayerPlan
    from gppq_dist.pq.variants import Coded


class ResidualPQMethod(Strict):
    """Gong et al. 2014: residual quantization in ``stages`` stages, no training."""

    name: Literal["residual_pq"] = Field(description="Gong et al. 2014: residual quantization in `stages` stages, "
                                         "no training.")
    stages: int = Field(2, ge=1, le=8, description="Codebooks per layer, each coding what the ones before left.")


def code(weights: Sequence[torch.Tensor], plans: Sequence[LayerPlan], **kmeans: Any) -> list[Coded]:
    from gppq_dist.pq.variants import residual_pq

    return residual_pq(weights, plans, **kmeans)


SPEC = MethodSpec(name="residual_pq", config=ResidualPQMethod, layer=LayerQuant, codec="residual", code=code)
