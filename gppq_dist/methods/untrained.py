"""The methods that code the weights once, with no training: direct PQ and the three
vector-quantization methods of Gong et al. 2014 (scalar k-means, sub-space PQ, residual PQ).

The run is the trainer's without its epochs: the data check on rank 0 first, the
baseline's val top-1, the (distributed) k-means of every layer with the method's coding
(:func:`gppq_dist.compress.code_model`), the val top-1 of the coded model as it ships
(fp16 codebooks), then rank 0 writes ``gppq.gppq``, ``summary.json`` and the MLflow run,
with the summary keys of a trained run (``top1_raw`` is the untouched baseline, ``epochs``
and ``steps`` are 0). Nothing to resume: ``--resume`` does nothing here.
"""

from __future__ import annotations

import copy
import time
from typing import Any

from gppq_dist.artifact import artifact_info, build_artifact, snap_model_
from gppq_dist.compress import code_model
from gppq_dist.config import RunConfig
from gppq_dist.data.loaders import run_loader
from gppq_dist.distributed import DistContext, reducer_for
from gppq_dist.evaluate import evaluate
from gppq_dist.models import load_model
from gppq_dist.runs import finish_run, preflight, write_config
from gppq_dist.tracking import open_tracker


def code_once(cfg: RunConfig, context: DistContext, resume: bool) -> dict[str, Any]:
    start = time.perf_counter()
    reducer = reducer_for(context)
    write_config(cfg, context)
    with open_tracker(cfg, context, resumed=False) as tracker:
        manifest = preflight(cfg, context, reducer)
        val_loader = run_loader(cfg.data, "val", manifest, context, cfg.seed)
        device = context.device
        model = load_model(cfg).to(device)
        baseline = evaluate(model, val_loader, device, "baseline val", reducer)
        coded = code_model(model, cfg, context)
        shipped = snap_model_(copy.deepcopy(model), coded.plans, coded.codebooks, coded.assignments)
        result = evaluate(shipped, val_loader, device, f"{cfg.method.name} val", reducer)
        tracker.log_metrics({"top1_quantized": result["top1"], "top1_raw": baseline["top1"], "gamma": coded.gamma,
                             "val_loss_quantized": result["loss"]}, step=0)
        artifact = build_artifact(shipped.cpu(), coded.plans, coded.codebooks, coded.assignments,
                                  artifact_info(cfg, coded.gamma))
        return finish_run(
            cfg, context, artifact, tracker, start,
            baseline_top1=baseline["top1"],
            direct_pq_top1=result["top1"] if cfg.method.name == "direct_pq" else None,
            top1_quantized=result["top1"],
            top1_raw=baseline["top1"],
            gamma=coded.gamma,
            epochs=0,
            steps=0,
            kmeans_s=coded.kmeans_s,
            resumed_from=None,
            history=[],
        )
