"""ONNX export of compressed models: file sizes, and ONNX Runtime's start and speed, compressed
against dense.

For every regime (``configs/<regime>.yaml``: the paper's ResNet-18 / ResNet-50 small- and
large-block regimes, 1000 classes) and method, the model is built with random weights
(``model.weights: random``, seeded; each BatchNorm given statistics of its own, as a trained
model's are, so that none is stored once for several) and coded:

- layer rules: the PQ methods that share codec ``pq`` (``direct_pq``; G&P PQ and two-stage
  PQ store the same layout) take the regime's own rules; the others the rules
  ``benchmarks/compare_methods.py`` gives them at the regime's point (``small`` / ``large``);
  a method with one setting (``kmeans_scalar``'s 1 bit, TSQ's ternary weights) has it in
  every regime;
- codes (``--codes kmeans``, the default): the method's own coding of the weights, k-means
  with ``--kmeans-iterations`` (``gppq compress --set model.weights=random`` in process);
  CLIP-Q and TSQ have no coding without training, so they get random codes in their layout
  (CLIP-Q's pattern a random one of its density, as ``gppq size`` estimates it).
  ``--codes random`` gives every method random codes: sizes (index bits are fixed by K)
  and speed do not depend on the values, and it skips the k-means (minutes for ResNet-50).

Each artifact is written (``.gppq``) and exported twice, compressed (codebooks and packed
indices, decoded in the graph) and ``--dense``; each ONNX file is opened by ONNX Runtime on
the CPU (all graph optimizations, which decode the weights at session start), and the two
are measured side by side: session creation, then the latency of one ``run`` at batch 1 and
32 (224 x 224), the two models taking turns run by run after a warm-up run, medians of
``--repeats`` sessions and ``--repeats`` x ``--runs`` runs. Goal: the ONNX file at most
1.05x the accounted size, latency within 1.1x of dense. The last column is the largest logit difference between ONNX Runtime (compressed) and
the PyTorch model ``rebuild_model`` returns, on one random image, and the largest logit (random
weights make no calibrated logits: the difference is float32 rounding at that scale).

Prints a Markdown table (a row per regime and method) and writes it to ``--out``/export.md;
``--readme`` also puts it under the README's ``<!-- export benchmark table ... -->`` line.

    .venv/bin/python benchmarks/export.py [--regimes resnet18_small_blocks ...] [--methods direct_pq ...]
        [--repeats 5] [--runs 3] [--batches 1 32] [--codes kmeans|random] [--kmeans-iterations 20]
        [--threads N] [--out DIR] [--readme]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
REGIMES = ("resnet18_small_blocks", "resnet18_large_blocks", "resnet50_small_blocks", "resnet50_large_blocks")
METHODS = ("direct_pq", "kmeans_scalar", "pq_subspace", "residual_pq", "clipq", "tsq")
README_MARK = "<!-- export benchmark table: written by benchmarks/export.py -->"
IMAGE_SIZE = 224


def random_codes(plans: list, seed: int = 0) -> tuple[dict, dict, dict]:
    """``(codebooks, assignments, extras)`` for ``plans``, random in each codec's layout:
    codewords centred, of the scale of a He-initialised layer (residual stages scaled down so
    that their sum keeps it), every index value used; a ``clipq`` layer keeps a random pattern of
    its density, a ``ternary`` layer's alphas are positive, its codes in {0, 1, 2} and its
    input quantizer fixed (eps 0.1, step 0.3, 3 levels)."""
    from gppq_dist.pq.ternary import InputQuantizer

    generator = torch.Generator().manual_seed(seed)
    codebooks, assignments, extras = {}, {}, {}
    for plan in plans:
        scale = math.sqrt(2.0 / math.prod(plan.shape[1:]))
        if plan.codec == "residual":
            scale /= math.sqrt(plan.stages)
        codebook = torch.randn(plan.codebook_shape, generator=generator) * scale
        if plan.k > 1:  # zero-mean weights, as trained ones are
            codebook -= codebook.mean(dim=-2, keepdim=True)
        values = plan.k
        if plan.codec == "ternary":
            codebook, values = codebook.abs() + scale, 3
            extras[plan.name] = InputQuantizer(0.1, 0.3, 3).to_tensor()
        if plan.codec == "clipq":
            mask = torch.zeros(plan.n_subvectors, dtype=torch.bool)
            mask[torch.randperm(plan.n_subvectors, generator=generator)[: plan.n_indices]] = True
            extras[plan.name] = mask
        codebooks[plan.name] = codebook
        assignments[plan.name] = torch.randint(values, (plan.n_indices,), generator=generator)
    return codebooks, assignments, extras


def vary_batchnorms_(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm statistics and an affine of its own, as training does: random
    weights give all of them the same, which the exporter stores once (the accounting counts
    each BatchNorm's scale and shift)."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            for tensor, low, high in ((module.running_mean, -0.5, 0.5), (module.running_var, 0.5, 2.0),
                                      (module.weight.data, 0.5, 1.5), (module.bias.data, -0.2, 0.2)):
                tensor.copy_(low + (high - low) * torch.rand(tensor.shape, generator=generator))


def method_settings(method: str, regime: str) -> dict[str, Any]:
    """``--set`` overrides giving ``method`` its section and rules in ``regime`` (module docstring)."""
    from gppq_dist.methods.base import LayerQuant
    from gppq_dist.methods.registry import method_spec

    spec = method_spec(method)
    if spec.codec == "pq" and spec.layer is LayerQuant:  # the regime's own {d, k} rules (not scalar k-means')
        return {"method": {"name": method}}
    if str(ROOT / "benchmarks") not in sys.path:  # run as a script it is there already
        sys.path.insert(0, str(ROOT / "benchmarks"))
    from compare_methods import SETTINGS

    point = "large" if "large" in regime else "small"
    settings = SETTINGS[method]
    section, rules = settings[point] if point in settings else next(iter(settings.values()))
    return {"method": section, "quantization.types": rules}


def build(regime: str, method: str, codes: str, iterations: int):
    """The artifact of ``method`` in ``regime`` and how it was coded."""
    from gppq_dist.artifact import artifact_info, build_artifact
    from gppq_dist.compress import code_model, plan_for
    from gppq_dist.config import load_config
    from gppq_dist.distributed import DistContext
    from gppq_dist.methods.registry import method_spec
    from gppq_dist.models import load_model

    overrides = {"model.weights": "random", "kmeans.iterations": iterations, **method_settings(method, regime)}
    cfg = load_config(ROOT / "configs" / f"{regime}.yaml", overrides)
    model = load_model(cfg)
    vary_batchnorms_(model, cfg.seed)
    if codes == "kmeans" and method_spec(method).code is not None:
        local = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
        coded = code_model(model, cfg, local)
        artifact = build_artifact(model, coded.plans, coded.codebooks, coded.assignments,
                                  artifact_info(cfg, coded.gamma))
        return artifact, f"k-means ({iterations} it.)"
    plans = plan_for(model, cfg)
    codebooks, assignments, extras = random_codes(plans, cfg.seed)
    info = artifact_info(cfg, 0.0, {"method": method})  # a method that trains would be named by its start
    return build_artifact(model, plans, codebooks, assignments, info, extras), "random"


def session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def side_by_side(paths: dict[str, Path], repeats: int, runs: int, batches: list[int], threads: int) -> dict:
    """Session creation (s, ``repeats`` each) and latency per batch (ms, ``repeats * runs``
    runs each) of each model, the models taking turns; medians."""
    started: dict[str, list[float]] = {name: [] for name in paths}
    sessions = {}
    for repeat in range(repeats):
        order = list(paths.items())
        for name, path in order[::-1] if repeat % 2 else order:
            start = time.perf_counter()
            sessions[name] = session(path, threads)
            started[name].append(time.perf_counter() - start)
    result: dict[str, Any] = {"session_s": {name: statistics.median(times) for name, times in started.items()}}
    generator = np.random.default_rng(0)
    for batch in batches:
        images = {"images": generator.standard_normal((batch, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)}
        for model in sessions.values():
            model.run(None, images)  # warm-up
        per_run: dict[str, list[float]] = {name: [] for name in paths}
        order = list(sessions.items())
        for turn in range(repeats * runs):  # the models take turns run by run, neither always first
            for name, model in order[::-1] if turn % 2 else order:
                start = time.perf_counter()
                model.run(None, images)
                per_run[name].append((time.perf_counter() - start) * 1e3)
        result[batch] = {name: statistics.median(times) for name, times in per_run.items()}
    return result


def logit_difference(artifact, path: Path, threads: int) -> tuple[float, float]:
    """Largest |logit| difference, ONNX Runtime against ``rebuild_model``, and the largest
    |logit|, on one random image."""
    from gppq_dist.artifact import rebuild_model

    images = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = rebuild_model(artifact)(images).numpy()
    logits = session(path, threads).run(None, {"images": images.numpy()})[0]
    return float(np.abs(logits - expected).max()), float(np.abs(expected).max())


def measure(regime: str, method: str, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    from gppq_dist.artifact import write_artifact
    from gppq_dist.export.onnx import export_onnx

    artifact, codes = build(regime, method, args.codes, args.kmeans_iterations)
    gppq_bytes = write_artifact(artifact, folder / f"{regime}_{method}.gppq")
    compressed = export_onnx(artifact, folder / f"{regime}_{method}.onnx")
    dense = export_onnx(artifact, folder / f"{regime}_{method}_dense.onnx", dense=True)
    timing = side_by_side({"onnx": compressed.path, "dense": dense.path}, args.repeats, args.runs, args.batches,
                          args.threads)
    row = {"regime": regime, "method": method, "codes": codes, "accounted": artifact.accounted_bytes,
           "gppq": gppq_bytes, "onnx": compressed.file_bytes, "dense": dense.file_bytes, **timing,
           "logits": logit_difference(artifact, compressed.path, args.threads)}
    print(f"  {regime} {method}: ONNX {compressed.over_accounted:.3f}x accounted", flush=True)
    return row


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    batch_columns = "".join(f" batch {b} ms (ONNX / dense) |" for b in args.batches)
    lines = [
        "| regime | method | codes | accounted B | .gppq B | ONNX B (x accounted) | dense ONNX B (x ONNX) | "
        f"session s (ONNX / dense) |{batch_columns} max abs logit diff (max abs logit) |",
        "|---|---|---|---:|---:|---:|---:|---:|" + "---:|" * len(args.batches) + "---:|",
    ]
    for row in rows:
        latency = "".join(f" {row[b]['onnx']:.1f} / {row[b]['dense']:.1f} ({row[b]['onnx'] / row[b]['dense']:.2f}x) |"
                          for b in args.batches)
        lines.append(
            f"| {row['regime']} | {row['method']} | {row['codes']} | {row['accounted']:,.0f} | {row['gppq']:,} | "
            f"{row['onnx']:,} ({row['onnx'] / row['accounted']:.3f}x) | {row['dense']:,} "
            f"({row['dense'] / row['onnx']:.1f}x) | {row['session_s']['onnx']:.2f} / {row['session_s']['dense']:.2f} |"
            f"{latency} {row['logits'][0]:.1e} ({row['logits'][1]:.3g}) |")
    import onnxruntime

    lines += ["", f"ONNX Runtime {onnxruntime.__version__} (CPU, {args.threads or 'default'} threads), torch "
              f"{torch.__version__}, Python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} cores; "
              f"medians of {args.repeats} sessions and {args.repeats * args.runs} runs per model, the two taking turns"]
    return "\n".join(lines)


def write_readme(text: str, readme: Path = ROOT / "README.md") -> None:
    """Put ``text`` under the README's mark, replacing the table (and its footnote) there."""
    lines = readme.read_text().splitlines()
    start = lines.index(README_MARK) + 1
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    if lines[end:end + 1] == [""] and end + 1 < len(lines) and lines[end + 1].startswith("ONNX Runtime "):
        end += 2  # the footnote
    readme.write_text("\n".join(lines[:start] + text.splitlines() + lines[end:]) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=REGIMES)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--repeats", type=int, default=5, help="sessions made per model; medians over them")
    parser.add_argument("--runs", type=int, default=3, help="with --repeats: repeats x runs timed runs per model "
                        "and batch, the models taking turns")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--codes", choices=("kmeans", "random"), default="kmeans")
    parser.add_argument("--kmeans-iterations", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--readme", action="store_true", help="also write the table into README.md")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="export_bench_") as scratch:
        for regime in args.regimes:
            for method in args.methods:
                rows.append(measure(regime, method, args, Path(scratch)))
    text = table(rows, args)
    print(text)
    (out / "export.md").write_text(text + "\n")
    if args.readme:
        write_readme(text)
    print(f"\nwritten to {out / 'export.md'}" + (" and README.md" if args.readme else ""))


if __name__ == "__main__":
    main()
