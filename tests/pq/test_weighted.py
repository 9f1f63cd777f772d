"""Activation-weighted k-means (two-stage PQ's stage 1), single layer."""

import torch
from torch import nn

from gppq_dist.pq.kmeans import kmeans
from gppq_dist.pq.subvectors import to_subvectors
from gppq_dist.pq.weighted import input_slices, second_moment, weighted_kmeans


def test_input_slices_line_up_with_the_weight_subvectors():
    """A conv's output is the sum over its input slices of slice . subvector."""
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 1, 3, padding=1, stride=2, bias=False)
    x = torch.randn(2, 6, 9, 9)
    for d in (3, 9, 18):
        slices = input_slices(conv, x, d)
        weights = to_subvectors(conv.weight.detach(), d)  # m x d, one row
        out = (slices.view(-1, weights.shape[0], d) * weights).sum((1, 2))
        expected = conv(x).permute(0, 2, 3, 1).reshape(-1)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    linear = nn.Linear(8, 3)
    assert input_slices(linear, torch.randn(5, 8), 4).shape == (10, 4)


def weighted_error(w, codebook, assignments, moment):
    diff = (w - codebook[assignments]).double()
    return float(((diff @ moment) * diff).sum())


def test_weighting_trades_weight_error_for_output_error():
    generator = torch.Generator().manual_seed(1)
    w = torch.randn(2000, 4, generator=generator)
    x = torch.randn(5000, 4, generator=generator) * torch.tensor([10.0, 1.0, 0.1, 0.1])  # anisotropic inputs
    moment, count = second_moment(x)
    assert count == 5000
    plain = kmeans(w, 16, iterations=30)
    weighted = weighted_kmeans(w, moment, 16, iterations=30)
    assert weighted_error(w, weighted.codebook, weighted.assignments, moment) < \
        0.7 * weighted_error(w, plain.codebook, plain.assignments, moment)
    assert float(((w - weighted.codebook[weighted.assignments]) ** 2).sum()) > plain.inertia
    for k in range(16):  # codewords stay the means of their members in weight space
        members = w[weighted.assignments == k]
        if len(members):
            torch.testing.assert_close(weighted.codebook[k], members.mean(0), rtol=1e-5, atol=1e-6)
