"""The methods that train through the trainer (:mod:`gppq_dist.train.trainer`): G&P PQ,
two-stage PQ, CLIP-Q and TSQ."""

from __future__ import annotations

from typing import Any

from gppq_dist.config import ClipQMethod, GPPQMethod, RunConfig, TSQMethod, TwoStagePQMethod
from gppq_dist.distributed import DistContext
from gppq_dist.methods import handles


@handles(GPPQMethod, TwoStagePQMethod, ClipQMethod, TSQMethod)
def train(cfg: RunConfig, context: DistContext, resume: bool) -> dict[str, Any]:
    from gppq_dist.train.trainer import train as run_trainer

    return run_trainer(cfg, context, resume=resume)
