"""G&P PQ training: k-means once, then the eq. 6 update every step, data parallel.

One process, or under torchrun (``torchrun --nproc_per_node=N -m gppq_dist.train --config
CFG``): the initial k-means is sharded over the ranks, quantized weights are synchronised
through per-codeword gradient sums (:class:`~gppq_dist.train.gp_update.GPUpdate`) and every
other parameter through DDP. Every epoch scores the val set with quantization (each
subvector snapped to its codeword, fp16 codebook as stored) and without, and logs Gamma.
The final model is the snapped one; rank 0 writes it as ``<run dir>/gppq.gppq`` with
``summary.json`` beside it.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from typing import Any

import torch
from torch import nn

from gppq_dist.artifact import build_artifact, snap_model_, write_artifact
from gppq_dist.compress import artifact_info, cluster, load_model
from gppq_dist.pq.plan import plan_layers
from gppq_dist.config import RunConfig
from gppq_dist.data.loaders import build_loader
from gppq_dist.distributed import DistContext, reducer_for
from gppq_dist.errors import ConfigError
from gppq_dist.evaluate import evaluate
from gppq_dist.io import write_text_atomic
from gppq_dist.pq.gp import cluster_means
from gppq_dist.progress import progress_bar
from gppq_dist.train import checkpoint
from gppq_dist.train.gp_update import GPUpdate
from gppq_dist.train.loop import train_epoch

log = logging.getLogger(__name__)


def codebooks_of(update: GPUpdate) -> dict[str, torch.Tensor]:
    """Current codewords of every quantized layer: the means of their members (eq. 5)."""
    return {
        plan.name: cluster_means(weight.detach().reshape(-1, plan.d), assignment)
        for plan, weight, assignment in zip(update.plans, update.weights, update.assignments)
    }


def snapped_copy(model: nn.Module, update: GPUpdate) -> nn.Module:
    """A copy of ``model`` with every quantized weight replaced by its codewords."""
    assignments = {plan.name: a.psi for plan, a in zip(update.plans, update.assignments)}
    return snap_model_(copy.deepcopy(model), update.plans, codebooks_of(update), assignments)


def broadcast_buffers_(model: nn.Module, reducer) -> None:
    """Give every rank rank 0's floating-point buffers (BN running statistics), in one call."""
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    if reducer.world_size == 1 or not buffers:
        return
    flat = torch.cat([b.reshape(-1) for b in buffers])
    reducer.broadcast(flat, src=0)
    for buffer, value in zip(buffers, flat.split([b.numel() for b in buffers])):
        buffer.copy_(value.view_as(buffer))


def train(cfg: RunConfig, context: DistContext, resume: bool = False) -> dict[str, Any]:
    """Run G&P PQ as configured; returns the summary (also written by rank 0).

    Rank 0 writes a checkpoint after every epoch; ``resume`` continues from the newest
    readable one in the run folder (a fresh start when there is none).
    """
    hp = cfg.train
    if hp.batch_size % context.world_size:
        raise ConfigError(
            f"train.batch_size = {hp.batch_size} must split evenly over {context.world_size} ranks"
        )
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    reducer = reducer_for(context)
    loader_args = dict(rank=context.rank, world_size=context.world_size,
                       local_rank=context.local_rank, seed=cfg.seed)
    train_loader = build_loader(cfg.data, "train", batch_size=hp.batch_size // context.world_size,
                                **loader_args)
    val_loader = build_loader(cfg.data, "val", **loader_args)
    device = train_loader.device
    model = load_model(cfg).to(device)
    plans = plan_layers(model, cfg.quantization)
    resumed = checkpoint.latest(cfg.run_dir) if resume else None
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        psi, baseline, direct = resumed["psi"], resumed["baseline"], resumed["direct"]
    else:
        baseline = evaluate(model, val_loader, device, "baseline val", reducer)
        psi = cluster(model, cfg, context).assignments
    update = GPUpdate(model, plans, psi, hp.mu, reducer)
    if resumed is None:
        direct = evaluate(snapped_copy(model, update), val_loader, device, "direct PQ val", reducer)
        log.info("baseline top-1 %.2f%%, direct PQ top-1 %.2f%%, Gamma %.3e",
                 baseline["top1"], direct["top1"], update.gamma())

    if context.distributed:
        update.exclude_from_ddp(model)
        trained: nn.Module = nn.parallel.DistributedDataParallel(model)
    else:
        trained = model
    optimizer = torch.optim.SGD(model.parameters(), lr=hp.lr, momentum=hp.momentum,
                                weight_decay=hp.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.1,
                                                           patience=hp.plateau_patience)
    history: list[dict[str, Any]] = []
    first_epoch = 1
    if resumed is not None:
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        torch.set_rng_state(resumed["rng"])
        history, first_epoch = resumed["history"], resumed["epoch"] + 1
    steps = (hp.epochs - first_epoch + 1) * len(train_loader)
    with progress_bar("G&P PQ", total=steps) as advance:
        for epoch in range(first_epoch, hp.epochs + 1):
            train_loader.set_epoch(epoch - 1)
            train_loss = train_epoch(trained, train_loader, optimizer, nn.functional.cross_entropy, device,
                                     advance, f"epoch {epoch}/{hp.epochs}",
                                     before_step=update.transform_gradients_)
            # DDP syncs BN statistics at the start of a forward pass, so after the last step
            # each rank still holds its own: take rank 0's, which the artifact will hold.
            broadcast_buffers_(model, reducer)
            raw = evaluate(model, val_loader, device, "val (raw)", reducer)
            quantized = evaluate(snapped_copy(model, update), val_loader, device, "val (quantized)", reducer)
            scheduler.step(quantized["loss"])
            record = {
                "epoch": epoch,
                "train_loss": train_loss,
                "top1_raw": raw["top1"],
                "top1_quantized": quantized["top1"],
                "val_loss_quantized": quantized["loss"],
                "gamma": update.gamma(),
                "lr": optimizer.param_groups[0]["lr"],
            }
            history.append(record)
            if context.is_main:
                checkpoint.save(cfg.run_dir, epoch, {
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "psi": {n: p.cpu() for n, p in psi.items()},
                    "rng": torch.get_rng_state(), "history": history,
                    "baseline": baseline, "direct": direct,
                })
            log.info("epoch %d/%d: train loss %.4f, top-1 quantized %.2f%% / raw %.2f%%, Gamma %.3e, lr %.1e",
                     epoch, hp.epochs, record["train_loss"], record["top1_quantized"], record["top1_raw"],
                     record["gamma"], record["lr"])

    final = snapped_copy(model, update).cpu()
    assignments = {plan.name: a.psi.cpu() for plan, a in zip(update.plans, update.assignments)}
    codebooks = {name: c.cpu() for name, c in codebooks_of(update).items()}
    artifact = build_artifact(final, update.plans, codebooks, assignments,
                              artifact_info(cfg, update.gamma(), {"method": "gppq"}))
    summary = {
        "baseline_top1": baseline["top1"],
        "direct_pq_top1": direct["top1"],
        "top1_quantized": history[-1]["top1_quantized"],
        "top1_raw": history[-1]["top1_raw"],
        "gamma": history[-1]["gamma"],
        "size_mb": artifact.accounted_bytes / 2**20,
        "ratio": artifact.info["fp32_bytes"] / artifact.accounted_bytes,
        "epochs": hp.epochs,
        "world_size": context.world_size,
        "history": history,
    }
    if context.is_main:
        path = cfg.run_dir / "gppq.gppq"
        summary["file_bytes"] = write_artifact(artifact, path)
        summary["artifact"] = str(path)
        summary["wall_s"] = time.perf_counter() - start
        write_text_atomic(cfg.run_dir / "summary.json", json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> None:
    """``python -m gppq_dist.train`` (torchrun entry point): same flags as ``gppq train``."""
    import sys

    from gppq_dist.cli import main as cli_main

    cli_main(["train", *(sys.argv[1:] if argv is None else argv)])
