"""GPSGD (eq. 6 folded into SGD) against the transform followed by torch's SGD."""

import io

import pytest
import torch

from gppq_dist.pq.gp import Assignment, apply_gp_gradient, codeword_gradient_sums, quantization_error
from gppq_dist.pq.gp_sgd import GPSGD
from gppq_dist.pq.kmeans import kmeans

SHAPES = [((16, 8, 3, 3), 9, 32), ((24, 16, 1, 1), 4, 16)]  # (weight shape, d, K)
MU = 0.05


def layers(seed=0):
    generator = torch.Generator().manual_seed(seed)
    weights, assignments = [], []
    for shape, d, k in SHAPES:
        weight = torch.nn.Parameter(torch.randn(shape, generator=generator))
        psi = kmeans(weight.detach().reshape(-1, d), k, iterations=4, seed=seed).assignments
        weights.append(weight)
        assignments.append(Assignment.from_psi(psi, k))
    return weights, assignments


def gradients(steps, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(shape, generator=generator) for shape, _, _ in SHAPES] for _ in range(steps)]


def sums_of(grads, assignments):
    return [codeword_gradient_sums(g.reshape(-1, d), a) for g, (_, d, _), a in zip(grads, SHAPES, assignments)]


def reference(steps, lrs, momentum, weight_decay):
    """apply_gp_gradient into .grad, then torch.optim.SGD: the generic path."""
    weights, assignments = layers()
    optimizer = torch.optim.SGD(weights, lr=lrs[0], momentum=momentum, weight_decay=weight_decay)
    for lr, grads in zip(lrs, gradients(steps)):
        optimizer.param_groups[0]["lr"] = lr
        for weight, (_, d, _), assignment, sums in zip(weights, SHAPES, assignments, sums_of(grads, assignments)):
            weight.grad = apply_gp_gradient(weight.detach().reshape(-1, d), sums, assignment, MU).view_as(weight)
        optimizer.step()
    return weights


def closed_form(steps, lrs, momentum, weight_decay):
    weights, assignments = layers()
    optimizer = GPSGD(weights, [d for _, d, _ in SHAPES], assignments, MU, lr=lrs[0], momentum=momentum,
                      weight_decay=weight_decay)
    for lr, grads in zip(lrs, gradients(steps)):
        optimizer.param_groups[0]["lr"] = lr
        optimizer.step(sums_of(grads, assignments))
    return weights, optimizer


@pytest.mark.parametrize("momentum,weight_decay", [(0.9, 1e-4), (0.0, 0.0), (0.9, 0.0)])
def test_equals_the_transform_followed_by_torch_sgd(momentum, weight_decay):
    lrs = [0.1] * 6 + [0.01] * 6  # an lr drop half-way, as ReduceLROnPlateau does
    expected = reference(len(lrs), lrs, momentum, weight_decay)
    got, _ = closed_form(len(lrs), lrs, momentum, weight_decay)
    start, _ = layers()
    for e, g, s in zip(expected, got, start):
        assert (e - s).abs().max() > 0.05  # it moved
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_state_round_trips_through_weights_only_loading_and_continues_bit_identically():
    lrs = [0.1] * 8
    weights, optimizer = closed_form(4, lrs[:4], 0.9, 1e-4)
    buffer = io.BytesIO()
    torch.save({"weights": [w.detach().clone() for w in weights], "optimizer": optimizer.state_dict()}, buffer)
    later = gradients(8)[4:]
    _, assignments = layers()
    for grads in later:
        optimizer.step(sums_of(grads, assignments))

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    fresh, assignments = layers()
    resumed = GPSGD(fresh, [d for _, d, _ in SHAPES], assignments, MU, lr=0.1, momentum=0.9, weight_decay=1e-4)
    resumed.load_state_dict(saved["optimizer"])
    with torch.no_grad():
        for weight, value in zip(fresh, saved["weights"]):
            weight.copy_(value)
    for grads in later:
        resumed.step(sums_of(grads, assignments))
    for a, b in zip(weights, fresh):
        assert torch.equal(a, b)


@pytest.mark.parametrize("lr", [0.5, 1.0])
def test_pure_mu_steps_shrink_gamma_geometrically(lr):
    """Eq. 8 through the optimizer: no task gradient, no momentum: Gamma x (1 - lr mu)^2 per
    step, and the codewords stay where they are."""
    weights, assignments = layers()
    optimizer = GPSGD(weights, [d for _, d, _ in SHAPES], assignments, MU, lr=lr)
    zero = [torch.zeros(a.k, d) for (_, d, _), a in zip(SHAPES, assignments)]
    gammas = [quantization_error(w.detach().reshape(-1, d), a) for w, (_, d, _), a in zip(weights, SHAPES, assignments)]
    codewords = [optimizer.state[w]["codewords"].clone() for w in weights]
    for _ in range(5):
        optimizer.step(zero)
        for i, (weight, (_, d, _), assignment) in enumerate(zip(weights, SHAPES, assignments)):
            gamma = quantization_error(weight.detach().reshape(-1, d), assignment)
            assert gamma.item() == pytest.approx((1 - lr * MU) ** 2 * gammas[i].item(), rel=1e-4)
            gammas[i] = gamma
    for weight, before in zip(weights, codewords):
        assert torch.equal(optimizer.state[weight]["codewords"], before)


def test_snapped_weights_with_their_codewords_stay_exactly_those_codewords():
    """Two-stage PQ's finetune: mu = 0 from snapped weights; W == codewords[psi] bit for bit."""
    weights, assignments = layers()
    starts = []
    with torch.no_grad():
        for weight, (_, d, _), assignment in zip(weights, SHAPES, assignments):
            codebook = torch.randn(assignment.k, d, generator=torch.Generator().manual_seed(5)).half().float()
            weight.copy_(codebook[assignment.psi].view_as(weight))
            starts.append(codebook)
    optimizer = GPSGD(weights, [d for _, d, _ in SHAPES], assignments, 0.0, lr=0.1, momentum=0.9,
                      weight_decay=1e-4, codewords=starts)
    for grads in gradients(5):
        optimizer.step(sums_of(grads, assignments))
    for weight, (_, d, _), assignment, start in zip(weights, SHAPES, assignments, starts):
        codewords = optimizer.state[weight]["codewords"]
        assert not torch.equal(codewords, start)  # they moved
        assert torch.equal(weight.detach().reshape(-1, d), codewords[assignment.psi])
