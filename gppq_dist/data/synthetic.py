"""A synthetic ImageNet-shaped folder of real JPEGs, for tests and benchmarks.

Each image is a seeded smooth colour field (a few random low-frequency waves per
channel) plus a little noise, so it compresses and decodes like a photograph rather
than like flat colour, and its class shifts the palette so classes differ.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_synthetic(
    out: str | Path,
    classes: int,
    per_class: int,
    size: tuple[int, int] = (500, 375),
    val_per_class: int | None = None,
    seed: int = 0,
    quality: int = 90,
) -> dict[str, int]:
    """Write ``train/c<NNN>/*.JPEG`` (``per_class`` each) and ``val/...`` (``val_per_class``,
    default ``max(1, per_class // 5)``); ``size`` is (width, height). Returns file counts."""
    out = Path(out)
    width, height = size
    val_per_class = max(1, per_class // 5) if val_per_class is None else val_per_class
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    counts = {"train": 0, "val": 0}
    for label in range(classes):
        tint = rng.uniform(0, 255, size=3)
        for split, count in (("train", per_class), ("val", val_per_class)):
            folder = out / split / f"c{label:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                image = _picture(rng, xs, ys, tint)
                Image.fromarray(image).save(folder / f"{split}_{label:03d}_{index:05d}.JPEG", quality=quality)
                counts[split] += 1
    return counts


def _picture(rng: np.random.Generator, xs: np.ndarray, ys: np.ndarray, tint: np.ndarray) -> np.ndarray:
    height, width = xs.shape
    channels = []
    for channel in range(3):
        field = np.zeros_like(xs)
        for _ in range(3):
            fx, fy = rng.uniform(0.5, 4.0, size=2) * 2 * np.pi
            phase = rng.uniform(0, 2 * np.pi)
            field += np.sin(fx * xs / width + fy * ys / height + phase)
        channels.append(tint[channel] * 0.5 + 40.0 * field)
    image = np.stack(channels, axis=-1) + rng.normal(0, 6.0, size=(height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)
