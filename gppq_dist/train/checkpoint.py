"""Training checkpoints: written atomically by rank 0, read without unpickling code.

A checkpoint is a ``torch.save`` of plain containers (tensors, numbers, strings, lists,
dicts) at the end of an epoch: model, optimizer and scheduler states, the fixed
assignments psi, the torch RNG state, the epoch, and the metrics so far. It is read with
``weights_only=True``. ``latest`` skips files that cannot be read (a crash mid-write leaves
only a temporary file, but a disk can still damage one), newest first.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

from gppq_dist.io import atomic_path

log = logging.getLogger(__name__)

PATTERN = re.compile(r"epoch_(\d{4,})\.pt")
KEEP = 2


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save(run_dir: Path, epoch: int, state: dict[str, Any]) -> Path:
    """Write ``epoch_<epoch>.pt`` atomically and keep only the newest ``KEEP``."""
    folder = checkpoint_dir(run_dir)
    path = folder / f"epoch_{epoch:04d}.pt"
    with atomic_path(path) as tmp:
        torch.save({**state, "epoch": epoch}, tmp)
    for old in _sorted(folder)[KEEP:]:
        old.unlink(missing_ok=True)
    return path


def latest(run_dir: Path) -> dict[str, Any] | None:
    """The newest readable checkpoint, or None when there is none."""
    for path in _sorted(checkpoint_dir(run_dir)):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a damaged file: fall back to the one before
            log.warning("checkpoint %s is unreadable (%s); trying an older one", path, exc)
            continue
        log.info("resuming from %s (epoch %d)", path, state["epoch"])
        return state
    return None


def _sorted(folder: Path) -> list[Path]:
    """Checkpoints in ``folder``, newest epoch first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := PATTERN.fullmatch(p.name))]
    return [path for _, path in sorted(found, reverse=True)]
