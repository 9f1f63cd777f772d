import torch
import pytest

from gppq_dist.distributed import ProcessGroupReducer
from gppq_dist.pq.kmeans import kmeans, kmeans_many, nearest
from tests.distributed_helpers import run_gloo


def blobs(n=3000, d=9, centers=24, seed=0):
    generator = torch.Generator().manual_seed(seed)
    means = torch.randn(centers, d, generator=generator) * 4
    labels = torch.randint(centers, (n,), generator=generator)
    return means[labels] + 0.3 * torch.randn(n, d, generator=generator)


def brute_force(points, codebook):
    return torch.cdist(points.double(), codebook.double()).argmin(1)


@pytest.mark.parametrize("kernel", ["faiss", "torch"])
def test_nearest_matches_brute_force(kernel):
    points, codebook = blobs(2000), blobs(64, seed=1)
    distances, indices = nearest(points, codebook, kernel=kernel, chunk_mb=1)
    assert torch.equal(indices, brute_force(points, codebook))
    exact = ((points - codebook[indices]) ** 2).sum(1)
    torch.testing.assert_close(distances, exact, rtol=1e-4, atol=1e-4)


def test_kmeans_is_deterministic_and_consistent():
    points = blobs()
    first = kmeans(points, 32, iterations=15, seed=3)
    second = kmeans(points, 32, iterations=15, seed=3)
    assert torch.equal(first.codebook, second.codebook)
    assert torch.equal(first.assignments, second.assignments)
    # codewords are the means of their members (eq. 5), assignments are nearest codewords
    for k in range(32):
        members = points[first.assignments == k]
        torch.testing.assert_close(first.codebook[k], members.mean(0), rtol=1e-5, atol=1e-5)
    assert torch.equal(first.assignments, brute_force(points, first.codebook))
    sse = ((points - first.codebook[first.assignments]) ** 2).sum().item()
    assert first.inertia == pytest.approx(sse, rel=1e-4)
    other_seed = kmeans(points, 32, iterations=15, seed=4)
    assert not torch.equal(first.codebook, other_seed.codebook)


def test_kmeans_improves_on_its_start_and_stops_at_a_fixed_point():
    points = blobs(centers=8)
    result = kmeans(points, 8, iterations=100, seed=0)
    assert result.iterations < 100  # converged: no assignment changed
    one_step = kmeans(points, 8, iterations=1, seed=0)
    assert result.inertia <= one_step.inertia


def test_empty_cluster_is_reseeded_deterministically():
    points = blobs(centers=8)
    start = kmeans(points, 8, iterations=1, seed=0).codebook.clone()
    start[3] = 1e4  # no point is near: cluster 3 is empty after the first assignment
    runs = [kmeans_many([points], [8], iterations=30, init_codebooks=[start]) for _ in range(2)]
    result = runs[0][0]
    assert result.reseeded >= 1
    assert torch.equal(result.codebook, runs[1][0].codebook)
    assert torch.isfinite(result.codebook).all()
    assert torch.bincount(result.assignments, minlength=8).min() > 0
    assert result.codebook.abs().max() < 100


def test_more_codewords_than_distinct_points_leaves_no_nan():
    points = blobs(64, centers=4, seed=2)[:4].repeat(16, 1)  # 4 distinct points
    result = kmeans(points, 8, iterations=10)
    assert torch.isfinite(result.codebook).all()
    assert result.inertia == pytest.approx(0.0, abs=1e-6)


def _distributed_kmeans(rank, world_size, kernel):
    layers = [blobs(3001, 9, seed=0), blobs(1500, 4, centers=40, seed=1), blobs(700, 18, seed=2)]
    results = kmeans_many(layers, [32, 64, 16], iterations=12, seed=5,
                          reducer=ProcessGroupReducer(), kernel=kernel)
    return [(r.codebook, r.assignments, torch.tensor(r.inertia), torch.tensor(r.iterations))
            for r in results]


@pytest.mark.distributed
@pytest.mark.parametrize("kernel", ["faiss", "torch"])
def test_two_rank_kmeans_equals_one_process(kernel):
    torch.set_num_threads(1)
    layers = [blobs(3001, 9, seed=0), blobs(1500, 4, centers=40, seed=1), blobs(700, 18, seed=2)]
    single = kmeans_many(layers, [32, 64, 16], iterations=12, seed=5, kernel=kernel)
    ranks = run_gloo(_distributed_kmeans, 2, kernel)
    for rank_result in ranks:
        for expected, (codebook, assignments, inertia, iterations) in zip(single, rank_result):
            assert torch.equal(assignments, expected.assignments)
            torch.testing.assert_close(codebook, expected.codebook, rtol=1e-5, atol=1e-6)
            assert inertia.item() == pytest.approx(expected.inertia, rel=1e-6)
            assert iterations.item() == expected.iterations
    # every rank ends with the same codebooks
    for a, b in zip(ranks[0], ranks[1]):
        assert torch.equal(a[0], b[0])
