"""A torchrun worker for tests/test_distributed.py: rank 1 dies by SIGKILL mid-collective in
the first attempt and joins late in the second, when the other rank would otherwise find the
dead rank's address in the agent's store (torch 2.14 keeps it there; with a plain
``dist.init_process_group`` the restart then fails to connect or hangs)."""

import os
import signal
import time

import torch
import torch.distributed as dist

from gppq_dist.distributed import init_distributed, restart_count

rank, attempt = int(os.environ["RANK"]), restart_count()
if attempt == 1 and rank == 1:
    time.sleep(3)  # the peer reaches the store first: a test of key separation, not of timing luck
init_distributed("cpu")
value = torch.ones(1)
dist.all_reduce(value)
if attempt == 0:
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    while True:  # until the peer's death reaches this rank
        dist.all_reduce(value)
print(f"attempt {attempt} rank {rank} sum {value.item():g}", flush=True)
dist.destroy_process_group()
