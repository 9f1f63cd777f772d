"""`gppq train` on one GPU under torchrun: the model on ``cuda:0``, a ``cpu:gloo,cuda:nccl``
process group at world size 1 (so every collective of a multi-GPU run is exercised), one
epoch of the digits data (22 steps of 64), tracking off."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from tests.conftest import ROOT, torchrun, write_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.timeout(900)
def test_one_gpu_torchrun_trains_on_cuda_in_a_nccl_and_gloo_group(tmp_path, digits_dir):
    config = write_config(
        tmp_path, name="gpu",
        data={"root": str(digits_dir), "crop_scale": [0.6, 1.0], "horizontal_flip": False},
        kmeans={"iterations": 3},
        train={"epochs": 1, "batch_size": 64, "lr": 0.01, "mu": 0.5, "checkpoint_every": 0},
        tracking={"enabled": False},
    )
    # rich wraps log lines at 80 columns off a terminal; wide lines keep each message whole
    env = {**os.environ, "COLUMNS": "200"}
    completed = subprocess.run(
        [torchrun(), "--standalone", "--nproc_per_node=1", "-m", "gppq_dist.train", "--config", str(config)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=850,
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output
    summary = json.loads((tmp_path / "runs" / "gpu" / "summary.json").read_text())
    assert summary["world_size"] == 1 and summary["steps"] == 22
    assert "cpu:gloo,cuda:nccl" in output  # the group the process joined, as logged
    assert "cuda:0" in output  # the device the trainer logs at its start
    assert summary["device"] == "cuda:0"
    assert summary["top1_raw"] > summary["baseline_top1"]  # it learned (the baseline is untrained)
