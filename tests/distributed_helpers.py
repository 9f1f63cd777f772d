"""Run a function on real gloo processes (``torch.multiprocessing.spawn``).

The function must be importable (module level); it receives ``(rank, world_size, *args)``
after the process group is up, and its return value comes back through a file.
"""

from __future__ import annotations

import gc
import os
import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank, world_size, port, out_dir, fn, args):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
        # What fn built on the group (DDP reducers and their threads) goes first, on every
        # rank at the same point, while the group is still up.
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # The result is on disk: leave without running interpreter and C++ static teardown,
    # where gloo/DDP background threads can abort the process ("terminate called without
    # an active exception", seen once on a loaded 2-core machine) after the work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_gloo(fn, world_size: int, *args):
    """``[fn(rank, world_size, *args) for rank]`` computed in ``world_size`` processes."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(world_size, free_port(), out_dir, fn, args), nprocs=world_size)
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=True) for r in range(world_size)]
