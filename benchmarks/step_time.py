"""Time of one G&P training step against one plain training step, same model and batch.

ResNet-18 (torchvision, 1000 classes, built by ``build_model``), one process on the CPU,
a fixed seeded batch of random images and labels, the ResNet-18 small-block regime of
``configs/resnet18_small_blocks.yaml`` (planned by ``plan_layers``; psi from a few
``kmeans_many`` iterations on the model's weights: setup, not timed). Two copies of the
model start from the same weights, one per kind of step, each with its own optimizer
(``sgd``: momentum 0.9, weight decay 1e-8, the config's lr):

- plain: forward, cross-entropy, backward, ``optimizer.step()``, ``zero_grad``;
- G&P: the same through ``DDPEngine(distributed=False)``, whose ``step`` runs
  ``GPUpdate.transform_gradients_(extra=loss)`` between backward and the optimizer step.

After a warm-up of both, blocks of ``--steps`` steps of each kind alternate
(``--repeats`` times, the order flipped every repeat) so that the machine's noise hits
both; every step is timed on its own and the median per step is reported, with the
ratio G&P / plain (also as the median over repeats of the ratio of two adjacent blocks),
and the transform alone (timed inside the G&P step) with its share of the G&P step. The
1-min load average is printed: other processes on the cores (a 2-thread run on 2 cores
is hit hard) skew the result. Prints a Markdown table and writes it to
``benchmarks/results/step_time.md``.

    .venv/bin/python benchmarks/step_time.py [--steps 5] [--repeats 10] [--threads N] [--batch 32] [--size 64]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from gppq_dist.config import load_config
from gppq_dist.models import build_model
from gppq_dist.pq.kmeans import kmeans_many
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


class TimedUpdate:
    """Wraps a :class:`GPUpdate` so that each ``transform_gradients_`` call is timed."""

    def __init__(self, update: GPUpdate) -> None:
        self.update = update
        self.seconds: list[float] = []

    def transform_gradients_(self, extra: torch.Tensor | None = None) -> None:
        start = time.perf_counter()
        self.update.transform_gradients_(extra=extra)
        self.seconds.append(time.perf_counter() - start)

    def __getattr__(self, name: str):
        return getattr(self.update, name)


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

    cfg = load_config(args.config)
    hp = cfg.train
    torch.manual_seed(args.seed)
    plain_model = build_model(cfg.model.arch, cfg.model.num_classes)
    gp_model = copy.deepcopy(plain_model)
    plans = plan_layers(gp_model, cfg.quantization)

    # Setup (not timed): psi from a few k-means iterations on the model's weights.
    setup_start = time.perf_counter()
    modules = dict(gp_model.named_modules())
    results = kmeans_many(
        [modules[p.name].weight.detach().reshape(-1, p.d) for p in plans],
        [p.k for p in plans],
        iterations=args.kmeans_iterations,
        seed=cfg.kmeans.seed,
        init_sample=cfg.kmeans.init_sample,
        kernel=cfg.kmeans.kernel,
    )
    assignments = {p.name: r.assignments for p, r in zip(plans, results)}
    setup_s = time.perf_counter() - setup_start
    timed_update = TimedUpdate(GPUpdate(gp_model, plans, assignments, mu=hp.mu))
    engine = DDPEngine(gp_model, timed_update, hp, distributed=False)  # type: ignore[arg-type]
    plain_optimizer = sgd(plain_model.parameters(), hp)
    plain_model.train()
    gp_model.train()

    generator = torch.Generator().manual_seed(args.seed)
    images = torch.randn(args.batch, 3, args.size, args.size, generator=generator)
    labels = torch.randint(cfg.model.num_classes, (args.batch,), generator=generator)
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

    steps = {"plain": plain_step, "G&P": gp_step}
    times: dict[str, list[float]] = {name: [] for name in steps}
    pair_ratios: list[float] = []  # per repeat: median G&P step / median plain step of its two blocks
    load_before = os.getloadavg()[0]
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    timed_update.seconds.clear()
    for repeat in range(args.repeats):
        order = list(steps) if repeat % 2 == 0 else list(reversed(steps))
        for name in order:
            for _ in range(args.steps):
                start = time.perf_counter()
                steps[name]()
                times[name].append(time.perf_counter() - start)
        pair_ratios.append(
            statistics.median(times["G&P"][-args.steps:]) / statistics.median(times["plain"][-args.steps:])
        )

    plain_ms = statistics.median(times["plain"]) * 1e3
    gp_ms = statistics.median(times["G&P"]) * 1e3
    transform_ms = statistics.median(timed_update.seconds) * 1e3
    ratio = gp_ms / plain_ms
    quantized = sum(torch.Size(p.shape).numel() for p in plans)
    total = sum(p.numel() for p in gp_model.parameters())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

    lines = [
        f"{cfg.model.arch} ({cfg.model.num_classes} classes), batch {args.batch} x 3 x {args.size} x {args.size}, "
        f"CPU, 1 process, {torch.get_num_threads()} torch threads; regime {Path(args.config).stem}: "
        f"{len(plans)} quantized layers, {quantized:,} of {total:,} parameters, "
        f"{sum(p.n_subvectors for p in plans):,} subvectors; psi from {args.kmeans_iterations} k-means "
        f"iterations ({setup_s:.1f} s, not timed); mu={hp.mu}",
        f"median of {args.repeats} x {args.steps} steps of each kind, blocks interleaved, "
        f"{args.warmup} warm-up steps each; goal: G&P / plain <= {GOAL:.2f}x "
        f"({'met' if ratio <= GOAL else 'NOT met'})",
        "",
        "| step | ms/step | ratio |",
        "|---|---:|---:|",
        f"| plain (fwd, CE, bwd, SGD, zero_grad) | {plain_ms:.1f} | 1.00x |",
        f"| G&P (plain + transform_gradients_) | {gp_ms:.1f} | {ratio:.3f}x |",
        f"| transform_gradients_ alone | {transform_ms:.1f} | {transform_ms / gp_ms:.1%} of G&P |",
        "",
        f"ratio as the median over the {args.repeats} adjacent plain/G&P block pairs: "
        f"{statistics.median(pair_ratios):.3f}x (range {min(pair_ratios):.3f}-{max(pair_ratios):.3f})",
        f"spread (min-max ms): plain {min(times['plain']) * 1e3:.1f}-{max(times['plain']) * 1e3:.1f}, "
        f"G&P {min(times['G&P']) * 1e3:.1f}-{max(times['G&P']) * 1e3:.1f}, "
        f"transform {min(timed_update.seconds) * 1e3:.1f}-{max(timed_update.seconds) * 1e3:.1f}",
        f"torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()}, "
        f"{cores} cores available ({cpu_model()}); 1-min load average {load_before:.2f} before, "
        f"{os.getloadavg()[0]:.2f} after (other processes on the cores skew both kinds of step)",
    ]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
