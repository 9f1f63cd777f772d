"""The run's data manifest: one walk of the tree on rank 0, none elsewhere, none on resume.

Real JPEG trees (``write_synthetic``), real data checks, real gloo processes. Before a
manifest is made, every folder of a tree gets an mtime far in the past (as a data set
copied long ago has), so a file added afterwards changes its folder's mtime whatever the
file system's timestamp granularity.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from gppq_dist.config import DataConfig
from gppq_dist.data.check import CACHE_FOLDER, check_data, tree_walks
from gppq_dist.data.layout import index_split
from gppq_dist.data.loaders import build_loader, checked_samples
from gppq_dist.data.manifest import MANIFEST, load_manifest, prepare_manifest, write_manifest
from gppq_dist.data.synthetic import write_synthetic
from gppq_dist.errors import DataError
from tests.distributed_helpers import run_gloo

LONG_AGO_NS = 1_000_000_000 * 10**9  # 2001-09-09


def make_tree(root: Path, classes: int = 3, per_class: int = 4) -> Path:
    write_synthetic(root, classes=classes, per_class=per_class, size=(40, 30), val_per_class=2, seed=3)
    age(root)
    return root


def age(root: Path) -> None:
    """Every folder under ``root`` (and ``root``) gets an mtime long ago."""
    for folder in [root, *(path for path in root.rglob("*") if path.is_dir())]:
        os.utime(folder, ns=(LONG_AGO_NS, LONG_AGO_NS))


def config(root: Path | str, **overrides) -> DataConfig:
    return DataConfig(**{"root": str(root), "image_size": 32, "resize_size": 32, "workers": 0, **overrides})


def walks_of(function, *args):
    """``function(*args)`` and the tree walks it made."""
    before = tree_walks()
    result = function(*args)
    return result, tree_walks() - before


def add_image(root: Path, name: str = "added.JPEG", into: str = "train/c001") -> Path:
    target = root / into / name
    shutil.copy(next((root / "train" / "c000").iterdir()), target)
    return target


def _rank_manifest(rank: int, world_size: int, root: str, run_dir: str):
    """Rank 0 prepares the manifest, the others load it after rank 0's flag arrives."""
    data = config(root)
    before = tree_walks()
    ready = torch.zeros(1)
    if rank == 0:
        manifest = prepare_manifest(data, run_dir)
        ready += 1
    dist.broadcast(ready, src=0)  # the barrier: rank 0's manifest is on disk
    if rank != 0:
        manifest = load_manifest(data, run_dir)
    return {"walks": tree_walks() - before, "ready": int(ready.item()), "classes": manifest.classes,
            "train": manifest.samples("train"), "val": manifest.samples("val")}


def test_two_ranks_walk_once_on_rank_0_and_never_elsewhere_and_not_again_on_resume(tmp_path):
    root, run_dir = make_tree(tmp_path / "data"), tmp_path / "run"
    assert not (root / CACHE_FOLDER).exists()  # cold check cache
    results = run_gloo(_rank_manifest, 2, str(root), str(run_dir))
    assert [result["walks"] for result in results] == [1, 0]
    assert [result["ready"] for result in results] == [1, 1]
    data = config(root)
    for split in ("train", "val"):
        expected = checked_samples(data, split)
        assert len(expected) == (12 if split == "train" else 6)
        assert results[0][split] == results[1][split] == expected
    assert results[0]["classes"] == results[1]["classes"] == ["c000", "c001", "c002"]

    resumed, walks = walks_of(prepare_manifest, data, run_dir)
    assert walks == 0 and resumed.reused
    assert resumed.samples("train") == results[0]["train"]

    added = add_image(root)
    fresh, walks = walks_of(prepare_manifest, data, run_dir)
    assert walks == 1 and not fresh.reused
    assert (str(added), 1) in fresh.samples("train")
    assert fresh.samples("train") == checked_samples(data, "train")
    assert len(fresh.samples("train")) == 13


def test_one_walk_on_a_cold_and_on_a_warm_check_cache_and_none_to_load(tmp_path):
    root, run_dir = make_tree(tmp_path / "data"), tmp_path / "run"
    data = config(root)
    cold, walks = walks_of(write_manifest, data, run_dir)
    assert walks == 1 and (root / CACHE_FOLDER).is_dir()
    assert check_data(data).cached  # the check's report is cached for the warm case
    (run_dir / MANIFEST).unlink()
    warm, walks = walks_of(prepare_manifest, data, run_dir)
    assert walks == 1 and not warm.reused
    loaded, walks = walks_of(load_manifest, data, run_dir)
    assert walks == 0
    for split in ("train", "val"):
        assert cold.samples(split) == warm.samples(split) == loaded.samples(split) == index_split(data, split).samples


def test_checked_samples_walks_the_tree_once(tmp_path):
    data = config(make_tree(tmp_path / "data"))
    samples, walks = walks_of(checked_samples, data, "train")
    assert walks == 1 and samples == index_split(data, "train").samples


@pytest.mark.parametrize("change", ["add", "remove", "rename", "new_class", "nested"])
def test_a_changed_tree_makes_a_new_manifest(tmp_path, change):
    root, run_dir = make_tree(tmp_path / "data"), tmp_path / "run"
    data = config(root)
    if change == "nested":  # a folder below a class folder, then a file added in it
        (root / "train" / "c002" / "more").mkdir()
        add_image(root, "first.JPEG", "train/c002/more")
        age(root)
    prepare_manifest(data, run_dir)
    victim = sorted((root / "val" / "c002").iterdir())[0]
    if change == "add":
        add_image(root)
    elif change == "remove":
        victim.unlink()
    elif change == "rename":
        victim.rename(victim.with_name("renamed.JPEG"))
    elif change == "new_class":
        for split in ("train", "val"):
            (root / split / "c003").mkdir()
            add_image(root, into=f"{split}/c003")
    else:
        add_image(root, "second.JPEG", "train/c002/more")
    manifest, walks = walks_of(prepare_manifest, data, run_dir)
    assert walks == 1 and not manifest.reused
    for split in ("train", "val"):
        assert manifest.samples(split) == checked_samples(data, split)


def test_a_file_rewritten_in_place_keeps_the_manifest(tmp_path):
    """What the fingerprint does not see (documented): a file rewritten under its name."""
    root, run_dir = make_tree(tmp_path / "data"), tmp_path / "run"
    data = config(root)
    prepare_manifest(data, run_dir)
    image = sorted((root / "train" / "c000").iterdir())[0]
    image.write_bytes(image.read_bytes() + b"\0")
    manifest, walks = walks_of(prepare_manifest, data, run_dir)
    assert walks == 0 and manifest.reused


@pytest.mark.parametrize("other", ["on_bad_file", "root", "val_list"])
def test_a_manifest_made_from_other_settings_is_not_reused(tmp_path, other):
    root, run_dir = make_tree(tmp_path / "data"), tmp_path / "run"
    prepare_manifest(config(root), run_dir)
    if other == "on_bad_file":
        data = config(root, on_bad_file="skip")
    elif other == "root":
        data = config(shutil.copytree(root, tmp_path / "copy"))
    else:
        listing = tmp_path / "val.txt"
        listing.write_text("".join(f"{Path(path).relative_to(root)} {label}\n"
                                   for path, label in index_split(config(root), "val").samples[::2]))
        data = config(root, val_list=str(listing))
    with pytest.raises(DataError) as raised:
        load_manifest(data, run_dir)
    assert str(run_dir / MANIFEST) in str(raised.value) and f"data.{other}" in str(raised.value)
    manifest, walks = walks_of(prepare_manifest, data, run_dir)
    assert walks == 1 and not manifest.reused
    assert manifest.settings["root"] == data.root and manifest.settings[other] == getattr(data, other)
    assert manifest.samples("val") == checked_samples(data, "val")
    assert load_manifest(data, run_dir).samples("val") == manifest.samples("val")


def test_an_edited_file_list_makes_a_new_manifest(tmp_path):
    root, run_dir = make_tree(tmp_path / "data"), tmp_path / "run"
    val = index_split(config(root), "val").samples
    listing = tmp_path / "val.txt"
    listing.write_text("".join(f"{Path(path).relative_to(root)} {label}\n" for path, label in val[::2]))
    os.utime(listing, ns=(LONG_AGO_NS, LONG_AGO_NS))
    data = config(root, val_list=str(listing))
    first = prepare_manifest(data, run_dir)
    assert first.samples("val") == val[::2] == checked_samples(data, "val")
    listing.write_text(listing.read_text() + "".join(f"{Path(path).relative_to(root)} {label}\n"
                                                     for path, label in val[1::2]))
    os.utime(listing, ns=(LONG_AGO_NS, LONG_AGO_NS))  # the size alone must tell
    second, walks = walks_of(prepare_manifest, data, run_dir)
    assert walks == 1 and second.samples("val") == val[::2] + val[1::2] == checked_samples(data, "val")


@pytest.mark.parametrize("damage", ["truncated", "not_gzip", "wrong_lengths", "format"])
def test_an_unreadable_manifest_is_a_data_error_naming_the_file(tmp_path, damage):
    root, run_dir = make_tree(tmp_path / "data"), tmp_path / "run"
    data = config(root)
    write_manifest(data, run_dir)
    path = run_dir / MANIFEST
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:40])
    elif damage == "not_gzip":
        path.write_text("{}")
    else:
        document = json.loads(gzip.decompress(path.read_bytes()))
        if damage == "wrong_lengths":
            document["splits"]["train"]["names"].pop()
        else:
            document["format"] = 99
        path.write_bytes(gzip.compress(json.dumps(document).encode()))
    with pytest.raises(DataError, match="unreadable") as raised:
        load_manifest(data, run_dir)
    assert str(path) in str(raised.value)
    # rank 0 replaces it (one walk), after which the other ranks read it again
    manifest, walks = walks_of(prepare_manifest, data, run_dir)
    assert walks == 1 and not manifest.reused
    assert load_manifest(data, run_dir).samples("train") == checked_samples(data, "train")


def test_a_missing_manifest_is_a_data_error_naming_the_file(tmp_path):
    with pytest.raises(DataError, match="does not exist") as raised:
        load_manifest(config(make_tree(tmp_path / "data")), tmp_path / "run")
    assert str(tmp_path / "run" / MANIFEST) in str(raised.value)


def test_bad_files_are_handled_as_checked_samples_does(tmp_path):
    root, run_dir = make_tree(tmp_path / "data"), tmp_path / "run"
    broken = add_image(root, "broken.JPEG")
    broken.write_bytes(broken.read_bytes()[:100])
    with pytest.raises(DataError) as from_check:
        checked_samples(config(root), "train")
    with pytest.raises(DataError) as from_manifest:
        prepare_manifest(config(root), run_dir)
    assert str(from_manifest.value) == str(from_check.value) and "broken.JPEG" in str(from_check.value)
    assert not (run_dir / MANIFEST).exists()
    data = config(root, on_bad_file="skip")
    manifest = prepare_manifest(data, run_dir)
    assert manifest.samples("train") == checked_samples(data, "train")
    assert str(broken) not in dict(manifest.samples("train")) and manifest.count("train") == 12
    assert manifest.splits["train"]["skipped"] == 1


def test_sizes_and_mtimes_are_those_of_the_files(tmp_path):
    root, run_dir = make_tree(tmp_path / "data"), tmp_path / "run"
    manifest = prepare_manifest(config(root), run_dir)
    paths = [path for path, _ in manifest.samples("val")]
    assert manifest.sizes("val") == [os.stat(path).st_size for path in paths]
    assert manifest.mtimes("val") == [os.stat(path).st_mtime_ns for path in paths]


@pytest.mark.parametrize("spelling", ["relative", "trailing_slash", "dot", "dot_slash"])
def test_paths_are_spelled_as_checked_samples_spells_them(tmp_path, monkeypatch, spelling):
    make_tree(tmp_path / "data")
    monkeypatch.chdir(tmp_path / "data" if spelling.startswith("dot") else tmp_path)
    root = {"relative": "data", "trailing_slash": "data/", "dot": ".", "dot_slash": "./"}[spelling]
    data = config(root)
    manifest = prepare_manifest(data, tmp_path / "run")
    for split in ("train", "val"):
        assert manifest.samples(split) == checked_samples(data, split)
        assert load_manifest(data, tmp_path / "run").samples(split) == checked_samples(data, split)
    assert prepare_manifest(data, tmp_path / "run").reused


def test_file_list_paths_outside_the_root_and_absolute_ones(tmp_path):
    root, run_dir = make_tree(tmp_path / "data"), tmp_path / "run"
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    val = index_split(config(root), "val").samples
    moved = outside / "moved.JPEG"
    shutil.copy(val[0][0], moved)
    listing = tmp_path / "val.txt"
    listing.write_text(f"../elsewhere/moved.JPEG 0\n{moved} 0\n{val[1][0]} 0\n"
                       + "".join(f"{Path(path).relative_to(root)} {label}\n" for path, label in val[2:]))
    age(outside)
    data = config(root, val_list=str(listing))
    manifest = prepare_manifest(data, run_dir)
    assert manifest.samples("val")[:2] == [(str(root / "../elsewhere/moved.JPEG"), 0), (str(moved), 0)]
    assert manifest.samples("val") == checked_samples(data, "val") == load_manifest(data, run_dir).samples("val")
    assert prepare_manifest(data, run_dir).reused
    moved.unlink()  # a listed file outside the root disappears: its folder's mtime tells
    with pytest.raises(DataError, match="unreadable"):
        prepare_manifest(data, run_dir)


@pytest.mark.parametrize("loader", ["dali", "torchvision"])
def test_a_loader_given_the_samples_neither_checks_nor_walks(tmp_path, loader):
    root, run_dir = make_tree(tmp_path / "data"), tmp_path / "run"
    data = config(root, loader=loader, device="cpu")
    manifest = prepare_manifest(data, run_dir)
    shutil.rmtree(root / CACHE_FOLDER)
    samples = manifest.samples("val")
    batches, walks = walks_of(lambda: build_loader(data, "val", batch_size=4, samples=samples,
                                                   device=torch.device("cpu")))
    assert walks == 0 and not (root / CACHE_FOLDER).exists()
    assert batches.device == torch.device("cpu")
    labels = Counter(label for _, batch in batches for label in batch.tolist())
    assert labels == {0: 2, 1: 2, 2: 2}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("loader,decode", [("dali", "gpu"), ("dali", "cpu"), ("torchvision", "auto")])
def test_batches_arrive_on_the_requested_gpu(tmp_path, loader, decode):
    root, run_dir = make_tree(tmp_path / "data"), tmp_path / "run"
    data = config(root, loader=loader, device=decode)
    manifest = prepare_manifest(data, run_dir)
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    for split in ("train", "val"):
        batches = build_loader(data, split, batch_size=4, samples=manifest.samples(split), device=device)
        assert batches.device == device
        images, labels = next(iter(batches))
        assert images.device == labels.device == device
        assert images.shape == (4, 3, 32, 32) and labels.dtype == torch.int64


def test_the_walk_lists_what_sorted_rglob_lists_in_its_order(tmp_path):
    """The check's walk (``entries_under``) against ``sorted(Path.rglob("*"))``: nested
    folders whose names sort differently as strings and as paths, hidden files, a linked
    folder (listed, not entered) and a dangling link (left out)."""
    from gppq_dist.data.layout import entries_under

    top = tmp_path / "class"
    for relative in ["a/b/x.JPEG", "a-b/y.JPEG", "a.JPEG", "B.png", ".hidden", "a/z.txt", "deep/er/est/q.jpg"]:
        (top / relative).parent.mkdir(parents=True, exist_ok=True)
        (top / relative).write_bytes(b"x")
    (top / "linked").symlink_to(top / "a", target_is_directory=True)
    (top / "dangling.JPEG").symlink_to(tmp_path / "missing.JPEG")
    expected = [str(path) for path in sorted(top.rglob("*")) if path.exists()]
    assert [path for path, _ in entries_under(top)] == expected
    assert str(top / "linked") in expected and str(top / "linked" / "b") not in expected
