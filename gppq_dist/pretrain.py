"""Training the uncompressed baseline that compression starts from (single process).

The result is cached: ``<run_dir>/baseline.safetensors`` plus ``baseline.json`` holding
the hash of every setting that shapes it; a second call with the same settings reuses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gppq_dist.config import RunConfig
from gppq_dist.data.layout import index_split
from gppq_dist.data.loaders import build_loader
from gppq_dist.distributed import resolve_device
from gppq_dist.errors import ConfigError
from gppq_dist.evaluate import evaluate
from gppq_dist.io import write_text_atomic
from gppq_dist.models import create_model, save_weights
from gppq_dist.progress import progress_bar
from gppq_dist.train.loop import train_epoch

log = logging.getLogger(__name__)


def baseline_paths(cfg: RunConfig) -> tuple[Path, Path]:
    return cfg.run_dir / "baseline.safetensors", cfg.run_dir / "baseline.json"


def settings_hash(cfg: RunConfig) -> str:
    shaping = {
        "seed": cfg.seed,
        # arch-only hashes as before, so that cached baselines stay valid
        "model": {"arch": cfg.model.arch, "num_classes": cfg.model.num_classes,
                  **({"factory": cfg.model.factory, "kwargs": cfg.model.kwargs} if cfg.model.factory else {})},
        "data": cfg.data.model_dump(mode="json", exclude={"workers", "batch_size"}),
        "pretrain": cfg.pretrain.model_dump(mode="json"),
    }
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]


def cached_baseline(cfg: RunConfig) -> dict[str, Any] | None:
    weights, record = baseline_paths(cfg)
    if not (weights.is_file() and record.is_file()):
        return None
    summary = json.loads(record.read_text())
    return summary if summary.get("settings_hash") == settings_hash(cfg) else None


def pretrain(cfg: RunConfig, force: bool = False, device: str = "auto") -> dict[str, Any]:
    """Train (or reuse) the baseline on ``device`` (``auto``: a GPU when torch sees one, or
    ``cpu``/``cuda``); returns its summary (``top1``, ``weights``, ...)."""
    if not force and (cached := cached_baseline(cfg)) is not None:
        log.info("baseline: reusing %s (top-1 %.2f%%)", cached["weights"], cached["top1"])
        return {**cached, "cached": True}
    torch.manual_seed(cfg.seed)
    classes = index_split(cfg.data, "train").classes
    if len(classes) != cfg.model.num_classes:
        raise ConfigError(
            f"model.num_classes = {cfg.model.num_classes} but '{cfg.data.root}/train' has "
            f"{len(classes)} class folders"
        )
    hp = cfg.pretrain
    device = torch.device(resolve_device(device))
    train_loader = build_loader(cfg.data, "train", seed=cfg.seed, batch_size=hp.batch_size, device=device)
    val_loader = build_loader(cfg.data, "val", seed=cfg.seed, device=device)
    model = create_model(cfg.model.spec).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=hp.lr, momentum=hp.momentum,
                                weight_decay=hp.weight_decay, nesterov=hp.momentum > 0)
    steps = hp.epochs * len(train_loader)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=hp.lr, total_steps=steps,
                                                    pct_start=0.15)
    criterion = nn.CrossEntropyLoss(label_smoothing=hp.label_smoothing)
    start = time.perf_counter()
    with progress_bar("pretrain", total=steps) as advance:
        for epoch in range(1, hp.epochs + 1):
            train_loader.set_epoch(epoch - 1)
            loss = train_epoch(model, train_loader, optimizer, criterion, device, advance,
                               f"epoch {epoch}/{hp.epochs}", after_step=scheduler.step)
            log.info("pretrain epoch %d/%d: train loss %.4f", epoch, hp.epochs, loss)
    metrics = evaluate(model, val_loader, device=device, label="baseline val")
    weights, record = baseline_paths(cfg)
    save_weights(model, weights)
    summary = {
        "weights": str(weights),
        "top1": metrics["top1"],
        "top5": metrics["top5"],
        "epochs": hp.epochs,
        "wall_s": time.perf_counter() - start,
        "settings_hash": settings_hash(cfg),
    }
    write_text_atomic(record, json.dumps(summary, indent=2))
    log.info("baseline: top-1 %.2f%% after %d epochs (%.0f s) -> %s",
             metrics["top1"], hp.epochs, summary["wall_s"], weights)
    return {**summary, "cached": False}
