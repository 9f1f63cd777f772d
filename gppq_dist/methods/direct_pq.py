"""Direct PQ: k-means per layer (one joint K x d codebook), snap, no training."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from gppq_dist.methods.base import LayerQuant, MethodSpec, Strict, joint_pq


class DirectPQMethod(Strict):
    """k-means per layer (joint codebook), snap, no training."""

    name: Literal["direct_pq"] = Field(description="k-means per layer (one joint codebook), snap, no training.")


SPEC = MethodSpec(name="direct_pq", config=DirectPQMethod, layer=LayerQuant, codec="pq", code=joint_pq)
