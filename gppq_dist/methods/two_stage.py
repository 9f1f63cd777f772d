"""Two-stage PQ ("And the Bit Goes Down"), stage 1: layer by layer, in network order.

Each quantized layer in turn is clustered with k-means weighted by its own input
activations (:mod:`gppq_dist.pq.weighted`) in the network whose earlier layers are already
quantized, so that it makes up for their error, and is then snapped to its codewords (the
fp16 codebook as stored). The activations come from ``method.calibration_batches`` train
batches per rank (each rank its own shard; the d x d moments are summed over the ranks, so
every rank clusters the same data), kept in memory so that every layer sees the same
images; the forward pass of a batch stops at the layer being clustered. Without
``activation_weighted`` the order changes nothing and stage 1 is direct PQ.

Stage 2 is the trainer's (:mod:`gppq_dist.train.trainer`) with mu = 0 on the snapped
weights: each codeword moves by its members' mean gradient, and the weights stay exactly
quantized (the residuals R0 of :mod:`gppq_dist.pq.reparam` start at exactly zero).
"""

from __future__ import annotations

import logging
import time
from itertools import islice

import torch
from torch import nn

from gppq_dist.artifact import snap_model_
from gppq_dist.compress import cluster
from gppq_dist.config import RunConfig
from gppq_dist.data.loaders import run_loader
from gppq_dist.data.manifest import Manifest
from gppq_dist.distributed import DistContext
from gppq_dist.distributed import Reducer
from gppq_dist.pq.plan import LayerPlan
from gppq_dist.pq.subvectors import to_subvectors
from gppq_dist.pq.weighted import input_slices, second_moment, weighted_kmeans

log = logging.getLogger(__name__)


class _Reached(Exception):
    """Raised by the input hook: the rest of the forward pass is not needed."""


def calibration_batches(cfg: RunConfig, context: DistContext, count: int, manifest: Manifest) -> list[torch.Tensor]:
    """The first ``count`` train batches of epoch 0 of this rank's shard (images only, on
    the process's device)."""
    loader = run_loader(cfg.data, "train", manifest, context, cfg.seed,
                        batch_size=cfg.train.batch_size // context.world_size)
    loader.set_epoch(0)
    batches = [images for images, _ in islice(loader, count)]
    del loader
    return batches


@torch.no_grad()
def for_each_input(model: nn.Module, module: nn.Module, batches: list[torch.Tensor], fold) -> None:
    """``fold(inputs)`` with ``module``'s input (after its other pre-hooks) for each batch;
    the forward pass stops there."""

    def capture(_module, args):
        fold(args[0])
        raise _Reached

    handle = module.register_forward_pre_hook(capture)
    try:
        for images in batches:
            try:
                model(images)
            except _Reached:
                pass
    finally:
        handle.remove()


def layerwise_pq(model: nn.Module, plans: list[LayerPlan], cfg: RunConfig, context: DistContext,
                 reducer: Reducer, manifest: Manifest) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Stage 1: psi and the (fp16-exact, fp32) codebooks of every layer; ``model``'s
    quantized weights are snapped to them in place."""
    if not cfg.method.activation_weighted:
        compressed = cluster(model, cfg, context)
        codebooks = {name: c.half().float() for name, c in compressed.codebooks.items()}
        snap_model_(model, plans, codebooks, compressed.assignments)
        return compressed.assignments, codebooks

    start = time.perf_counter()
    batches = calibration_batches(cfg, context, cfg.method.calibration_batches, manifest)
    modules = dict(model.named_modules())
    was_training = model.training
    model.eval()
    psi, codebooks = {}, {}
    for index, plan in enumerate(plans):
        module = modules[plan.name]
        moment = torch.zeros(plan.d, plan.d, dtype=torch.float64, device=context.device)

        def add(inputs, plan=plan, module=module, moment=moment):
            moment.add_(second_moment(input_slices(module, inputs, plan.d))[0])

        for_each_input(model, module, batches, add)
        reducer.all_reduce_sum(moment)
        result = weighted_kmeans(
            to_subvectors(module.weight.detach(), plan.d).to(context.device), moment, plan.k, reducer=reducer,
            iterations=cfg.kmeans.iterations, seed=cfg.kmeans.seed + index, kernel=cfg.kmeans.kernel,
            init_sample=cfg.kmeans.init_sample, chunk_mb=cfg.kmeans.chunk_mb,
        )
        psi[plan.name] = result.assignments
        codebooks[plan.name] = result.codebook.half().float()
        snap_model_(model, [plan], codebooks, psi)
    model.train(was_training)
    log.info("two-stage PQ, stage 1: %d layers in network order, activation-weighted k-means on %d "
             "batches per rank: %.1f s", len(plans), len(batches), time.perf_counter() - start)
    return psi, codebooks
