"""Direct PQ: k-means on a model's weights, no finetuning, written as a ``.gppq`` artifact.

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

from gppq_dist.artifact import build_artifact, write_artifact
from gppq_dist.config import RunConfig
from gppq_dist.data.folder import preprocess_info
from gppq_dist.distributed import DistContext, reducer_for
from gppq_dist.models import build_model, load_weights
from gppq_dist.pq.kmeans import KMeansResult, kmeans_many
from gppq_dist.pq.plan import LayerPlan, plan_layers
from gppq_dist.pq.subvectors import to_subvectors

log = logging.getLogger(__name__)


@dataclass
class Compressed:
    model: nn.Module
    plans: list[LayerPlan]
    results: list[KMeansResult]
    kmeans_s: float

    @property
    def codebooks(self) -> dict[str, torch.Tensor]:
        return {plan.name: r.codebook for plan, r in zip(self.plans, self.results)}

    @property
    def assignments(self) -> dict[str, torch.Tensor]:
        return {plan.name: r.assignments for plan, r in zip(self.plans, self.results)}

    @property
    def gamma(self) -> float:
        """Quantization loss (eq. 7): mean over layers of the mean squared subvector error."""
        return sum(r.mse for r in self.results) / max(1, len(self.results))


def load_model(cfg: RunConfig, weights: str | None = None) -> nn.Module:
    """The config's model with ``weights`` (or ``model.weights``): a file or ``random``."""
    source = weights or cfg.model.weights
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model.arch, cfg.model.num_classes)
    if source != "random":
        load_weights(model, source, key="--weights" if weights else "model.weights")
    return model.eval()


def cluster(model: nn.Module, cfg: RunConfig, context: DistContext) -> Compressed:
    """Plan the layers and run the (distributed) k-means of all of them in lockstep."""
    plans = plan_layers(model, cfg.quantization)
    modules = dict(model.named_modules())
    subvectors = [
        to_subvectors(modules[plan.name].weight.detach().to(context.device), plan.d) for plan in plans
    ]
    start = time.perf_counter()
    results = kmeans_many(
        subvectors,
        [plan.k for plan in plans],
        iterations=cfg.kmeans.iterations,
        seed=cfg.kmeans.seed,
        reducer=reducer_for(context),
        kernel=cfg.kmeans.kernel,
        init_sample=cfg.kmeans.init_sample,
        chunk_mb=cfg.kmeans.chunk_mb,
    )
    elapsed = time.perf_counter() - start
    log.info("k-means of %d layers: %.1f s on %d rank(s)", len(plans), elapsed, context.world_size)
    return Compressed(model=model, plans=plans, results=results, kmeans_s=elapsed)


def artifact_info(cfg: RunConfig, gamma: float, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "arch": cfg.model.arch,
        "num_classes": cfg.model.num_classes,
        "method": "direct_pq",
        "gamma": gamma,
        "preprocess": preprocess_info(cfg.data),
        "config": cfg.model_dump(mode="json"),
        **(extra or {}),
    }


def compress(
    cfg: RunConfig, out: str | Path, context: DistContext, weights: str | None = None
) -> dict[str, Any]:
    """Direct PQ of the config's model into ``out``; returns a summary (rank 0 writes)."""
    model = load_model(cfg, weights)
    compressed = cluster(model, cfg, context)
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
