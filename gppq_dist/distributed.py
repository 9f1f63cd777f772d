"""The process group, kept small and apart from the math.

``init_distributed()`` reads the environment torchrun (or a SLURM launcher) sets and
starts the process group: NCCL on GPUs, gloo on CPU. A half-set environment is refused
with a message rather than left to hang in a rendezvous.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.constants import default_pg_timeout

from gppq_dist.errors import UserError

_REQUIRED = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class ProcessGroupReducer:
    """:class:`gppq_dist.pq.kmeans.Reducer` over the default process group."""

    def __init__(self) -> None:
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        dist.broadcast(tensor, src=src)


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group described by the environment, or run as one process.

    ``device``: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
    """
    present = [name for name in _REQUIRED if name in os.environ]
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise UserError("device 'cuda' was asked for, but no CUDA device is visible")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size <= 1 or dist.is_initialized():
        if dist.is_initialized():
            return _context(dist.get_rank(), dist.get_world_size(), local_rank, use_cuda)
        return _context(0, 1, 0, use_cuda)
    missing = [name for name in _REQUIRED if name not in present]
    if missing:
        raise UserError(
            f"WORLD_SIZE={world_size} but {', '.join(missing)} not set: launch with torchrun "
            "(or set all of RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)"
        )
    if use_cuda:
        torch.cuda.set_device(local_rank)
    backend = "nccl" if use_cuda else "gloo"
    store = _attempt_store(world_size)
    if store is None:
        dist.init_process_group(backend=backend)
    else:
        dist.init_process_group(backend=backend, store=store, rank=int(os.environ["RANK"]), world_size=world_size)
    logging.getLogger(__name__).info(
        "joined process group: rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(),
        dist.get_backend(),
    )
    return _context(dist.get_rank(), dist.get_world_size(), local_rank, use_cuda)


def _attempt_store(world_size: int) -> dist.Store | None:
    """Under torchrun, the agent's store with a prefix of its own for this restart attempt.

    torchrun's workers share the agent's TCPStore, which outlives a restart
    (``--max-restarts``), and torch 2.14 no longer separates the attempts' keys: a restarted
    rank could read the killed incarnation's gloo address of a peer and fail to connect
    (seen after SIGKILL of one rank). A ``PrefixStore`` per ``TORCHELASTIC_RESTART_COUNT``
    gives every attempt a clean set of keys. None outside torchrun's agent store.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                           is_master=False, timeout=default_pg_timeout)
    return dist.PrefixStore(f"gppq_dist/attempt_{restart_count()}/", client)


def _context(rank: int, world_size: int, local_rank: int, use_cuda: bool) -> DistContext:
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def reducer_for(context: DistContext):
    """The k-means reducer for this process: the process group, or the local identity."""
    from gppq_dist.pq.kmeans import LocalReducer

    return ProcessGroupReducer() if context.distributed else LocalReducer()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def gather_to_main(obj: Any, context: DistContext) -> list[Any] | None:
    """Every rank's ``obj`` (small, picklable, our own) as a list on rank 0; None elsewhere.

    Used for per-rank state that rank 0 alone writes into a checkpoint (loader positions,
    ZeRO optimizer partitions). One process: ``[obj]``.
    """
    if not context.distributed:
        return [obj]
    gathered: list[Any] | None = [None] * context.world_size if context.is_main else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def restart_count() -> int:
    """How often torchrun has restarted this worker group (``--max-restarts``); 0 otherwise."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def launch_local(nproc: int, module: str, args: list[str], max_restarts: int = 0) -> int:
    """``torchrun --standalone --nproc_per_node=N --max-restarts=R -m module args``, run here.

    Returns the exit status: 0, 2 when every failed rank stopped on a user error (each
    rank printed its own ``error:`` line, torchrun's failure report would only repeat it
    as a traceback), 1 otherwise (with one line naming the first rank that failed).
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(["--standalone", f"--nproc_per_node={nproc}", f"--max-restarts={max_restarts}",
                        "-m", module, *args]))
    except ChildFailedError as exc:
        if all(failure.exitcode == 2 for failure in exc.failures.values()):
            return 2
        rank, failure = exc.get_first_failure()
        how = (f"was killed by {failure.signal_name()}" if failure.exitcode < 0
               else f"exited with status {failure.exitcode}")
        logging.getLogger(__name__).error(
            "rank %d of %d %s (its output is above); %d restart(s) allowed (--max-restarts)",
            rank, nproc, how, max_restarts)
        return 1
    return 0
