"""Bytes all-reduced per step for the quantized layers: codeword sync vs full gradients.

For the paper's four regimes, from the layer plan: the full gradients of the quantized
weights (fp32, what plain DDP sends) against the K x d per-codeword gradients that G&P
sends. Then a 2-rank gloo run of one training step of ResNet-18 (10 classes, 32x32, the demo
regime) counts what the process group really sends, three ways:

- full gradients: the dense model under DDP, every gradient in DDP's buckets;
- codeword sync, the trainer's step: the model reparametrized by ``reparam.attach_gp`` (each
  quantized layer's trainable parameter is its K x d codewords) and stepped through
  ``DDPEngine(distributed=True)``: DDP's buckets hold the codewords' gradients (the cluster
  means) beside the unquantized parameters', and the engine's reducer sends the loss verdict;
- codeword sync, former path: the quantized weights excluded from DDP and their K x d
  codeword gradient sums sent through :class:`gppq_dist.train.gp_update.GPUpdate`'s reducer.

DDP's buckets are counted with a counting comm hook, the reducers' all-reduces by a
counting :class:`~gppq_dist.distributed.ProcessGroupReducer`. The check: the trainer's DDP
buckets = unquantized parameters' bytes + the sum over quantized layers of ``K * d * 4``,
the same K x d traffic as the former codeword sync. (DDP also broadcasts the model's buffers
before each forward pass, not counted here: BatchNorm's statistics and each quantized
layer's ``alpha`` and ``beta``; psi and R0 are no buffers and are never sent.)

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
from gppq_dist.pq import reparam
from gppq_dist.pq.plan import plan_layers
from gppq_dist.train.engine import DDPEngine
from gppq_dist.train.gp_update import GPUpdate

ROOT = Path(__file__).resolve().parents[1]

REGIMES = ["resnet18_small_blocks", "resnet18_large_blocks", "resnet50_small_blocks", "resnet50_large_blocks"]


def planned(regime: str) -> tuple[int, int]:
    """(full-gradient bytes, codeword-gradient bytes) of the quantized layers, per step."""
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


def _step_bytes(mode: str, cfg) -> tuple[int, int]:
    """(bytes in DDP's buckets, bytes through the reducer) of one training step on this rank."""
    torch.manual_seed(0)
    model = build_model("resnet18", 10)
    plans = plan_layers(model, cfg.quantization)
    assignments = {p.name: torch.randint(p.k, (p.n_subvectors,)) for p in plans}
    reducer = CountingReducer()
    ddp_bytes = [0]
    images, labels = torch.randn(4, 3, 32, 32), torch.randint(10, (4,))
    if mode == "trainer":
        layers = reparam.attach_gp(model, plans, assignments, mu=1e-3)
        engine = DDPEngine(model, cfg.train, distributed=True, reducer=reducer)
        reparam.recursion_hook(engine.optimizer, layers)
        engine.wrapped.register_comm_hook(None, _counting_hook(ddp_bytes))
        loss = nn.functional.cross_entropy(engine.forward(images), labels)
        engine.backward(loss)
        if engine.step(loss) is None:
            raise RuntimeError("step skipped: loss not finite")
        return ddp_bytes[0], reducer.bytes
    update = GPUpdate(model, plans, assignments, mu=1e-3, reducer=reducer if mode == "former" else None)
    if mode == "former":
        update.exclude_from_ddp(model)
    wrapped = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=1000)
    wrapped.register_comm_hook(None, _counting_hook(ddp_bytes))
    nn.functional.cross_entropy(wrapped(images), labels).backward()
    if mode == "former":
        update.transform_gradients_()
    return ddp_bytes[0], reducer.bytes


def _measure(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    cfg = load_config(ROOT / "configs" / "demo_digits.yaml", {"model.weights": "random"})
    results = {mode: _step_bytes(mode, cfg) for mode in ("full", "trainer", "former")}
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
    print("Per step, per rank, quantized layers only (fp32; MB = 2^20 bytes)\n")
    print("| regime | full gradients MB | codeword gradients MB | ratio |")
    print("|---|---:|---:|---:|")
    for regime in REGIMES:
        full, codeword = planned(regime)
        print(f"| {regime} | {full / 2**20:.2f} | {codeword / 2**20:.3f} | {full / codeword:.0f}x |")
    counts = measured()
    full_ddp, _ = counts["full"]
    trainer_ddp, verdict_sent = counts["trainer"]
    former_ddp, former_sent = counts["former"]
    cfg = load_config(ROOT / "configs" / "demo_digits.yaml")
    model = build_model("resnet18", 10, device="meta")
    plans = plan_layers(model, cfg.quantization)
    planned_full = sum(4 * torch.Size(p.shape).numel() for p in plans)
    planned_codeword = sum(4 * p.k * p.d for p in plans)
    planned_rest = sum(4 * p.numel() for p in model.parameters()) - planned_full
    print("\nChecked on 2 gloo ranks, one step of ResNet-18 (10 classes, demo regime), bytes one rank hands "
          "to all_reduce; quantized layers B = what the path sends beyond the unquantized parameters' "
          f"{planned_rest:,} B:\n")
    print("| path | DDP buckets B | reducer B | quantized layers B | planned B |")
    print("|---|---:|---:|---:|---:|")
    print(f"| full gradients through DDP | {full_ddp:,} | 0 | {full_ddp - planned_rest:,} | {planned_full:,} |")
    print(f"| codeword sync, the trainer's step (attach_gp, DDP over the codewords; reducer: loss verdict) | "
          f"{trainer_ddp:,} | {verdict_sent:,} | {trainer_ddp - planned_rest:,} | {planned_codeword:,} |")
    print(f"| codeword sync, former path (quantized weights out of DDP, GPUpdate's reducer) | {former_ddp:,} | "
          f"{former_sent:,} | {former_sent:,} | {planned_codeword:,} |")
    as_planned = trainer_ddp == planned_rest + planned_codeword
    same = former_ddp == planned_rest and trainer_ddp - former_ddp == former_sent
    print(f"\ntrainer's DDP buckets = unquantized parameters {planned_rest:,} B + codewords {planned_codeword:,} B "
          f"(sum of K * d * 4 over {len(plans)} layers) = {planned_rest + planned_codeword:,} B: "
          f"{'yes' if as_planned else 'NO'}; same K x d traffic as the former "
          f"codeword sync: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
