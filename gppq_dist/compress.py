"""Direct PQ: k-means on a model's weights, no finetuning, written as a ``.gppq`` artifact.

The same for every method that does not train (``method:`` ``direct_pq``,
``kmeans_scalar``, ``pq_subspace``, ``residual_pq``: :func:`code_model` picks the codec);
for the methods that train, ``gppq compress`` is their direct-PQ starting point.

Runs as one process, or under torchrun (``torchrun --nproc_per_node=N -m
gppq_dist.compress --config CFG --out FILE``): each rank then clusters its shard of every
layer's subvectors, with one bucketed all-reduce per k-means iteration; rank 0 alone
writes the artifact.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gppq_dist.artifact import build_artifact, write_artifact
from gppq_dist.config import RunConfig
from gppq_dist.data.folder import preprocess_info
from gppq_dist.distributed import DistContext, reducer_for
from gppq_dist.models import create_model, load_weights
from gppq_dist.pq.kmeans import kmeans_many
from gppq_dist.pq.plan import LayerPlan, plan_layers
from gppq_dist.pq.subvectors import to_subvectors
from gppq_dist.pq.variants import Coded, residual_pq, subspace_pq

log = logging.getLogger(__name__)


# untrained method -> the codec of its layers (direct PQ, and G&P / two-stage PQ, code with "pq")
CODECS = {"kmeans_scalar": "pq", "pq_subspace": "pq_subspace", "residual_pq": "residual"}
UNTRAINED = ("direct_pq", *CODECS)
TRAINED_CODECS = {"clipq": "clipq", "tsq": "ternary"}


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


def load_model(cfg: RunConfig, weights: str | None = None) -> nn.Module:
    """The config's model (``model.arch`` or ``model.factory``) with ``weights`` (or
    ``model.weights``): a file, torchvision weights of the arch by name, or ``random``."""
    source = weights or cfg.model.weights
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model.spec)
    if source != "random":
        load_weights(model, source, key="--weights" if weights else "model.weights")
    return model.eval()


def cluster(model: nn.Module, cfg: RunConfig, context: DistContext, reducer=None) -> Compressed:
    """Plan the layers and run the (distributed) k-means of all of them in lockstep (PQ with
    one joint codebook per layer, the start of G&P PQ)."""
    return code_model(model, cfg, context, codec="pq", reducer=reducer)


def plan_for(model: nn.Module, cfg: RunConfig, codec: str | None = None) -> list[LayerPlan]:
    """The config's layer plan with its method's codec (``codec`` overrides it)."""
    codec = codec or CODECS.get(cfg.method.name) or TRAINED_CODECS.get(cfg.method.name, "pq")
    plans = plan_layers(model, cfg.quantization, codec=codec, stages=getattr(cfg.method, "stages", 1))
    if codec == "clipq":
        settings = [cfg.method.setting(plan.name) for plan in plans]
        plans = [replace(plan, prune=prune, k=1 << bits, k_requested=1 << bits)
                 for plan, (prune, bits) in zip(plans, settings)]
    return plans


def code_model(model: nn.Module, cfg: RunConfig, context: DistContext, codec: str | None = None,
               reducer=None) -> Compressed:
    """Code every planned layer with ``codec`` (default: the config method's), k-means of all
    layers in lockstep and sharded over the ranks."""
    if codec is None and cfg.method.name in TRAINED_CODECS:
        codec = "pq"  # their direct-PQ starting point (`gppq compress`)
    plans = plan_for(model, cfg, codec)
    codec = plans[0].codec if plans else "pq"
    modules = dict(model.named_modules())
    weights = [modules[plan.name].weight.detach().to(context.device) for plan in plans]
    options = kmeans_options(cfg, context, reducer)
    start = time.perf_counter()
    if codec == "pq":
        results = kmeans_many([to_subvectors(w, p.d) for w, p in zip(weights, plans)], [p.k for p in plans],
                              **options)
        coded = [Coded(r.codebook, r.assignments, r.mse) for r in results]
    elif codec == "pq_subspace":
        coded = subspace_pq(weights, plans, **options)
    else:
        coded = residual_pq(weights, plans, **options)
    elapsed = time.perf_counter() - start
    log.info("k-means of %d layers (%s): %.1f s on %d rank(s)", len(plans), codec, elapsed, context.world_size)
    return Compressed(
        model=model, plans=plans, codebooks={p.name: c.codebook for p, c in zip(plans, coded)},
        assignments={p.name: c.indices for p, c in zip(plans, coded)}, errors=[c.mse for c in coded],
        kmeans_s=elapsed,
    )


def artifact_info(cfg: RunConfig, gamma: float, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The artifact's payload: what rebuilds the model (``arch``, or ``factory`` with its
    ``factory_kwargs``; ``arch`` is then the factory's name), how it was made, the config."""
    model = cfg.model.model_dump(mode="json")
    recipe = {"factory": model["factory"], "factory_kwargs": model["kwargs"]} if cfg.model.factory else {}
    return {
        "arch": cfg.model.spec.label,
        **recipe,
        "num_classes": cfg.model.num_classes,
        "method": cfg.method.name if cfg.method.name in UNTRAINED else "direct_pq",
        "gamma": gamma,
        "preprocess": preprocess_info(cfg.data),
        "config": cfg.model_dump(mode="json"),
        **(extra or {}),
    }


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


def main(argv: list[str] | None = None) -> None:
    """``python -m gppq_dist.compress`` (torchrun entry point): same flags as ``gppq compress``."""
    import sys

    from gppq_dist.cli import main as cli_main

    cli_main(["compress", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
