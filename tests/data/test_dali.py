"""The DALI pipelines against torchvision, and sharding on real gloo processes (CPU).

Real JPEGs (``write_synthetic``, 64x48), real DALI CPU pipelines, real torchvision
loaders; the GPU variant runs only where torch sees a GPU.
"""

from __future__ import annotations

import pytest
import torch
from torchvision import datasets

from gppq_dist.config import DataConfig
from gppq_dist.data.dali import DaliLoader
from gppq_dist.data.folder import LoaderSpec, TorchvisionLoader, train_steps
from gppq_dist.data.layout import index_split
from gppq_dist.data.synthetic import write_synthetic
from tests.distributed_helpers import run_gloo

# One level of an 8-bit pixel, in normalized units, for the smallest ImageNet std (0.224).
ONE_LEVEL = 1.0 / (255.0 * 0.224)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic(root, classes=3, per_class=11, size=(64, 48), val_per_class=4, seed=1)
    return root


def data_config(root, **overrides) -> DataConfig:
    """Small crops (32 of 64x48 images), loading in this process; ``overrides`` win."""
    return DataConfig(**{"root": str(root), "image_size": 32, "resize_size": 40, "workers": 0, **overrides})


def make_loader(kind: str, samples, data, train, batch_size, rank=0, world_size=1, seed=0):
    spec = LoaderSpec(samples, data, train, batch_size, rank, world_size, seed)
    return DaliLoader(spec) if kind == "dali" else TorchvisionLoader(spec)


def _epoch_orders(rank, world_size, kind, root, samples, batch_size):
    """Per epoch, the sample ids (labels) this rank saw, batch by batch; also a second
    loader with the same seed (epoch 0) and one with another seed."""
    data = data_config(root)
    loader = make_loader(kind, samples, data, True, batch_size, rank, world_size, seed=5)
    orders = {}
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        batches = []
        for images, labels in loader:
            assert images.shape == (batch_size, 3, 32, 32) and images.dtype == torch.float32
            assert labels.dtype == torch.int64
            batches.append(labels.tolist())
        orders[epoch] = batches
    same_seed = [labels.tolist() for _, labels in make_loader(kind, samples, data, True, batch_size, rank,
                                                              world_size, seed=5)]
    other_seed = [labels.tolist() for _, labels in make_loader(kind, samples, data, True, batch_size, rank,
                                                               world_size, seed=6)]
    return {"orders": orders, "same_seed": same_seed, "other_seed": other_seed, "len": len(loader)}


def _both_kinds(rank, world_size, root, samples, batch_size):
    return {kind: _epoch_orders(rank, world_size, kind, root, samples, batch_size) for kind in ("dali", "torchvision")}


@pytest.fixture(scope="module")
def two_rank_orders(folder):
    """Both loaders on one spawned pair of ranks: 31 samples labelled by their index (a label
    names the file), batch 4."""
    paths = index_split(data_config(folder), "train").paths[:31]
    samples = [(path, index) for index, path in enumerate(paths)]
    return run_gloo(_both_kinds, 2, str(folder), samples, 4)


@pytest.mark.parametrize("kind", ["dali", "torchvision"])
def test_two_ranks_get_disjoint_shards_and_equal_steps(two_rank_orders, kind):
    # Batch 4 on 2 ranks: DALI's shards hold 15 and 16 samples, 3 and 4 full batches; both
    # ranks must stop at 3.
    batch_size, steps = 4, train_steps(31, 2, 4)
    assert steps == 3
    ranks = [rank[kind] for rank in two_rank_orders]

    for epoch in (0, 1):
        seen = [[i for batch in rank["orders"][epoch] for i in batch] for rank in ranks]
        assert [len(rank["orders"][epoch]) for rank in ranks] == [steps, steps]
        assert not set(seen[0]) & set(seen[1]), f"epoch {epoch}: ranks share samples"
        everything = seen[0] + seen[1]
        assert len(set(everything)) == len(everything) == 2 * steps * batch_size  # each once
        assert set(everything) <= set(range(31))  # the rest is the dropped tail
    for rank in ranks:
        assert rank["len"] == steps
        assert rank["orders"][0] != rank["orders"][1]  # a new epoch, a new order
        assert rank["same_seed"] == rank["orders"][0]  # same seed and epoch: same order
        assert rank["other_seed"] != rank["orders"][0]


@pytest.mark.parametrize("kind", ["dali", "torchvision"])
def test_labels_are_imagefolder_labels(folder, kind):
    data = data_config(folder)
    for split in ("train", "val"):
        reference = datasets.ImageFolder(str(folder / split))
        index = index_split(data, split)
        assert index.classes == reference.classes
        assert index.samples == [(path, label) for path, label in reference.samples]
    # and the loader hands them out unchanged (val is read in order)
    loader = make_loader(kind, index_split(data, "val").samples, data, False, batch_size=5)
    labels = torch.cat([labels for _, labels in loader]).tolist()
    assert labels == datasets.ImageFolder(str(folder / "val")).targets


@pytest.mark.parametrize("kind", ["dali", "torchvision"])
def test_val_yields_each_shard_sample_once_with_a_partial_last_batch(folder, kind):
    val = index_split(data_config(folder), "val").paths  # 12 images
    samples = [(path, index) for index, path in enumerate(val)]
    seen = []
    for rank in range(3):  # shards of 4 with batch 3: batches of 3 and 1
        loader = make_loader(kind, samples, data_config(folder), False, 3, rank, 3)
        sizes = [len(labels) for _, labels in loader]
        assert sizes == [3, 1] and len(loader) == 2
        seen += [i for _, labels in loader for i in labels.tolist()]
    assert sorted(seen) == list(range(12))


# (resize_size, image_size) for 64x48 images: 40 -> 53x40, crop offset 10.5 (rounds to 10);
# 41 -> 54.67x41 (torchvision truncates to 54); 42 -> 56x42, offset 11.5 (rounds to 12).
@pytest.mark.parametrize("resize_size,image_size", [(40, 32), (41, 32), (42, 33)])
def test_dali_val_batches_match_torchvision(folder, resize_size, image_size):
    """DALI's CPU val pipeline against torchvision's ``Resize`` + ``CenterCrop``.

    Both decode with libjpeg-turbo (identical pixels) and use torchvision's output size
    and crop window, so what differs is the resize filter: PIL's antialiased bilinear in
    fixed-point arithmetic against DALI's float linear filter with antialiasing. Measured:
    at most 1 of 255 levels per pixel (max |diff| = 0.0175 after normalization, mean about
    0.003); a one-pixel shift of the crop would give a mean near 0.2. Tolerance: 2 levels.
    """
    data = data_config(folder, resize_size=resize_size, image_size=image_size)
    samples = index_split(data, "val").samples
    dali = torch.cat([images for images, _ in make_loader("dali", samples, data, False, 5)])
    reference = torch.cat([images for images, _ in make_loader("torchvision", samples, data, False, 5)])
    assert dali.shape == reference.shape == (len(samples), 3, image_size, image_size)
    difference = (dali - reference).abs()
    assert difference.max() <= 2 * ONE_LEVEL
    assert difference.mean() <= 0.25 * ONE_LEVEL


def test_train_batches_are_normalized_crops(folder):
    """Train pixels land in the normalized range of the synthetic images' palette, and the
    crop is random: two epochs of the same images differ."""
    data = data_config(folder, horizontal_flip=True)
    samples = index_split(data, "train").samples
    loader = make_loader("dali", samples, data, True, batch_size=33)
    first = next(iter(loader))[0]
    loader.set_epoch(1)
    second = next(iter(loader))[0]
    low = (0 - max(data.mean)) / min(data.std)
    high = (1 - min(data.mean)) / min(data.std)
    assert low <= float(first.min()) and float(first.max()) <= high
    assert abs(float(first.mean())) < 1.5  # normalized, not 0-255
    assert not torch.equal(first, second)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_pipeline_matches_cpu_pipeline(folder):
    data = data_config(folder, device="gpu")
    samples = index_split(data, "val").samples
    gpu = list(DaliLoader(LoaderSpec(samples, data, False, 5), device_id=0))
    assert gpu[0][0].device.type == "cuda" and gpu[0][1].dtype == torch.int64
    cpu = torch.cat([images for images, _ in make_loader("dali", samples, data, False, 5)])
    # nvJPEG's IDCT differs from libjpeg-turbo's by a few levels
    assert (torch.cat([images.cpu() for images, _ in gpu]) - cpu).abs().mean() <= 2 * ONE_LEVEL
    train = DaliLoader(LoaderSpec(samples, data, True, 4), device_id=0)
    images, labels = next(iter(train))
    assert images.shape == (4, 3, 32, 32) and images.is_cuda and labels.is_cuda


@pytest.mark.parametrize("kind", ["dali", "torchvision"])
@pytest.mark.parametrize("saved_position", [True, False])
def test_a_resumed_epoch_yields_exactly_the_rest_of_the_epoch(folder, kind, saved_position):
    # Rank 1 of 2, batch 4: 4 steps; stop after 2, then a new loader resumes at batch 2
    # from the saved position (DALI: its checkpoint; torchvision: none needed), or with
    # no position (DALI reads and drops the first batches). Same pixels, same labels.
    data = data_config(folder)
    samples = index_split(data, "train").samples
    spec = LoaderSpec(samples, data, True, 4, rank=1, world_size=2, seed=3)
    first = make_loader(kind, samples, data, True, 4, 1, 2, seed=3)
    first.set_epoch(1)
    whole, position = [], None
    for step, batch in enumerate(first, start=1):
        whole.append(batch)
        if step == 2:
            position = first.position()
    assert len(whole) == spec.steps == 4
    assert bool(position) == (kind == "dali")  # torchvision's position is the step itself
    resumed = make_loader(kind, samples, data, True, 4, 1, 2, seed=3)
    resumed.set_epoch(1, start_step=2, state=position if saved_position else "")
    rest = list(resumed)
    assert len(rest) == 2
    for (images, labels), (expected_images, expected_labels) in zip(rest, whole[2:]):
        assert torch.equal(images, expected_images) and torch.equal(labels, expected_labels)
    resumed.set_epoch(1)  # the skip was for one pass: the next pass is the whole epoch again
    again = list(resumed)
    assert len(again) == 4 and torch.equal(again[0][0], whole[0][0])
