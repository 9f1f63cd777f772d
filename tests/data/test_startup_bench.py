"""``benchmarks/startup.py``: the trees it writes, the config it runs, the rows it reports.

Small real trees (a few classes); the 200,000-file tree is the same code with other counts.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import yaml
from PIL import Image

from gppq_dist.config import load_config
from gppq_dist.data.check import check_folder
from gppq_dist.data.layout import index_split
from gppq_dist.data.manifest import prepare_manifest
from tests.conftest import ROOT
from tests.data.test_manifest import config, walks_of


@pytest.fixture(scope="module")
def startup():
    spec = importlib.util.spec_from_file_location("startup_bench", ROOT / "benchmarks" / "startup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_tree_is_written_once_with_real_tiny_jpegs(startup, tmp_path):
    root = tmp_path / "imagenet"
    assert startup.ensure_tree(root, classes=4, per_class=5, val_per_class=2)
    assert startup.count_files(root) == {"train": 20, "val": 8}
    assert sorted(os.listdir(root / "train")) == ["n00000000", "n00000001", "n00000002", "n00000003"]
    report = check_folder(root, workers=0)
    assert report.ok and report.checked == 28
    with Image.open(root / "val" / "n00000003" / "n00000003_000001.JPEG") as image:
        assert image.size == (16, 16) and image.format == "JPEG"
    inode = os.stat(root / "train" / "n00000000" / "n00000000_000000.JPEG").st_ino
    assert not startup.ensure_tree(root, classes=4, per_class=5, val_per_class=2)  # cached
    assert os.stat(root / "train" / "n00000000" / "n00000000_000000.JPEG").st_ino == inode
    assert startup.ensure_tree(root, classes=4, per_class=6, val_per_class=2)  # other counts: rewritten
    assert startup.count_files(root) == {"train": 24, "val": 8}


def test_an_unfinished_tree_is_written_again(startup, tmp_path):
    root = tmp_path / "imagenet"
    startup.ensure_tree(root, classes=2, per_class=3, val_per_class=1)
    startup._stamp(root).unlink()  # as if interrupted before the stamp
    (root / "train" / "n00000000" / "partial.JPEG").write_bytes(b"")
    assert startup.ensure_tree(root, classes=2, per_class=3, val_per_class=1)
    assert not (root / "train" / "n00000000" / "partial.JPEG").exists()
    assert check_folder(root, workers=0).ok


def test_the_smaller_tree_links_the_first_images_of_every_class(startup, tmp_path):
    large, small = tmp_path / "large", tmp_path / "small"
    startup.ensure_tree(large, classes=3, per_class=5, val_per_class=2)
    assert startup.ensure_subset(small, large, per_class=2, val_per_class=1)
    assert startup.count_files(small) == {"train": 6, "val": 3}
    linked = small / "train" / "n00000001" / "n00000001_000001.JPEG"
    assert os.stat(linked).st_ino == os.stat(large / "train" / "n00000001" / "n00000001_000001.JPEG").st_ino
    assert not (small / "train" / "n00000001" / "n00000001_000002.JPEG").exists()
    assert not startup.ensure_subset(small, large, per_class=2, val_per_class=1)
    data = config(small)
    manifest, walks = walks_of(prepare_manifest, data, tmp_path / "run")
    assert walks == 1 and manifest.samples("train") == index_split(data, "train").samples


def test_the_benchmark_config_is_a_valid_tiny_run(startup, tmp_path):
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(startup.bench_config(tmp_path / "tree", "startup_x"), sort_keys=False))
    cfg = load_config(path)
    assert cfg.train.max_steps == 1 and cfg.kmeans.iterations == 1 and not cfg.tracking.enabled
    assert cfg.model.num_classes == 1000 and cfg.data.image_size == 16 and cfg.name == "startup_x"


def test_a_row_is_launch_to_first_step_less_coding_and_baseline_eval(startup):
    summary = {"timing": {"first_step_unix": 1000.0 + 42.5, "coding_s": 20.0, "baseline_eval_s": 15.0,
                          "train_loop_s": 1.0},
               "tree_walks": [1, 0]}
    row = startup.startup_row(summary, 1000.0, 203_000, "warm")
    assert row["to_first_step_s"] == pytest.approx(42.5) and row["overhead_s"] == pytest.approx(7.5)
    assert row["walks"] == [1, 0] and startup.goal_met(row) is True
    assert startup.goal_met({**row, "walks": [1, 1]}) is False
    assert startup.goal_met({**row, "overhead_s": 10.5}) is False
    assert startup.goal_met({**row, "cache": "cold"}) is None
    table = startup.train_table([row])
    assert "| 203,000 | warm | 42.5 | 20.0 | 15.0 | 7.5 | 1, 0 | met |" in table
