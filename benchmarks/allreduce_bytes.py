"""Bytes all-reduced per step for the quantized layers: codeword sync vs full gradients.

For the paper's four regimes, from the layer plan: the full gradients of the quantized
weights (fp32, what plain DDP sends) against the K x d per-codeword gradient sums that
:class:`gppq_dist.train.gp_update.GPUpdate` sends. Then a 2-rank gloo run of one training
step of ResNet-18 (10 classes, 32x32) counts what the process group really sends: the
codeword sums through the reducer, and DDP's gradient buckets through a counting comm hook,
once with the quantized weights left to DDP and once excluded.

    .venv/bin/python benchmarks/allreduce_bytes.py
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from gppq_dist.config import load_config
from gppq_dist.distributed import ProcessGroupReducer
from gppq_dist.models import build_model
from gppq_dist.pq.plan import plan_layers
from gppq_dist.train.gp_update import GPUpdate

ROOT = Path(__file__).resolve().parents[1]

REGIMES = ["resnet18_small_blocks", "resnet18_large_blocks", "resnet50_small_blocks", "resnet50_large_blocks"]


def planned(regime: str) -> tuple[int, int]:
    """(full-gradient bytes, codeword-sum bytes) of the quantized layers, per step."""
    cfg = load_config(ROOT / "configs" / f"{regime}.yaml")
    model = build_model(cfg.model.arch, cfg.model.num_classes, device="meta")
    plans = plan_layers(model, cfg.quantization)
    full = sum(4 * torch.Size(p.shape).numel() for p in plans)
    return full, sum(4 * p.k * p.d for p in plans)


class CountingReducer(ProcessGroupReducer):
    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        self.bytes += tensor.numel() * tensor.element_size()
        super().all_reduce_sum(tensor)


def _counting_hook(counter: list[int]):
    def hook(state, bucket):
        counter[0] += bucket.buffer().numel() * bucket.buffer().element_size()
        tensor = bucket.buffer().div_(dist.get_world_size())
        return dist.all_reduce(tensor, async_op=True).get_future().then(lambda fut: fut.value()[0])

    return hook


def _measure(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    cfg = load_config(ROOT / "configs" / "demo_digits.yaml", {"model.weights": "random"})
    results = {}
    for mode in ("full", "codeword"):
        torch.manual_seed(0)
        model = build_model("resnet18", 10)
        plans = plan_layers(model, cfg.quantization)
        assignments = {p.name: torch.randint(p.k, (p.n_subvectors,)) for p in plans}
        reducer = CountingReducer()
        update = GPUpdate(model, plans, assignments, mu=1e-3, reducer=reducer if mode == "codeword" else None)
        if mode == "codeword":
            update.exclude_from_ddp(model)
        ddp_bytes = [0]
        wrapped = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=1000)
        wrapped.register_comm_hook(None, _counting_hook(ddp_bytes))
        images, labels = torch.randn(4, 3, 32, 32), torch.randint(10, (4,))
        nn.functional.cross_entropy(wrapped(images), labels).backward()
        update.transform_gradients_()
        results[mode] = (ddp_bytes[0], reducer.bytes)
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def measured() -> dict[str, tuple[int, int]]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        out = str(Path(folder) / "bytes.pt")
        mp.spawn(_measure, args=(2, port, out), nprocs=2)
        return torch.load(out, weights_only=True)


def main() -> None:
    print("Per step, per rank, quantized layers only (fp32 sums; MB = 2^20 bytes)\n")
    print("| regime | full gradients MB | codeword sums MB | ratio |")
    print("|---|---:|---:|---:|")
    for regime in REGIMES:
        full, codeword = planned(regime)
        print(f"| {regime} | {full / 2**20:.2f} | {codeword / 2**20:.3f} | {full / codeword:.0f}x |")
    counts = measured()
    full_ddp, _ = counts["full"]
    rest_ddp, codeword_sent = counts["codeword"]
    cfg = load_config(ROOT / "configs" / "demo_digits.yaml")
    model = build_model("resnet18", 10, device="meta")
    plans = plan_layers(model, cfg.quantization)
    planned_full = sum(4 * torch.Size(p.shape).numel() for p in plans)
    planned_codeword = sum(4 * p.k * p.d for p in plans)
    print("\nChecked on 2 gloo ranks, one step of ResNet-18 (10 classes, demo regime), bytes one rank hands "
          "to all_reduce:\n")
    print("| path | DDP buckets B | codeword sums B | quantized layers B | planned B |")
    print("|---|---:|---:|---:|---:|")
    print(f"| full gradients through DDP | {full_ddp:,} | 0 | {full_ddp - rest_ddp:,} | {planned_full:,} |")
    print(f"| codeword sync (GPUpdate) | {rest_ddp:,} | {codeword_sent:,} | {codeword_sent:,} | {planned_codeword:,} |")


if __name__ == "__main__":
    main()
