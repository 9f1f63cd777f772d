"""The demo: the whole flow on scikit-learn's digits, on the CPU, in minutes.

Data (written once), baseline (cached), direct PQ, G&P PQ training, and one table.
``summary.json`` in the run folder keeps the numbers of the G&P run (including the
baseline and direct-PQ top-1 it measured on the same val loader).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from gppq_dist.compress import compress
from gppq_dist.config import RunConfig
from gppq_dist.data.digits import write_digits
from gppq_dist.distributed import init_distributed
from gppq_dist.pretrain import pretrain
from gppq_dist.train.trainer import train


log = logging.getLogger(__name__)


def run_demo(cfg: RunConfig) -> list[dict[str, Any]]:
    """Rows of the demo table: baseline, direct PQ, G&P PQ (quantized and raw weights)."""
    manifest = write_digits(cfg.data.root, size=cfg.data.image_size)
    log.info("data: %s (%d train, %d val)", cfg.data.root, manifest["train"], manifest["val"])
    baseline = pretrain(cfg)
    context = init_distributed(device="cpu")
    direct = compress(cfg, cfg.run_dir / "direct_pq.gppq", context, weights=baseline["weights"])
    summary = train(cfg.model_copy(update={"model": cfg.model.model_copy(update={"weights": baseline["weights"]})}),
                    context)
    fp32_mb = summary["size_mb"] * summary["ratio"]
    return [
        {"model": "baseline (fp32)", "top-1 %": summary["baseline_top1"], "size MB": fp32_mb,
         "file bytes": Path(baseline["weights"]).stat().st_size, "ratio": 1.0},
        {"model": "direct PQ (k-means, no finetuning)", "top-1 %": summary["direct_pq_top1"],
         "size MB": direct["accounted_mb"], "file bytes": direct["file_bytes"], "ratio": direct["ratio"]},
        {"model": "G&P PQ (quantized: what ships)", "top-1 %": summary["top1_quantized"],
         "size MB": summary["size_mb"], "file bytes": summary["file_bytes"], "ratio": summary["ratio"]},
        {"model": "G&P PQ (raw weights, for reference)", "top-1 %": summary["top1_raw"],
         "size MB": fp32_mb, "file bytes": "-", "ratio": 1.0},
    ]
