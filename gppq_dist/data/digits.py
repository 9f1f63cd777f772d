"""scikit-learn's digits data set written out as an ImageNet-style JPEG folder.

1,797 grey 8x8 images of the digits 0-9 ship inside scikit-learn, so the demo needs no
download. Each is upscaled (bicubic) to ``size x size``, stored as an RGB JPEG under
``train/<digit>/`` or ``val/<digit>/`` with a seeded, per-class split.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from gppq_dist.io import write_text_atomic

MANIFEST = "digits.json"


def write_digits(out: str | Path, size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> dict:
    """Write the folder (or keep it if a complete one with the same settings exists)."""
    from sklearn.datasets import load_digits

    out = Path(out)
    settings = {"size": size, "val_fraction": val_fraction, "seed": seed}
    manifest_path = out / MANIFEST
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("settings") == settings:
            return manifest
    if out.exists():
        shutil.rmtree(out)
    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    labels = digits.target
    rng = np.random.default_rng(seed)
    counts = {"train": 0, "val": 0}
    for label in range(10):
        rows = np.flatnonzero(labels == label)
        rng.shuffle(rows)
        n_val = int(round(len(rows) * val_fraction))
        for position, row in enumerate(rows):
            split = "val" if position < n_val else "train"
            folder = out / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            picture = Image.fromarray(images[row]).resize((size, size), Image.BICUBIC).convert("RGB")
            picture.save(folder / f"digit_{row:04d}.JPEG", quality=95)
            counts[split] += 1
    manifest = {"settings": settings, "classes": 10, **counts}
    write_text_atomic(manifest_path, json.dumps(manifest, indent=2))
    return manifest
