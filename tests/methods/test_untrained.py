"""Direct PQ and Gong et al.'s three methods through `gppq train` (no training): each one's
artifact rebuilds to the model it scored, and its accounted size is what the file holds."""

import json

import pytest
import torch

from gppq_dist.artifact import read_artifact, rebuild_model
from gppq_dist.config import load_config
from gppq_dist.data.loaders import build_loader
from gppq_dist.distributed import DistContext
from gppq_dist.evaluate import evaluate
from gppq_dist.methods import run
from tests.conftest import gppq_here, write_config

LOCAL = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
SCALAR = {"types": {"conv3x3": {"d": 1, "k": 4}, "conv1x1": {"d": 1, "k": 4}, "linear": {"d": 1, "k": 4}}}
METHODS = {  # method -> (quantization override, codec of the layers)
    "direct_pq": (None, "pq"),
    "kmeans_scalar": (SCALAR, "pq"),
    "pq_subspace": (None, "pq_subspace"),
    "residual_pq": (None, "residual"),
}


def config_for(tmp_path, digits_dir, method):
    quantization, _ = METHODS[method]
    sections = dict(data={"root": str(digits_dir)}, kmeans={"iterations": 3}, method=method,
                    tracking={"enabled": False})
    if quantization:
        sections["quantization"] = quantization
    return write_config(tmp_path, name=method, **sections)


@pytest.mark.parametrize("method", list(METHODS))
def test_the_artifact_is_the_model_that_was_scored_and_as_large_as_accounted(tmp_path, digits_dir, method):
    cfg_path = config_for(tmp_path, digits_dir, method)
    cfg = load_config(cfg_path)
    summary = run(cfg, LOCAL)
    artifact = read_artifact(summary["artifact"])
    assert artifact.info["method"] == method == summary["method"]
    assert {plan.codec for plan in artifact.layers} == {METHODS[method][1]}
    scored = evaluate(rebuild_model(artifact), build_loader(cfg.data, "val"))
    assert scored["top1"] == pytest.approx(summary["top1_quantized"], abs=100 / 359 + 1e-9)  # one image
    accounted = summary["size_mb"] * 2**20
    assert accounted <= summary["file_bytes"] <= accounted * 1.01 + 64 * 1024
    assert summary["epochs"] == 0 and summary["top1_raw"] == summary["baseline_top1"]
    planned = json.loads(gppq_here("size", "--config", cfg_path, "--json", check=True).stdout)  # no weights, no data
    assert planned["size_mb"] == summary["size_mb"]
    assert json.loads((cfg.run_dir / "summary.json").read_text())["file_bytes"] == summary["file_bytes"]


def test_residual_stages_cost_what_they_buy(tmp_path, digits_dir):
    """One more stage: more bytes (indices and a codebook per stage), less quantization error."""
    sizes, gammas = [], []
    for stages in (1, 2):
        path = config_for(tmp_path, digits_dir, "residual_pq")
        cfg = load_config(path, {"method.stages": stages, "name": f"residual{stages}"})
        summary = run(cfg, LOCAL)
        sizes.append(summary["size_mb"])
        gammas.append(summary["gamma"])
    assert sizes[1] > sizes[0] and gammas[1] < gammas[0]


def test_gppq_train_runs_them_from_the_command_line(tmp_path, digits_dir):
    path = config_for(tmp_path, digits_dir, "pq_subspace")
    result = gppq_here("train", "--config", path, "--set", "quantization.types.conv3x3.k=16", check=True)
    assert "quantized (pq_subspace;" in result.stdout
    bad = gppq_here("train", "--config", path, "--set", "method.name=kmeans_scalar")
    assert bad.returncode == 2 and "method kmeans_scalar quantizes single weights" in bad.stderr
    assert "Traceback" not in bad.stderr
