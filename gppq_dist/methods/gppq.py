"""G&P PQ (the paper): k-means once, then the progressive update (``train.*``).

A run whose ``model.weights`` is a ``.gppq`` artifact coded under the run's rules (e.g. one
imported by ``gppq import kill-the-bits``) starts from its codebooks and assignments instead.

Its layers are coded with ``pq`` (one joint K x d codebook per layer); the trainer trains
the codewords through :class:`gppq_dist.train.schemes.GPScheme`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from gppq_dist.methods.base import LayerQuant, MethodSpec, Strict, starting_codes

if TYPE_CHECKING:
    from torch import nn

    from gppq_dist.config import RunConfig
    from gppq_dist.distributed import DistContext
    from gppq_dist.pq.plan import LayerPlan
    from gppq_dist.train.schemes import Scheme


class GPPQMethod(Strict):
    """G&P PQ (the paper): k-means once, then the progressive update (``train.*``)."""

    name: Literal["gppq"] = Field("gppq", description="G&P PQ, the paper (the default): k-means once, then the "
                                  "progressive update every step (`train.*`, see Training).")


def make_scheme(cfg: RunConfig, model: nn.Module, plans: list[LayerPlan], context: DistContext, reducer,
                state: dict[str, Any] | None, manifest: Any) -> Scheme:
    """psi from the checkpoint; else psi and the codewords of the artifact ``model.weights``
    names (its decoded weights are the model: Gamma starts at 0); else the (distributed)
    k-means of every planned layer."""
    from gppq_dist.compress import cluster
    from gppq_dist.models import create_model
    from gppq_dist.train.schemes import GPScheme

    psi, codebooks = starting_codes(cfg, plans, state, lambda: (cluster(model, cfg, context, reducer).assignments, None))
    return GPScheme(model, plans, psi, cfg.train.mu, codebooks, build=lambda: create_model(cfg.model.spec))


SPEC = MethodSpec(name="gppq", config=GPPQMethod, layer=LayerQuant, codec="pq", scheme=make_scheme)
