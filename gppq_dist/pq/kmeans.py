"""k-means on subvectors, for one layer or many in lockstep, on one process or many.

Distribution is a parameter, not a dependency: every process holds the same subvectors
(weights are replicated), assigns its own contiguous shard of them, and the per-codeword
sums and counts of all layers are summed across processes by a :class:`Reducer` in one
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
  mean of its members (eq. 5), so ``codebook[k]`` is exactly the centroid of cluster k.

All math is fp32 on the subvectors' device; the reductions are fp64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol, Sequence

import torch

try:  # faiss is the fastest CPU assignment kernel; the torch kernel covers the rest.
    import faiss
except ImportError:  # pragma: no cover - faiss-cpu is a dependency
    faiss = None

Kernel = Literal["auto", "faiss", "torch"]


class Reducer(Protocol):
    """Sums tensors across processes in place; broadcasts from one rank."""

    rank: int
    world_size: int

    def all_reduce_sum(self, tensor: torch.Tensor) -> None: ...

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None: ...


class LocalReducer:
    """The reducer of a single process: sums over one rank are the identity."""

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


def _nearest_torch(
    points: torch.Tensor, codebook: torch.Tensor, chunk_mb: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocked ``||x||^2 + ||c||^2 - 2 x.c``: one ``rows x K`` block at a time."""
    n, k = points.shape[0], codebook.shape[0]
    rows = max(1, (chunk_mb * 2**20) // (4 * max(k, 1)))
    codebook_sq = (codebook * codebook).sum(1)
    distances = torch.empty(n, dtype=points.dtype, device=points.device)
    indices = torch.empty(n, dtype=torch.int64, device=points.device)
    for start in range(0, n, rows):
        block = points[start : start + rows]
        scores = torch.addmm(codebook_sq.unsqueeze(0), block, codebook.T, alpha=-2.0)
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
) -> list[KMeansResult]:
    """k-means of many layers in lockstep: ``[N_l x d_l], [K_l] -> [KMeansResult]``.

    Every rank passes the full subvectors of every layer; rank r works on rows
    ``[r*N/W, (r+1)*N/W)`` of each. ``init_codebooks`` replaces the k-means++ init of a
    layer where given (used by tests to force empty clusters).
    """
    reducer = reducer or LocalReducer()
    if len(subvectors) != len(ks):
        raise ValueError("one k per layer")
    layers = [
        _Layer(points.detach().float().contiguous(), k, reducer) for points, k in zip(subvectors, ks)
    ]
    for index, layer in enumerate(layers):
        given = init_codebooks[index] if init_codebooks is not None else None
        if given is not None:
            layer.codebook = given.detach().float().clone().to(layer.points.device)
        else:
            generator = torch.Generator().manual_seed(_layer_seed(seed, index))
            layer.codebook = _kmeans_plus_plus(layer.points, layer.k, init_sample, generator)
    _broadcast_codebooks(layers, reducer)

    for iteration in range(1, iterations + 1):
        bucket = []
        for layer in layers:
            layer.distances, assignments = nearest(layer.shard, layer.codebook, kernel, chunk_mb)
            changed = (
                assignments.numel()
                if layer.assignments is None
                else int((assignments != layer.assignments).sum())
            )
            layer.assignments = assignments
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
            break

    return _finish(layers, reducer, kernel, chunk_mb)


class _Layer:
    """Per-layer state of :func:`kmeans_many` on one rank."""

    def __init__(self, points: torch.Tensor, k: int, reducer: Reducer) -> None:
        n = points.shape[0]
        if k < 1 or n < 1:
            raise ValueError(f"k-means needs k >= 1 and at least one point (got k={k}, n={n})")
        self.points = points
        self.k = k
        self.d = points.shape[1]
        self.start = n * reducer.rank // reducer.world_size
        self.stop = n * (reducer.rank + 1) // reducer.world_size
        self.shard = points[self.start : self.stop]
        self.codebook = torch.empty(0)
        self.assignments: torch.Tensor | None = None
        self.distances = torch.empty(0)
        self.iterations = 0
        self.reseeded = 0

    def statistics(self, extra: torch.Tensor) -> torch.Tensor:
        """This shard's per-codeword sums and counts, then ``extra``: one fp64 vector."""
        sums = torch.zeros(self.k, self.d, dtype=torch.float32, device=self.shard.device)
        sums.index_add_(0, self.assignments, self.shard)
        counts = torch.bincount(self.assignments, minlength=self.k)
        return torch.cat([sums.reshape(-1).double(), counts.double(), extra.to(sums.device)])

    def unpack(self, total: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        size = self.k * self.d
        return total[:size].view(self.k, self.d), total[size : size + self.k], total[size + self.k :]

    def update(self, sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Codewords become the means of their members; returns the empty clusters."""
        filled = counts > 0
        means = (sums / counts.clamp_min(1).unsqueeze(1)).float()
        self.codebook = torch.where(filled.unsqueeze(1), means, self.codebook)
        return torch.nonzero(~filled).flatten()


def _layer_seed(seed: int, index: int) -> int:
    return (seed * 1_000_003 + index * 7_919) % (2**63)


def _kmeans_plus_plus(
    points: torch.Tensor, k: int, init_sample: int, generator: torch.Generator
) -> torch.Tensor:
    """Greedy k-means++ seeding on a seeded sample of at most ``init_sample * k`` points."""
    n = points.shape[0]
    sample_size = min(n, max(init_sample * k, k))
    if sample_size < n:
        rows = torch.randperm(n, generator=generator)[:sample_size].sort().values
        sample = points[rows.to(points.device)].cpu()
    else:
        sample = points.cpu()
    trials = 2 + int(math.log(k))
    codebook = torch.empty(k, sample.shape[1])
    first = int(torch.randint(sample_size, (1,), generator=generator))
    codebook[0] = sample[first]
    closest = ((sample - sample[first]) ** 2).sum(1)
    for index in range(1, k):
        total = closest.sum()
        if total <= 0:  # fewer distinct points than codewords: duplicates are unavoidable
            candidates = torch.randint(sample_size, (trials,), generator=generator)
        else:
            candidates = torch.multinomial(closest, trials, replacement=True, generator=generator)
        candidate_distances = torch.cdist(sample[candidates], sample).pow_(2)
        potentials = torch.minimum(closest.unsqueeze(0), candidate_distances)
        best = int(potentials.sum(1).argmin())
        codebook[index] = sample[candidates[best]]
        closest = potentials[best]
    return codebook.to(points.device)


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
    layers: list[_Layer], reducer: Reducer, kernel: Kernel, chunk_mb: int
) -> list[KMeansResult]:
    """Final assignment, codewords = member means, inertia, and the full assignments."""
    bucket = []
    for layer in layers:
        _, layer.assignments = nearest(layer.shard, layer.codebook, kernel, chunk_mb)
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
        )
        for layer, full in zip(layers, gathered)
    ]
