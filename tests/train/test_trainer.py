"""`gppq train` end to end on the digits data: one process and two (torchrun, gloo)."""

import json

import pytest
import torch

from gppq_dist.artifact import read_artifact, rebuild_model
from gppq_dist.config import load_config
from gppq_dist.data.loaders import build_loader
from gppq_dist.evaluate import evaluate
from tests.conftest import gppq, write_config


def digits_config(tmp_path, digits_dir, name):
    return write_config(
        tmp_path, name=name,
        data={"root": str(digits_dir), "crop_scale": [0.6, 1.0], "horizontal_flip": False},
        kmeans={"iterations": 3},
        train={"epochs": 2, "batch_size": 64, "lr": 0.01, "mu": 0.5},
    )


def run_and_check(tmp_path, digits_dir, name, *extra):
    config = digits_config(tmp_path, digits_dir, name)
    result = gppq("train", "--config", config, *extra, check=True)
    summary = json.loads((tmp_path / "runs" / name / "summary.json").read_text())
    for key in ("baseline_top1", "direct_pq_top1", "top1_quantized", "top1_raw", "size_mb",
                "file_bytes", "ratio", "epochs", "wall_s", "world_size"):
        assert key in summary, key
    # the pull toward the codewords works: Gamma shrinks every epoch (eq. 8)
    gammas = [epoch["gamma"] for epoch in summary["history"]]
    assert gammas == sorted(gammas, reverse=True) and gammas[-1] < gammas[0] * 0.5
    # the artifact is the model that was scored "with quantization" (same val loader here;
    # `gppq eval` reads with torchvision, whose resize differs by up to 1/255 per pixel)
    cfg = load_config(config)
    loader = build_loader(cfg.data, "val")
    scored = evaluate(rebuild_model(read_artifact(summary["artifact"])), loader)
    assert scored["top1"] == pytest.approx(summary["top1_quantized"], abs=100 / 359 + 1e-9)
    assert summary["file_bytes"] <= summary["size_mb"] * 2**20 * 1.01 + 64 * 1024
    return summary, result


def test_train_one_process(tmp_path, digits_dir):
    summary, result = run_and_check(tmp_path, digits_dir, "one")
    assert summary["world_size"] == 1 and summary["epochs"] == 2
    assert "top-1" in result.stdout


@pytest.mark.distributed
def test_train_two_processes(tmp_path, digits_dir):
    summary, _ = run_and_check(tmp_path, digits_dir, "two", "--nproc", "2")
    assert summary["world_size"] == 2


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tmp_path, digits_dir):
    straight = digits_config(tmp_path, digits_dir, "straight")
    gppq("train", "--config", straight, check=True)
    split = digits_config(tmp_path, digits_dir, "split")
    gppq("train", "--config", split, "--set", "train.epochs=1", check=True)  # "interrupted" after epoch 1
    checkpoints = sorted((tmp_path / "runs" / "split" / "checkpoints").glob("epoch_*.pt"))
    assert [p.name for p in checkpoints] == ["epoch_0001.pt"]
    resumed = gppq("train", "--config", split, "--resume", "auto", check=True)
    assert "resuming from" in resumed.stderr
    one = read_artifact(tmp_path / "runs" / "straight" / "gppq.gppq")
    two = read_artifact(tmp_path / "runs" / "split" / "gppq.gppq")
    for name in one.codebooks:
        assert torch.equal(one.codebooks[name], two.codebooks[name])
        assert torch.equal(one.assignments[name], two.assignments[name])
    for group in ("params", "bn_scale", "bn_shift"):
        for name, tensor in getattr(one, group).items():
            assert torch.equal(tensor, getattr(two, group)[name]), name
    history = [json.loads((tmp_path / "runs" / run / "summary.json").read_text())["history"]
               for run in ("straight", "split")]
    assert history[0] == history[1]


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path, digits_dir):
    config = digits_config(tmp_path, digits_dir, "damaged")
    gppq("train", "--config", config, check=True)
    folder = tmp_path / "runs" / "damaged" / "checkpoints"
    newest = folder / "epoch_0002.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    from gppq_dist.train import checkpoint

    state = checkpoint.latest(tmp_path / "runs" / "damaged")
    assert state["epoch"] == 1 and set(state["psi"]) and isinstance(state["history"], list)
