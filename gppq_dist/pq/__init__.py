"""The product-quantization math: single-device, no distributed code.

Distributed callers pass a :class:`~gppq_dist.pq.kmeans.Reducer`; on one process the
default :class:`~gppq_dist.pq.kmeans.LocalReducer` does nothing.
"""

from gppq_dist.pq.accounting import SizeReport, account
from gppq_dist.pq.codec import decode, encode, pack_indices, snap, unpack_indices
from gppq_dist.pq.kmeans import KMeansResult, LocalReducer, Reducer, kmeans, kmeans_many
from gppq_dist.pq.plan import LayerPlan, clamp_k, layer_kind, plan_layers
from gppq_dist.pq.subvectors import from_subvectors, to_subvectors

__all__ = [
    "KMeansResult",
    "LayerPlan",
    "LocalReducer",
    "Reducer",
    "SizeReport",
    "account",
    "clamp_k",
    "decode",
    "encode",
    "from_subvectors",
    "kmeans",
    "kmeans_many",
    "layer_kind",
    "pack_indices",
    "plan_layers",
    "snap",
    "to_subvectors",
    "unpack_indices",
]
