"""Gong et al. 2014, scalar k-means: all weights of a layer clustered to K levels, no
training. It is PQ with d = 1 (codec ``pq``), so every layer rule's d must be 1."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from gppq_dist.methods.base import LayerQuant, MethodSpec, Strict, joint_pq


class KMeansScalarMethod(Strict):
    """Gong et al. 2014: scalar k-means of all weights of a layer (every rule's d must be 1,
    K levels), no training."""

    name: Literal["kmeans_scalar"] = Field(description="Gong et al. 2014: scalar k-means of all weights of a layer "
                                           "to K levels (every rule's `d` is 1), no training.")


class ScalarLayer(LayerQuant):
    """``{d: 1, k}``: k levels for the single weights of a layer."""

    d: int = Field(gt=0, description="`1`: every weight is a subvector of its own.")
    k: int = Field(gt=0, description="Levels of the layer, a power of two (clamped per layer to the largest below "
                   "a quarter of its weights).")

    @field_validator("d")
    @classmethod
    def _single_weights(cls, d: int) -> int:
        if d != 1:
            raise ValueError("method kmeans_scalar quantizes single weights, so d must be 1 (k is the number of levels)")
        return d


SPEC = MethodSpec(name="kmeans_scalar", config=KMeansScalarMethod, layer=ScalarLayer, codec="pq", code=joint_pq)
