import torch
import pytest

from gppq_dist.distributed import ProcessGroupReducer
from gppq_dist.pq.kmeans import LocalReducer, _Layer, kmeans, kmeans_many, nearest
from tests.distributed_helpers import run_gloo


def blobs(n=3000, d=9, centers=24, seed=0):
    generator = torch.Generator().manual_seed(seed)
    means = torch.randn(centers, d, generator=generator) * 4
    labels = torch.randint(centers, (n,), generator=generator)
    return means[labels] + 0.3 * torch.randn(n, d, generator=generator)


@pytest.fixture
def one_thread():
    """One thread, as each gloo rank has, so results differ only by the sharding."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_seeding_does_not_depend_on_the_thread_count(one_thread):
    points = torch.randn(50_000, 4, generator=torch.Generator().manual_seed(8))
    single = kmeans(points, 512, iterations=1, seed=2).codebook
    torch.set_num_threads(2)
    assert torch.equal(kmeans(points, 512, iterations=1, seed=2).codebook, single)


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


@pytest.mark.parametrize("incremental", [True, False])
def test_result_at_a_fixed_point_is_one(incremental):
    points = torch.randn(4000, 3, generator=torch.Generator().manual_seed(0))
    result = kmeans(points, 8, iterations=200, seed=0, incremental=incremental)
    assert 10 < result.iterations < 200  # converged after many moves
    # the final assignment is skipped at a fixed point: nothing in it may be stale
    assert torch.equal(result.assignments, brute_force(points, result.codebook))
    for k in range(8):
        members = points[result.assignments == k]
        torch.testing.assert_close(result.codebook[k], members.mean(0), rtol=1e-5, atol=1e-6)


def textbook_lloyd(points, codebook, steps):
    """``steps`` rounds of: assign to the nearest codeword (fp64), move codewords to means."""
    for _ in range(steps):
        assignments = brute_force(points, codebook)
        counts = torch.bincount(assignments, minlength=codebook.shape[0])
        assert counts.min() > 0, "the reference does not re-seed empty clusters"
        sums = torch.zeros_like(codebook, dtype=torch.float64).index_add_(
            0, assignments, points.double()
        )
        codebook = (sums / counts.unsqueeze(1)).float()
    return codebook, assignments


@pytest.mark.parametrize("incremental", [True, False])
def test_iterations_then_final_step_are_textbook_lloyd(incremental):
    points = torch.randn(4000, 9, generator=torch.Generator().manual_seed(6))
    start = points[torch.randperm(4000, generator=torch.Generator().manual_seed(7))[:16]]
    result = kmeans_many([points], [16], iterations=4, init_codebooks=[start],
                         incremental=incremental)[0]
    assert result.iterations == 4 and result.reseeded == 0  # stopped by the iteration limit
    # 4 iterations, then the final assignment and mean
    codebook, assignments = textbook_lloyd(points, start, steps=5)
    assert torch.equal(result.assignments, assignments)
    torch.testing.assert_close(result.codebook, codebook, rtol=1e-5, atol=1e-6)


def corner_start(points, k, seed):
    """k codewords near one corner of the data: most start empty and are re-seeded, and
    about half of the points change cluster in each of the next iterations."""
    generator = torch.Generator().manual_seed(seed)
    corner = points.min(0).values
    return corner + 0.1 * torch.rand(k, points.shape[1], generator=generator)


@pytest.mark.parametrize("kernel", ["faiss", "torch"])
@pytest.mark.parametrize("start", ["kmeans++", "bad"])
def test_incremental_sums_equal_full_recomputation(kernel, start):
    points = torch.randn(5000, 9, generator=torch.Generator().manual_seed(1))
    init = None if start == "kmeans++" else [corner_start(points, 64, seed=2)]
    options = dict(iterations=25, seed=3, kernel=kernel, init_codebooks=init)
    incremental = kmeans_many([points], [64], incremental=True, **options)[0]
    full = kmeans_many([points], [64], incremental=False, **options)[0]
    assert torch.equal(incremental.assignments, full.assignments)
    torch.testing.assert_close(incremental.codebook, full.codebook, rtol=1e-6, atol=1e-7)
    assert incremental.iterations == full.iterations
    assert incremental.reseeded == full.reseeded
    assert incremental.inertia == pytest.approx(full.inertia, rel=1e-9)
    if start == "bad":  # all but a few codewords start empty and are re-seeded
        assert incremental.reseeded > 0


@pytest.mark.parametrize("kernel", ["faiss", "torch"])
def test_sums_follow_assignments_when_every_point_switches(kernel):
    points = blobs(2000, d=5, centers=16, seed=4)
    codebook = points[torch.randperm(2000, generator=torch.Generator().manual_seed(5))[:16]]
    layer = _Layer(points, 16, LocalReducer(), incremental=True)
    layer.codebook = codebook
    assert layer.assign(kernel, chunk_mb=1) == 2000
    # the same codewords in another order: every subvector changes codeword index
    layer.codebook = codebook.roll(1, 0)
    assert layer.assign(kernel, chunk_mb=1) == 2000
    expected_sums = torch.zeros(16, 5, dtype=torch.float64).index_add_(
        0, layer.assignments, points.double()
    )
    torch.testing.assert_close(layer.sums, expected_sums, rtol=1e-12, atol=1e-9)
    assert torch.equal(layer.counts, torch.bincount(layer.assignments, minlength=16).double())
    # and back, now against the sums kept so far
    layer.codebook = codebook
    assert layer.assign(kernel, chunk_mb=1) == 2000
    torch.testing.assert_close(layer.sums, expected_sums.roll(-1, 0), rtol=1e-12, atol=1e-9)


def test_empty_cluster_is_reseeded_deterministically():
    points = blobs(centers=8)
    start = kmeans(points, 8, iterations=1, seed=0).codebook.clone()
    start[3] = 1e4  # no point is near: cluster 3 is empty after the first assignment
    runs = [kmeans_many([points], [8], iterations=30, init_codebooks=[start]) for _ in range(2)]
    result = runs[0][0]
    assert result.reseeded >= 1
    assert torch.equal(result.codebook, runs[1][0].codebook)
    full = kmeans_many([points], [8], iterations=30, init_codebooks=[start], incremental=False)[0]
    assert torch.equal(result.assignments, full.assignments)
    assert result.reseeded == full.reseeded
    assert torch.isfinite(result.codebook).all()
    assert torch.bincount(result.assignments, minlength=8).min() > 0
    assert result.codebook.abs().max() < 100


def test_more_codewords_than_distinct_points_leaves_no_nan():
    points = blobs(64, centers=4, seed=2)[:4].repeat(16, 1)  # 4 distinct points
    result = kmeans(points, 8, iterations=10)
    assert torch.isfinite(result.codebook).all()
    assert result.inertia == pytest.approx(0.0, abs=1e-6)


def _distributed_kmeans(rank, world_size, kernel, incremental):
    layers = [blobs(3001, 9, seed=0), blobs(1500, 4, centers=40, seed=1), blobs(700, 18, seed=2)]
    results = kmeans_many(layers, [32, 64, 16], iterations=12, seed=5,
                          reducer=ProcessGroupReducer(), kernel=kernel, incremental=incremental)
    return [(r.codebook, r.assignments, torch.tensor(r.inertia), torch.tensor(r.iterations))
            for r in results]


@pytest.mark.distributed
@pytest.mark.parametrize("kernel, incremental", [("faiss", True), ("torch", True), ("faiss", False)])
def test_two_rank_kmeans_equals_one_process(kernel, incremental, one_thread):
    layers = [blobs(3001, 9, seed=0), blobs(1500, 4, centers=40, seed=1), blobs(700, 18, seed=2)]
    single = kmeans_many(layers, [32, 64, 16], iterations=12, seed=5, kernel=kernel)
    ranks = run_gloo(_distributed_kmeans, 2, kernel, incremental)
    for rank_result in ranks:
        for expected, (codebook, assignments, inertia, iterations) in zip(single, rank_result):
            assert torch.equal(assignments, expected.assignments)
            torch.testing.assert_close(codebook, expected.codebook, rtol=1e-5, atol=1e-6)
            assert inertia.item() == pytest.approx(expected.inertia, rel=1e-6)
            assert iterations.item() == expected.iterations
    # every rank ends with the same codebooks
    for a, b in zip(ranks[0], ranks[1]):
        assert torch.equal(a[0], b[0])
