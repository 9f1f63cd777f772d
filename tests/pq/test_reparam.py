"""G&P as a reparametrization (codewords as parameters, torch's SGD) against GPSGD and the
eq. 6 transform, plus its gradient, checkpoints, snapping and memory formats."""

import copy
import io

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from gppq_dist.pq import reparam
from gppq_dist.pq.gp import quantization_error
from gppq_dist.pq.kmeans import kmeans
from gppq_dist.pq.plan import LayerPlan
from gppq_dist.train.gp_update import GPUpdate

MU, MOMENTUM, WEIGHT_DECAY, LR = 0.5, 0.9, 5e-4, 0.1
STEPS = 20
PLANS = [
    LayerPlan(name="2", kind="conv3x3", shape=(16, 8, 3, 3), d=9, k=16, k_requested=16, rule="test"),
    LayerPlan(name="4", kind="conv1x1", shape=(16, 16, 1, 1), d=4, k=8, k_requested=8, rule="test"),
    LayerPlan(name="8", kind="linear", shape=(10, 16), d=4, k=8, k_requested=8, rule="test"),
]


def small_cnn(seed: int = 0) -> nn.Module:
    """A stem conv (left alone), a 3x3 and a 1x1 conv and a Linear head (quantized)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )


def psi_of(model: nn.Module) -> dict[str, torch.Tensor]:
    modules = dict(model.named_modules())
    psi = {}
    for plan in PLANS:
        weight = modules[plan.name].weight.detach()
        psi[plan.name] = kmeans(weight.reshape(-1, plan.d), plan.k, iterations=4).assignments
        assert torch.bincount(psi[plan.name], minlength=plan.k).min() > 0  # every codeword used
    return psi


def batches(steps: int, channels_last: bool = False):
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, 3, 8, 8, generator=generator)
        y = torch.randint(0, 10, (8,), generator=generator)
        yield (x.to(memory_format=torch.channels_last) if channels_last else x), y


def backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    nn.functional.cross_entropy(model(x), y).backward()


def dense_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every conv and Linear weight and bias (the rebuilt W where reparametrized)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            with torch.no_grad():
                out[f"{name}.weight"] = module.weight.detach().clone()
                out[f"{name}.bias"] = module.bias.detach().clone()
    return out


def reparametrized(seed: int = 0, psi: dict[str, torch.Tensor] | None = None, channels_last: bool = False):
    model = small_cnn(seed)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    layers = reparam.attach_gp(model, PLANS, psi if psi is not None else psi_of(model), MU)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    reparam.recursion_hook(optimizer, layers)
    return model, layers, optimizer


def train_reparametrized(steps: int = STEPS):
    """Path B: attach_gp + one torch SGD over everything + the recursion hook, with a
    ReduceLROnPlateau that drops the lr once, after the metric stops improving at step 10."""
    model, layers, optimizer = reparametrized()
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.1, patience=0, cooldown=steps)
    lrs = []
    for step, (x, y) in enumerate(batches(steps)):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.zero_grad()
        backward(model, x, y)
        optimizer.step()
        scheduler.step(float(max(10 - step, 0)))
    return model, layers, lrs


def train_gpsgd(lrs: list[float]):
    """Path A: GPUpdate's codeword sums -> GPSGD for the quantized weights, SGD for the rest."""
    model = small_cnn()
    update = GPUpdate(model, PLANS, psi_of(model), MU)
    gp_optimizer = update.sgd(lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    quantized = {id(weight) for weight in update.weights}
    rest = torch.optim.SGD([p for p in model.parameters() if id(p) not in quantized], lr=LR,
                           momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    for lr, (x, y) in zip(lrs, batches(len(lrs))):
        for optimizer in (gp_optimizer, rest):
            optimizer.param_groups[0]["lr"] = lr
        model.zero_grad(set_to_none=True)
        backward(model, x, y)
        gp_optimizer.step(update.reduced_gradient_sums())
        rest.step()
    return model, update, gp_optimizer


def train_transform(lrs: list[float]):
    """Path C: the eq. 6 gradient written into .grad, then one torch SGD over everything."""
    model = small_cnn()
    update = GPUpdate(model, PLANS, psi_of(model), MU)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    for lr, (x, y) in zip(lrs, batches(len(lrs))):
        optimizer.param_groups[0]["lr"] = lr
        optimizer.zero_grad()
        backward(model, x, y)
        update.transform_gradients_()
        optimizer.step()
    return model


def test_torch_sgd_on_the_codewords_equals_gpsgd_and_the_eq6_transform():
    model_b, layers, lrs = train_reparametrized()
    assert lrs[0] == LR and lrs[-1] == pytest.approx(LR / 10) and lrs.index(lrs[-1]) == STEPS // 2 + 2
    model_a, update, gp_optimizer = train_gpsgd(lrs)
    model_c = train_transform(lrs)

    start, a, b, c = (dense_weights(m) for m in (small_cnn(), model_a, model_b, model_c))
    assert a.keys() == b.keys() == c.keys()
    for name in a:
        assert (a[name] - start[name]).abs().max() > 1e-3, name  # it trained
        assert (b[name] - a[name]).abs().max() <= 1e-5, name
        assert (b[name] - c[name]).abs().max() <= 1e-5, name
    for (name, parametrization), weight in zip(layers, update.weights, strict=True):
        state = gp_optimizer.state[weight]
        assert abs(state["alpha"]) < 0.5  # the residual really shrank (it oscillates under momentum)
        assert parametrization.alpha.item() == pytest.approx(state["alpha"], rel=1e-5)
        assert parametrization.beta.item() == pytest.approx(state["beta"], rel=1e-4)
        torch.testing.assert_close(parametrization.codewords.detach(), state["codewords"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # CSR members / index_add_
def test_codeword_gradient_is_the_cluster_mean_gradient(dtype):
    model, layers, _ = reparametrized()
    model.to(dtype)
    x, y = next(batches(1))
    modules = dict(model.named_modules())
    with parametrize.cached():  # the forward then uses these very tensors
        rebuilt = {name: modules[name].weight for name, _ in layers}
        for weight in rebuilt.values():
            weight.retain_grad()
        backward(model, x.to(dtype), y)
    for name, parametrization in layers:
        grad = rebuilt[name].grad.reshape(-1, parametrization.d)
        sums = torch.zeros(parametrization.k, parametrization.d, dtype=dtype).index_add_(0, parametrization.psi, grad)
        counts = torch.bincount(parametrization.psi, minlength=parametrization.k).unsqueeze(1)
        assert parametrization.codewords.grad.dtype == dtype
        torch.testing.assert_close(parametrization.codewords.grad, sums / counts)


def test_state_dict_round_trip_restores_weights_and_recursion_and_continues_bit_identically():
    model, layers, optimizer = reparametrized()
    steps = list(batches(8))
    for x, y in steps[:5]:
        optimizer.zero_grad()
        backward(model, x, y)
        optimizer.step()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert {k for k in saved["model"] if k.startswith("2.")} == {
        "2.bias", "2.parametrizations.weight.original",
        *(f"2.parametrizations.weight.0.{b}" for b in ("alpha", "beta", "_extra_state")),
    }
    assert saved["model"]["2.parametrizations.weight.0._extra_state"].keys() == {"psi", "residual"}

    # another start and another psi: loading must replace both, and the gradient follow the loaded psi
    other_psi = {name: torch.randperm(psi.numel()) % p.k for (name, p), psi in
                 zip(layers, reparam.assignments(layers).values())}
    fresh, fresh_layers, fresh_optimizer = reparametrized(seed=1, psi=other_psi)
    fresh.load_state_dict(saved["model"])
    fresh_optimizer.load_state_dict(saved["optimizer"])
    for name, value in dense_weights(model).items():
        assert torch.equal(dense_weights(fresh)[name], value), name
    for (_, p), (_, q) in zip(layers, fresh_layers):
        for buffer_name in ("psi", "counts", "residual", "alpha", "beta"):
            assert torch.equal(getattr(p, buffer_name), getattr(q, buffer_name)), buffer_name

    for x, y in steps[5:]:
        for m, o in ((model, optimizer), (fresh, fresh_optimizer)):
            o.zero_grad()
            backward(m, x, y)
            o.step()
    for name, value in dense_weights(model).items():
        assert torch.equal(dense_weights(fresh)[name], value), name
    for (_, p), (_, q) in zip(layers, fresh_layers):
        assert torch.equal(p.alpha, q.alpha) and torch.equal(p.beta, q.beta)


def test_deepcopy_gives_an_independent_model():
    model, layers, _ = reparametrized()
    replica = copy.deepcopy(model)
    stack = dict(replica.named_modules())["2"].parametrizations["weight"]
    assert stack[0].codewords is stack.original  # bound to its own codewords
    x, y = next(batches(1))
    backward(replica, x, y)
    assert stack.original.grad is not None and layers[0][1].codewords.grad is None
    # snapping the copy (the trainer's quantized copy) leaves the original parametrized
    before = model(x)
    reparam.snap_(replica)
    assert type(dict(replica.named_modules())["2"]) is nn.Conv2d
    assert torch.equal(model(x), before) and dict(model.named_modules())["2"].weight.shape == layers[0][1].shape


def test_assigning_a_dense_weight_restarts_from_its_member_means():
    model, layers, optimizer = reparametrized()
    for x, y in batches(3):
        optimizer.zero_grad()
        backward(model, x, y)
        optimizer.step()
    name, parametrization = layers[0]
    module = dict(model.named_modules())[name]
    codewords = parametrization.codewords
    dense = torch.randn(parametrization.shape)
    module.weight = dense
    assert parametrization.codewords is codewords  # the same Parameter, new values
    assert parametrization.alpha.item() == 1 and parametrization.beta.item() == 0
    torch.testing.assert_close(module.weight, dense, rtol=0, atol=1e-6)


def test_snap_leaves_exactly_the_codewords_and_a_plain_model():
    model, layers, optimizer = reparametrized()
    for x, y in batches(3):
        optimizer.zero_grad()
        backward(model, x, y)
        optimizer.step()
    expected = {name: p.codewords.detach()[p.psi].view(p.shape).clone() for name, p in layers}
    assert reparam.snap_(model) == [name for name, _ in layers]
    modules = dict(model.named_modules())
    for name, weight in expected.items():
        module = modules[name]
        assert type(module) in (nn.Conv2d, nn.Linear) and not parametrize.is_parametrized(module)
        assert isinstance(module.weight, nn.Parameter) and torch.equal(module.weight, weight)
    assert not any("parametrizations" in key for key in model.state_dict())
    model(next(batches(1))[0])


def test_remove_without_snapping_keeps_the_current_weights():
    model, layers, optimizer = reparametrized()
    for x, y in batches(3):
        optimizer.zero_grad()
        backward(model, x, y)
        optimizer.step()
    before = dense_weights(model)
    assert reparam.remove_gp(model, snap=False) == [name for name, _ in layers]
    after = dense_weights(model)
    for name in before:
        assert torch.equal(after[name], before[name]), name
    assert not any(parametrize.is_parametrized(m) for m in model.modules())


@pytest.mark.parametrize("lr", [0.5, 1.0])
def test_gamma_decays_with_alpha_squared(lr):
    """No momentum, no weight decay: alpha_t = (1 - lr mu)^t and Gamma_t = alpha_t^2 Gamma_0
    (the codewords are the member means, so W - c = alpha R0), whatever the task gradient."""
    model = small_cnn()
    layers = reparam.attach_gp(model, PLANS, psi_of(model), MU)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    handle = reparam.recursion_hook(optimizer, layers)
    start = reparam.gamma(layers)
    assert start.dim() == 0 and start > 0
    for step, (x, y) in enumerate(batches(4), start=1):
        optimizer.zero_grad()
        backward(model, x, y)
        optimizer.step()
        alpha = layers[0][1].alpha
        assert alpha.item() == pytest.approx((1 - lr * MU) ** step, rel=1e-6)
        assert reparam.gamma(layers).item() == pytest.approx((alpha**2 * start).item(), rel=1e-4)
        # the closed form (no codewords read) is the error of the weights as they are
        direct = torch.stack([quantization_error(p.subvectors(), p.assignment) for _, p in layers]).mean()
        assert reparam.gamma(layers).item() == pytest.approx(direct.item(), rel=1e-4)
    handle.remove()
    optimizer.step()
    assert layers[0][1].alpha.item() == pytest.approx((1 - lr * MU) ** 4, rel=1e-6)


def test_each_layer_follows_the_lr_of_its_own_param_group():
    model = small_cnn()
    layers = reparam.attach_gp(model, PLANS, psi_of(model), MU)
    first = layers[0][1].codewords
    optimizer = torch.optim.SGD([{"params": [first], "lr": 0.2}], lr=0.1)
    optimizer.add_param_group({"params": [p for p in model.parameters() if p is not first]})
    reparam.recursion_hook(optimizer, layers)
    backward(model, *next(batches(1)))
    optimizer.step()
    assert [p.alpha.item() for _, p in layers] == pytest.approx([1 - 0.2 * MU] + [1 - 0.1 * MU] * 2)


@pytest.mark.parametrize("options", [dict(nesterov=True, momentum=0.9), dict(dampening=0.1, momentum=0.9)])
def test_sgd_variants_the_recursion_does_not_follow_are_refused(options):
    model = small_cnn()
    layers = reparam.attach_gp(model, PLANS, psi_of(model), MU)
    with pytest.raises(ValueError, match="without"):
        reparam.recursion_hook(torch.optim.SGD(model.parameters(), lr=0.1, **options), layers)
    with pytest.raises(ValueError, match="SGD"):
        reparam.recursion_hook(torch.optim.Adam(model.parameters()), layers)


def test_snapped_start_codebook_keeps_the_weights_exactly_quantized():
    """Given codewords that the weights are snapped to: R0 = 0, so W == C[psi] bit for bit."""
    model = small_cnn()
    psi = psi_of(model)
    modules = dict(model.named_modules())
    starts = {}
    with torch.no_grad():
        for plan in PLANS:
            starts[plan.name] = torch.randn(plan.k, plan.d).half().float()
            modules[plan.name].weight.copy_(starts[plan.name][psi[plan.name]].view(plan.shape))
    layers = reparam.attach_gp(model, PLANS, psi, 0.0, codebooks=starts)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    reparam.recursion_hook(optimizer, layers)
    for x, y in batches(3):
        optimizer.zero_grad()
        backward(model, x, y)
        optimizer.step()
    for name, p in layers:
        assert torch.count_nonzero(p.residual) == 0
        assert not torch.equal(p.codewords, starts[name])  # they moved
        assert torch.equal(modules[name].weight.detach().reshape(-1, p.d), p.codewords.detach()[p.psi])
    assert reparam.codebooks(layers).keys() == reparam.assignments(layers).keys() == starts.keys()


def test_channels_last_model_trains_as_the_contiguous_one():
    psi = psi_of(small_cnn())
    results = []
    for channels_last in (False, True):
        model, layers, optimizer = reparametrized(psi=psi, channels_last=channels_last)
        for x, y in batches(5, channels_last=channels_last):
            optimizer.zero_grad()
            backward(model, x, y)
            optimizer.step()
        results.append((model, dense_weights(model)))
    (_, expected), (model, got) = results
    for name in expected:
        assert (got[name] - expected[name]).abs().max() <= 1e-5, name
    reparam.snap_(model)
    weight = dict(model.named_modules())["2"].weight
    assert not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last)


def test_psi_and_the_residual_are_no_buffers_that_ddp_would_broadcast_but_move_with_the_model():
    model = small_cnn()
    layers = reparam.attach_gp(model, PLANS, psi_of(model), MU)
    buffers = dict(model.named_buffers())
    assert all(name.endswith((".alpha", ".beta")) or "parametrizations" not in name for name in buffers)
    model.to(torch.float64)
    for _, p in layers:
        assert p.residual.dtype == torch.float64 and p.psi.dtype == torch.int64
        assert torch.equal(p.counts, torch.bincount(p.psi, minlength=p.k).float())
