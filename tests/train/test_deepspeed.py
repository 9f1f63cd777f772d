"""DeepSpeed engine, ZeRO stage 0 to 3 on real gloo ranks: the same G&P steps as DDP.

The quantized layers are reparametrized (their parameters are the K x d codewords), so
DeepSpeed reduces, partitions and steps them as it does every other parameter. DeepSpeed is
slow to import, so one spawned run checks every stage, several things each: 5 steps on a
split batch equal DDP on one rank (and the naive full-gradient path), the state saved after
2 steps and loaded into a fresh engine continues bit for bit, and a non-finite loss on one
rank changes nothing.
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
from gppq_dist.pq import reparam
from gppq_dist.pq.kmeans import LocalReducer
from gppq_dist.train.engine import DDPEngine
from tests.conftest import CONFIGS
from tests.distributed_helpers import run_gloo
from tests.train.test_gp_update import BATCH, MU, batches, dense_state, quantize, small_net, train

STAGES = (0, 1, 2, 3)

HP = TrainConfig(batch_size=BATCH, lr=0.1, momentum=0.9, weight_decay=1e-4, mu=MU)  # test_gp_update's SGD
SAVE_AFTER = 2
TOLERANCE = 1e-5


def ds_config(stage: int) -> dict:
    return load_deepspeed_config(CONFIGS / "deepspeed" / f"zero{stage}.json")


def snapshot(model: nn.Module, engine=None) -> dict[str, torch.Tensor]:
    """The model's tensors, quantized weights as rebuilt (at ZeRO-3: gathered first)."""
    if engine is None:
        return dense_state(model)
    with engine.gathered():
        return dense_state(model)


def reparametrized() -> tuple[nn.Module, list]:
    model = small_net()
    plans, assignments = quantize(model)
    return model, reparam.attach_gp(model, plans, assignments, MU)


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
    model, layers = reparametrized()
    engine = DDPEngine(model, HP, distributed=False, reducer=LocalReducer())
    reparam.recursion_hook(engine.optimizer, layers)
    for images, labels in batches():
        take(engine, images, labels, scale=scale)
    return snapshot(model)


def scenario(rank: int, world_size: int) -> dict[int, dict]:
    return {stage: stage_scenario(rank, world_size, stage) for stage in STAGES}


def stage_scenario(rank: int, world_size: int, stage: int) -> dict:
    share = BATCH // world_size
    data = [(images[rank * share:(rank + 1) * share], labels[rank * share:(rank + 1) * share])
            for images, labels in batches()]

    def fresh(saved=None):
        """As the trainer does it: reparametrize, load the model state, then the engine."""
        model, layers = reparametrized()
        if saved is not None:
            model.load_state_dict(saved["model"])
        engine = DeepSpeedEngine(model, HP, ds_config(stage), distributed=True, reducer=ProcessGroupReducer())
        reparam.recursion_hook(engine.optimizer, layers)
        if saved is not None:
            engine.load_state_dict(saved["engine"])
        return model, engine

    model, engine = fresh()
    for step, (images, labels) in enumerate(data):
        if step == SAVE_AFTER:
            buffer = io.BytesIO()
            with engine.gathered():
                torch.save({"model": model.state_dict(), "engine": engine.state_dict()}, buffer)
        loss = nn.functional.cross_entropy(engine.forward(images), labels)
        engine.backward(loss)
        engine.step(loss)
    uninterrupted = snapshot(model, engine)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model, engine = fresh(saved)
    before = snapshot(model, engine)
    skipped = take(engine, *data[SAVE_AFTER], poison=rank == 1)
    skip_changed = max_diff(snapshot(model, engine), before)
    for images, labels in data[SAVE_AFTER:]:
        take(engine, images, labels)
    return {"sharded": engine.sharded, "uninterrupted": uninterrupted, "resumed": snapshot(model, engine),
            "skipped": skipped, "skip_changed": skip_changed, "naive": train(rank, world_size, True)}


@pytest.fixture(scope="module")
def two_ranks() -> list[dict[int, dict]]:
    return run_gloo(scenario, 2)


@pytest.fixture(scope="module")
def single() -> dict[str, torch.Tensor]:
    reference = ddp_single()
    assert max_diff(reference, snapshot(small_net())) > 1e-3  # it trained
    return reference


@pytest.mark.distributed
@pytest.mark.parametrize("stage", STAGES)
def test_two_ranks_equal_ddp_on_one_rank_resume_exactly_and_skip_non_finite_steps(two_ranks, single, stage):
    results = [by_stage[stage] for by_stage in two_ranks]
    for result in results:
        assert result["sharded"] == (stage >= 1)
        assert max_diff(result["uninterrupted"], single) <= TOLERANCE
        assert max_diff(result["naive"], single) <= TOLERANCE
        assert result["skipped"] is None and result["skip_changed"] == 0.0
        # saved after 2 steps, a skipped step, 3 more == 5 uninterrupted steps, bit for bit
        assert max_diff(result["resumed"], result["uninterrupted"]) == 0.0


def alone(rank: int, out: str) -> None:
    """One process, no process group: the engine starts its own 1-rank group."""
    model, layers = reparametrized()
    engine = DeepSpeedEngine(model, HP, ds_config(2), distributed=False, reducer=LocalReducer())
    reparam.recursion_hook(engine.optimizer, layers)
    losses = [take(engine, images, labels) for images, labels in batches()]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the caller's autocast reaches the model
        autocast_dtype = engine.forward(batches()[0][0]).dtype
    loud, loud_layers = reparametrized()
    engine = DeepSpeedEngine(loud, HP, ds_config(0), distributed=False, reducer=LocalReducer())
    reparam.recursion_hook(engine.optimizer, loud_layers)
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
    ({"zero_optimization": {"stage": 4}}, "zero_optimization.stage"),
    ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps"),
    ({"gradient_clipping": 1.0}, "gradient_clipping"),
    ({"optimizer": {"type": "Adam"}}, "optimizer"),
    ({"scheduler": {"type": "WarmupLR"}}, "scheduler"),
])
def test_configs_that_would_change_the_math_are_refused_by_key(config, key):
    with pytest.raises(ConfigError, match=re.escape(f"DeepSpeed config: {key}: ")):
        check_deepspeed_config(config)


def test_the_engine_refuses_them_before_starting_anything():
    model, _ = reparametrized()
    group_was_up = torch.distributed.is_initialized()
    with pytest.raises(ConfigError, match=r"fp16\.enabled: .*use train\.precision: bf16"):
        DeepSpeedEngine(model, HP, {"fp16": {"enabled": True}}, distributed=False, reducer=LocalReducer())
    with pytest.raises(ConfigError, match=r"zero_optimization\.stage: 4 is not a ZeRO stage"):
        DeepSpeedEngine(model, HP, {"zero_optimization": {"stage": 4}}, distributed=False, reducer=LocalReducer())
    assert torch.distributed.is_initialized() == group_was_up


def test_the_shipped_configs_are_accepted():
    assert [check_deepspeed_config(ds_config(stage)) for stage in STAGES] == list(STAGES)
