"""Start-up cost of a run on an ImageNet-sized tree: the data manifest against walking per loader.

Writes (once, cached: ``data/startup_bench/``, an ignored folder) an ImageNet-layout tree of
tiny real JPEGs: 1,000 class folders ``n00000000`` .. , ``--per-class`` (default 200) train
images each, so 200,000 files, and ``--val-per-class`` (3) val images each. The files are
16x16 JPEGs, a few distinct encodings written to many files, so writing takes seconds, and
decoding them (the check on a cold cache) is cheap: what is measured is listing and
``stat``-ing the tree, as on a real data set. A second tree with the first ``--small-per-class``
(100) images of every class, made of hard links into the first, is the 100,000-file size.

Two measurements:

1. **In process** (``--part inprocess``), on the largest tree: ``write_manifest`` on a cold
   and on a warm check cache, ``prepare_manifest`` reusing the manifest (a resume),
   ``load_manifest`` plus both splits' samples (every rank but 0), against
   ``checked_samples`` as it was before the manifest (the check, then ``index_split``: two
   walks per call; a run called it for train and val in its pre-flight and again per
   loader) and as it is now (one walk per call). Each row gives seconds and the tree walks
   it made (``gppq_dist.data.check.tree_walks``).
2. **End to end** (``--part train``): for each tree, ``gppq train --config <cfg> --nproc 2``
   of a tiny run (ResNet-18 at 16x16 pixels, 1,000 classes, tracking off, one k-means
   iteration, ``train.max_steps: 1``), first on a cold check cache (its folder removed),
   then on a warm one, each under a fresh run name. From ``summary.json``: ``timing``
   (``first_step_unix``, ``coding_s``, ``baseline_eval_s``) and ``tree_walks`` (per rank).
   The start-up overhead of a row is the time from just before the launch to the end of
   the first step, less ``coding_s`` (k-means and scoring the direct-PQ start) and
   ``baseline_eval_s``: process start, imports, the data check and manifest, loaders,
   the model. Goal: at most 10 s warm at 200,000 files, with one walk on rank 0 and none
   on the others.

Prints Markdown tables and writes them to ``benchmarks/results/startup.md``. The page cache
is warm (the tree was just written or read): on a shared file system every ``stat`` is a
round trip, and the walks cost far more than here.

    .venv/bin/python benchmarks/startup.py [--part inprocess|train|all] [--per-class 200]
        [--small-per-class 100] [--val-per-class 3] [--workers 2]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / "data" / "startup_bench"
RUNS_DIR = ROOT / "runs" / "startup_bench"
RESULTS = ROOT / "benchmarks" / "results" / "startup.md"
CLASSES = 1000
IMAGE_SIZE = 16
VARIANTS = 8  # distinct encoded images written round-robin
GOAL_OVERHEAD_S = 10.0
GOAL_FILES = 200_000


# ---- the trees ----------------------------------------------------------------------------

def tiny_jpegs(count: int = VARIANTS, size: int = IMAGE_SIZE, seed: int = 0) -> list[bytes]:
    """``count`` distinct ``size`` x ``size`` JPEG encodings (seeded smooth colour fields)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    encoded = []
    for _ in range(count):
        waves = [np.sin(rng.uniform(1, 4) * xs / size * 6.28 + rng.uniform(1, 4) * ys / size * 6.28)
                 for _ in range(3)]
        pixels = np.stack([128 + 100 * wave for wave in waves], axis=-1).clip(0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        encoded.append(buffer.getvalue())
    return encoded


def class_name(index: int) -> str:
    return f"n{index:08d}"


def image_name(class_index: int, index: int) -> str:
    return f"{class_name(class_index)}_{index:06d}.JPEG"


def _stamp(root: Path) -> Path:
    return root.with_name(root.name + ".done.json")


def _is_complete(root: Path, spec: dict[str, Any]) -> bool:
    try:
        return json.loads(_stamp(root).read_text()) == spec and root.is_dir()
    except (OSError, ValueError):
        return False


def _finish(root: Path, spec: dict[str, Any]) -> None:
    from gppq_dist.io import write_text_atomic

    write_text_atomic(_stamp(root), json.dumps(spec))


def ensure_tree(root: Path, classes: int = CLASSES, per_class: int = 200, val_per_class: int = 3) -> bool:
    """Write ``root/{train,val}/<class>/*.JPEG`` unless a complete tree of these counts is
    there (a ``<root>.done.json`` stamp, written last). Returns True when it wrote."""
    spec = {"classes": classes, "per_class": per_class, "val_per_class": val_per_class, "size": IMAGE_SIZE}
    if _is_complete(root, spec):
        return False
    _stamp(root).unlink(missing_ok=True)
    shutil.rmtree(root, ignore_errors=True)
    encoded = tiny_jpegs()
    written = 0
    for split, count in (("train", per_class), ("val", val_per_class)):
        for label in range(classes):
            folder = root / split / class_name(label)
            folder.mkdir(parents=True)
            for index in range(count):
                with open(folder / image_name(label, index), "wb") as out:
                    out.write(encoded[written % len(encoded)])
                written += 1
    _finish(root, spec)
    return True


def ensure_subset(root: Path, source: Path, per_class: int, val_per_class: int) -> bool:
    """A tree of the first ``per_class`` train (and ``val_per_class`` val) images of every
    class of ``source``, as hard links (copies where linking fails). True when it wrote."""
    spec = {"source": str(source), "per_class": per_class, "val_per_class": val_per_class}
    if _is_complete(root, spec):
        return False
    _stamp(root).unlink(missing_ok=True)
    shutil.rmtree(root, ignore_errors=True)
    for split, count in (("train", per_class), ("val", val_per_class)):
        for folder in sorted(p for p in (source / split).iterdir() if p.is_dir()):
            target = root / split / folder.name
            target.mkdir(parents=True)
            for image in sorted(folder.iterdir())[:count]:
                try:
                    os.link(image, target / image.name)
                except OSError:
                    shutil.copyfile(image, target / image.name)
    _finish(root, spec)
    return True


def count_files(root: Path) -> dict[str, int]:
    return {split: sum(len(os.listdir(folder)) for folder in (root / split).iterdir()) for split in ("train", "val")}


# ---- in process ---------------------------------------------------------------------------

def old_checked_samples(data: Any, split: str) -> list[tuple[str, int]]:
    """``checked_samples`` as it was before the manifest: the check (one walk), then
    ``index_split`` (a second walk), then the bad files left out."""
    from gppq_dist.data.check import check_data
    from gppq_dist.data.layout import index_split

    report = check_data(data)
    bad = report.bad_files
    return [(path, label) for path, label in index_split(data, split).samples if path not in bad]


def timed(function: Callable[[], Any]) -> tuple[Any, float, int]:
    """``(result, seconds, tree walks)`` of ``function()``."""
    from gppq_dist.data.check import tree_walks

    walks = tree_walks()
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start, tree_walks() - walks


def in_process(root: Path, workers: int) -> list[dict[str, Any]]:
    from gppq_dist.config import DataConfig
    from gppq_dist.data.check import default_cache_dir
    from gppq_dist.data.loaders import checked_samples
    from gppq_dist.data.manifest import MANIFEST, load_manifest, prepare_manifest, write_manifest

    data = DataConfig(root=str(root), workers=workers)
    run_dir = RUNS_DIR / "manifest_timing"
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.rmtree(default_cache_dir(root), ignore_errors=True)
    rows = []

    def row(what: str, function: Callable[[], Any], who: str) -> Any:
        result, seconds, walks = timed(function)
        rows.append({"what": what, "who": who, "seconds": seconds, "walks": walks})
        print(f"  {what}: {seconds:.2f} s, {walks} walk(s)", flush=True)
        return result

    row("write_manifest, cold check cache (decodes every image)", lambda: write_manifest(data, run_dir), "rank 0")
    row("write_manifest, warm check cache", lambda: write_manifest(data, run_dir), "rank 0")
    reused = row("prepare_manifest, reused (a resume)", lambda: prepare_manifest(data, run_dir), "rank 0")
    assert reused.reused
    row("load_manifest + samples(train) + samples(val)",
        lambda: [load_manifest(data, run_dir).samples(split) for split in ("train", "val")], "every other rank")
    row("old checked_samples(train) + (val), warm (the pre-flight; each loader repeated it)",
        lambda: [old_checked_samples(data, split) for split in ("train", "val")], "every rank")
    row("checked_samples(train) + (val) now, warm (no run folder: pretrain, eval)",
        lambda: [checked_samples(data, split) for split in ("train", "val")], "every rank")
    size = (run_dir / MANIFEST).stat().st_size
    rows.append({"manifest_bytes": size})
    return rows


def in_process_table(rows: list[dict[str, Any]], files: int) -> str:
    lines = [f"In process, {files:,} files (`.venv/bin/python benchmarks/startup.py --part inprocess`):", "",
             "| step | who | seconds | tree walks |", "|---|---|---:|---:|"]
    for row in rows:
        if "what" in row:
            lines.append(f"| {row['what']} | {row['who']} | {row['seconds']:.2f} | {row['walks']} |")
    size = next((row["manifest_bytes"] for row in rows if "manifest_bytes" in row), None)
    if size is not None:
        lines += ["", f"Manifest file: {size:,} bytes (gzip'd JSON)."]
    return "\n".join(lines)


# ---- end to end ---------------------------------------------------------------------------

def bench_config(root: Path, name: str, loader: str = "dali") -> dict[str, Any]:
    """The tiny run of the end-to-end rows, as a config dict."""
    return {
        "name": name,
        "output_dir": str(RUNS_DIR),
        "seed": 0,
        "model": {"arch": "resnet18", "num_classes": CLASSES, "weights": "random"},
        "data": {"root": str(root), "image_size": IMAGE_SIZE, "resize_size": IMAGE_SIZE, "batch_size": 256,
                 "workers": 1, "loader": loader, "crop_scale": [0.5, 1.0]},
        "quantization": {"skip_first_conv": True,
                         "types": {"conv3x3": {"d": 9, "k": 256}, "conv1x1": {"d": 4, "k": 256},
                                   "linear": {"d": 4, "k": 2048}}},
        "kmeans": {"iterations": 1},
        "train": {"epochs": 1, "batch_size": 64, "max_steps": 1, "checkpoint_every": 0},
        "tracking": {"enabled": False},
    }


def startup_row(summary: dict[str, Any], launched_unix: float, files: int, cache: str) -> dict[str, Any]:
    """One end-to-end row from a run's ``summary.json`` and the time just before its launch."""
    timing = summary["timing"]
    to_first_step = timing["first_step_unix"] - launched_unix
    overhead = to_first_step - timing["coding_s"] - timing["baseline_eval_s"]
    return {"files": files, "cache": cache, "to_first_step_s": to_first_step, "coding_s": timing["coding_s"],
            "baseline_eval_s": timing["baseline_eval_s"], "overhead_s": overhead,
            "walks": list(summary["tree_walks"])}


def goal_met(row: dict[str, Any]) -> bool | None:
    """The goal applies to the warm row at 200,000 files or more (None elsewhere)."""
    if row["cache"] != "warm" or row["files"] < GOAL_FILES:
        return None
    return row["overhead_s"] <= GOAL_OVERHEAD_S and row["walks"][0] == 1 and not any(row["walks"][1:])


def run_train(root: Path, files: int, cache: str, loader: str) -> dict[str, Any]:
    import yaml

    from gppq_dist.data.check import default_cache_dir

    if cache == "cold":
        shutil.rmtree(default_cache_dir(root), ignore_errors=True)
    name = f"startup_{files // 1000}k_{cache}_{time.strftime('%Y%m%d_%H%M%S')}"
    config = RUNS_DIR / "configs" / f"{name}.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump(bench_config(root, name, loader), sort_keys=False))
    gppq = Path(sys.executable).parent / "gppq"
    print(f"  gppq train --config {config.relative_to(ROOT)} --nproc 2 ({cache} check cache)", flush=True)
    launched = time.time()
    result = subprocess.run([str(gppq), "train", "--config", str(config), "--nproc", "2"], cwd=ROOT,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"gppq train failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    summary = json.loads((RUNS_DIR / name / "summary.json").read_text())
    missing = [key for key in ("timing", "tree_walks") if key not in summary]
    if missing:
        raise SystemExit(f"{RUNS_DIR / name / 'summary.json'} has no {', '.join(missing)}: the trainer must "
                         "record them (timing.first_step_unix, coding_s, baseline_eval_s; tree_walks per rank)")
    return startup_row(summary, launched, files, cache)


def train_table(rows: list[dict[str, Any]]) -> str:
    lines = ["End to end, `gppq train --nproc 2` (`.venv/bin/python benchmarks/startup.py --part train`):", "",
             "| files | check cache | launch to first step s | coding s | baseline eval s | overhead s "
             "| walks per rank | goal |",
             "|---:|---|---:|---:|---:|---:|---|---|"]
    for row in rows:
        met = goal_met(row)
        goal = "" if met is None else ("met" if met else "missed")
        lines.append(f"| {row['files']:,} | {row['cache']} | {row['to_first_step_s']:.1f} | {row['coding_s']:.1f} "
                     f"| {row['baseline_eval_s']:.1f} | {row['overhead_s']:.1f} "
                     f"| {', '.join(map(str, row['walks']))} | {goal} |")
    lines += ["", f"Goal: overhead <= {GOAL_OVERHEAD_S:.0f} s warm at {GOAL_FILES:,} files, "
              "1 walk on rank 0 and 0 on the others."]
    return "\n".join(lines)


def machine_line() -> str:
    import PIL
    import torch

    return (f"torch {torch.__version__}, Pillow {PIL.__version__}, Python {platform.python_version()}, "
            f"{platform.machine()}, {os.cpu_count()} cores, warm page cache.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["inprocess", "train", "all"], default="all")
    parser.add_argument("--per-class", type=int, default=200)
    parser.add_argument("--small-per-class", type=int, default=100)
    parser.add_argument("--val-per-class", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="check decoding processes")
    parser.add_argument("--loader", choices=["dali", "torchvision"], default="dali")
    args = parser.parse_args()

    large = BENCH_DIR / f"imagenet_{CLASSES * args.per_class // 1000}k"
    small = BENCH_DIR / f"imagenet_{CLASSES * args.small_per_class // 1000}k"
    start = time.perf_counter()
    if ensure_tree(large, CLASSES, args.per_class, args.val_per_class):
        print(f"wrote {large} in {time.perf_counter() - start:.1f} s", flush=True)
    if ensure_subset(small, large, args.small_per_class, args.val_per_class):
        print(f"linked {small}", flush=True)
    trees = [(sum(count_files(tree).values()), tree) for tree in (small, large)]

    sections = []
    if args.part in ("inprocess", "all"):
        files, tree = trees[-1]
        print(f"in process, {tree} ({files:,} files):", flush=True)
        sections.append(in_process_table(in_process(tree, args.workers), files))
    if args.part in ("train", "all"):
        rows = [run_train(tree, files, cache, args.loader) for files, tree in trees for cache in ("cold", "warm")]
        sections.append(train_table(rows))
    report = "\n\n".join([*sections, machine_line()]) + "\n"
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    from gppq_dist.io import write_text_atomic

    write_text_atomic(RESULTS, report)
    print()
    print(report)


if __name__ == "__main__":
    main()
