"""Fashion-MNIST (Zalando, MIT licence) from its four IDX files to an ImageNet-layout folder.

Debian's ``dataset-fashion-mnist`` installs the files under :data:`DEBIAN_SOURCE`:
``train-images-idx3-ubyte.gz`` (60,000 x 28 x 28), ``train-labels-idx1-ubyte.gz``,
``t10k-images-idx3-ubyte.gz`` (10,000), ``t10k-labels-idx1-ubyte.gz`` (gzipped or not).
IDX: a big-endian header (two zero bytes, the type code 0x08 for unsigned bytes, the
number of dimensions, then each dimension as a uint32; magic 2051 for images, 2049 for
labels) followed by the values, row-major.

:func:`write_fashion_mnist` writes lossless greyscale PNGs (28 x 28, as stored; the loaders
decode them to 3 channels and resize):

- ``val/``: a stratified, seeded sample of the 60,000 training images (``val`` of them,
  5,000 by default: the same share of every class, largest remainders first);
- ``train/``: the other training images;
- ``test/``: the 10,000 test images, for scoring a final model once.

Class folders are named ``<label>_<name>`` (``0_t-shirt_top`` ... ``9_ankle_boot``), so
their sorted order (the class index every loader assigns) is Zalando's label order. A file
is named by its row in the IDX file (``train_00042.png``, ``test_00042.png``). Same files,
seed and ``val``: the same bytes.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from gppq_dist.errors import DataError
from gppq_dist.io import write_text_atomic

DEBIAN_SOURCE = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot")
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049
MANIFEST = "fashion_mnist.json"
INSTALL_HINT = ("install Debian's package dataset-fashion-mnist (`apt-get install dataset-fashion-mnist`, or "
                "`make data-fashion` as root), or pass --source with the four IDX files")


def read_idx(path: Path, magic: int) -> np.ndarray:
    """The values of one IDX file of unsigned bytes (``.gz`` or not); any deviation from
    the format (magic, type, a size the header does not promise) is a :class:`DataError`."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: cannot read it as an IDX file ({exc})") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise DataError(f"{path}: not an IDX file of unsigned bytes (expected the header 00 00 08 ..)")
    found, ndim = int.from_bytes(raw[:4], "big"), raw[3]
    if found != magic:
        kind = "images" if magic == IMAGES_MAGIC else "labels"
        raise DataError(f"{path}: magic number {found}, expected {magic} (IDX {kind})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated header ({len(raw)} bytes)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        state = "truncated" if len(raw) < expected else "longer than its header says"
        raise DataError(f"{path}: {state}: {len(raw):,} bytes, the header {shape} promises {expected:,}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find(source: Path, stem: str) -> Path:
    for candidate in (source / f"{stem}.gz", source / stem):
        if candidate.is_file():
            return candidate
    raise DataError(f"{source}: no {stem}.gz (or {stem}); {INSTALL_HINT}")


def read_split(source: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images N x 28 x 28 uint8, labels N uint8)`` of ``train`` or ``test``."""
    images_stem, labels_stem = FILES[split]
    images_path, labels_path = _find(source, images_stem), _find(source, labels_stem)
    images, labels = read_idx(images_path, IMAGES_MAGIC), read_idx(labels_path, LABELS_MAGIC)
    if images.ndim != 3 or labels.ndim != 1:
        raise DataError(f"{images_path}, {labels_path}: expected N x H x W images and N labels, got "
                        f"{images.shape} and {labels.shape}")
    if len(images) != len(labels):
        raise DataError(f"{images_path} holds {len(images):,} images, {labels_path} {len(labels):,} labels")
    if labels.size and int(labels.max()) >= len(CLASSES):
        raise DataError(f"{labels_path}: label {int(labels.max())}, expected 0-{len(CLASSES) - 1}")
    return images, labels


def stratified_split(labels: np.ndarray, n_val: int, seed: int) -> np.ndarray:
    """Rows of a validation sample of ``n_val``: each class gets its share of ``n_val``
    (rounded down, the remainders to the largest fractions, ties to the lower label), drawn
    by a seeded permutation of that class's rows. Returns a boolean mask."""
    if not 0 <= n_val < len(labels):
        raise DataError(f"--val: {n_val} validation images from {len(labels):,} training images; expected "
                        f"0 <= N < {len(labels):,}")
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * n_val / len(labels)
    shares = np.floor(exact).astype(np.int64)
    for position in np.argsort(-(exact - shares), kind="stable")[: n_val - int(shares.sum())]:
        shares[position] += 1
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), dtype=bool)
    for label, share in zip(classes, shares):
        rows = np.flatnonzero(labels == label)
        mask[rows[rng.permutation(len(rows))[:share]]] = True
    return mask


def _write_png(path: Path, image: np.ndarray) -> None:
    Image.fromarray(image, mode="L").save(path, format="PNG", optimize=False, compress_level=6)


def write_fashion_mnist(out: str | Path, source: str | Path = DEBIAN_SOURCE, val: int = 5000,
                        seed: int = 0) -> dict:
    """Write the folder (or keep a complete one written with the same settings); returns
    its manifest (settings and image counts). A folder that exists but was not written by
    this function is left alone (an error)."""
    out, source = Path(out), Path(source)
    settings = {"val": val, "seed": seed}
    manifest_path = out / MANIFEST
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("settings") == settings:
            return manifest
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"--out: '{out}' exists and holds files that `gppq data fashion-mnist` did not write; "
                        "name a new or empty folder")
    if not source.is_dir():
        raise DataError(f"--source: '{source}' is not a folder; {INSTALL_HINT}")
    train_images, train_labels = read_split(source, "train")
    test_images, test_labels = read_split(source, "test")
    in_val = stratified_split(train_labels, val, seed)
    # Written beside the target and moved into place at the end: an interrupted run leaves
    # no half folder that a later run would take as complete.
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    counts = {"train": 0, "val": 0, "test": 0}
    for split in counts:
        for label, name in enumerate(CLASSES):
            (partial / split / f"{label}_{name}").mkdir(parents=True)
    for row, (image, label) in enumerate(zip(train_images, train_labels)):
        split = "val" if in_val[row] else "train"
        _write_png(partial / split / f"{label}_{CLASSES[label]}" / f"train_{row:05d}.png", image)
        counts[split] += 1
    for row, (image, label) in enumerate(zip(test_images, test_labels)):
        _write_png(partial / "test" / f"{label}_{CLASSES[label]}" / f"test_{row:05d}.png", image)
        counts["test"] += 1
    manifest = {"settings": settings, "source": str(source), "classes": list(CLASSES), **counts}
    write_text_atomic(partial / MANIFEST, json.dumps(manifest, indent=2))
    if out.exists():  # an earlier write with other settings (it held our manifest)
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial.rename(out)
    return manifest
