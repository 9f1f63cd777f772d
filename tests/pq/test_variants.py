"""Gong et al.'s codecs: sub-space PQ and residual PQ (decoding, fitting, accounting)."""

import torch
from torch import nn

from gppq_dist.config import QuantizationConfig
from gppq_dist.pq.accounting import layer_cost
from gppq_dist.pq.codecs import decode_layer
from gppq_dist.pq.plan import plan_layers
from gppq_dist.pq.subvectors import to_subvectors
from gppq_dist.pq.variants import residual_pq, subspace_pq

RULES = QuantizationConfig.model_validate({"skip_first_conv": False, "types": {"conv3x3": {"d": 9, "k": 16}}})


def layer(codec, stages=1):
    conv = nn.Conv2d(12, 64, 3)
    (plan,) = plan_layers(nn.Sequential(conv), RULES, codec=codec, stages=stages)
    return conv.weight.detach(), plan


def test_subspace_codebooks_fit_their_own_columns_and_decode_in_row_order():
    weight, plan = layer("pq_subspace")
    assert plan.n_codebooks == 12 and plan.k == 8  # K clamped against the 64 rows of each sub-space
    (coded,) = subspace_pq([weight], [plan], iterations=10)
    assert coded.codebook.shape == (12, 8, 9) and coded.indices.numel() == plan.n_indices == 64 * 12
    decoded = decode_layer(plan, coded.codebook, coded.indices)
    rows = to_subvectors(decoded, 9).view(64, 12, 9)
    original = to_subvectors(weight, 9).view(64, 12, 9)
    indices = coded.indices.view(64, 12)
    for j in range(12):
        assert torch.equal(rows[:, j], coded.codebook[j][indices[:, j]])
        for k in range(8):  # each codeword is the mean of its members in its own sub-space
            members = original[indices[:, j] == k, j]
            if len(members):
                torch.testing.assert_close(coded.codebook[j, k], members.mean(0), rtol=1e-5, atol=1e-6)
    error = float(((to_subvectors(decoded, 9) - to_subvectors(weight, 9)) ** 2).sum(1).mean())
    assert abs(coded.mse - error) <= 1e-6 * max(1.0, error)


def test_residual_stages_add_up_and_each_stage_lowers_the_error():
    weight, one = layer("residual", stages=1)
    _, two = layer("residual", stages=2)
    (first,) = residual_pq([weight], [one], iterations=10)
    (both,) = residual_pq([weight], [two], iterations=10)
    assert both.codebook.shape == (2, 16, 9) and both.indices.numel() == 2 * two.n_subvectors
    assert torch.equal(both.codebook[0], first.codebook[0])  # stage 1 is plain PQ, same seed
    decoded = decode_layer(two, both.codebook, both.indices)
    stage = both.indices.view(2, -1)
    expected = both.codebook[0][stage[0]] + both.codebook[1][stage[1]]
    torch.testing.assert_close(to_subvectors(decoded, 9), expected)
    assert both.mse < 0.8 * first.mse


def test_accounting_counts_every_codebook_and_every_index():
    _, sub = layer("pq_subspace")
    cost = layer_cost(sub)
    assert cost.index_bytes == 64 * 12 * 3 / 8 and cost.codebook_bytes == 12 * 8 * 9 * 2
    _, res = layer("residual", stages=3)
    cost = layer_cost(res)
    assert cost.index_bytes == 3 * 64 * 12 * 4 / 8 and cost.codebook_bytes == 3 * 16 * 9 * 2
