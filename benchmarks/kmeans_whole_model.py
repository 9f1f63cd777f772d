"""Whole-model initial k-means (ResNet-50 small blocks, random weights): 1 rank vs 2 ranks.

Prints a Markdown table: ranks, threads per rank, k-means wall time, peak resident memory
per rank and summed over ranks, and the model's quantization loss Gamma. Both rows are
measured in one run, one after the other, on the same machine.

    .venv/bin/python benchmarks/kmeans_whole_model.py [--config configs/resnet50_small_blocks.yaml]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(config: str, iterations: int) -> None:
    import torch
    import torch.distributed as dist

    from gppq_dist.compress import cluster
    from gppq_dist.config import load_config
    from gppq_dist.distributed import init_distributed, shutdown
    from gppq_dist.models import load_model

    cfg = load_config(config, {"kmeans.iterations": iterations, "model.weights": "random"})
    context = init_distributed(device="cpu")
    model = load_model(cfg)  # seeded random weights, identical on every rank
    if context.distributed:
        dist.barrier()
    start = time.perf_counter()
    compressed = cluster(model, cfg, context)
    elapsed = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    stats = torch.tensor([elapsed, peak_mb, peak_mb], dtype=torch.float64)
    if context.distributed:
        maxima = stats.clone()
        dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
        sums = stats.clone()
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        stats = torch.tensor([maxima[0], maxima[1], sums[2]])
    if context.is_main:
        print("RESULT " + json.dumps({
            "ranks": context.world_size,
            "threads": torch.get_num_threads(),
            "layers": len(compressed.plans),
            "subvectors": sum(p.n_subvectors for p in compressed.plans),
            "kmeans_s": float(stats[0]),
            "peak_rank_mb": float(stats[1]),
            "peak_total_mb": float(stats[2]),
            "gamma": compressed.gamma,
        }), flush=True)
    shutdown()


def run(command: list[str], env: dict[str, str]) -> dict:
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **env})
    if result.returncode != 0:
        sys.exit(f"benchmark worker failed:\n{result.stderr[-4000:]}")
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/resnet50_small_blocks.yaml")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.config, args.iterations)
        return
    me = [sys.executable, str(Path(__file__).resolve()), "--worker", "--config", args.config,
          "--iterations", str(args.iterations)]
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    if not Path(torchrun).exists():
        torchrun = shutil.which("torchrun")
    rows = [
        run(me, {"OMP_NUM_THREADS": str(args.cores)}),
        run([torchrun, "--standalone", "--nproc_per_node=2", *me[1:]],
            {"OMP_NUM_THREADS": str(max(1, args.cores // 2))}),
    ]
    import torch

    print(f"config {args.config}, {args.iterations} Lloyd iterations, {platform.machine()} "
          f"{args.cores} cores, torch {torch.__version__}")
    print(f"{rows[0]['layers']} layers, {rows[0]['subvectors']:,} subvectors; goal: k-means wall < 30 s\n")
    print("| ranks | threads/rank | k-means wall s | peak RSS/rank MB | peak RSS total MB | Gamma |")
    print("|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['ranks']} | {row['threads']} | {row['kmeans_s']:.2f} | {row['peak_rank_mb']:.0f} | "
              f"{row['peak_total_mb']:.0f} | {row['gamma']:.4e} |")


if __name__ == "__main__":
    main()
