"""The process group, kept small and apart from the math: the one module that talks to
``torch.distributed``.

``init_distributed()`` reads the environment torchrun (or a SLURM launcher) sets and joins
the process group. On a CUDA device the group is ``cpu:gloo,cuda:nccl`` (what torch builds
when no backend is named): NCCL carries CUDA tensors, gloo the CPU ones, so a small flag or
a gathered object is as legal a collective as a gradient bucket; on the CPU it is gloo.
Under torchrun the group is created also at ``WORLD_SIZE=1``, so a one-GPU run goes through
every collective a multi-node run does. A half-set environment, or more processes on a
node than it has GPUs, is refused with a message before any group is made.

Every collective of the package goes through :class:`ProcessGroupReducer` (or
:func:`gather_to_main`): each tensor is moved to the process's device
(:attr:`DistContext.device`) for the collective and back, so no caller has to know which
backend serves which device. :func:`record_collectives` lists what they were handed (a
diagnostic: tests count the collectives of a training step with it).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator, Protocol

import torch
import torch.distributed as dist
from torch.distributed.constants import default_pg_timeout

from gppq_dist.errors import UserError

_REQUIRED = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Collective:
    """One collective as the gateway saw it: the operation, the phase it ran in
    (:func:`collective_phase`), and the tensor's device, dtype and size (None for objects)."""

    op: str
    phase: str
    device: str | None
    dtype: str | None
    numel: int | None


_recorded: list[Collective] | None = None
_phase = "setup"


@contextlib.contextmanager
def record_collectives() -> Iterator[list[Collective]]:
    """Collect every collective this process runs through the gateway while the block runs."""
    global _recorded
    previous, _recorded = _recorded, []
    try:
        yield _recorded
    finally:
        _recorded = previous


@contextlib.contextmanager
def collective_phase(name: str) -> Iterator[None]:
    """Label the collectives of the block (e.g. ``step``) in :func:`record_collectives`."""
    global _phase
    previous, _phase = _phase, name
    try:
        yield
    finally:
        _phase = previous


def _record(op: str, tensor: torch.Tensor | None = None) -> None:
    if _recorded is not None:
        _recorded.append(Collective(
            op, _phase, None if tensor is None else str(tensor.device),
            None if tensor is None else str(tensor.dtype).removeprefix("torch."),
            None if tensor is None else tensor.numel()))


class Reducer(Protocol):
    """What the distributed math is handed (k-means, calibration, evaluation): sums tensors
    across processes in place and broadcasts from one rank. :class:`ProcessGroupReducer`
    runs them on the default process group; :class:`gppq_dist.pq.kmeans.LocalReducer` is
    the identity of a single process (it needs no ``torch.distributed``, so the math keeps
    it). Anything with these four members will do (another framework's process group)."""

    rank: int
    world_size: int

    def all_reduce_sum(self, tensor: torch.Tensor) -> None: ...

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None: ...


class ProcessGroupReducer:
    """:class:`Reducer` over the default process group.

    ``device``: where the collectives run (the process's device); a tensor elsewhere is
    copied there and back. Default: the current CUDA device under a CUDA group, else the CPU.
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.device = torch.device(device) if device is not None else _group_device()

    def _run(self, op: str, tensor: torch.Tensor, collective) -> None:
        _record(op, tensor)
        there = tensor.to(self.device)
        collective(there)
        if there is not tensor:
            tensor.copy_(there)

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        self._run("all_reduce", tensor, lambda t: dist.all_reduce(t, op=dist.ReduceOp.SUM))

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        self._run("broadcast", tensor, lambda t: dist.broadcast(t, src=src))


def _group_device() -> torch.device:
    if dist.is_initialized() and "nccl" in str(dist.get_backend()) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def backend_for(device: torch.device) -> str:
    """The process group's backend for a process on ``device``: ``cpu:gloo,cuda:nccl`` on a
    GPU (an NCCL-only group refuses CPU tensors: "No backend type associated with device
    type cpu"), ``gloo`` on the CPU."""
    return "cpu:gloo,cuda:nccl" if torch.device(device).type == "cuda" else "gloo"


@dataclass(frozen=True)
class DistContext:
    """This process's place in the run. ``device`` holds the model, every batch and every
    tensor a collective sees (``cuda:LOCAL_RANK`` on GPUs). ``group``: a process group is up
    (always under torchrun, also at world size 1)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Collectives run: a process group is up (world size 1 included)."""
        return self.group or self.world_size > 1


def under_launcher() -> bool:
    """True when torchrun (or a launcher that sets its variables) started this process."""
    return "TORCHELASTIC_RUN_ID" in os.environ or all(name in os.environ for name in _REQUIRED)


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; ``cuda`` with none is an error."""
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device: expected auto, cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but no CUDA device is visible")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def check_gpus_per_node(nproc: int, visible: int) -> None:
    """More processes on this node than visible GPUs is one error, before anything starts."""
    if nproc > visible:
        shown = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise UserError(
            f"{nproc} processes on this node but {visible} GPU(s) visible"
            + (f" (CUDA_VISIBLE_DEVICES={shown})" if shown is not None else "")
            + f": one process per GPU, so start at most {visible} (--nproc / --nproc_per_node), "
            "or run on the CPU with --device cpu"
        )


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group described by the environment, or run as one process.

    ``device``: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
    """
    kind = resolve_device(device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        return _context(dist.get_rank(), dist.get_world_size(), local_rank, kind, group=True)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 and not under_launcher():
        if kind == "cuda":
            torch.cuda.set_device(0)
        return _context(0, 1, 0, kind)
    missing = [name for name in _REQUIRED if name not in os.environ]
    if missing:
        raise UserError(
            f"WORLD_SIZE={world_size} but {', '.join(missing)} not set: launch with torchrun "
            "(or set all of RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)"
        )
    if kind == "cuda":
        check_gpus_per_node(int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1)), torch.cuda.device_count())
        torch.cuda.set_device(local_rank)
    backend = backend_for(torch.device(kind))
    store = _attempt_store(world_size)
    options: dict[str, Any] = {"backend": backend}
    if kind == "cuda":
        # binds NCCL's communicator to this rank's GPU at once (and silences torch's warning
        # that it would otherwise guess the device from the rank)
        options["device_id"] = torch.device("cuda", local_rank)
    if store is None:
        dist.init_process_group(**options)
    else:
        dist.init_process_group(**options, store=store, rank=int(os.environ["RANK"]), world_size=world_size)
    context = _context(dist.get_rank(), dist.get_world_size(), local_rank, kind, group=True)
    log.info("joined process group: rank %d of %d (%s), device %s", context.rank, context.world_size,
             dist.get_backend(), context.device)
    return context


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


def _context(rank: int, world_size: int, local_rank: int, kind: str, group: bool = False) -> DistContext:
    device = torch.device("cuda", local_rank) if kind == "cuda" else torch.device("cpu")
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device, group=group)


def current_context(device: torch.device | str) -> DistContext:
    """This process's place in the process group already up (or a single process), holding
    its model on ``device``: for library callers that set up torch.distributed themselves."""
    device = torch.device(device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                           device=device, group=True)
    return DistContext(rank=0, world_size=1, local_rank=0, device=device, group=False)


def reducer_for(context: DistContext) -> Reducer:
    """The reducer for this process: the process group (on the context's device) whenever
    one is up, world size 1 included; the local identity otherwise."""
    from gppq_dist.pq.kmeans import LocalReducer

    return ProcessGroupReducer(context.device) if context.distributed else LocalReducer()


def ensure_process_group(distributed: bool, device: torch.device) -> None:
    """A process group for engines that need one (DeepSpeed): one process without a launcher
    gets a 1-rank group in memory (a ``HashStore``) with the backend for ``device``."""
    if dist.is_initialized():
        if not distributed and dist.get_world_size() != 1:
            raise ValueError(f"distributed=False, but the process group has {dist.get_world_size()} ranks")
        return
    if distributed:
        raise ValueError("distributed=True, but no process group is initialized")
    dist.init_process_group(backend_for(device), store=dist.HashStore(), rank=0, world_size=1)


def group_rank_and_size() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group (``(0, 1)`` without one)."""
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def gather_to_main(obj: Any, context: DistContext) -> list[Any] | None:
    """Every rank's ``obj`` (small, picklable, our own) as a list on rank 0; None elsewhere.

    Used for per-rank state that rank 0 alone writes into a checkpoint (loader positions,
    ZeRO optimizer partitions) and per-rank counters. One process: ``[obj]``. The group
    pickles and sends it over its CPU (gloo) side.
    """
    if not context.distributed:
        return [obj]
    _record("gather_object")
    gathered: list[Any] | None = [None] * context.world_size if context.is_main else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def restart_count() -> int:
    """How often torchrun has restarted this worker group (``--max-restarts``); 0 otherwise."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def launch_local(nproc: int, module: str, args: list[str], max_restarts: int = 0, device: str = "auto") -> int:
    """``torchrun --standalone --nproc_per_node=N --max-restarts=R -m module args``, run here.

    On a GPU machine (``device`` auto or cuda) more processes than visible GPUs is refused
    before anything starts. Returns the exit status: 0, 2 when every failed rank stopped on
    a user error (each rank printed its own ``error:`` line, torchrun's failure report would
    only repeat it as a traceback), 1 otherwise (with one line naming the first rank that
    failed).
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if resolve_device(device) == "cuda":
        check_gpus_per_node(nproc, torch.cuda.device_count())
    try:
        run(parse_args(["--standalone", f"--nproc_per_node={nproc}", f"--max-restarts={max_restarts}",
                        "-m", module, *args]))
    except ChildFailedError as exc:
        if all(failure.exitcode == 2 for failure in exc.failures.values()):
            return 2
        rank, failure = exc.get_first_failure()
        how = (f"was killed by {failure.signal_name()}" if failure.exitcode < 0
               else f"exited with status {failure.exitcode}")
        log.error("rank %d of %d %s (its output is above); %d restart(s) allowed (--max-restarts)",
                  rank, nproc, how, max_restarts)
        return 1
    return 0


# ---- FSDP2 (torch.distributed.fsdp.fully_shard), for train/fsdp_engine.py -------------------

def fsdp_shard(model: torch.nn.Module) -> None:
    """Shard ``model`` in place with FSDP2: every child module holding trainable parameters is
    one unit (gathered for its forward and backward, resharded after), the root takes the rest."""
    from torch.distributed.fsdp import fully_shard

    for child in model.children():
        if any(p.requires_grad for p in child.parameters()):
            fully_shard(child)
    fully_shard(model)


def is_sharded(tensor: Any) -> bool:
    """Whether ``tensor`` is a DTensor (a parameter FSDP sharded over the ranks)."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of a sharded tensor (an all-gather: every rank must call it, in the same
    order), or ``tensor`` itself when it is not sharded."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def local_shards(tree: Any) -> Any:
    """``tree`` (dicts, lists, tuples) with every DTensor replaced by this rank's shard: plain
    tensors that ``torch.load(weights_only=True)`` reads back."""
    if is_sharded(tree):
        return tree.to_local()
    if isinstance(tree, dict):
        return {key: local_shards(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(local_shards(value) for value in tree)
    return tree


def sharded_like(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A local shard saved by :func:`local_shards` as a DTensor laid out as ``like``."""
    from torch.distributed.tensor import DTensor

    if not is_sharded(like):
        return local
    return DTensor.from_local(local.to(like.device), like.device_mesh, like.placements,
                              shape=like.shape, stride=like.stride())
