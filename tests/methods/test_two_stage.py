"""Two-stage PQ through the trainer: layer-by-layer weighted k-means, then a codeword-only
finetune during which every weight stays exactly quantized."""

import json

import pytest
import torch

from gppq_dist.artifact import read_artifact, rebuild_model
from gppq_dist.config import load_config
from gppq_dist.data.loaders import build_loader
from gppq_dist.evaluate import evaluate
from gppq_dist.pq.plan import plan_layers
from gppq_dist.train import checkpoint
from tests.conftest import gppq, write_config


def exactly_quantized(weight: torch.Tensor, psi: torch.Tensor, d: int) -> bool:
    """Every subvector equals the first member of its cluster, bit for bit."""
    subvectors = weight.reshape(-1, d)
    first = torch.full((int(psi.max()) + 1,), -1, dtype=torch.long)
    first.scatter_reduce_(0, psi, torch.arange(psi.numel()), reduce="amin", include_self=False)
    return torch.equal(subvectors, subvectors[first[psi]])


@pytest.mark.distributed
def rebuilt_weight(model_state, name):
    """A quantized layer's weight from a checkpoint: ``C[psi] + alpha * R0`` (G&P's
    reparametrization, gppq_dist/pq/reparam.py); two-stage PQ's residuals are exactly zero."""
    prefix = f"{name}.parametrizations.weight"
    extra = model_state[f"{prefix}.0._extra_state"]
    assert torch.count_nonzero(extra["residual"]) == 0
    return model_state[f"{prefix}.original"][extra["psi"]] + model_state[f"{prefix}.0.alpha"] * extra["residual"]


def test_two_stage_pq_keeps_weights_quantized_and_ships_what_it_scored(tmp_path, digits_dir):
    path = write_config(
        tmp_path, name="two_stage", method={"name": "two_stage_pq", "calibration_batches": 2},
        data={"root": str(digits_dir), "crop_scale": [0.6, 1.0], "horizontal_flip": False},
        kmeans={"iterations": 3}, tracking={"enabled": False},
        train={"epochs": 1, "batch_size": 64, "lr": 0.01, "mu": 0.5, "checkpoint_every": 5},
    )
    gppq("train", "--config", path, "--nproc", "2", check=True)
    cfg = load_config(path)
    summary = json.loads((cfg.run_dir / "summary.json").read_text())
    assert summary["method"] == "two_stage_pq" and summary["steps"] == 22
    # the finetune moved the codewords, and every checkpoint's weights are exactly quantized
    saved = checkpoint.saved(cfg.run_dir)
    states = [torch.load(p, weights_only=True) for p in saved]
    plans = plan_layers(rebuild_model(read_artifact(summary["artifact"])), cfg.quantization)
    for state in states:
        for plan in plans:
            weight = rebuilt_weight(state["model"], plan.name)
            assert exactly_quantized(weight, state["scheme"]["psi"][plan.name], plan.d), (state["global_step"], plan.name)
    first, last = states[-1]["model"], states[0]["model"]  # oldest kept, newest
    moved = any(not torch.equal(rebuilt_weight(first, p.name), rebuilt_weight(last, p.name)) for p in plans)
    assert moved
    # the raw weights are the codewords in fp32, the scored copy holds them in fp16 as stored:
    # the two agree within one image
    assert summary["top1_raw"] == pytest.approx(summary["top1_quantized"], abs=100 / 359 + 1e-9)
    scored = evaluate(rebuild_model(read_artifact(summary["artifact"])), build_loader(cfg.data, "val"))
    assert scored["top1"] == pytest.approx(summary["top1_quantized"], abs=100 / 359 + 1e-9)
    assert summary["file_bytes"] <= summary["size_mb"] * 2**20 * 1.01 + 64 * 1024
