"""The library API: `gppq_dist.prepare` in a plain PyTorch loop (examples/own_loop.py) is
`gppq train` with the same settings, bit for bit."""

import os
import subprocess

import pytest
import torch
from torch import nn

import gppq_dist
from gppq_dist.errors import ConfigError
from tests.conftest import ROOT, launch_config, torchrun
from tests.distributed_helpers import free_port
from tests.train.test_trainer import assert_same_model


@pytest.mark.distributed
def test_own_loop_under_torchrun_equals_gppq_train(local_reference, tmp_path, digits_dir):
    """The 2-rank reference run (tests/conftest.py) and the example on its settings: the same
    codebooks, assignments, unquantized parameters and folded BN, every tensor torch.equal."""
    config = launch_config(tmp_path, digits_dir, "own")  # the reference's training settings
    out = tmp_path / "own.gppq"
    # torchrun sets OMP_NUM_THREADS=1 for several processes per node, as for the reference
    run = subprocess.run([torchrun(), "--nproc_per_node=2", f"--master_port={free_port()}",
                          str(ROOT / "examples" / "own_loop.py"),
                          "--config", str(config), "--out", str(out)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=900, env=dict(os.environ))
    assert run.returncode == 0, run.stderr
    assert "epoch 2: last loss" in run.stdout and "MB accounted" in run.stdout
    assert_same_model(local_reference.artifact, out)


def test_prepare_takes_a_mapping_and_the_handle_drives_any_sgd_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.Flatten(), nn.LazyLinear(10))
    model(torch.randn(1, 3, 8, 8))  # materialize the lazy layer
    handle = gppq_dist.prepare(model, {
        "model": {"arch": "resnet18", "num_classes": 10},
        "quantization": {"skip_first_conv": True, "types": {"conv3x3": {"d": 9, "k": 8}}},
        "kmeans": {"iterations": 2}, "train": {"mu": 0.5},
    })
    assert [plan.name for plan in handle.plans] == ["2"]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    handle.attach(optimizer)
    start = handle.gamma()
    for _ in range(10):
        handle.before_forward()
        nn.functional.cross_entropy(model(torch.randn(4, 3, 8, 8)), torch.randint(10, (4,))).backward()
        handle.after_backward()
        optimizer.step()
        optimizer.zero_grad()
    assert 0 < handle.gamma() < start  # the pull toward the codewords works
    snapped, artifact = handle.finalize()
    weight = snapped[2].weight.detach().reshape(-1, 9)
    # every subvector is its codeword (the artifact stores the codebook in fp16)
    shipped = artifact.codebooks["2"].float()[artifact.assignments["2"].long()]
    assert torch.allclose(weight, shipped, rtol=1e-3, atol=1e-5) and len(torch.unique(weight, dim=0)) <= 8
    assert type(snapped[2]) is nn.Conv2d and sum(1 for _ in snapped.parameters()) == 6


def test_a_method_without_training_is_sent_to_compress():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3))
    with pytest.raises(ConfigError, match=r"method direct_pq does not train: .*gppq compress"):
        gppq_dist.prepare(model, {"model": {"arch": "resnet18"}, "method": "direct_pq",
                                  "quantization": {"types": {"conv3x3": {"d": 9, "k": 4}}}})
