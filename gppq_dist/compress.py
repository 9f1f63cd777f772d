"""Direct PQ: k-means on a model's weights, no finetuning, written as a ``.gppq`` artifact.

The same for every method that does not train (``method:`` ``direct_pq``,
``kmeans_scalar``, ``pq_subspace``, ``residual_pq``: :func:`code_model` codes with the
method's coding function and codec, :mod:`gppq_dist.methods.registry`); for the methods
that train with ``{d, k}`` layer rules (G&P PQ, two-stage PQ), ``gppq compress`` is their
direct-PQ starting point. CLIP-Q and TSQ have none: they train with ``gppq train``.

Runs as one process, or under torchrun (``torchrun --nproc_per_node=N -m
gppq_dist.compress --config CFG --out FILE``): each rank then clusters its shard of every
layer's subvectors, with one bucketed all-reduce per k-means iteration; rank 0 alone
writes the artifact.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gppq_dist.artifact import artifact_info, build_artifact, write_artifact
from gppq_dist.config import RunConfig
from gppq_dist.distributed import DistContext, reducer_for
from gppq_dist.errors import ConfigError
from gppq_dist.methods.base import CodeFunction, LayerQuant
from gppq_dist.methods.registry import method_spec
from gppq_dist.models import load_model
from gppq_dist.pq.plan import LayerPlan, plan_layers
from gppq_dist.pq.variants import joint_pq

log = logging.getLogger(__name__)


@dataclass
class Compressed:
    model: nn.Module
    plans: list[LayerPlan]
    codebooks: dict[str, torch.Tensor]
    assignments: dict[str, torch.Tensor]
    errors: list[float]  # per layer: mean squared error per subvector
    kmeans_s: float

    @property
    def gamma(self) -> float:
        """Quantization loss (eq. 7): mean over layers of the mean squared subvector error."""
        return sum(self.errors) / max(1, len(self.errors))


def kmeans_options(cfg: RunConfig, context: DistContext, reducer=None) -> dict[str, Any]:
    """The k-means settings of ``cfg``; its collectives through ``reducer`` (default: the
    context's process group, or none)."""
    return dict(iterations=cfg.kmeans.iterations, seed=cfg.kmeans.seed, reducer=reducer or reducer_for(context),
                kernel=cfg.kmeans.kernel, init_sample=cfg.kmeans.init_sample, chunk_mb=cfg.kmeans.chunk_mb)


def cluster(model: nn.Module, cfg: RunConfig, context: DistContext, reducer=None) -> Compressed:
    """Plan the layers and run the (distributed) k-means of all of them in lockstep (PQ with
    one joint codebook per layer, the start of G&P PQ)."""
    return code_model(model, cfg, context, reducer, direct=True)


def plan_for(model: nn.Module, cfg: RunConfig, codec: str | None = None) -> list[LayerPlan]:
    """The config's layer plan with its method's codec (``codec`` overrides it)."""
    return plan_layers(model, cfg.quantization, codec=codec or method_spec(cfg.method.name).codec,
                       stages=getattr(cfg.method, "stages", 1))


def coding_of(cfg: RunConfig, direct: bool = False) -> tuple[str, CodeFunction]:
    """The codec and coding function of the config's method; with ``direct``, or for a
    method that trains, direct PQ (its starting point), which needs ``{d, k}`` rules."""
    spec = method_spec(cfg.method.name)
    if spec.code is not None and not direct:
        return spec.codec, spec.code
    if not issubclass(spec.layer, LayerQuant):
        raise ConfigError(f"method {spec.name} has no direct-PQ starting point (its layer rules are not {{d, k}}): "
                          "train it with `gppq train`")
    return "pq", joint_pq


def code_model(model: nn.Module, cfg: RunConfig, context: DistContext, reducer=None,
               direct: bool = False) -> Compressed:
    """Code every planned layer with the config method's coding (``direct``: direct PQ), the
    k-means of all layers in lockstep and sharded over the ranks."""
    codec, code = coding_of(cfg, direct)
    plans = plan_for(model, cfg, codec)
    modules = dict(model.named_modules())
    weights = [modules[plan.name].weight.detach().to(context.device) for plan in plans]
    options = kmeans_options(cfg, context, reducer)
    start = time.perf_counter()
    coded = code(weights, plans, **options)
    elapsed = time.perf_counter() - start
    log.info("k-means of %d layers (%s): %.1f s on %d rank(s)", len(plans), codec, elapsed, context.world_size)
    return Compressed(
        model=model, plans=plans, codebooks={p.name: c.codebook for p, c in zip(plans, coded)},
        assignments={p.name: c.indices for p, c in zip(plans, coded)}, errors=[c.mse for c in coded],
        kmeans_s=elapsed,
    )


def compress(
    cfg: RunConfig, out: str | Path, context: DistContext, weights: str | None = None
) -> dict[str, Any]:
    """Direct PQ (or the config's untrained method) of the config's model into ``out``;
    returns a summary (rank 0 writes)."""
    model = load_model(cfg, weights)
    compressed = code_model(model, cfg, context)
    artifact = build_artifact(model, compressed.plans, compressed.codebooks,
                              compressed.assignments, artifact_info(cfg, compressed.gamma))
    summary = {
        "artifact": str(out),
        "layers": len(compressed.plans),
        "accounted_mb": artifact.accounted_bytes / 2**20,
        "ratio": artifact.info["fp32_bytes"] / artifact.accounted_bytes,
        "gamma": compressed.gamma,
        "kmeans_s": compressed.kmeans_s,
        "world_size": context.world_size,
    }
    if context.is_main:
        summary["file_bytes"] = write_artifact(artifact, out)
    return summary


if __name__ == "__main__":  # python -m gppq_dist.compress: torchrun's entry, `gppq compress`'s flags
    from gppq_dist.commands import torchrun_main

    torchrun_main("compress")
