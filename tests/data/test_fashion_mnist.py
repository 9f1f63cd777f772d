"""`gppq data fashion-mnist` on tiny IDX files written here (no real data in the repo)."""

from __future__ import annotations

import gzip
import hashlib

import numpy as np
import pytest
from PIL import Image

from gppq_dist.data.fashion_mnist import (
    CLASSES,
    IMAGES_MAGIC,
    LABELS_MAGIC,
    read_idx,
    stratified_split,
    write_fashion_mnist,
)
from gppq_dist.errors import DataError
from tests.conftest import gppq


def idx_bytes(values: np.ndarray) -> bytes:
    """The IDX encoding of an unsigned-byte array (header: 00 00 08 ndim, then the dims)."""
    header = bytes([0, 0, 0x08, values.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in values.shape)
    return header + values.astype(np.uint8).tobytes()


def write_source(folder, train_per_class=6, test_per_class=2, seed=1):
    """The four files, gzipped as Debian ships them; images carry their row in pixel 0."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, per_class, prefix in (("train", train_per_class, "train"), ("test", test_per_class, "t10k")):
        labels = rng.permutation(np.repeat(np.arange(10), per_class)).astype(np.uint8)
        images = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images), mtime=0))
        (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels), mtime=0))
    return folder


def tree_digest(folder) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*.png")):
        digest.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return digest.hexdigest()


def test_idx_files_read_back_and_every_deviation_is_named(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = tmp_path / "images-idx3-ubyte"
    raw.write_bytes(idx_bytes(images))
    assert np.array_equal(read_idx(raw, IMAGES_MAGIC), images)
    with pytest.raises(DataError, match="magic number 2051, expected 2049"):
        read_idx(raw, LABELS_MAGIC)
    truncated = tmp_path / "cut-idx3-ubyte.gz"
    truncated.write_bytes(gzip.compress(idx_bytes(images)[:-5]))
    with pytest.raises(DataError, match=r"truncated: 35 bytes, the header \(2, 3, 4\) promises 40"):
        read_idx(truncated, IMAGES_MAGIC)
    not_idx = tmp_path / "photo.gz"
    not_idx.write_bytes(gzip.compress(b"\x89PNG\r\n\x1a\n...."))
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(not_idx, IMAGES_MAGIC)
    broken_gzip = tmp_path / "broken.gz"
    broken_gzip.write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(DataError, match="cannot read it as an IDX file"):
        read_idx(broken_gzip, IMAGES_MAGIC)


def test_the_val_split_is_stratified_and_seeded():
    labels = np.repeat(np.arange(10), [60, 60, 60, 60, 60, 60, 60, 60, 61, 59])
    mask = stratified_split(labels, 50, seed=0)
    assert mask.sum() == 50 and [int(mask[labels == c].sum()) for c in range(10)] == [5] * 10
    assert np.array_equal(mask, stratified_split(labels, 50, seed=0))
    assert not np.array_equal(mask, stratified_split(labels, 50, seed=1))
    # shares that do not divide: the largest remainders get the extra image
    assert [int(stratified_split(labels, 7, 0)[labels == c].sum()) for c in range(10)].count(1) == 7


def test_the_folder_is_lossless_stratified_and_the_same_bytes_for_the_same_seed(tmp_path):
    source = write_source(tmp_path / "source")
    manifest = write_fashion_mnist(tmp_path / "a", source, val=10, seed=3)
    assert (manifest["train"], manifest["val"], manifest["test"]) == (50, 10, 20)
    out = tmp_path / "a"
    assert sorted(p.name for p in (out / "val").iterdir()) == [f"{i}_{name}" for i, name in enumerate(CLASSES)]
    assert all(len(list(folder.iterdir())) == 1 for folder in (out / "val").iterdir())
    # lossless: a PNG decodes to the IDX rows it came from
    images = read_idx(source / "t10k-images-idx3-ubyte.gz", IMAGES_MAGIC)
    labels = read_idx(source / "t10k-labels-idx1-ubyte.gz", LABELS_MAGIC)
    png = out / "test" / f"{labels[7]}_{CLASSES[labels[7]]}" / "test_00007.png"
    assert np.array_equal(np.asarray(Image.open(png)), images[7])
    # same seed, same bytes; another seed, another val split
    write_fashion_mnist(tmp_path / "b", source, val=10, seed=3)
    write_fashion_mnist(tmp_path / "c", source, val=10, seed=4)
    assert tree_digest(out) == tree_digest(tmp_path / "b")
    val_files = {folder: sorted(p.name for p in (folder / "val").rglob("*.png")) for folder in (out, tmp_path / "c")}
    assert val_files[out] != val_files[tmp_path / "c"]
    # written again with the same settings: kept as it is
    (out / "val" / "marker").write_text("kept")
    assert write_fashion_mnist(out, source, val=10, seed=3) == manifest and (out / "val" / "marker").exists()


def test_bad_input_is_one_error_line(tmp_path):
    source = write_source(tmp_path / "source")
    # images and labels that disagree in count
    labels = np.zeros(59, dtype=np.uint8)
    (source / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    result = gppq("data", "fashion-mnist", "--source", source, "--out", tmp_path / "out")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "holds 60 images" in result.stderr and "59 labels" in result.stderr
    assert not (tmp_path / "out").exists()
    missing = gppq("data", "fashion-mnist", "--source", tmp_path / "nowhere", "--out", tmp_path / "out")
    assert missing.returncode == 2 and "dataset-fashion-mnist" in missing.stderr
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("a user's file")
    with pytest.raises(DataError, match="did not write"):
        write_fashion_mnist(tmp_path / "mine", source)
    assert (tmp_path / "mine" / "notes.txt").exists()
