"""Time of one G&P training step against one plain training step, same model and batch.

ResNet-18 (torchvision, 1000 classes, built by ``build_model``), one process on the CPU,
a fixed seeded batch of random images and labels, the ResNet-18 small-block regime of
``configs/resnet18_small_blocks.yaml`` (planned by ``plan_layers``; psi from a few
``kmeans_many`` iterations on the model's weights: setup, not timed). Copies of the model
start from the same weights, one per kind of step, each with its own optimizer (SGD:
momentum 0.9, weight decay 1e-8, the config's lr):

- plain: forward, cross-entropy, backward, ``optimizer.step()``, ``zero_grad``;
- G&P (the trainer's step): the model reparametrized by ``reparam.attach_gp`` (each
  quantized weight rebuilt as ``C[psi] + alpha * R0`` in the forward pass, its K x d
  codewords the trainable parameter), stepped through ``DDPEngine(distributed=False,
  LocalReducer())``: the loss verdict, then one ``torch.optim.SGD`` over every trainable
  parameter, with ``reparam.recursion_hook`` advancing the residual's scalar recursion;
- G&P closed form (former trainer's step): dense weights, then the codeword gradient sums
  (``GPUpdate.reduced_gradient_sums``, the loss riding along) stepped by ``GPSGD`` (eq. 6
  folded into SGD, writing ``W = C[psi] + alpha * R0``), plain SGD for the rest;
- G&P generic: ``GPUpdate.transform_gradients_`` (eq. 6 written into ``.grad``), then a
  plain ``torch.optim.SGD`` over all parameters: the path any torch optimizer can take.

After a warm-up, blocks of ``--steps`` steps of each kind alternate (``--repeats`` times,
the order reversed every repeat) so that the machine's noise hits all of them; every step
is timed on its own and the median per step is reported, with the ratio to plain (also as
the median over repeats of the ratio of adjacent blocks). The
1-min load average is printed: other processes on the cores (a 2-thread run on 2 cores
is hit hard) skew the result. Prints a Markdown table and writes it to
``benchmarks/results/step_time.md``.

``measure(config, device, batch, size, ...)`` is the measurement without the report, on any
device: ``benchmarks/gpu_check.py`` runs it on a GPU, where every step is timed between two
``torch.cuda.synchronize`` calls (timing only: the steps themselves are unchanged).

    .venv/bin/python benchmarks/step_time.py [--steps 5] [--repeats 10] [--threads N] [--batch 32] [--size 64]
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from gppq_dist.config import load_config
from gppq_dist.models import build_model
from gppq_dist.pq import reparam
from gppq_dist.pq.kmeans import LocalReducer, kmeans_many
from gppq_dist.pq.plan import plan_layers
from gppq_dist.train.engine import DDPEngine, sgd
from gppq_dist.train.gp_update import GPUpdate

ROOT = Path(__file__).resolve().parents[1]
GOAL = 1.05


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _timer(device: torch.device):
    """``time.perf_counter`` for the CPU; on a GPU the clock waits for the queued kernels
    first (``torch.cuda.synchronize``), so a step's time is its GPU work, not its launch."""
    if device.type != "cuda":
        return time.perf_counter

    def clock() -> float:
        torch.cuda.synchronize(device)
        return time.perf_counter()

    return clock


def measure(
    config: str | Path,
    device: torch.device | str = "cpu",
    batch: int = 32,
    size: int = 64,
    steps: int = 5,
    repeats: int = 10,
    warmup: int = 2,
    kmeans_iterations: int = 3,
    seed: int = 0,
) -> dict:
    """Time the four kinds of step (module docstring) on ``device``; returns ``times`` (per
    kind, every timed step in seconds), ``ms`` (median per kind), ``ratio`` (G&P, the
    trainer's step, / plain), ``pair_ratios`` and what the report says about the setup."""
    device = torch.device(device)
    cfg = load_config(config)
    hp = cfg.train
    torch.manual_seed(seed)
    plain_model = build_model(cfg.model.arch, cfg.model.num_classes).to(device)
    gp_model = copy.deepcopy(plain_model)
    closed_model = copy.deepcopy(plain_model)
    generic_model = copy.deepcopy(plain_model)
    plans = plan_layers(gp_model, cfg.quantization)
    clock = _timer(device)

    # Setup (not timed): psi from a few k-means iterations on the model's weights.
    setup_start = clock()
    modules = dict(gp_model.named_modules())
    results = kmeans_many(
        [modules[p.name].weight.detach().reshape(-1, p.d) for p in plans],
        [p.k for p in plans],
        iterations=kmeans_iterations,
        seed=cfg.kmeans.seed,
        init_sample=cfg.kmeans.init_sample,
        kernel=cfg.kmeans.kernel,
    )
    assignments = {p.name: r.assignments for p, r in zip(plans, results)}
    setup_s = clock() - setup_start
    # the trainer's order: reparametrize, build the engine (its SGD), hook the recursion on
    layers = reparam.attach_gp(gp_model, plans, assignments, hp.mu)
    engine = DDPEngine(gp_model, hp, distributed=False, reducer=LocalReducer())
    reparam.recursion_hook(engine.optimizer, layers)
    # the former trainer's step: GPSGD for the quantized weights, SGD for the rest
    closed_update = GPUpdate(closed_model, plans, assignments, mu=hp.mu)
    closed_optimizer = closed_update.sgd(lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
    quantized = {id(weight) for weight in closed_update.weights}
    closed_rest = sgd([p for p in closed_model.parameters() if id(p) not in quantized], hp)
    generic_update = GPUpdate(generic_model, plans, assignments, mu=hp.mu)
    generic_optimizer = sgd(generic_model.parameters(), hp)
    plain_optimizer = sgd(plain_model.parameters(), hp)
    for model in (plain_model, gp_model, closed_model, generic_model):
        model.train()

    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=generator).to(device)
    labels = torch.randint(cfg.model.num_classes, (batch,), generator=generator).to(device)
    criterion = nn.CrossEntropyLoss()

    def plain_step() -> None:
        loss = criterion(plain_model(images), labels)
        loss.backward()
        plain_optimizer.step()
        plain_optimizer.zero_grad(set_to_none=True)

    def gp_step() -> None:
        loss = criterion(engine.forward(images), labels)
        engine.backward(loss)
        if engine.step(loss) is None:
            raise RuntimeError("G&P step skipped: loss not finite")

    def closed_step() -> None:
        loss = criterion(closed_model(images), labels)
        loss.backward()
        value = loss.detach().float().reshape(1).clone()
        sums = closed_update.reduced_gradient_sums(extra=value)
        if not math.isfinite(float(value)):
            raise RuntimeError("G&P closed-form step skipped: loss not finite")
        closed_optimizer.step(sums)
        closed_rest.step()
        closed_optimizer.zero_grad(set_to_none=True)
        closed_rest.zero_grad(set_to_none=True)

    def generic_step() -> None:
        loss = criterion(generic_model(images), labels)
        loss.backward()
        generic_update.transform_gradients_(extra=loss.detach().reshape(1).clone())
        generic_optimizer.step()
        generic_optimizer.zero_grad(set_to_none=True)

    kinds = {"plain": plain_step, "G&P": gp_step, "G&P closed form": closed_step, "G&P generic": generic_step}
    times: dict[str, list[float]] = {name: [] for name in kinds}
    pair_ratios: dict[str, list[float]] = {name: [] for name in kinds if name != "plain"}
    load_before = os.getloadavg()[0]
    for _ in range(warmup):
        for step in kinds.values():
            step()
    for repeat in range(repeats):
        order = list(kinds) if repeat % 2 == 0 else list(reversed(kinds))
        for name in order:
            for _ in range(steps):
                start = clock()
                kinds[name]()
                times[name].append(clock() - start)
        for name, ratios in pair_ratios.items():
            ratios.append(statistics.median(times[name][-steps:]) / statistics.median(times["plain"][-steps:]))

    ms = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    return {
        "arch": cfg.model.arch,
        "num_classes": cfg.model.num_classes,
        "mu": hp.mu,
        "device": str(device),
        "batch": batch,
        "size": size,
        "steps": steps,
        "repeats": repeats,
        "warmup": warmup,
        "kmeans_iterations": kmeans_iterations,
        "layers": len(plans),
        "quantized": sum(torch.Size(p.shape).numel() for p in plans),
        "total": sum(p.numel() for p in plain_model.parameters()),
        "trained": sum(p.numel() for p in engine.optimizer.param_groups[0]["params"]),
        "subvectors": sum(p.n_subvectors for p in plans),
        "setup_s": setup_s,
        "times": times,
        "ms": ms,
        "ratio": ms["G&P"] / ms["plain"],
        "pair_ratios": pair_ratios,
        "load_before": load_before,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "resnet18_small_blocks.yaml"))
    parser.add_argument("--steps", type=int, default=5, help="timed steps per block")
    parser.add_argument("--repeats", type=int, default=10, help="blocks of each kind, alternating")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each kind first")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=64, help="input height = width")
    parser.add_argument("--kmeans-iterations", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "step_time.md"))
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    result = measure(args.config, "cpu", batch=args.batch, size=args.size, steps=args.steps,
                     repeats=args.repeats, warmup=args.warmup, kmeans_iterations=args.kmeans_iterations,
                     seed=args.seed)
    ms, times, pair_ratios, ratio = result["ms"], result["times"], result["pair_ratios"], result["ratio"]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

    lines = [
        f"{result['arch']} ({result['num_classes']} classes), batch {args.batch} x 3 x {args.size} x {args.size}, "
        f"CPU, 1 process, {torch.get_num_threads()} torch threads; regime {Path(args.config).stem}: "
        f"{result['layers']} quantized layers, {result['quantized']:,} of {result['total']:,} parameters, "
        f"{result['subvectors']:,} subvectors (the trainer's SGD steps {result['trained']:,} parameters); "
        f"psi from {args.kmeans_iterations} k-means iterations ({result['setup_s']:.1f} s, not timed); "
        f"mu={result['mu']}",
        f"median of {args.repeats} x {args.steps} steps of each kind, blocks interleaved, "
        f"{args.warmup} warm-up steps each; goal: G&P / plain <= {GOAL:.2f}x "
        f"({'met' if ratio <= GOAL else 'NOT met'})",
        "",
        "| step | ms/step | ratio |",
        "|---|---:|---:|",
        f"| plain (forward, cross-entropy, backward, SGD, zero_grad) | {ms['plain']:.1f} | 1.00x |",
        f"| G&P, the trainer's step (weights from K x d codewords, one torch SGD, recursion hook) | "
        f"{ms['G&P']:.1f} | {ratio:.3f}x |",
        f"| G&P closed form, the former trainer's step (codeword sums + GPSGD, SGD for the rest) | "
        f"{ms['G&P closed form']:.1f} | {ms['G&P closed form'] / ms['plain']:.3f}x |",
        f"| G&P generic (eq. 6 into .grad, then torch SGD) | {ms['G&P generic']:.1f} | "
        f"{ms['G&P generic'] / ms['plain']:.3f}x |",
        "",
        "ratio as the median over the adjacent block pairs: " + ", ".join(
            f"{name} {statistics.median(r):.3f}x (range {min(r):.3f}-{max(r):.3f})" for name, r in pair_ratios.items()
        ),
        "spread (min-max ms): " + ", ".join(
            f"{name} {min(t) * 1e3:.1f}-{max(t) * 1e3:.1f}" for name, t in times.items()
        ),
        f"torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()}, "
        f"{cores} cores available ({cpu_model()}); 1-min load average {result['load_before']:.2f} before, "
        f"{os.getloadavg()[0]:.2f} after (other processes on the cores skew every kind of step)",
    ]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
