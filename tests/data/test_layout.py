"""Split indexing: the folder layout labels like torchvision's ImageFolder; file lists."""

import shutil
from pathlib import Path

import pytest
from torchvision import datasets

from gppq_dist.config import DataConfig
from gppq_dist.data.layout import index_split
from gppq_dist.data.synthetic import write_synthetic
from gppq_dist.errors import DataError


@pytest.fixture
def data_root(tmp_path) -> Path:
    """train/ and val/ with class folders whose sorted order is not the order written
    ("Mango" < "apple" < "zebra": capitals sort first), a nested folder and a stray file."""
    root = tmp_path / "data"
    write_synthetic(root, classes=3, per_class=3, size=(64, 48), val_per_class=2)
    for split in ("train", "val"):
        for old, new in (("c000", "zebra"), ("c001", "apple"), ("c002", "Mango")):
            (root / split / old).rename(root / split / new)
    nested = root / "train" / "apple" / "more"
    nested.mkdir()
    shutil.copy(next((root / "train" / "zebra").iterdir()), nested / "copy.jpg")
    (root / "train" / "zebra" / "notes.txt").write_text("not an image")
    return root


@pytest.mark.parametrize("split", ["train", "val"])
def test_folder_labels_equal_torchvision_image_folder(data_root, split):
    index = index_split(DataConfig(root=str(data_root)), split)
    reference = datasets.ImageFolder(str(data_root / split))
    assert index.classes == reference.classes == ["Mango", "apple", "zebra"]
    assert dict(index.samples) == dict(reference.samples)
    assert len(index.samples) == len(reference.samples) == (10 if split == "train" else 6)


def test_file_list_takes_class_names_integer_labels_relative_and_absolute_paths(data_root, tmp_path):
    val = data_root / "val"
    mango, apple, zebra = (sorted((val / name).iterdir())[0] for name in ("Mango", "apple", "zebra"))
    listing = tmp_path / "val.txt"
    listing.write_text(
        "# path label\n"
        f"{mango.relative_to(data_root)} Mango\n"
        "\n"
        f"{apple} 1\n"
        f"{zebra.relative_to(data_root)} 2\n"
    )
    index = index_split(DataConfig(root=str(data_root), val_list=str(listing)), "val")
    assert index.classes == ["Mango", "apple", "zebra"]
    assert index.samples == [(str(mango), 0), (str(apple), 1), (str(zebra), 2)]


@pytest.mark.parametrize("bad_line", ["val/zebra/x.JPEG giraffe", "val/zebra/x.JPEG 3", "val/zebra/x.JPEG"])
def test_bad_file_list_line_names_file_and_line(data_root, tmp_path, bad_line):
    listing = tmp_path / "val.txt"
    listing.write_text(f"val/zebra/a.JPEG zebra\n\n{bad_line}\n")
    with pytest.raises(DataError, match=f"{listing}:3: expected '<path> <label>'"):
        index_split(DataConfig(root=str(data_root), val_list=str(listing)), "val")


def test_val_class_that_train_lacks_is_an_error(data_root):
    (data_root / "val" / "okapi").mkdir()
    with pytest.raises(DataError, match="okapi"):
        index_split(DataConfig(root=str(data_root)), "val")


def test_flat_val_folder_through_a_file_list(data_root, tmp_path):
    """Sites whose val images sit in one folder name each image's class in a list."""
    flat = data_root / "val_flat"
    flat.mkdir()
    expected = []
    for label, name in enumerate(["Mango", "apple", "zebra"]):
        for image in sorted((data_root / "val" / name).iterdir()):
            target = flat / f"{name}_{image.name}"
            image.rename(target)
            expected.append((str(target), label))
    shutil.rmtree(data_root / "val")
    listing = tmp_path / "val_flat.txt"
    listing.write_text("".join(f"{Path(path).relative_to(data_root)} {label}\n" for path, label in expected))
    index = index_split(DataConfig(root=str(data_root), val_list=str(listing)), "val")
    assert index.samples == expected
    assert index.classes == index_split(DataConfig(root=str(data_root)), "train").classes
