"""The product-quantization math: single-device, no distributed code.

Distributed callers pass a :class:`~gppq_dist.distributed.Reducer` (the protocol lives with
the distributed code); on one process the default :class:`~gppq_dist.pq.kmeans.LocalReducer`
does nothing.
"""

from gppq_dist.pq.accounting import SizeReport, account
from gppq_dist.pq.codec import decode, encode, pack_indices, snap, unpack_indices
from gppq_dist.pq.codecs import Codec, clamp_k, codec_for, decode_layer
from gppq_dist.pq.kmeans import KMeansResult, LocalReducer, kmeans, kmeans_many
from gppq_dist.pq.plan import LayerPlan, layer_kind, plan_layers
from gppq_dist.pq.subvectors import from_subvectors, to_subvectors

__all__ = [
    "Codec",
    "KMeansResult",
    "LayerPlan",
    "LocalReducer",
    "SizeReport",
    "account",
    "clamp_k",
    "codec_for",
    "decode",
    "decode_layer",
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
