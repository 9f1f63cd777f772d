"""ImageNet-layout folders read with torchvision (``train/<class>/*``, ``val/<class>/*``).

Class index = position of the class folder name in sorted order, as torchvision's
``ImageFolder``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torchvision import datasets, transforms

from gppq_dist.data.layout import split_dir
from gppq_dist.errors import DataError


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
    steps = [transforms.RandomResizedCrop(data.image_size, scale=tuple(data.crop_scale))]
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
