"""k-means on subvectors, for one layer or many in lockstep, on one process or many.

Distribution is a parameter, not a dependency: every process holds the same subvectors
(weights are replicated), assigns its own contiguous shard of them, and the per-codeword
sums and counts of all layers are summed across processes by a :class:`~gppq_dist.distributed.Reducer` in one
bucketed call per iteration. On one process the :class:`LocalReducer` does nothing, so the
result is the single-process k-means on the same data up to float summation order.

Algorithm, per layer:

- init: greedy k-means++ (as scikit-learn's, ``2 + ln K`` candidates per step) on a seeded
  uniform sample of at most ``init_sample * K`` subvectors, broadcast from rank 0 so that
  every rank starts from the same codebook;
- Lloyd iterations: assign each subvector to its nearest codeword, then set each codeword
  to the mean of its members; stops early once no assignment changes anywhere;
- empty clusters are re-seeded at the subvectors farthest from their codewords (the
  global top-E over all ranks, ties to the lower rank and row), so every rank agrees;
- finally every subvector is assigned to the final codebook and each codeword is set to the
  mean of its members (eq. 5), so ``codebook[k]`` is exactly the centroid of cluster k
  (skipped after an early stop: at a fixed point it would change nothing).

Each rank keeps its shard's per-codeword sums and counts (fp64) from one iteration to the
next and moves only the subvectors whose codeword changed (a few percent after the first
iterations) instead of summing the whole shard again; ``incremental=False`` recomputes
them every iteration, which gives the same codebooks up to fp64 rounding.

Distances are fp32 on the subvectors' device; sums and reductions are fp64.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Sequence

import torch

if TYPE_CHECKING:  # the protocol, for types only: the math never needs a process group
    from gppq_dist.distributed import Reducer

# torch before faiss: faiss's OpenMP calls then bind to torch's OpenMP runtime. With faiss
# imported first, each keeps its own thread pool, and the idle spinning of one slows the
# other down as the two alternate every iteration (measured: 1.6x per iteration).
try:  # faiss is the fastest CPU assignment kernel; the torch kernel covers the rest.
    import faiss
except ImportError:  # pragma: no cover - faiss-cpu is a dependency
    faiss = None

Kernel = Literal["auto", "faiss", "torch"]


class LocalReducer:
    """The :class:`~gppq_dist.distributed.Reducer` of a single process: sums over one rank
    are the identity. It needs no process group, so it lives here with the math (the
    protocol and the process-group reducer live in :mod:`gppq_dist.distributed`)."""

    rank = 0
    world_size = 1

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        return None

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        return None


@dataclass
class KMeansResult:
    """``codebook``: K x d fp32; ``assignments``: N int64; ``inertia``: sum of squared errors."""

    codebook: torch.Tensor
    assignments: torch.Tensor
    inertia: float
    iterations: int
    reseeded: int
    init_s: float = 0.0

    @property
    def mse(self) -> float:
        """Mean squared error per subvector (the paper's Gamma for one layer, eq. 7)."""
        return self.inertia / max(1, self.assignments.numel())


def nearest(
    points: torch.Tensor,
    codebook: torch.Tensor,
    kernel: Kernel = "auto",
    chunk_mb: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared distance to, and index of, the nearest codeword: ``N x d, K x d -> N, N``."""
    if kernel == "faiss" and (faiss is None or points.device.type != "cpu"):
        raise ValueError("the faiss kernel needs faiss-cpu and CPU tensors")
    if kernel != "torch" and faiss is not None and points.device.type == "cpu":
        faiss.omp_set_num_threads(torch.get_num_threads())
        distances, indices = faiss.knn(
            points.contiguous().numpy(), codebook.contiguous().numpy(), 1
        )
        return (
            torch.from_numpy(distances[:, 0]).clamp_min_(0),
            torch.from_numpy(indices[:, 0]),
        )
    return _nearest_torch(points, codebook, chunk_mb)


# On CPU a score block that stays in cache is faster than a large one, and reusing one
# buffer saves a page-faulting allocation per block.
_CPU_BLOCK_BYTES = 2 * 2**20


def _nearest_torch(
    points: torch.Tensor, codebook: torch.Tensor, chunk_mb: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocked ``||x||^2 + ||c||^2 - 2 x.c``: one ``rows x K`` block at a time."""
    n, k = points.shape[0], codebook.shape[0]
    budget = chunk_mb * 2**20
    if points.device.type == "cpu":
        budget = min(budget, _CPU_BLOCK_BYTES)
    rows = max(1, min(n, budget // (4 * max(k, 1))))
    codebook_sq = (codebook * codebook).sum(1).unsqueeze(0)
    codebook_t = codebook.T.contiguous()
    scores_buffer = torch.empty(rows, k, dtype=points.dtype, device=points.device)
    distances = torch.empty(n, dtype=points.dtype, device=points.device)
    indices = torch.empty(n, dtype=torch.int64, device=points.device)
    for start in range(0, n, rows):
        block = points[start : start + rows]
        scores = scores_buffer[: block.shape[0]]
        torch.addmm(codebook_sq, block, codebook_t, alpha=-2.0, out=scores)
        best, best_index = scores.min(1)
        distances[start : start + rows] = (best + (block * block).sum(1)).clamp_min_(0)
        indices[start : start + rows] = best_index
    return distances, indices


def kmeans(subvectors: torch.Tensor, k: int, **options) -> KMeansResult:
    """k-means of one layer; see :func:`kmeans_many` for the options."""
    return kmeans_many([subvectors], [k], **options)[0]


def kmeans_many(
    subvectors: Sequence[torch.Tensor],
    ks: Sequence[int],
    *,
    iterations: int = 20,
    seed: int = 0,
    reducer: Reducer | None = None,
    kernel: Kernel = "auto",
    init_sample: int = 32,
    chunk_mb: int = 64,
    init_codebooks: Sequence[torch.Tensor | None] | None = None,
    incremental: bool = True,
) -> list[KMeansResult]:
    """k-means of many layers in lockstep: ``[N_l x d_l], [K_l] -> [KMeansResult]``.

    Every rank passes the full subvectors of every layer; rank r works on rows
    ``[r*N/W, (r+1)*N/W)`` of each. ``init_codebooks`` replaces the k-means++ init of a
    layer where given (used by tests to force empty clusters). ``incremental=False``
    sums every shard from scratch each iteration instead of moving only the subvectors
    that changed codeword (the reference the incremental sums are tested against).
    """
    reducer = reducer or LocalReducer()
    if len(subvectors) != len(ks):
        raise ValueError("one k per layer")
    layers = [
        _Layer(points.detach().float().contiguous(), k, reducer, incremental)
        for points, k in zip(subvectors, ks)
    ]
    for index, layer in enumerate(layers):
        given = init_codebooks[index] if init_codebooks is not None else None
        if given is not None:
            layer.codebook = given.detach().float().clone().to(layer.points.device)
        else:
            generator = torch.Generator().manual_seed(_layer_seed(seed, index))
            started = time.perf_counter()
            layer.codebook = _kmeans_plus_plus(layer.points, layer.k, init_sample, generator)
            layer.init_s = time.perf_counter() - started
    _broadcast_codebooks(layers, reducer)

    converged = False
    for iteration in range(1, iterations + 1):
        bucket = []
        for layer in layers:
            changed = layer.assign(kernel, chunk_mb)
            bucket.append(layer.statistics(torch.tensor([float(changed)], dtype=torch.float64)))
        totals = _reduce(bucket, reducer)
        any_changed = False
        empty_layers = []
        for layer, total in zip(layers, totals):
            sums, counts, changed = layer.unpack(total)
            any_changed |= changed.item() > 0
            layer.iterations = iteration
            empty = layer.update(sums, counts)
            if empty.numel():
                empty_layers.append((layer, empty))
        if empty_layers:
            _reseed(empty_layers, reducer)
        elif not any_changed:
            converged = True
            break

    return _finish(layers, reducer, kernel, chunk_mb, reassign=not converged)


class _Layer:
    """Per-layer state of :func:`kmeans_many` on one rank.

    For a shard of n subvectors: ``assignments`` and ``distances`` (squared, to the
    codeword at assignment time) are n; ``sums`` (K x d) and ``counts`` (K) are fp64 and
    cover this shard only, always for the current ``assignments``.
    """

    def __init__(self, points: torch.Tensor, k: int, reducer: Reducer, incremental: bool) -> None:
        n = points.shape[0]
        if k < 1 or n < 1:
            raise ValueError(f"k-means needs k >= 1 and at least one point (got k={k}, n={n})")
        self.points = points
        self.k = k
        self.d = points.shape[1]
        self.start = n * reducer.rank // reducer.world_size
        self.stop = n * (reducer.rank + 1) // reducer.world_size
        self.shard = points[self.start : self.stop]
        self.incremental = incremental
        self.codebook = torch.empty(0)
        self.assignments: torch.Tensor | None = None
        self.distances = torch.empty(0)
        self.sums = torch.empty(0)
        self.counts = torch.empty(0)
        self.iterations = 0
        self.reseeded = 0
        self.init_s = 0.0

    def assign(self, kernel: Kernel, chunk_mb: int) -> int:
        """Assign the shard to the nearest codewords and bring ``sums`` and ``counts`` up
        to date; returns how many assignments changed."""
        self.distances, assignments = nearest(self.shard, self.codebook, kernel, chunk_mb)
        previous, self.assignments = self.assignments, assignments
        if previous is None or not self.incremental:
            self.sums = _member_sums(self.shard, assignments, self.k)
            self.counts = torch.bincount(assignments, minlength=self.k).double()
            return assignments.numel() if previous is None else int((assignments != previous).sum())
        rows = (assignments != previous).nonzero().squeeze(1)
        moved = self.shard.index_select(0, rows).double()
        old, new = previous.index_select(0, rows), assignments.index_select(0, rows)
        self.sums.index_put_((new,), moved, accumulate=True)
        self.sums.index_put_((old,), moved.neg_(), accumulate=True)
        self.counts += torch.bincount(new, minlength=self.k) - torch.bincount(old, minlength=self.k)
        return rows.numel()

    def statistics(self, extra: torch.Tensor) -> torch.Tensor:
        """This shard's per-codeword sums and counts, then ``extra``: one fp64 vector."""
        return torch.cat([self.sums.reshape(-1), self.counts, extra.to(self.sums.device)])

    def unpack(self, total: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        size = self.k * self.d
        return total[:size].view(self.k, self.d), total[size : size + self.k], total[size + self.k :]

    def update(self, sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Codewords become the means of their members; returns the empty clusters."""
        filled = counts > 0
        means = (sums / counts.clamp_min(1).unsqueeze(1)).float()
        self.codebook = torch.where(filled.unsqueeze(1), means, self.codebook)
        return torch.nonzero(~filled).flatten()


# Rows converted to fp64 at a time by _member_sums: bounds the temporary copy.
_SUM_BLOCK_ROWS = 2**20


def _member_sums(points: torch.Tensor, assignments: torch.Tensor, k: int) -> torch.Tensor:
    """fp64 sum of the points assigned to each codeword: ``N x d, N -> K x d``."""
    sums = torch.zeros(k, points.shape[1], dtype=torch.float64, device=points.device)
    for start in range(0, points.shape[0], _SUM_BLOCK_ROWS):
        rows = slice(start, start + _SUM_BLOCK_ROWS)
        # index_put_ rather than index_add_: several times faster on CPU for row updates,
        # and deterministic on CUDA.
        sums.index_put_((assignments[rows],), points[rows].double(), accumulate=True)
    return sums


def _layer_seed(seed: int, index: int) -> int:
    return (seed * 1_000_003 + index * 7_919) % (2**63)


def _kmeans_plus_plus(
    points: torch.Tensor, k: int, init_sample: int, generator: torch.Generator
) -> torch.Tensor:
    """Greedy k-means++ seeding on a seeded sample of at most ``init_sample * k`` points.

    Distances are fp64 so that the sampling does not depend on the thread count: fp32
    rounding differences shift the sampling boundaries, and one different pick changes
    the whole clustering.
    """
    n = points.shape[0]
    sample_size = min(n, max(init_sample * k, k))
    if sample_size < n:
        rows = torch.randperm(n, generator=generator)[:sample_size].sort().values
        sample = points[rows.to(points.device)].cpu().double()
    else:
        sample = points.cpu().double()
    squares = (sample * sample).sum(1)
    trials = 2 + int(math.log(k))
    codebook = torch.empty(k, sample.shape[1], dtype=torch.float64)
    first = int(torch.randint(sample_size, (1,), generator=generator))
    codebook[0] = sample[first]
    closest = ((sample - sample[first]) ** 2).sum(1)
    for index in range(1, k):
        total = closest.sum()
        if total <= 0:  # fewer distinct points than codewords: duplicates are unavoidable
            candidates = torch.randint(sample_size, (trials,), generator=generator)
        else:
            candidates = torch.multinomial(closest, trials, replacement=True, generator=generator)
        candidate_distances = torch.addmm(
            squares[candidates].unsqueeze(1) + squares.unsqueeze(0),
            sample[candidates], sample.T, alpha=-2.0,
        ).clamp_min_(0)
        potentials = torch.minimum(closest.unsqueeze(0), candidate_distances)
        best = int(potentials.sum(1).argmin())
        codebook[index] = sample[candidates[best]]
        closest = potentials[best]
    return codebook.float().to(points.device)


def _broadcast_codebooks(layers: list[_Layer], reducer: Reducer) -> None:
    if reducer.world_size == 1:
        return
    flat = torch.cat([layer.codebook.reshape(-1) for layer in layers])
    reducer.broadcast(flat, src=0)
    offset = 0
    for layer in layers:
        size = layer.k * layer.d
        layer.codebook = flat[offset : offset + size].view(layer.k, layer.d).clone()
        offset += size


def _reduce(parts: list[torch.Tensor], reducer: Reducer) -> list[torch.Tensor]:
    """One all-reduce for all layers' vectors; returns the summed vectors."""
    flat = torch.cat(parts)
    reducer.all_reduce_sum(flat)
    return list(flat.split([part.numel() for part in parts]))


def _reseed(empty_layers: list[tuple[_Layer, torch.Tensor]], reducer: Reducer) -> None:
    """Move each empty codeword to one of the points farthest from their codewords.

    Each rank offers its shard's top-E points; the offers of all ranks are gathered by a
    sum over a zero-filled ``W x E x (d+2)`` buffer (one call for all layers), and every
    rank takes the same global top-E.
    """
    offers = []
    for layer, empty in empty_layers:
        count = empty.numel()
        offer = torch.zeros(reducer.world_size, count, layer.d + 2, dtype=torch.float64,
                            device=layer.shard.device)
        take = min(count, layer.shard.shape[0])
        if take:
            far_distances, far_rows = layer.distances.topk(take)
            offer[reducer.rank, :take, 0] = far_distances.double()
            offer[reducer.rank, :take, 1] = 1.0  # marks a real offer
            offer[reducer.rank, :take, 2:] = layer.shard[far_rows].double()
        offers.append(offer.reshape(-1))
    gathered = _reduce(offers, reducer)
    for (layer, empty), offer in zip(empty_layers, gathered):
        offer = offer.view(-1, layer.d + 2)
        real = offer[:, 1] > 0
        distances = torch.where(real, offer[:, 0], torch.full_like(offer[:, 0], -1.0))
        order = torch.sort(distances, descending=True, stable=True).indices[: empty.numel()]
        usable = order[distances[order] > 0]  # a point already on its codeword gains nothing
        targets = empty[: usable.numel()]
        layer.codebook[targets] = offer[usable, 2:].float()
        layer.reseeded += int(targets.numel())


def _finish(
    layers: list[_Layer], reducer: Reducer, kernel: Kernel, chunk_mb: int, reassign: bool
) -> list[KMeansResult]:
    """Final assignment, codewords = member means, inertia, and the full assignments.

    At a fixed point (``reassign=False``) the codewords already are the means of the
    assignments, and assigning again would change nothing, so that step is skipped.
    """
    if reassign:
        bucket = []
        for layer in layers:
            layer.assign(kernel, chunk_mb)
            bucket.append(layer.statistics(torch.zeros(0, dtype=torch.float64)))
        for layer, total in zip(layers, _reduce(bucket, reducer)):
            sums, counts, _ = layer.unpack(total)
            layer.update(sums, counts)
    # Full assignments (exact in fp64) and per-layer SSE, gathered in one sum.
    gathered = []
    for layer in layers:
        errors = ((layer.shard - layer.codebook[layer.assignments]) ** 2).sum(1)
        full = torch.zeros(layer.points.shape[0] + 1, dtype=torch.float64, device=layer.points.device)
        full[layer.start : layer.stop] = layer.assignments.double()
        full[-1] = errors.double().sum()
        gathered.append(full)
    if reducer.world_size > 1:
        gathered = _reduce(gathered, reducer)
    return [
        KMeansResult(
            codebook=layer.codebook,
            assignments=full[:-1].long(),
            inertia=float(full[-1]),
            iterations=layer.iterations,
            reseeded=layer.reseeded,
            init_s=layer.init_s,
        )
        for layer, full in zip(layers, gathered)
    ]
