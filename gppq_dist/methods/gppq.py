"""G&P PQ (the paper): k-means once, then the progressive update (``train.*``).

Its layers are coded with ``pq`` (one joint K x d codebook per layer); the trainer trains
the codewords through :class:`gppq_dist.train.schemes.GPScheme`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from gppq_dist.methods.base import LayerQuant, MethodSpec, Strict

if TYPE_CHECKING:
    from torch import nn

    from gppq_dist.config import RunConfig
    from gppq_dist.distributed import DistContext
    from gppq_dist.pq.plan import LayerPlan
    from gppq_dist.train.schemes import Scheme


class GPPQMethod(Strict):
    """G&P PQ (the paper): k-means once, then the progressive update (``train.*``)."""

    name: Literal["gppq"] = "gppq"


def make_scheme(cfg: RunConfig, model: nn.Module, plans: list[LayerPlan], context: DistContext, reducer,
                state: dict[str, Any] | None, manifest: Any) -> Scheme:
    """psi from the checkpoint, or from the (distributed) k-means of every planned layer."""
    from gppq_dist.compress import cluster
    from gppq_dist.models import create_model
    from gppq_dist.train.schemes import GPScheme

    psi = state["psi"] if state is not None else cluster(model, cfg, context, reducer).assignments
    return GPScheme(model, plans, psi, cfg.train.mu, build=lambda: create_model(cfg.model.spec))


SPEC = MethodSpec(name="gppq", config=GPPQMethod, layer=LayerQuant, codec="pq", scheme=make_scheme)
