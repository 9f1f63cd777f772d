"""The process group on a GPU: ``cpu:gloo,cuda:nccl``, so CPU and CUDA tensors are both legal
collectives, and under a launcher the group is created also at world size 1.

A process group is per-process state: the group test runs in a fresh interpreter with the
environment torchrun would give a single process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from gppq_dist.distributed import backend_for
from tests.conftest import ROOT
from tests.distributed_helpers import free_port

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_backend_serves_cpu_and_cuda_on_a_gpu_and_is_gloo_on_the_cpu():
    assert backend_for(torch.device("cuda", 0)) == "cpu:gloo,cuda:nccl"
    assert backend_for(torch.device("cpu")) == "gloo"


def one_process_group() -> None:
    """In a fresh interpreter: join the group the environment describes, all-reduce a CPU
    and a CUDA tensor, print one ``RESULT`` JSON line."""
    import torch.distributed as dist

    from gppq_dist.distributed import init_distributed, shutdown

    context = init_distributed()
    try:
        on_cpu = torch.arange(4, dtype=torch.float32)
        dist.all_reduce(on_cpu)
        on_cuda = torch.arange(4, dtype=torch.float32, device=context.device)
        dist.all_reduce(on_cuda)
        seen = {
            "initialized": dist.is_initialized(),
            "backend": str(dist.get_backend()),
            "world_size": dist.get_world_size(),
            "device": str(context.device),
            "cpu": on_cpu.tolist(),
            "cuda": on_cuda.cpu().tolist(),
            "cuda_tensor_device": str(on_cuda.device),
        }
    finally:
        shutdown()
    print("RESULT " + json.dumps(seen), flush=True)


def test_a_one_process_group_serves_cpu_and_cuda_tensors():
    launcher = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(free_port())}
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("TORCHELASTIC_") and key not in ("LOCAL_WORLD_SIZE", "GROUP_RANK")}
    completed = subprocess.run(
        [sys.executable, "-c", "from tests.gpu.test_process_group import one_process_group; one_process_group()"],
        cwd=ROOT, env={**env, **launcher}, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, completed.stdout + completed.stderr
    seen = json.loads(lines[0].removeprefix("RESULT "))
    assert seen["initialized"] and seen["world_size"] == 1  # a group also at world size 1
    assert seen["backend"] == "cpu:gloo,cuda:nccl"
    assert seen["device"] == "cuda:0" and seen["cuda_tensor_device"] == "cuda:0"
    # an NCCL-only group would have refused the CPU tensor; a sum over one rank is the identity
    assert seen["cpu"] == [0.0, 1.0, 2.0, 3.0]
    assert seen["cuda"] == [0.0, 1.0, 2.0, 3.0]
