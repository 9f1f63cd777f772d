"""Time our k-means against ``faiss.Kmeans`` on the same data, threads and iterations.

    .venv/bin/python benchmarks/kmeans_vs_faiss.py --n 262144 --d 9 --k 256 --iterations 20

Both run on the same seeded ``torch.randn`` subvectors with the same thread count; faiss's
subsampling is off (``max_points_per_centroid`` huge) so both cluster all points. Each
method runs ``--repeats`` times, interleaved so that they share the machine's conditions,
and the fastest run of each is reported. Inertia is computed the same way for both: the
fp64 sum of squared distances of every point to its nearest final codeword.

Both produce what PQ needs, a codebook and every point's assignment: ours returns the
assignments from its final assignment pass, faiss needs one more search after training
(timed with it). Per iteration is ``(total - init) / iterations`` for ours (k-means++
seeding is reported apart) and ``total / iterations`` for faiss (its random-sample init
is negligible), so both charge the same iterations + 1 assignment passes.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from dataclasses import dataclass

# torch before faiss, as gppq_dist.pq.kmeans does: faiss's OpenMP calls then bind to torch's
# OpenMP runtime. Imported the other way round, each library keeps its own thread pool,
# and their idle spinning threads slow down code that alternates between the two (ours).
import torch  # isort: skip
import faiss  # isort: skip
import numpy as np

from gppq_dist.pq.kmeans import kmeans, nearest


@dataclass
class Run:
    total_s: float
    init_s: float
    iterations: int
    inertia: float

    @property
    def per_iteration_s(self) -> float:
        return (self.total_s - self.init_s) / max(1, self.iterations)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def inertia(points: torch.Tensor, codebook: torch.Tensor) -> float:
    """fp64 sum of squared distances of ``points`` (N x d) to their nearest codeword (K x d)."""
    _, indices = nearest(points, codebook, kernel="torch")
    return float(((points.double() - codebook.double()[indices]) ** 2).sum())


def run_faiss(points: torch.Tensor, args: argparse.Namespace) -> Run:
    """``faiss.Kmeans`` training, then the one search that gives the assignments PQ needs."""
    clustering = faiss.Kmeans(
        args.d, args.k, niter=args.iterations, seed=args.seed,
        max_points_per_centroid=10**9, verbose=False,
    )
    start = time.perf_counter()
    clustering.train(points.numpy())
    faiss.knn(points.numpy(), clustering.centroids, 1)
    total = time.perf_counter() - start
    codebook = torch.from_numpy(clustering.centroids.copy())
    return Run(total, 0.0, args.iterations, inertia(points, codebook))


def run_ours(points: torch.Tensor, args: argparse.Namespace, incremental: bool) -> Run:
    start = time.perf_counter()
    result = kmeans(points, args.k, iterations=args.iterations, seed=args.seed,
                    incremental=incremental)
    total = time.perf_counter() - start
    return Run(total, result.init_s, result.iterations, inertia(points, result.codebook))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=262144)
    parser.add_argument("--d", type=int, default=9)
    parser.add_argument("--k", type=int, default=256)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-full-sums", action="store_true",
                        help="leave out our run with incremental=False")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    points = torch.randn(args.n, args.d, generator=torch.Generator().manual_seed(args.seed))

    methods = {
        "faiss.Kmeans": lambda: run_faiss(points, args),
        "ours (incremental sums)": lambda: run_ours(points, args, incremental=True),
    }
    if not args.skip_full_sums:
        methods["ours (full sums)"] = lambda: run_ours(points, args, incremental=False)
    runs: dict[str, list[Run]] = {name: [] for name in methods}
    for _ in range(args.repeats):
        for name, method in methods.items():
            runs[name].append(method())

    print(
        f"threads={args.threads} (torch {torch.get_num_threads()}, faiss omp "
        f"{faiss.omp_get_max_threads()}), cpus={os.cpu_count()} ({cpu_model()}), "
        f"torch {torch.__version__}, faiss {faiss.__version__}, numpy {np.__version__}, "
        f"python {platform.python_version()}, {platform.machine()}"
    )
    print(
        f"n={args.n} d={args.d} k={args.k} iterations={args.iterations} seed={args.seed}: "
        f"fastest of {args.repeats} runs (median per iteration in brackets)"
    )
    print()
    reference = min(runs["faiss.Kmeans"], key=lambda run: run.total_s)
    print("| method | total s | s / iteration | init s | iterations | final inertia "
          "| per iteration vs faiss | inertia vs faiss |")
    print("|---|---|---|---|---|---|---|---|")
    for name, method_runs in runs.items():
        best = min(method_runs, key=lambda run: run.total_s)
        median = statistics.median(run.per_iteration_s for run in method_runs)
        init = f"{best.init_s:.4f}" if name != "faiss.Kmeans" else "-"
        print(
            f"| {name} | {best.total_s:.4f} | {best.per_iteration_s:.5f} ({median:.5f}) "
            f"| {init} | {best.iterations} | {best.inertia:.2f} "
            f"| {best.per_iteration_s / reference.per_iteration_s:.3f}x "
            f"| {best.inertia / reference.inertia:.5f} |"
        )
    print()
    print("s / iteration: (total - init) / iterations; both totals include the final "
          "assignment pass (iterations + 1 passes in all).")


if __name__ == "__main__":
    main()
