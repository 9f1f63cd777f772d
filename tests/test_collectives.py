"""One gateway to torch.distributed, one device for every collective, a known number of
collectives per training step.

Every method (G&P PQ, two-stage PQ, CLIP-Q, TSQ) and the distributed ``compress`` run on
2 real gloo ranks, one after the other in one spawned process group, with the gateway
recording what it is handed. A collective added to the step path, or a tensor handed over
on another device than the process's, fails here (on a GPU node the same code hands CUDA
tensors to NCCL and CPU tensors would need a copy each way).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from gppq_dist.distributed import DistContext, backend_for, check_gpus_per_node
from gppq_dist.errors import UserError
from tests.conftest import CLIPQ_RULES, ROOT, TSQ_RULES, write_config
from tests.distributed_helpers import free_port, run_gloo

# collectives through the gateway in one training step: the loss verdict, for every method
# (G&P's codeword gradients go through DDP's own buckets, as every other gradient)
PER_STEP = {"gppq": 1, "two_stage_pq": 1, "clipq": 1, "tsq": 1}


def _every_method(rank: int, world_size: int, configs: dict[str, str]) -> dict[str, dict]:
    from gppq_dist.compress import compress
    from gppq_dist.config import load_config
    from gppq_dist.distributed import init_distributed, record_collectives
    from gppq_dist.methods import run

    context = init_distributed("cpu")  # joins the group the test helper started
    out: dict[str, dict] = {"context": {"device": str(context.device), "group": context.group}}
    for method, path in configs.items():
        cfg = load_config(path)
        with record_collectives() as calls:
            if method == "compress":
                summary = compress(cfg, Path(cfg.run_dir) / "direct_pq.gppq", context)
            else:
                summary = run(cfg, context)
        out[method] = {"calls": [asdict(call) for call in calls], "steps": summary.get("steps", 0)}
    return out


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    from gppq_dist.data.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("collectives")
    write_synthetic(root / "data", classes=4, per_class=24, size=(32, 32), val_per_class=4)
    common = dict(model={"arch": "resnet18", "num_classes": 4, "weights": "random"}, kmeans={"iterations": 1},
                  tracking={"enabled": False}, data={"root": str(root / "data"), "batch_size": 16},
                  train={"epochs": 1, "batch_size": 32, "checkpoint_every": 0})
    configs = {
        "gppq": write_config(root, name="gppq", **common),
        "two_stage_pq": write_config(root, name="two_stage", method={"name": "two_stage_pq",
                                                                      "calibration_batches": 1}, **common),
        "clipq": write_config(root, name="clipq", method="clipq", quantization=CLIPQ_RULES, **common),
        # step 2's least squares is a loop over input columns: the deep layers stay fp32 here
        "tsq": write_config(root, name="tsq", method={"name": "tsq", "calibration_batches": 1, "ls_iterations": 1},
                            quantization={**TSQ_RULES, "names": {"layer[34]\\..*": None}}, **common),
        "compress": write_config(root, name="compress", **common),
    }
    ranks = run_gloo(_every_method, 2, {method: str(path) for method, path in configs.items()})
    return ranks


@pytest.mark.distributed
def test_every_collective_is_on_the_process_device(recorded):
    for rank, result in enumerate(recorded):
        device = result["context"]["device"]
        assert result["context"]["group"] is True
        for method in ("gppq", "two_stage_pq", "clipq", "tsq", "compress"):
            calls = result[method]["calls"]
            assert calls, f"{method} ran no collective on rank {rank}"
            elsewhere = [call for call in calls if call["device"] not in (None, device)]
            assert not elsewhere, f"{method} on rank {rank} handed tensors off {device}: {elsewhere[:3]}"


@pytest.mark.distributed
def test_collectives_per_training_step(recorded):
    for method, per_step in PER_STEP.items():
        for rank, result in enumerate(recorded):
            run = result[method]
            in_steps = [call for call in run["calls"] if call["phase"] == "step"]
            assert run["steps"] > 0
            assert len(in_steps) == per_step * run["steps"], (
                f"{method} on rank {rank}: {len(in_steps)} collectives in {run['steps']} steps, "
                f"expected {per_step} a step: {in_steps[:4]}")
            assert all(call["op"] == "all_reduce" for call in in_steps)
    # both ranks took part in the same collectives, in the same order
    for method in (*PER_STEP, "compress"):
        shapes = [[(c["op"], c["numel"]) for c in result[method]["calls"]] for result in recorded]
        assert shapes[0] == shapes[1], method


def test_backend_serves_both_devices_on_gpus():
    assert backend_for(torch.device("cuda", 3)) == "cpu:gloo,cuda:nccl"
    assert backend_for(torch.device("cpu")) == "gloo"


def test_more_processes_than_gpus_is_one_error():
    check_gpus_per_node(8, visible=8)
    with pytest.raises(UserError, match=r"8 processes on this node but 2 GPU\(s\) visible.*at most 2"):
        check_gpus_per_node(8, visible=2)


def test_context_distributed_means_a_group_is_up():
    assert DistContext(0, 1, 0, torch.device("cpu"), group=True).distributed
    assert not DistContext(0, 1, 0, torch.device("cpu")).distributed


def test_a_launcher_at_world_size_one_still_makes_a_group():
    """Under torchrun (or its variables) a one-process run joins a real group, so the same
    collectives run as on many ranks; a plain process does not."""
    code = ("import torch.distributed as d; from gppq_dist.distributed import init_distributed; "
            "c = init_distributed('cpu'); print(c.group, c.world_size, d.is_initialized(), "
            "d.get_backend() if d.is_initialized() else '-')")
    launcher = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    plain = {k: v for k, v in os.environ.items() if k not in (*launcher, "TORCHELASTIC_RUN_ID")}
    runs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
            for env in ({**plain, **launcher}, plain)]
    assert [run.stdout.split() for run in runs] == [["True", "1", "True", "gloo"], ["False", "1", "False", "-"]], \
        [run.stderr[-2000:] for run in runs]
