"""The G&P update rule (paper eq. 6-9) on its own, single device."""

import pytest
import torch

from gppq_dist.pq.gp import (
    Assignment,
    apply_gp_gradient,
    cluster_means,
    codeword_gradient_sums,
    quantization_error,
)
from gppq_dist.pq.kmeans import kmeans


def layer(n=600, d=9, k=16, seed=0):
    weights = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    result = kmeans(weights, k, iterations=5, seed=seed)
    return weights, Assignment.from_psi(result.assignments, k)


def test_cluster_means_are_the_kmeans_codebook():
    weights = torch.randn(600, 9, generator=torch.Generator().manual_seed(1))
    result = kmeans(weights, 16, iterations=5)
    means = cluster_means(weights, Assignment.from_psi(result.assignments, 16))
    torch.testing.assert_close(means, result.codebook, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mu", [0.1, 0.3, 0.9])
def test_pure_mu_steps_shrink_gamma_geometrically(mu):
    """Eq. 8: with no task gradient and lr 1, Gamma_{t+1} = (1 - mu)^2 Gamma_t."""
    weights, assignment = layer()
    zero_sums = torch.zeros(assignment.k, weights.shape[1])
    gamma = quantization_error(weights, assignment)
    codewords = cluster_means(weights, assignment)
    for _ in range(5):
        weights = weights - apply_gp_gradient(weights, zero_sums, assignment, mu)
        new_gamma = quantization_error(weights, assignment)
        assert new_gamma.item() == pytest.approx((1 - mu) ** 2 * gamma.item(), rel=1e-4)
        gamma = new_gamma
    # the pull moves subvectors toward fixed codewords: the mu term sums to zero per cluster
    torch.testing.assert_close(cluster_means(weights, assignment), codewords, rtol=1e-5, atol=1e-6)


def test_mu_zero_gives_the_codeword_gradient():
    """Eq. 9: on quantized weights the update is the mean gradient of each codeword's members,
    i.e. the gradient w.r.t. the shared codeword divided by its member count."""
    _, assignment = layer()
    codebook = torch.randn(assignment.k, 9, requires_grad=True)
    target = torch.randn(600, 9, generator=torch.Generator().manual_seed(3))
    snapped = codebook[assignment.psi].detach().requires_grad_(True)
    ((snapped - target) ** 3).sum().backward()
    ((codebook[assignment.psi] - target) ** 3).sum().backward()
    sums = codeword_gradient_sums(snapped.grad, assignment)
    update = apply_gp_gradient(snapped.detach(), sums, assignment, mu=0.0)
    expected = (codebook.grad / assignment.counts.clamp_min(1).unsqueeze(1))[assignment.psi]
    torch.testing.assert_close(update, expected, rtol=1e-5, atol=1e-6)


def test_reducing_sums_equals_averaging_full_gradients():
    """Two shards' sums, averaged, give the same update as the averaged full gradient."""
    weights, assignment = layer()
    grads = [torch.randn(600, 9, generator=torch.Generator().manual_seed(s)) for s in (4, 5)]
    reduced = sum(codeword_gradient_sums(g, assignment) for g in grads) / 2
    via_sums = apply_gp_gradient(weights, reduced, assignment, mu=0.01)
    full = (grads[0] + grads[1]) / 2
    via_full = apply_gp_gradient(weights, codeword_gradient_sums(full, assignment), assignment, mu=0.01)
    torch.testing.assert_close(via_sums, via_full, rtol=1e-5, atol=1e-6)
    # every member of a cluster gets the same task part of the update
    task = apply_gp_gradient(weights, reduced, assignment, mu=0.0)
    for k in range(assignment.k):
        members = task[assignment.psi == k]
        if members.shape[0]:
            assert torch.allclose(members, members[0].expand_as(members))
