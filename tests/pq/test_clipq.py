"""CLIP-Q's per-layer pruning and quantization, its sparsity coding, and the straight-through
training that lets a pruned weight come back."""

import numpy as np
import pytest
import torch
from torch import nn

from gppq_dist.methods.clipq_scheme import ClipQScheme
from gppq_dist.pq.clipq import (
    best_gap_bits,
    gap_codes,
    keep_mask,
    linear_levels,
    mask_from_gap_codes,
    n_kept,
    pattern_bytes,
    prune_quantize,
)
from gppq_dist.pq.plan import LayerPlan


def test_exactly_the_smallest_magnitudes_are_pruned_even_with_ties():
    weight = torch.tensor([0.5, -0.1, 0.1, 0.1, -0.3, 0.0, 0.2, -0.1])
    mask = keep_mask(weight, prune=0.5)  # floor(4) pruned; the 0.1 magnitudes tie at the threshold
    assert int(mask.sum()) == n_kept(8, 0.5) == 4
    assert weight[mask].abs().min() >= weight[~mask].abs().max()
    torch.manual_seed(0)
    big = torch.randn(10_000)
    mask = keep_mask(big, prune=0.9)
    assert int(mask.sum()) == 1000 and big[mask].abs().min() > big[~mask].abs().max()


def test_levels_are_the_means_of_equal_width_intervals_in_fp16():
    torch.manual_seed(0)
    values = torch.randn(5000)
    levels, index = linear_levels(values, bits=3)
    assert levels.shape == (8,) and int(index.min()) >= 0 and int(index.max()) <= 7
    assert torch.equal(levels, levels.half().float())
    edges = torch.linspace(float(values.min()), float(values.max()), 9)
    for k in range(8):
        members = values[index == k]
        assert float(members.min()) >= float(edges[k]) - 1e-6 and float(members.max()) <= float(edges[k + 1]) + 1e-6
        assert float(levels[k]) == pytest.approx(float(members.mean()), abs=2e-3)
    coded = prune_quantize(values.view(50, 100), prune=0.7, bits=2)
    weight = coded.weight((50, 100))
    assert int((weight != 0).sum()) == 1500 and torch.unique(weight[weight != 0]).numel() <= 4


@pytest.mark.parametrize("density", [0.0, 0.01, 0.2, 0.5, 1.0])
def test_the_sparsity_pattern_round_trips_at_every_code_width(density):
    rng = np.random.default_rng(1)
    n = 3000
    mask = rng.random(n) < density
    mask[:40] = False  # a run longer than several escapes at the start, trailing zeros at the end
    if density:
        mask[-1] = False
    for bits in range(1, 9):
        codes = gap_codes(mask, bits)
        assert codes.max(initial=0) < (1 << bits)
        assert np.array_equal(mask_from_gap_codes(codes, bits, n), mask)
    r, count = best_gap_bits(mask)
    assert count == len(gap_codes(mask, r))
    assert pattern_bytes(mask) == min(len(gap_codes(mask, b)) * b for b in range(1, 9)) / 8
    with pytest.raises(ValueError):
        mask_from_gap_codes(np.array([5, 5]), 4, 6)  # the second kept weight would sit at 11


def test_a_sparse_pattern_costs_less_than_a_bitmap():
    mask = np.zeros(100_000, dtype=bool)
    mask[np.random.default_rng(0).choice(100_000, 5000, replace=False)] = True
    assert pattern_bytes(mask) < 100_000 / 8 / 2


def test_a_pruned_weight_comes_back_through_the_straight_through_update():
    """y = x . [1, 1, 1, 3, 0.01...]: the last input starts pruned (smallest), but its gradient
    at the pruned weight still reaches the full-precision copy, which grows until it is kept."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 1.1, 0.9, 0.01]]))
    plan = LayerPlan(name="0", kind="linear", shape=(1, 4), d=1, k=256, k_requested=256, rule="test",
                     codec="clipq", prune=0.25)
    scheme = ClipQScheme(model, [plan], reducer=None)
    target = torch.tensor([1.0, 1.0, 1.0, 3.0])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    assert not bool(scheme.masks()["0"][3])  # pruned at the start
    for _ in range(100):
        x = torch.randn(32, 4)
        scheme.before_forward()
        loss = ((model(x).squeeze(1) - x @ target) ** 2).mean()
        loss.backward()
        scheme.after_backward()
        optimizer.step()
        optimizer.zero_grad()
    mask = scheme.masks()["0"]
    assert bool(mask[3]) and int(mask.sum()) == 3  # back, and another weight pruned instead
    assert float(model[0].weight.detach()[0, 3]) > 2.0


def test_the_forward_pass_sees_the_pruned_weights_and_the_step_the_full_ones():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 4))
    full = model[0].weight.detach().clone()
    plan = LayerPlan(name="0", kind="linear", shape=(4, 16), d=1, k=4, k_requested=4, rule="test",
                     codec="clipq", prune=0.5)
    scheme = ClipQScheme(model, [plan], reducer=None)
    scheme.before_forward()
    swapped = model[0].weight.detach().clone()
    assert int((swapped == 0).sum()) == 32 and torch.unique(swapped[swapped != 0]).numel() <= 4
    model(torch.randn(2, 16)).sum().backward()
    scheme.after_backward()
    assert torch.equal(model[0].weight.detach(), full)
    assert model[0].weight.grad is not None and bool((model[0].weight.grad[swapped == 0] != 0).any())
