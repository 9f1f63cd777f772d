"""``build_loader``: the pre-flight check in front of both loaders, and the fallbacks.

Real JPEG folders with real bad files (a corrupt JPEG, a truncated one, a text file named
``.JPEG``), real DALI CPU pipelines and torchvision loaders.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from gppq_dist.data.dali import DaliLoader
from gppq_dist.data.folder import TorchvisionLoader
from gppq_dist.data.layout import index_split
from gppq_dist.data.loaders import build_loader, checked_samples
from gppq_dist.data.synthetic import write_synthetic
from gppq_dist.errors import DataError
from tests.conftest import ROOT
from tests.data.test_dali import data_config

LOADERS = {"dali": DaliLoader, "torchvision": TorchvisionLoader}
BAD_FILES = ("train/c001/corrupt.JPEG", "train/c001/truncated.JPEG", "train/c002/notes.JPEG")


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clean")
    write_synthetic(root, classes=3, per_class=4, size=(64, 48), val_per_class=2)
    return root


@pytest.fixture(scope="module")
def with_bad_files(tmp_path_factory) -> Path:
    """12 good train images (4 per class) plus three bad ones in classes c001 and c002."""
    root = tmp_path_factory.mktemp("bad")
    write_synthetic(root, classes=3, per_class=4, size=(64, 48), val_per_class=2)
    good = (root / "train/c000/train_000_00000.JPEG").read_bytes()
    noise = np.random.default_rng(0).integers(0, 256, len(good) - 200, dtype=np.uint8).tobytes()
    (root / BAD_FILES[0]).write_bytes(good[:200] + noise)  # valid headers, garbage after
    (root / BAD_FILES[1]).write_bytes(good[: len(good) // 2])
    (root / BAD_FILES[2]).write_text("not an image\n")
    return root


def copy_of(folder: Path, tmp_path: Path) -> Path:
    """A copy without the check's cache, to break in one test only."""
    shutil.copytree(folder, tmp_path / "data", ignore=shutil.ignore_patterns(".gppq_check"))
    return tmp_path / "data"


@pytest.mark.parametrize("loader", ["dali", "torchvision"])
def test_bad_files_stop_the_run_before_any_batch(with_bad_files, loader):
    with pytest.raises(DataError) as raised:
        build_loader(data_config(with_bad_files, loader=loader, on_bad_file="error"), "train", batch_size=4)
    message = str(raised.value)
    for name in BAD_FILES:
        assert name in message
    assert "on_bad_file: skip" in message


@pytest.mark.parametrize("loader", ["dali", "torchvision"])
def test_skip_leaves_bad_files_out_and_reads_every_good_one(with_bad_files, loader, caplog):
    data = data_config(with_bad_files, loader=loader, on_bad_file="skip")
    good = [(path, label) for path, label in index_split(data, "train").samples
            if not path.endswith(BAD_FILES)]
    assert len(good) == 12
    assert checked_samples(data, "train") == good
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gppq_dist.data.loaders"):
        batches = build_loader(data, "train", batch_size=4)  # 12 good files: 3 full batches
    assert type(batches) is LOADERS[loader]
    skipped = [record.getMessage() for record in caplog.records if "skipping" in record.getMessage()]
    assert skipped == ["data: skipping 3 bad file(s) of 15 in train (data.on_bad_file: skip)"]
    labels = [label for _, batch in batches for label in batch.tolist()]
    # every good file once: 4 per class (a bad file read would add to c001 or c002, or crash)
    assert Counter(labels) == {0: 4, 1: 4, 2: 4}


@pytest.mark.parametrize("on_bad_file", ["error", "skip"])
def test_an_empty_class_folder_is_an_error_in_both_modes(clean, tmp_path, on_bad_file):
    root = copy_of(clean, tmp_path)
    (root / "train" / "c003").mkdir()
    (root / "val" / "c003").mkdir()
    with pytest.raises(DataError, match="empty_class") as raised:
        build_loader(data_config(root, on_bad_file=on_bad_file), "train", batch_size=4)
    assert "train/c003" in str(raised.value)


@pytest.mark.parametrize("on_bad_file", ["error", "skip"])
def test_a_val_class_missing_from_train_is_an_error_in_both_modes(clean, tmp_path, on_bad_file):
    root = copy_of(clean, tmp_path)
    shutil.copytree(root / "val" / "c002", root / "val" / "c009")
    with pytest.raises(DataError, match="class_mismatch") as raised:
        build_loader(data_config(root, on_bad_file=on_bad_file), "val")
    assert "c009" in str(raised.value)


def test_too_few_train_images_for_one_batch_per_rank(clean):
    with pytest.raises(DataError, match="fewer than one batch"):
        build_loader(data_config(clean), "train", world_size=2, batch_size=8)  # 12 images, 6 per rank


def run_python(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter (warnings are once per process), logging to stderr."""
    prelude = "import logging; logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(message)s')\n"
    return subprocess.run([sys.executable, "-c", prelude + code], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


BUILD_BOTH = """
from gppq_dist.config import DataConfig
from gppq_dist.data.loaders import build_loader
data = DataConfig(root={root!r}, image_size=32, resize_size=40, workers=0, device={device!r})
for split in ("train", "val"):
    loader = build_loader(data, split, batch_size=4)
    images, labels = next(iter(loader))
    print(split, type(loader).__name__, images.device, tuple(images.shape), labels.dtype)
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback of a machine without a GPU")
def test_gpu_requested_without_a_gpu_warns_once_and_uses_dali_on_the_cpu(clean):
    result = run_python(BUILD_BOTH.format(root=str(clean), device="gpu"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "train DaliLoader cpu (4, 3, 32, 32) torch.int64",
        "val DaliLoader cpu (4, 3, 32, 32) torch.int64",
    ]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("WARNING")]
    assert warnings == ["WARNING data.device is gpu but no GPU is visible; DALI decodes on the CPU"]
    assert "Traceback" not in result.stderr


def test_without_dali_the_torchvision_loader_is_used_with_one_warning(clean):
    # An interpreter in which `import nvidia.dali` fails, as it does where DALI is not installed.
    block_dali = "import sys; sys.modules['nvidia.dali'] = None\n"
    result = run_python(block_dali + BUILD_BOTH.format(root=str(clean), device="auto"))
    assert result.returncode == 0, result.stderr
    assert [line.split()[1] for line in result.stdout.splitlines()] == ["TorchvisionLoader"] * 2
    warnings = [line for line in result.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and "DALI cannot be imported" in warnings[0] and "torchvision" in warnings[0]
