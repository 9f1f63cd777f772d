"""The demo: the whole flow on scikit-learn's digits, on the CPU, in minutes.

Data (written once), baseline (cached), direct PQ, G&P PQ training on ``nproc`` processes
(torchrun, gloo), and one table. ``summary.json`` in the run folder keeps the numbers of
the G&P run (including the baseline and direct-PQ top-1 it measured on the same val
loader). The training resumes its own checkpoints, so a second ``make demo`` (or one after
an interruption) continues rather than starting over.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from gppq_dist.compress import compress
from gppq_dist.config import RunConfig
from gppq_dist.errors import UserError
from gppq_dist.data.digits import write_digits
from gppq_dist.distributed import init_distributed, resolve_device
from gppq_dist.pretrain import pretrain
from gppq_dist.train.trainer import train


log = logging.getLogger(__name__)


def run_demo(cfg: RunConfig, config_path: Path, sets: list[str], nproc: int = 2,
             device: str = "auto") -> list[dict[str, Any]]:
    """Rows of the demo table: baseline, direct PQ, G&P PQ (quantized and raw weights).

    ``cfg`` is ``config_path`` with ``sets`` applied; the training stage gets both again
    when it runs under torchrun (``nproc`` > 1). ``device``: ``auto`` runs on the GPUs when
    torch sees any, with ``nproc`` cut to one process per visible GPU; ``cpu`` on the CPU.
    """
    kind = resolve_device(device)
    if kind == "cuda" and nproc > torch.cuda.device_count():
        log.info("demo: %d GPU(s) visible: the G&P stage runs on %d process(es), not %d",
                 torch.cuda.device_count(), torch.cuda.device_count(), nproc)
        nproc = torch.cuda.device_count()
    manifest = write_digits(cfg.data.root, size=cfg.data.image_size)
    log.info("data: %s (%d train, %d val)", cfg.data.root, manifest["train"], manifest["val"])
    baseline = pretrain(cfg, device=kind)
    context = init_distributed(device=kind)
    direct = compress(cfg, cfg.run_dir / "direct_pq.gppq", context, weights=baseline["weights"])
    weights = f"model.weights={baseline['weights']}"
    if nproc > 1:
        log.info("G&P PQ on %d processes (torchrun, %s)", nproc, "NCCL" if kind == "cuda" else "gloo")
        command = [sys.executable, "-m", "gppq_dist.cli", "train", "--config", str(config_path),
                   "--nproc", str(nproc), "--resume", "auto", "--device", kind]
        for item in [*sets, weights]:
            command += ["--set", item]
        if subprocess.call(command) != 0:
            raise UserError(f"the G&P PQ stage failed (its message is above); rerun `gppq demo` to continue "
                            f"from its last checkpoint in {cfg.run_dir / 'checkpoints'}")
        summary = json.loads((cfg.run_dir / "summary.json").read_text())
    else:
        summary = train(cfg.model_copy(update={"model": cfg.model.model_copy(update={"weights": baseline["weights"]})}),
                        context, resume=True)
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
