"""Training checkpoints: written atomically by rank 0, read without unpickling code.

A checkpoint is a ``torch.save`` of plain containers (tensors, numbers, strings, lists,
dicts), named by the global step it was taken after: ``checkpoints/step_NNNNNNNN.pt``.
It holds the model, the engine's optimizer state(s), the scheduler, the fixed assignments
psi, the torch RNG state, where the data stands (epoch, batch, every rank's loader
position) and the metrics so far. It is read with ``weights_only=True``. ``latest`` skips
files that cannot be read (a crash mid-write leaves only a temporary file, but a disk can
still damage one), newest first.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

from gppq_dist.io import atomic_path

log = logging.getLogger(__name__)

PATTERN = re.compile(r"step_(\d{8,})\.pt")
KEEP = 2


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def path_for(run_dir: Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step_{step:08d}.pt"


def save(run_dir: Path, step: int, state: dict[str, Any]) -> Path:
    """Write ``step_<step>.pt`` atomically, then keep only the newest ``KEEP``."""
    path = path_for(run_dir, step)
    with atomic_path(path) as tmp:
        torch.save({**state, "global_step": step}, tmp)
    for old in saved(run_dir)[KEEP:]:
        old.unlink(missing_ok=True)
    return path


def latest(run_dir: Path) -> dict[str, Any] | None:
    """The newest readable checkpoint (with its ``path``), or None when there is none."""
    for path in saved(run_dir):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a damaged file: fall back to the one before
            log.warning("checkpoint %s is unreadable (%s); trying an older one", path, exc)
            continue
        log.info("resuming from %s (epoch %d, batch %d, step %d)", path, state["epoch"], state["batch"],
                 state["global_step"])
        return {**state, "path": str(path)}
    return None


def saved(run_dir: Path) -> list[Path]:
    """Checkpoint files of the run, newest first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := PATTERN.fullmatch(p.name))]
    return [path for _, path in sorted(found, reverse=True)]
