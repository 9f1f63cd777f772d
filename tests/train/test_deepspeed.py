"""DeepSpeed engine, ZeRO stage 0/1/2 on real gloo ranks: the same G&P steps as DDP.

DeepSpeed is slow to import, so one spawned run checks every stage, several things each:
DeepSpeed leaves the quantized weights' gradients alone, 5 steps on a split batch equal
DDP on one rank (and the naive full-gradient path), the state dict saved after 2 steps and
loaded into a fresh engine continues bit for bit, and a non-finite loss on one rank
changes nothing.
"""

import io
import re
import tempfile
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from gppq_dist.config import TrainConfig
from gppq_dist.distributed import ProcessGroupReducer
from gppq_dist.errors import ConfigError
from gppq_dist.train.deepspeed_engine import DeepSpeedEngine, check_deepspeed_config, load_deepspeed_config
from gppq_dist.train.engine import DDPEngine
from gppq_dist.train.gp_update import GPUpdate
from tests.conftest import CONFIGS
from tests.distributed_helpers import run_gloo
from tests.train.test_gp_update import BATCH, MU, batches, quantize, small_net, train

HP = TrainConfig(batch_size=BATCH, lr=0.1, momentum=0.9, weight_decay=1e-4, mu=MU)  # test_gp_update's SGD
SAVE_AFTER = 2
TOLERANCE = 1e-5


def ds_config(stage: int) -> dict:
    return load_deepspeed_config(CONFIGS / "deepspeed" / f"zero{stage}.json")


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[name] - b[name]).abs().max()) for name in a)


def take(engine, images, labels, poison: bool = False, scale: float = 1.0) -> float | None:
    loss = scale * nn.functional.cross_entropy(engine.forward(images), labels)
    if poison:
        loss = loss + float("inf")  # the gradients stay finite: only the verdict can stop the step
    engine.backward(loss)
    return engine.step(loss)


# A loss scale that lifts the gradient norm well above 1, where clipping would show
# (DeepSpeed clips to 1.0 by default).
LOUD = 50.0


def ddp_single(scale: float = 1.0) -> dict[str, torch.Tensor]:
    """The reference: DDPEngine, one process, the whole batch."""
    model = small_net()
    plans, assignments = quantize(model)
    engine = DDPEngine(model, GPUpdate(model, plans, assignments, MU), HP, distributed=False)
    for images, labels in batches():
        take(engine, images, labels, scale=scale)
    return snapshot(model)


def scenario(rank: int, world_size: int) -> dict[int, dict]:
    return {stage: stage_scenario(rank, world_size, stage) for stage in (0, 1, 2)}


def stage_scenario(rank: int, world_size: int, stage: int) -> dict:
    share = BATCH // world_size
    data = [(images[rank * share:(rank + 1) * share], labels[rank * share:(rank + 1) * share])
            for images, labels in batches()]

    def fresh():
        model = small_net()
        plans, assignments = quantize(model)
        update = GPUpdate(model, plans, assignments, MU, ProcessGroupReducer())
        return model, DeepSpeedEngine(model, update, HP, ds_config(stage), distributed=True)

    plain = small_net()  # this rank's own gradient of the first batch, by plain autograd
    nn.functional.cross_entropy(plain(data[0][0]), data[0][1]).backward()
    model, engine = fresh()
    quantized = {f"{plan.name}.weight" for plan in engine.update.plans}
    own = {name: param.grad for name, param in plain.named_parameters() if name in quantized}
    for step, (images, labels) in enumerate(data):
        if step == SAVE_AFTER:
            buffer = io.BytesIO()
            torch.save({"model": model.state_dict(), "engine": engine.state_dict()}, buffer)
        loss = nn.functional.cross_entropy(engine.forward(images), labels)
        engine.backward(loss)
        if step == 0:
            after_backward = {name: p.grad.clone() for name, p in model.named_parameters() if name in quantized}
        engine.step(loss)
    uninterrupted = snapshot(model)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model, engine = fresh()
    engine.load_state_dict(saved["engine"])  # before the weights: the order must not matter
    model.load_state_dict(saved["model"])
    before = snapshot(model)
    skipped = take(engine, *data[SAVE_AFTER], poison=rank == 1)
    skip_changed = max_diff(snapshot(model), before)
    for images, labels in data[SAVE_AFTER:]:
        take(engine, images, labels)
    return {"own": own, "after_backward": after_backward, "sharded": engine.sharded,
            "uninterrupted": uninterrupted, "resumed": snapshot(model), "skipped": skipped,
            "skip_changed": skip_changed, "naive": train(rank, world_size, True)}


@pytest.fixture(scope="module")
def two_ranks() -> list[dict[int, dict]]:
    return run_gloo(scenario, 2)


@pytest.fixture(scope="module")
def single() -> dict[str, torch.Tensor]:
    reference = ddp_single()
    assert max_diff(reference, snapshot(small_net())) > 1e-3  # it trained
    return reference


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_two_ranks_equal_ddp_on_one_rank_resume_exactly_and_skip_non_finite_steps(two_ranks, single, stage):
    results = [by_stage[stage] for by_stage in two_ranks]
    own = [result["own"] for result in results]
    assert own[0] and all(not torch.equal(own[0][name], own[1][name]) for name in own[0])
    for result in results:
        # after backward, each rank still holds its own gradient of the quantized weights
        assert all(torch.equal(result["after_backward"][name], grad) for name, grad in result["own"].items())
        assert result["sharded"] == (stage >= 1)
        assert max_diff(result["uninterrupted"], single) <= TOLERANCE
        assert max_diff(result["naive"], single) <= TOLERANCE
        assert result["skipped"] is None and result["skip_changed"] == 0.0
        # saved after 2 steps, a skipped step, 3 more == 5 uninterrupted steps, bit for bit
        assert max_diff(result["resumed"], result["uninterrupted"]) == 0.0


def alone(rank: int, out: str) -> None:
    """One process, no process group: the engine starts its own 1-rank group."""
    model = small_net()
    plans, assignments = quantize(model)
    engine = DeepSpeedEngine(model, GPUpdate(model, plans, assignments, MU), HP, ds_config(2), distributed=False)
    losses = [take(engine, images, labels) for images, labels in batches()]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the caller's autocast reaches the model
        autocast_dtype = engine.forward(batches()[0][0]).dtype
    loud = small_net()
    engine = DeepSpeedEngine(loud, GPUpdate(loud, plans, assignments, MU), HP, ds_config(0), distributed=False)
    plain = small_net()
    nn.functional.cross_entropy(plain(batches()[0][0]), batches()[0][1]).mul(LOUD).backward()
    grad_norm = float(torch.cat([p.grad.reshape(-1) for p in plain.parameters()]).norm())
    for images, labels in batches():
        take(engine, images, labels, scale=LOUD)
    torch.save({"weights": snapshot(model), "losses": losses, "autocast_dtype": autocast_dtype,
                "loud": snapshot(loud), "loud_grad_norm": grad_norm}, out)


@pytest.mark.distributed
def test_one_process_without_a_process_group_equals_ddp(single):
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "alone.pt")
        mp.spawn(alone, args=(out,), nprocs=1)
        result = torch.load(out, weights_only=True)
    assert all(isinstance(loss, float) for loss in result["losses"])
    assert max_diff(result["weights"], single) <= TOLERANCE
    assert result["autocast_dtype"] == torch.bfloat16
    # large gradients are not clipped (DeepSpeed's default would clip their norm to 1)
    assert result["loud_grad_norm"] > 5
    loud = ddp_single(scale=LOUD)
    assert max_diff(result["loud"], loud) <= TOLERANCE * LOUD


@pytest.mark.parametrize(("config", "key"), [
    ({"fp16": {"enabled": True}}, "fp16.enabled"),
    ({"bf16": {"enabled": True}}, "bf16.enabled"),
    ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage"),
    ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps"),
    ({"gradient_clipping": 1.0}, "gradient_clipping"),
    ({"optimizer": {"type": "Adam"}}, "optimizer"),
    ({"scheduler": {"type": "WarmupLR"}}, "scheduler"),
])
def test_configs_that_would_change_the_math_are_refused_by_key(config, key):
    with pytest.raises(ConfigError, match=re.escape(f"DeepSpeed config: {key}: ")):
        check_deepspeed_config(config)


def test_the_engine_refuses_them_before_starting_anything():
    model = small_net()
    plans, assignments = quantize(model)
    update = GPUpdate(model, plans, assignments, MU)
    group_was_up = torch.distributed.is_initialized()
    with pytest.raises(ConfigError, match=r"fp16\.enabled: .*use train\.precision: bf16"):
        DeepSpeedEngine(model, update, HP, {"fp16": {"enabled": True}}, distributed=False)
    with pytest.raises(ConfigError, match=r"zero_optimization\.stage: 3 is not supported"):
        DeepSpeedEngine(model, update, HP, {"zero_optimization": {"stage": 3}}, distributed=False)
    assert torch.distributed.is_initialized() == group_was_up


def test_the_shipped_configs_are_accepted():
    assert [check_deepspeed_config(ds_config(stage)) for stage in (0, 1, 2)] == [0, 1, 2]
