"""Synthetic ImageNet-layout folders: counts, sizes, real JPEGs, determinism, the CLI."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gppq_dist.data.synthetic import write_synthetic
from tests.conftest import gppq


def files_by_name(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_counts_and_layout(tmp_path):
    counts = write_synthetic(tmp_path, classes=3, per_class=5, size=(64, 48), val_per_class=2)
    assert counts == {"train": 15, "val": 6}
    for split, per_class in (("train", 5), ("val", 2)):
        assert sorted(p.name for p in (tmp_path / split).iterdir()) == ["c000", "c001", "c002"]
        for folder in (tmp_path / split).iterdir():
            assert len(list(folder.glob("*.JPEG"))) == per_class


def test_val_defaults_to_a_fifth_of_train_and_at_least_one(tmp_path):
    assert write_synthetic(tmp_path / "a", classes=2, per_class=10, size=(16, 16)) == {"train": 20, "val": 4}
    assert write_synthetic(tmp_path / "b", classes=2, per_class=3, size=(16, 16)) == {"train": 6, "val": 2}


def test_images_are_real_jpegs_of_the_requested_size(tmp_path):
    write_synthetic(tmp_path, classes=2, per_class=3, size=(64, 48), val_per_class=1)
    paths = sorted(tmp_path.rglob("*.JPEG"))
    assert len(paths) == 8
    means = {}
    for path in paths:
        with Image.open(path) as image:
            image.load()
            assert image.format == "JPEG" and image.mode == "RGB" and image.size == (64, 48)
            pixels = np.asarray(image, dtype=np.float32)
        assert pixels.std() > 5  # a textured picture, not flat colour
        means.setdefault(path.parent.name, []).append(pixels.mean(axis=(0, 1)))
    # Each class has its own tint, so the class mean colours differ.
    assert np.abs(np.mean(means["c000"], axis=0) - np.mean(means["c001"], axis=0)).max() > 1


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        write_synthetic(tmp_path / name, classes=2, per_class=2, size=(64, 48), val_per_class=1, seed=seed)
    first, again, other = (files_by_name(tmp_path / name) for name in "abc")
    assert first == again
    assert first.keys() == other.keys()
    assert all(first[name] != other[name] for name in first)


def test_cli_writes_the_same_folder_as_the_function(tmp_path):
    result = gppq("data", "synthetic", "--classes", "2", "--per-class", "3", "--size", "64x48",
                  "--out", tmp_path / "cli", "--val-per-class", "1", "--seed", "5", check=True)
    assert "6 train and 2 val images, 2 classes, 64x48" in result.stdout
    write_synthetic(tmp_path / "api", classes=2, per_class=3, size=(64, 48), val_per_class=1, seed=5)
    assert files_by_name(tmp_path / "cli") == files_by_name(tmp_path / "api")


@pytest.mark.parametrize("size", ["64", "64by48", "64x", "0x48", "-64x48"])
def test_cli_bad_size_is_a_one_line_error(tmp_path, size):
    result = gppq("data", "synthetic", "--classes", "2", "--per-class", "3", f"--size={size}", "--out", tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --size") and "WIDTHxHEIGHT" in lines[0]
    assert not any(tmp_path.iterdir())
