"""What every method's run shares, trained or not: the run folder's ``config.yaml``, the
data pre-flight (once, on rank 0), and the end of the run (``gppq.gppq``, ``summary.json``
with the keys every method writes, the tracker's final records)."""

from __future__ import annotations

import json
import time
from typing import Any

import torch
import yaml

from gppq_dist.artifact import Artifact, write_artifact
from gppq_dist.config import RunConfig
from gppq_dist.data.manifest import Manifest, load_manifest, prepare_manifest
from gppq_dist.distributed import DistContext, Reducer
from gppq_dist.errors import DataError
from gppq_dist.io import write_text_atomic
from gppq_dist.tracking import NullTracker


def write_config(cfg: RunConfig, context: DistContext) -> None:
    """Rank 0: the resolved config as ``<run dir>/config.yaml``."""
    if context.is_main:
        write_text_atomic(cfg.run_dir / "config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def preflight(cfg: RunConfig, context: DistContext, reducer: Reducer) -> Manifest:
    """The run's data, listed once: rank 0 checks the data (cached) and writes the manifest
    into the run folder (or keeps the one there, on a resume of an unchanged tree), then the
    other ranks read it and never list the tree themselves.

    A failure reaches every rank, so none is left waiting in a collective. Multi-node runs
    read the manifest from the run folder, which (like the checkpoints) must be on a file
    system every node sees.
    """
    ok, error, manifest = torch.ones(1, device=context.device), None, None
    if context.is_main:
        try:
            manifest = prepare_manifest(cfg.data, cfg.run_dir)
        except DataError as exc:
            ok.zero_()
            error = exc
    if context.distributed:
        reducer.broadcast(ok, src=0)
    if error is not None:
        raise error
    if not bool(ok):
        raise DataError(f"data check of '{cfg.data.root}' failed on rank 0 (its message says why)")
    return manifest if manifest is not None else load_manifest(cfg.data, cfg.run_dir)


def finish_run(cfg: RunConfig, context: DistContext, artifact: Artifact, tracker: NullTracker, start: float,
               **fields: Any) -> dict[str, Any]:
    """The run's summary: ``method``, the method's ``fields`` (every method gives
    ``baseline_top1``, ``direct_pq_top1``, ``top1_quantized``, ``top1_raw``, ``gamma``,
    ``epochs``, ``steps``, ``resumed_from``, ``history``), ``size_mb``, ``ratio`` and
    ``world_size``; rank 0 writes ``gppq.gppq`` and ``summary.json`` (adding
    ``file_bytes``, ``artifact`` and ``wall_s``) and the tracker's final records."""
    history = fields.pop("history", [])
    summary: dict[str, Any] = {
        "method": cfg.method.name,
        **fields,
        "size_mb": artifact.accounted_bytes / 2**20,
        "ratio": artifact.info["fp32_bytes"] / artifact.accounted_bytes,
        "world_size": context.world_size,
        "history": history,
    }
    if context.is_main:
        path = cfg.run_dir / "gppq.gppq"
        summary["file_bytes"] = write_artifact(artifact, path)
        summary["artifact"] = str(path)
        summary["wall_s"] = time.perf_counter() - start
        write_text_atomic(cfg.run_dir / "summary.json", json.dumps(summary, indent=2))
        tracker.finish(summary)
    return summary
