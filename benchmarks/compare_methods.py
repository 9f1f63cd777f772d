"""Every compression method on the demo data at matched compressed size, several seeds each.

The demo's baseline (ResNet-18 trained on scikit-learn's digits, ``configs/demo_digits.yaml``;
written and cached as ``make demo`` does) is compressed by every method at two size points:

- ``small``: the ResNet-18 small-block size (PQ d = 9 / 4, K = 256: 1.357 MB, 31x here);
- ``large``: the harder large-block size (3x3 convs d = 18: 0.845 MB, 50x here);
- ``2bit``: TSQ's own size, ternary weights at 2 bits each (2.74 MB, 15.5x here), with the
  PQ methods at d = 4, K = 256 (also 2 bits per weight) beside it.

Each method gets the settings of its own kind that come closest to the point (the accounted
size is in the table, so any mismatch shows): PQ-based methods (G&P PQ, two-stage PQ, direct
PQ) the regime itself; scalar k-means 1 bit per weight (K = 2, its smallest: it has no
``large`` point); sub-space PQ d = 18 with K = 16 / 8 per sub-space; residual PQ two stages
of K = 16 (d = 9) / K = 32 (d = 18); CLIP-Q prunes 85% and codes the rest with 2 bits
(small) or prunes 90.5% with 1 bit (large); TSQ (2-bit inputs, half of them zero) exists
at ``2bit`` only. The methods that train (G&P PQ, two-stage PQ, CLIP-Q, TSQ) run the demo's
schedule, 12 epochs in all (lr 0.01, momentum 0.9; G&P PQ's mu = 0.5; TSQ: 4 epochs of
step 1, then 8 of finetuning, each starting at lr 0.01) on ``--nproc`` processes; seeds
vary the k-means seeding and the data order, the baseline is the same.

Every run is a real ``gppq train`` (its own run folder under ``--out``, tracked into the
MLflow store ``--out``/mlflow.db, experiment ``compare_methods``); finished runs are reused
unless ``--force``. Prints a Markdown table (method, point, accounted MB, ratio, top-1 mean
+- std over the seeds, mean wall time) and writes it with a size / top-1 plot to
``--out``/compare_methods.md and .png.

    .venv/bin/python benchmarks/compare_methods.py [--seeds 3] [--points small large] [--methods ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from gppq_dist.config import load_config
from gppq_dist.data.digits import write_digits
from gppq_dist.pretrain import pretrain
from gppq_dist.tracking.plots import pareto_png

ROOT = Path(__file__).resolve().parents[1]
GPPQ = str(Path(sys.executable).parent / "gppq")


def types(d3: int, k3: int, d1: int, k1: int, dl: int, kl: int) -> dict:
    return {"conv3x3": {"d": d3, "k": k3}, "conv1x1": {"d": d1, "k": k1}, "linear": {"d": dl, "k": kl}}


def every_kind(setting: dict) -> dict:
    return {kind: setting for kind in ("conv3x3", "conv1x1", "linear")}


PQ = {"small": types(9, 256, 4, 256, 4, 2048), "large": types(18, 256, 4, 256, 4, 2048),
      "2bit": types(4, 256, 4, 256, 4, 256)}
# method -> point -> (method section, quantization.types); a point a method cannot reach is absent
SETTINGS: dict[str, dict[str, tuple[dict, dict]]] = {
    "gppq": {point: ({"name": "gppq"}, rules) for point, rules in PQ.items()},
    "two_stage_pq": {point: ({"name": "two_stage_pq"}, rules) for point, rules in PQ.items()},
    "direct_pq": {point: ({"name": "direct_pq"}, rules) for point, rules in PQ.items()},
    "kmeans_scalar": {"small": ({"name": "kmeans_scalar"}, types(1, 2, 1, 2, 1, 2))},
    "pq_subspace": {"small": ({"name": "pq_subspace"}, types(18, 16, 4, 16, 4, 16)),
                    "large": ({"name": "pq_subspace"}, types(18, 8, 4, 8, 4, 8))},
    "residual_pq": {"small": ({"name": "residual_pq", "stages": 2}, types(9, 16, 4, 16, 4, 16)),
                    "large": ({"name": "residual_pq", "stages": 2}, types(18, 32, 4, 32, 4, 32))},
    # CLIP-Q and TSQ code single weights: CLIP-Q's rules are {prune, bits}, TSQ's {} (no settings)
    "clipq": {"small": ({"name": "clipq"}, every_kind({"prune": 0.85, "bits": 2})),
              "large": ({"name": "clipq"}, every_kind({"prune": 0.905, "bits": 1}))},
    "tsq": {"2bit": ({"name": "tsq", "code_epochs": 4}, every_kind({}))},
}
TRAINED = ("gppq", "two_stage_pq", "clipq", "tsq")
POINTS = ("small", "large", "2bit")
# settings besides the method section and the rules
EXTRA = {"tsq": {"train.epochs": 8}}


def gppq_train(base: Path, out: Path, name: str, method: str, sets: dict, nproc: int, force: bool) -> dict:
    """``gppq train --config base --set KEY=VALUE...`` as run ``name`` under ``out`` (the
    methods that train on ``nproc`` processes); a finished run is reused unless ``force``.
    Returns its summary."""
    summary_path = out / name / "summary.json"
    if summary_path.is_file() and not force:
        return json.loads(summary_path.read_text())
    if (out / name).exists():
        shutil.rmtree(out / name)
    command = [GPPQ, "train", "--config", str(base)]
    if method in TRAINED and nproc > 1:
        command += ["--nproc", str(nproc)]
    for key, value in {"name": name, "output_dir": str(out), **sets}.items():
        command += ["--set", f"{key}={json.dumps(value) if isinstance(value, (dict, list)) else value}"]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    print(f"  {name}: {time.perf_counter() - started:.0f} s", flush=True)
    return json.loads(summary_path.read_text())


def run_one(base: Path, out: Path, weights: str, method: str, point: str, seed: int, nproc: int,
            force: bool) -> dict:
    section, rules = SETTINGS[method][point]
    sets = {
        "model.weights": weights, "seed": seed, "kmeans.seed": seed,
        "method": section, "quantization.types": rules, **EXTRA.get(method, {}),
        "tracking.uri": f"sqlite:///{(out / 'mlflow.db').resolve()}", "tracking.experiment": "compare_methods",
    }
    return gppq_train(base, out, f"{point}_{method}_s{seed}", method, sets, nproc, force)


def common_arguments(parser: argparse.ArgumentParser, config: str, seeds: int, out: str) -> None:
    """The options both method benchmarks take."""
    parser.add_argument("--config", default=str(ROOT / "configs" / config))
    parser.add_argument("--seeds", type=int, default=seeds)
    parser.add_argument("--methods", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--points", nargs="+", default=list(POINTS), choices=POINTS)
    parser.add_argument("--nproc", type=int, default=2, help="processes for the methods that train")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / out))
    parser.add_argument("--force", action="store_true", help="run again even where a summary exists")
    parser.add_argument("--docs", action="store_true",
                        help="also write the table and plot to docs/, where the README includes them (make targets)")


def output_folders(args: argparse.Namespace, out: Path) -> list[Path]:
    """Where a benchmark writes its table and plot: ``--out``, and ``docs/`` with ``--docs``."""
    return [out] + ([ROOT / "docs"] if args.docs else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_arguments(parser, "demo_digits.yaml", 3, "compare")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(args.config)
    write_digits(cfg.data.root, size=cfg.data.image_size)
    baseline = pretrain(cfg)  # cached by its settings, as in `make demo`
    started = time.perf_counter()
    rows = []
    for point in args.points:
        for method in args.methods:
            if point not in SETTINGS[method]:
                continue
            summaries = [run_one(Path(args.config), out, baseline["weights"], method, point, seed, args.nproc,
                                 args.force) for seed in range(args.seeds)]
            top1 = [s["top1_quantized"] for s in summaries]
            rows.append({
                "method": method, "point": point, "size_mb": summaries[0]["size_mb"],
                "ratio": summaries[0]["ratio"], "top1_mean": statistics.mean(top1),
                "top1_std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
                "wall_s": statistics.mean(s["wall_s"] for s in summaries), "seeds": len(top1),
                "baseline_top1": summaries[0]["baseline_top1"],
            })
    baseline_top1 = rows[0]["baseline_top1"] if rows else float("nan")
    lines = [
        f"ResNet-18 on digits (baseline {baseline_top1:.2f}% top-1, 42.66 MB fp32), {args.seeds} seeds per "
        f"row; trained methods on {args.nproc} CPU processes; wall time per run; total {time.perf_counter() - started:.0f} s",
        "",
        "| method | point | accounted MB | ratio | top-1 % (mean +- std) | wall s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in sorted(rows, key=lambda r: (POINTS.index(r["point"]), -r["top1_mean"])):
        lines.append(f"| {row['method']} | {row['point']} | {row['size_mb']:.3f} | {row['ratio']:.1f}x | "
                     f"{row['top1_mean']:.2f} +- {row['top1_std']:.2f} | {row['wall_s']:.0f} |")
    lines.append("")
    lines.append(f"torch {torch.__version__}, Python {platform.python_version()}, "
                 f"{platform.machine()}, {os.cpu_count()} cores")
    text = "\n".join(lines)
    print(text)
    for folder in output_folders(args, out):
        (folder / "compare_methods.md").write_text(text + "\n")
        pareto_png([{"method": r["method"], "run": r["point"], "size_mb": r["size_mb"],
                     "top1_quantized": r["top1_mean"]} for r in rows],
                   folder / "compare_methods.png", "digits, ResNet-18: size vs top-1 (mean of seeds)")
        print(f"\nwritten to {folder / 'compare_methods.md'} and {folder / 'compare_methods.png'}")
    (out / "settings.yaml").write_text(yaml.safe_dump({m: {p: list(s) for p, s in v.items()}
                                                       for m, v in SETTINGS.items()}, sort_keys=False))


if __name__ == "__main__":
    main()
