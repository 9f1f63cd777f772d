"""Codeword-gradient sync: 2 gloo ranks on a split batch == 1 rank on the whole batch.

Three roads to the same weights: the eq. 6 transform with the codeword sums all-reduced
(``GPUpdate``, the reference), the same transform after DDP's full all-reduce (naive), and
the trainer's engine (G&P as a reparametrization: DDP reduces the K x d codeword gradients,
one torch SGD steps everything, the residual's recursion hooked on it)."""

import pytest
import torch
from torch import nn

from gppq_dist.config import QuantizationConfig, TrainConfig
from gppq_dist.distributed import ProcessGroupReducer
from gppq_dist.pq.gp import Assignment, apply_gp_gradient, codeword_gradient_sums
from gppq_dist.pq.kmeans import kmeans_many
from gppq_dist.pq.plan import plan_layers
from gppq_dist.pq.subvectors import to_subvectors
from gppq_dist.pq import reparam
from gppq_dist.pq.kmeans import LocalReducer
from gppq_dist.train.engine import DDPEngine
from gppq_dist.train.gp_update import GPUpdate
from tests.distributed_helpers import run_gloo

STEPS, BATCH, MU = 5, 8, 0.05


def small_net() -> nn.Module:
    """Conv layers (quantized) around an unquantized head; no BatchNorm, so a split batch
    computes the same gradients as the whole one."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )


def quantize(model):
    rules = QuantizationConfig.model_validate(
        {"skip_first_conv": False, "types": {"conv3x3": {"d": 9, "k": 16}, "conv1x1": {"d": 4, "k": 8}}}
    )
    plans = plan_layers(model, rules)
    modules = dict(model.named_modules())
    results = kmeans_many([to_subvectors(modules[p.name].weight.detach(), p.d) for p in plans],
                          [p.k for p in plans], iterations=5)
    return plans, {p.name: r.assignments for p, r in zip(plans, results)}


def batches():
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 3, 8, 8, generator=generator), torch.randint(10, (BATCH,), generator=generator))
            for _ in range(STEPS)]


def optimizer_for(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)


def train(rank, world_size, naive=False):
    """STEPS G&P steps on this rank's slice of each global batch; returns the state dict."""
    model = small_net()
    plans, assignments = quantize(model)
    ddp = world_size > 1
    update = GPUpdate(model, plans, assignments, MU, ProcessGroupReducer() if ddp and not naive else None)
    if ddp and not naive:
        update.exclude_from_ddp(model)
    wrapped = nn.parallel.DistributedDataParallel(model) if ddp else model
    optimizer = optimizer_for(model)
    share = BATCH // world_size
    for images, labels in batches():
        images, labels = images[rank * share:(rank + 1) * share], labels[rank * share:(rank + 1) * share]
        optimizer.zero_grad()
        nn.functional.cross_entropy(wrapped(images), labels).backward()
        update.transform_gradients_()  # naive: DDP already averaged the full gradients
        optimizer.step()
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def dense_state(model):
    """The model's tensors by their plain names (a reparametrized weight as rebuilt)."""
    state = {}
    for name, module in model.named_modules():
        for key, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            state[f"{name}.{key}" if name else key] = tensor.detach().clone()
        if reparam.parametrize.is_parametrized(module, "weight"):
            state[f"{name}.weight"] = module.weight.detach().clone()
    return {k: v for k, v in state.items() if "parametrizations" not in k}


def train_engine(rank, world_size):
    """The trainer's step: the layers reparametrized, DDPEngine (DDP and one SGD for all)."""
    model = small_net()
    plans, assignments = quantize(model)
    ddp = world_size > 1
    layers = reparam.attach_gp(model, plans, assignments, MU)
    hp = TrainConfig(batch_size=BATCH, lr=0.1, momentum=0.9, weight_decay=1e-4, mu=MU)  # optimizer_for's
    engine = DDPEngine(model, hp, distributed=ddp, reducer=ProcessGroupReducer() if ddp else LocalReducer())
    reparam.recursion_hook(engine.optimizer, layers)
    share = BATCH // world_size
    for images, labels in batches():
        images, labels = images[rank * share:(rank + 1) * share], labels[rank * share:(rank + 1) * share]
        loss = nn.functional.cross_entropy(engine.forward(images), labels)
        engine.backward(loss)
        assert engine.step(loss) is not None
    return dense_state(model)


def three_roads(rank, world_size):
    """The three roads on one spawned group (each spawn costs seconds of imports)."""
    return {"synced": train(rank, world_size), "naive": train(rank, world_size, True),
            "engine": train_engine(rank, world_size)}


@pytest.mark.distributed
def test_two_ranks_with_codeword_sync_equal_one_rank_and_the_naive_path():
    single = train(0, 1)
    ranks = run_gloo(three_roads, 2)
    synced, naive, engine = ([rank[road] for rank in ranks] for road in ("synced", "naive", "engine"))
    engine_single = train_engine(0, 1)
    for name, expected in single.items():
        for result in (synced[0], synced[1], naive[0], engine[0], engine[1], engine_single):
            assert (result[name] - expected).abs().max() <= 1e-5, name
    assert any((single[n] - small_net().state_dict()[n]).abs().max() > 1e-3 for n in single)  # it trained


def test_transform_matches_the_rule_and_sends_only_codeword_sums():
    model = small_net()
    plans, assignments = quantize(model)
    update = GPUpdate(model, plans, assignments, MU)
    images, labels = batches()[0]
    nn.functional.cross_entropy(model(images), labels).backward()
    raw = {p.name: dict(model.named_modules())[p.name].weight.grad.clone() for p in plans}
    update.transform_gradients_()
    for plan in plans:
        weight = dict(model.named_modules())[plan.name].weight
        assignment = Assignment.from_psi(assignments[plan.name], plan.k)
        sums = codeword_gradient_sums(raw[plan.name].reshape(-1, plan.d), assignment)
        expected = apply_gp_gradient(weight.detach().reshape(-1, plan.d), sums, assignment, MU)
        torch.testing.assert_close(weight.grad.reshape(-1, plan.d), expected)
    full_bytes = sum(4 * dict(model.named_modules())[p.name].weight.numel() for p in plans)
    assert update.bytes_per_step == sum(p.k * p.d * 4 for p in plans) < full_bytes
    assert update.gamma() > 0
