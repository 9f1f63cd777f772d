"""ImageNet-layout folders read with torchvision (``train/<class>/*``, ``val/<class>/*``).

Class index = position of the class folder name in sorted order, as torchvision's
``ImageFolder``. Also the ``data.loader: torchvision`` training/val loader
(:class:`TorchvisionLoader`), the fallback of the DALI one with the same samples, transforms,
sharding and steps per epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import datasets, transforms
from torchvision.datasets.folder import default_loader

from gppq_dist.data.layout import split_dir
from gppq_dist.errors import DataError

ASPECT_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def preprocess_info(data: Any) -> dict[str, Any]:
    """What evaluation needs to reproduce the val transform (stored in artifacts)."""
    return {
        "image_size": data.image_size,
        "resize_size": data.resize_size,
        "mean": list(data.mean),
        "std": list(data.std),
    }


def val_transform(preprocess: Mapping[str, Any]) -> transforms.Compose:
    """Resize the shorter side to ``resize_size``, center crop ``image_size``, normalize."""
    return transforms.Compose(
        [
            transforms.Resize(preprocess["resize_size"]),
            transforms.CenterCrop(preprocess["image_size"]),
            transforms.ToTensor(),
            transforms.Normalize(preprocess["mean"], preprocess["std"]),
        ]
    )


def train_transform(data: Any) -> transforms.Compose:
    """Random-resized crop (``crop_scale``), optional horizontal flip, normalize."""
    steps = [transforms.RandomResizedCrop(data.image_size, scale=tuple(data.crop_scale), ratio=ASPECT_RATIO)]
    if data.horizontal_flip:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize(data.mean, data.std)]
    return transforms.Compose(steps)


def image_folder(root: str | Path, split: str, transform, key: str = "data.root") -> datasets.ImageFolder:
    folder = split_dir(root, split, key)
    try:
        return datasets.ImageFolder(str(folder), transform=transform)
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"{key}: '{folder}' is not an image folder: {exc}") from None


def loader(dataset, batch_size: int, workers: int, shuffle: bool, seed: int = 0) -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        generator=generator,
        persistent_workers=workers > 0,
        drop_last=False,
    )


def derived_seed(*parts: int) -> int:
    """A seed in 0..2^31-1 (what DALI accepts) fixed by ``parts``, e.g. (seed, epoch, rank)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


def train_steps(samples: int, world_size: int, batch_size: int) -> int:
    """Train batches per epoch on every rank: ``floor(floor(samples / world_size) / batch_size)``.

    The same on all ranks (partial batches and the tail that does not split evenly are
    dropped), so no rank waits in a collective for a batch another rank never gets.
    """
    return (samples // world_size) // batch_size


def shard_range(samples: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[start, stop)`` of ``rank``'s contiguous shard, the split DALI's readers use."""
    return (rank * samples) // world_size, ((rank + 1) * samples) // world_size


class SampleDataset(Dataset):
    """``samples`` (path, label) read with PIL as RGB and passed through ``transform``.

    With ``seed`` set, items are asked for as ``(index, epoch)`` and the transform draws its
    randomness from a generator seeded by ``(seed, epoch, index)``: an image's crop and
    flip depend on nothing else (not the worker, not the batches before it), so an epoch
    resumed half-way sees exactly the crops of an uninterrupted one.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], transform, seed: int | None = None):
        self.samples = list(samples)
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item) -> tuple[torch.Tensor, int]:
        if self.seed is None:
            path, label = self.samples[item]
            return self.transform(default_loader(path)), label
        index, epoch = item
        path, label = self.samples[index]
        image = default_loader(path)
        with torch.random.fork_rng(devices=[]):  # the caller's RNG stays untouched
            torch.manual_seed(derived_seed(self.seed, epoch, index))
            return self.transform(image), label


class EpochSampler(Sampler[tuple[int, int]]):
    """Train order of one rank: ``(index, epoch)`` pairs, like ``DistributedSampler``.

    The whole set is permuted by ``(seed, epoch)`` (equal on all ranks), cut to a multiple
    of ``world_size`` and dealt out round-robin; ``set_epoch(epoch, skip)`` also drops the
    first ``skip`` indices of the rank's share, for the next pass only (a resumed epoch).
    """

    def __init__(self, samples: int, rank: int, world_size: int, seed: int):
        self.samples, self.rank, self.world_size, self.seed = samples, rank, world_size, seed
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return self.samples // self.world_size - self.skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = torch.randperm(self.samples, generator=torch.Generator().manual_seed(
            derived_seed(self.seed, self.epoch)))
        share = order[: self.samples // self.world_size * self.world_size][self.rank::self.world_size]
        skip, self.skip = self.skip, 0  # a skip applies to one pass only
        return iter([(int(index), self.epoch) for index in share[skip:]])


class ShardSampler(Sampler[int]):
    """Indices of one rank's contiguous shard, in order, each exactly once.

    For val: ``DistributedSampler`` would pad the shards to equal size with repeated samples,
    which counts those images twice in distributed metrics.
    """

    def __init__(self, samples: int, rank: int, world_size: int):
        self.start, self.stop = shard_range(samples, rank, world_size)

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))


@dataclass(frozen=True)
class LoaderSpec:
    """What one rank's loader reads and how it batches it.

    ``samples``: the whole split's (path, label) pairs; ``data``: the transform settings (a
    :class:`~gppq_dist.config.DataConfig`); ``train``: train transform, shuffled, full
    batches only, else val; ``rank`` of ``world_size``: which shard; ``seed``: shuffle and
    augmentation.
    """

    samples: Sequence[tuple[str, int]]
    data: Any
    train: bool
    batch_size: int
    rank: int = 0
    world_size: int = 1
    seed: int = 0

    @property
    def steps(self) -> int:
        """Batches per epoch: ``train_steps`` for train, ``ceil(shard size / batch_size)`` for val."""
        if self.train:
            return train_steps(len(self.samples), self.world_size, self.batch_size)
        start, stop = shard_range(len(self.samples), self.rank, self.world_size)
        return math.ceil((stop - start) / self.batch_size)


class TorchvisionLoader:
    """The torchvision counterpart of :class:`~gppq_dist.data.dali.DaliLoader`.

    Yields ``(images float32 [B, 3, S, S], labels int64 [B])`` on ``device`` (default the
    CPU), ``spec.steps`` batches per epoch; for a CUDA ``device`` the batches are collated
    into pinned memory and copied with ``non_blocking=True``. Train: :class:`EpochSampler`
    (shuffled by ``(seed, epoch)``, tail dropped), crops drawn per image from ``(seed,
    epoch, index)``, full batches only. Val: the rank's contiguous shard once, last batch
    partial. ``set_epoch`` picks the train order and, for a resumed epoch, the first batch;
    the position is implied by the epoch and step, so :meth:`position` has nothing to add.
    """

    def __init__(self, spec: LoaderSpec, device: torch.device | None = None):
        data = spec.data
        self.spec = spec
        if spec.train:
            dataset = SampleDataset(spec.samples, train_transform(data), seed=spec.seed)
            self.sampler: EpochSampler | ShardSampler = EpochSampler(
                len(dataset), spec.rank, spec.world_size, spec.seed)
        else:
            dataset = SampleDataset(spec.samples, val_transform(preprocess_info(data)))
            self.sampler = ShardSampler(len(dataset), spec.rank, spec.world_size)
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.batches = DataLoader(
            dataset,
            batch_size=spec.batch_size,
            sampler=self.sampler,
            num_workers=data.workers,
            persistent_workers=data.workers > 0,
            drop_last=spec.train,
            pin_memory=self.device.type == "cuda",
        )

    def set_epoch(self, epoch: int, start_step: int = 0, state: str = "") -> None:
        if isinstance(self.sampler, EpochSampler):
            self.sampler.set_epoch(epoch, start_step * self.spec.batch_size)

    def position(self) -> str:
        return ""

    def __len__(self) -> int:
        return self.spec.steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.device.type == "cpu":
            return iter(self.batches)
        return ((images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True))
                for images, labels in self.batches)
