"""Launching runs through submitit: one training job (``gppq submit``) or a grid of them as
one job array (``gppq sweep``), on SLURM, on this machine (``local``) or in this process
(``debug``).

The job callable, :class:`TrainJob`, sets up torch.distributed from the job's environment,
trains with ``resume=True`` and requeues itself on preemption or timeout, so a requeued
job continues from its newest checkpoint. The library itself never imports this package.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CLUSTERS": "submit", "JobFailed": "submit", "Resources": "submit", "TrainJob": "submit",
    "submit_run": "submit", "wait_for": "submit",
    "Sweep": "sweep", "load_sweep": "sweep", "submit_sweep": "sweep",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    # submitit is imported when something from here is used, not when the CLI starts
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
