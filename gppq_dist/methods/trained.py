"""The methods that train through the G&P trainer (:mod:`gppq_dist.train.trainer`)."""

from __future__ import annotations

from typing import Any

from gppq_dist.config import GPPQMethod, RunConfig, TwoStagePQMethod
from gppq_dist.distributed import DistContext
from gppq_dist.methods import handles


@handles(GPPQMethod, TwoStagePQMethod)
def train(cfg: RunConfig, context: DistContext, resume: bool) -> dict[str, Any]:
    from gppq_dist.train.trainer import train as run_trainer

    return run_trainer(cfg, context, resume=resume)
