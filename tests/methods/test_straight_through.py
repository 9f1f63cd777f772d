"""CLIP-Q and TSQ through `gppq train`: straight-through training on the ranks, artifacts
that rebuild to the model that was scored, at the accounted size; TSQ's two steps and its
finetune resume across the phase change, on DDP and on DeepSpeed ZeRO-1 alike."""

import json
import math
import shutil

import pytest
import torch

from gppq_dist.artifact import read_artifact, rebuild_model
from gppq_dist.config import load_config
from gppq_dist.data.loaders import build_loader
from gppq_dist.evaluate import evaluate
from gppq_dist.pq.clipq import keep_mask
from gppq_dist.train import checkpoint
from tests.conftest import CLIPQ_RULES, CONFIGS, TSQ_RULES, gppq, gppq_here, write_config
from tests.train.test_trainer import assert_same_model

ONE_IMAGE = 100 / 359 + 1e-9


def config(tmp_path, digits_dir, name, method, quantization, **train):
    return write_config(
        tmp_path, name=name, method=method, quantization=quantization, tracking={"enabled": False},
        data={"root": str(digits_dir), "crop_scale": [0.6, 1.0], "horizontal_flip": False},
        train={"epochs": 1, "batch_size": 64, "lr": 0.01, "checkpoint_every": 5, **train},
    )


def summary_of(tmp_path, name):
    return json.loads((tmp_path / "runs" / name / "summary.json").read_text())


def ships_what_it_scored(path, summary):
    cfg = load_config(path)
    artifact = read_artifact(summary["artifact"])
    scored = evaluate(rebuild_model(artifact), build_loader(cfg.data, "val"))
    assert scored["top1"] == pytest.approx(summary["top1_quantized"], abs=ONE_IMAGE)
    accounted = summary["size_mb"] * 2**20
    assert accounted <= summary["file_bytes"] <= accounted * 1.01 + 64 * 1024
    return cfg, artifact


@pytest.mark.distributed
def test_clipq_trains_on_two_ranks_prunes_per_layer_and_lets_pruned_weights_back(tmp_path, digits_dir):
    rules = {**CLIPQ_RULES, "names": {"layer4\\..*": {"prune": 0.9, "bits": 1}}}
    path = config(tmp_path, digits_dir, "clipq", "clipq", rules)
    gppq("train", "--config", path, "--nproc", "2", check=True)
    summary = summary_of(tmp_path, "clipq")
    assert summary["method"] == "clipq" and summary["world_size"] == 2 and summary["steps"] == 22
    cfg, artifact = ships_what_it_scored(path, summary)
    for plan in artifact.layers:
        prune, bits = (0.9, 1) if plan.name.startswith("layer4.") else (0.8, 2)
        n = math.prod(plan.shape)
        assert (plan.codec, plan.prune, plan.index_bits) == ("clipq", prune, bits)
        assert int(artifact.extras[plan.name].sum()) == n - math.floor(prune * n)
        assert torch.unique(artifact.decoded_weight(plan.name)).numel() <= 2**bits + 1  # levels and 0
    # the estimate before training counts a random pattern of the same density
    planned = json.loads(gppq_here("size", "--config", path, "--json", check=True).stdout)
    assert planned["size_mb"] == pytest.approx(summary["size_mb"], rel=0.02)
    # checkpoints hold the full-precision weights; weights pruned at step 5 are kept at the end
    states = [torch.load(p, weights_only=True) for p in reversed(checkpoint.saved(cfg.run_dir))]
    early, late = states[0]["model"], states[-1]["model"]
    back = 0
    for plan in artifact.layers:
        weight = early[f"{plan.name}.weight"]
        assert int((weight == 0).sum()) < 0.01 * weight.numel()
        before = keep_mask(weight, plan.prune)
        back += int((~before & artifact.extras[plan.name]).sum())
    assert back > 0


@pytest.fixture(scope="module")
def tsq_straight(tmp_path_factory, digits_dir):
    """A whole TSQ run: 1 epoch of step 1, step 2, 1 epoch of finetuning."""
    tmp_path = tmp_path_factory.mktemp("tsq")
    path = config(tmp_path, digits_dir, "tsq", TSQ, TSQ_RULES, checkpoint_every=0)
    gppq_here("train", "--config", path, check=True)
    return tmp_path, path


TSQ = {"name": "tsq", "code_epochs": 1, "calibration_batches": 1, "ls_iterations": 1}


def test_tsq_ships_ternary_weights_and_quantizes_inputs_at_inference(tsq_straight):
    tmp_path, path = tsq_straight
    summary = summary_of(tmp_path, "tsq")
    assert summary["epochs"] == 2 and summary["steps"] == 44
    assert summary["history"][1]["gamma"] > 0 == summary["history"][0]["gamma"]  # ternary from epoch 2 on
    _, artifact = ships_what_it_scored(path, summary)
    images = next(iter(build_loader(load_config(path).data, "val")))[0][:16]
    model = rebuild_model(artifact)
    for plan in artifact.layers:
        assert (plan.codec, plan.index_bits) == ("ternary", 2)
        rows = artifact.decoded_weight(plan.name).reshape(plan.shape[0], -1)
        alpha = artifact.codebooks[plan.name].float()
        assert torch.equal(rows.abs() * (rows != 0), alpha * (rows != 0))  # each row in {-a, 0, +a}
        assert artifact.extras[plan.name].shape == (3,)  # its input quantizer
    with torch.no_grad():
        quantized = model(images)
        for module in model.modules():
            module._forward_pre_hooks.clear()
        assert not torch.allclose(model(images), quantized)


def test_tsq_resumes_across_its_phase_change_bit_identically(tsq_straight, tmp_path, digits_dir):
    """From the checkpoint at the end of step 1 (epoch 1): step 2 and the finetune again."""
    straight, _ = tsq_straight
    shutil.copytree(straight / "runs" / "tsq", tmp_path / "runs" / "tsq")
    newest, end_of_step_1 = checkpoint.saved(tmp_path / "runs" / "tsq")
    assert end_of_step_1.name == "step_00000022.pt"
    state = torch.load(end_of_step_1, weights_only=True)
    assert state["scheme"]["ternary"] is False and state["scheme"]["quantizers"].shape == (20, 3)
    for leftover in (newest, tmp_path / "runs" / "tsq" / "gppq.gppq", tmp_path / "runs" / "tsq" / "summary.json"):
        leftover.unlink()
    split = config(tmp_path, digits_dir, "tsq", TSQ, TSQ_RULES, checkpoint_every=0)
    gppq_here("train", "--config", split, "--resume", "auto", check=True)
    assert summary_of(tmp_path, "tsq")["history"] == summary_of(straight, "tsq")["history"]
    assert_same_model(straight / "runs" / "tsq" / "gppq.gppq", tmp_path / "runs" / "tsq" / "gppq.gppq")


def test_tsq_on_deepspeed_zero1_equals_ddp(tsq_straight, tmp_path, digits_dir):
    """ZeRO keeps its own fp32 copy of the weights: step 2's weights must reach it."""
    straight, _ = tsq_straight
    path = config(tmp_path, digits_dir, "tsq", TSQ, TSQ_RULES, checkpoint_every=0, engine="deepspeed",
                  deepspeed_config=str(CONFIGS / "deepspeed" / "zero1.json"))
    gppq("train", "--config", path, check=True)
    ours, ddp = summary_of(tmp_path, "tsq"), summary_of(straight, "tsq")
    assert ours["engine"] == "deepspeed"
    assert ours["history"] == ddp["history"]
    assert_same_model(straight / "runs" / "tsq" / "gppq.gppq", tmp_path / "runs" / "tsq" / "gppq.gppq")


@pytest.mark.distributed
def test_tsq_on_two_ranks_shares_its_quantizers_and_ships_what_it_scored(tmp_path, digits_dir):
    """The input quantizers are averaged over the ranks and step 2's moments summed, so every
    rank scores its shard of val with the model rank 0 ships."""
    path = config(tmp_path, digits_dir, "tsq2", TSQ, TSQ_RULES, checkpoint_every=0)
    gppq("train", "--config", path, "--nproc", "2", check=True)
    summary = summary_of(tmp_path, "tsq2")
    assert summary["world_size"] == 2 and summary["steps"] == 44
    _, artifact = ships_what_it_scored(path, summary)
    assert {plan.codec for plan in artifact.layers} == {"ternary"} and len(artifact.extras) == 20
