"""FSDP2 engine on real gloo ranks: the same G&P steps as DDP, with the codewords sharded.

One spawned run: 5 steps on a split batch equal DDP on one rank, the state saved after 2
steps (the model's whole, the optimizer's local shards) and loaded into a fresh engine
continues bit for bit, a non-finite loss on one rank changes nothing, and the snapped copy
(built fresh: FSDP models cannot be deep-copied) is the model with its codewords.
"""

import io

import pytest
import torch
from torch import nn

from gppq_dist.distributed import ProcessGroupReducer
from gppq_dist.pq import reparam
from gppq_dist.train.fsdp_engine import FSDPEngine
from gppq_dist.train.schemes import GPScheme
from tests.distributed_helpers import run_gloo
from tests.train.test_deepspeed import HP, SAVE_AFTER, TOLERANCE, max_diff, take
from tests.train.test_gp_update import BATCH, MU, batches, dense_state, quantize, small_net, train_engine


def full_state(engine) -> dict[str, torch.Tensor]:
    """The model's tensors by plain names, quantized weights rebuilt from the whole codewords."""
    state = engine.model_state()
    dense = {k: v.clone() for k, v in state.items() if ".parametrizations." not in k and not k.endswith("_extra_state")}
    for name, module in engine.model.named_modules():
        if reparam.parametrize.is_parametrized(module, "weight"):
            p = module.parametrizations["weight"][0]
            codewords = state[f"{name}.parametrizations.weight.original"]
            dense[f"{name}.weight"] = (codewords[p.psi] + p.alpha * p.residual).view(p.shape)
    return dense


def scenario(rank: int, world_size: int) -> dict:
    share = BATCH // world_size
    data = [(images[rank * share:(rank + 1) * share], labels[rank * share:(rank + 1) * share])
            for images, labels in batches()]

    def fresh(saved=None):
        model = small_net()
        plans, assignments = quantize(model)
        scheme = GPScheme(model, plans, assignments, MU, build=small_net)
        if saved is not None:
            model.load_state_dict(saved["model"])
        engine = FSDPEngine(model, HP, distributed=True, reducer=ProcessGroupReducer())
        scheme.attach(engine.optimizer)
        if saved is not None:
            engine.load_state_dict(saved["engine"])
        return scheme, engine

    scheme, engine = fresh()
    for step, (images, labels) in enumerate(data):
        if step == SAVE_AFTER:
            buffer = io.BytesIO()
            torch.save({"model": engine.model_state(), "engine": engine.state_dict()}, buffer)
        take(engine, images, labels)
    uninterrupted = full_state(engine)
    snapped = scheme.quantized_copy()
    codebooks = scheme.codebooks()
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    scheme, engine = fresh(saved)
    before = full_state(engine)
    skipped = take(engine, *data[SAVE_AFTER], poison=rank == 1)
    skip_changed = max_diff(full_state(engine), before)
    for images, labels in data[SAVE_AFTER:]:
        take(engine, images, labels)
    shard_rows = [p.codewords.to_local().shape[0] for _, p in scheme.layers]
    return {"uninterrupted": uninterrupted, "resumed": full_state(engine), "skipped": skipped,
            "skip_changed": skip_changed, "snapped": dense_state(snapped), "codebooks": codebooks,
            "psi": {n: p.psi for n, p in scheme.layers}, "shard_rows": shard_rows}


@pytest.mark.distributed
def test_two_ranks_equal_ddp_resume_exactly_skip_non_finite_steps_and_snap():
    results = run_gloo(scenario, 2)
    single = train_engine(0, 1)
    for result in results:
        assert max_diff(result["uninterrupted"], single) <= TOLERANCE
        assert max_diff(result["resumed"], result["uninterrupted"]) == 0.0
        assert result["skipped"] is None and result["skip_changed"] == 0.0
        for name, codebook in result["codebooks"].items():
            # every rank holds half of each codebook; the snapped copy is the whole codebook[psi]
            assert torch.equal(result["snapped"][f"{name}.weight"].reshape(-1, codebook.shape[1]),
                               codebook[result["psi"][name]])
    k = {name: codebook.shape[0] for name, codebook in results[0]["codebooks"].items()}
    assert results[0]["shard_rows"] == [(rows + 1) // 2 for rows in k.values()]
