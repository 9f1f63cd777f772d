"""Train-loader throughput: DALI's CPU pipeline against torchvision's ``DataLoader``.

Both read the same synthetic ImageNet-shaped folder (real JPEGs, default 100 classes x 20
images of 500x375, written once by ``write_synthetic`` into an ignored folder) with the
same train transform (random-resized crop to 224, flip, normalize), the same batch size
and the same number of CPU threads (DALI) / worker processes (torchvision). Epochs of the
two alternate; the first batch of each loader (thread, process and pipeline start-up) is
not timed, everything after it is, including each later epoch's start. Prints a Markdown
table and a line with versions and core count.

    .venv/bin/python benchmarks/data_loading.py [--workers 2] [--epochs 3] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def ensure_folder(folder: Path, classes: int, per_class: int) -> None:
    """Write the synthetic folder unless one with exactly these counts is there."""
    from gppq_dist.data.synthetic import write_synthetic

    train = folder / "train"
    if train.is_dir() and len(list(train.glob("*/*.JPEG"))) == classes * per_class \
            and len(list(train.iterdir())) == classes:
        return
    print(f"writing {classes} x {per_class} JPEGs (500x375) to {folder} ...", flush=True)
    write_synthetic(folder, classes=classes, per_class=per_class, size=(500, 375), val_per_class=1)


def timed_epoch(loader, epoch: int, skip_first: bool) -> tuple[int, float]:
    """(images, seconds) of one epoch; with ``skip_first`` the clock starts after batch 1."""
    loader.set_epoch(epoch)
    images, start = 0, time.perf_counter()
    for step, (batch, _) in enumerate(loader):
        if skip_first and step == 0:
            start = time.perf_counter()
            continue
        images += batch.shape[0]
    return images, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "benchmarks" / "results" / "synthetic_imagenet")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2, help="DALI CPU threads = torchvision worker processes")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()

    import nvidia.dali
    import PIL
    import torch
    import torchvision

    from gppq_dist.config import DataConfig
    from gppq_dist.data.dali import DaliLoader
    from gppq_dist.data.folder import LoaderSpec, TorchvisionLoader
    from gppq_dist.data.layout import index_split

    ensure_folder(args.data, args.classes, args.per_class)
    data = DataConfig(root=str(args.data), image_size=224, workers=args.workers, device="cpu")
    spec = LoaderSpec(index_split(data, "train").samples, data, train=True, batch_size=args.batch_size)
    loaders = {"DALI (CPU pipeline)": DaliLoader(spec), "torchvision DataLoader": TorchvisionLoader(spec)}
    totals = {name: [0, 0.0] for name in loaders}
    for epoch in range(args.epochs):
        for name, loader in loaders.items():  # interleaved: machine noise hits both
            images, seconds = timed_epoch(loader, epoch, skip_first=epoch == 0)
            totals[name][0] += images
            totals[name][1] += seconds

    reference = totals["torchvision DataLoader"][0] / totals["torchvision DataLoader"][1]
    print(f"\n{len(spec.samples)} train images of 500x375 -> 224x224, batch {args.batch_size}, "
          f"{args.epochs} epochs each, interleaved; first batch not timed\n")
    print("| loader | threads / workers | images | seconds | images/s | vs torchvision |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (images, seconds) in totals.items():
        rate = images / seconds
        print(f"| {name} | {args.workers} | {images} | {seconds:.2f} | {rate:.0f} | {rate / reference:.2f}x |")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"\nDALI {nvidia.dali.__version__}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
          f"Pillow {PIL.__version__}, Python {platform.python_version()}, {platform.machine()}, "
          f"{cores} cores available")


if __name__ == "__main__":
    main()
