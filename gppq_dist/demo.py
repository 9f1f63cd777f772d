"""The demo: the whole flow on scikit-learn's digits, on the CPU, in minutes.

Data (written once), baseline (cached), direct PQ, evaluation of the artifact as it
ships, and one table. ``summary.json`` in the run folder keeps the numbers.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from gppq_dist.artifact import read_artifact, rebuild_model
from gppq_dist.compress import compress
from gppq_dist.config import RunConfig
from gppq_dist.data.digits import write_digits
from gppq_dist.data.loaders import build_loader
from gppq_dist.distributed import init_distributed
from gppq_dist.evaluate import evaluate
from gppq_dist.io import write_text_atomic
from gppq_dist.pretrain import pretrain

log = logging.getLogger(__name__)


def run_demo(cfg: RunConfig) -> list[dict[str, Any]]:
    start = time.perf_counter()
    manifest = write_digits(cfg.data.root, size=cfg.data.image_size)
    log.info("data: %s (%d train, %d val)", cfg.data.root, manifest["train"], manifest["val"])
    baseline = pretrain(cfg)
    artifact_path = cfg.run_dir / "direct_pq.gppq"
    summary = compress(cfg, artifact_path, init_distributed(device="cpu"), weights=baseline["weights"])
    artifact = read_artifact(artifact_path)
    # The val loader the baseline was scored with, so the two rows differ only by the model.
    val_loader = build_loader(cfg.data, "val", seed=cfg.seed)
    metrics = evaluate(rebuild_model(artifact), val_loader, device=val_loader.device, label="direct PQ val")
    fp32_mb = artifact.info["fp32_bytes"] / 2**20
    rows = [
        {"model": "baseline (fp32)", "top-1 %": baseline["top1"], "size MB": fp32_mb,
         "file bytes": _file_bytes(baseline["weights"]), "ratio": 1.0},
        {"model": "direct PQ (k-means, no finetuning)", "top-1 %": metrics["top1"],
         "size MB": summary["accounted_mb"], "file bytes": summary["file_bytes"], "ratio": summary["ratio"]},
    ]
    record = {
        "baseline_top1": baseline["top1"],
        "direct_pq_top1": metrics["top1"],
        "size_mb": summary["accounted_mb"],
        "file_bytes": summary["file_bytes"],
        "ratio": summary["ratio"],
        "gamma": summary["gamma"],
        "wall_s": time.perf_counter() - start,
    }
    write_text_atomic(cfg.run_dir / "summary.json", json.dumps(record, indent=2))
    return rows


def _file_bytes(path: str) -> int:
    from pathlib import Path

    return Path(path).stat().st_size
