"""The pre-flight data check on real, deliberately damaged folders (API and CLI)."""

import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import ImageFile

from gppq_dist.config import DataConfig
from gppq_dist.data.check import CACHE_FOLDER, check_data, check_folder
from gppq_dist.data.layout import index_split
from gppq_dist.data.synthetic import write_synthetic
from gppq_dist.errors import DataError
from tests.conftest import gppq

TRAIN_IMAGES, VAL_IMAGES = 3 * 4, 3 * 2


def clean_folder(root: Path) -> Path:
    """train/c000..c002 (4 JPEGs each) and val/c000..c002 (2 each), 64x48."""
    write_synthetic(root, classes=3, per_class=4, size=(64, 48), val_per_class=2)
    return root


def overwrite_middle(path: Path) -> None:
    """Overwrite 32 bytes in the middle of the compressed data with marker-like bytes.

    ``FF 99`` is no JPEG marker, so libjpeg stops with an error. (Zeroed or random bytes
    there often only garble pixels: libjpeg recovers with a warning and no decoder error,
    which no decode-based check can see.)
    """
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 32] = b"\xff\x99" * 16
    path.write_bytes(bytes(data))


def cut_in_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture
def damaged(tmp_path) -> tuple[Path, set[tuple[str, str]]]:
    """A folder with one of each problem, and the (kind, path) pairs the check must report."""
    root = clean_folder(tmp_path / "data")
    train, val = root / "train", root / "val"
    corrupt, truncated = sorted((train / "c000").iterdir())[:2]
    overwrite_middle(corrupt)
    cut_in_half(truncated)
    (train / "c001" / "x.JPEG").write_text("a text file with an image name\n")
    (train / "c001" / "notes.txt").write_text("a note in a class folder\n")
    (train / "c002" / ".DS_Store").write_bytes(b"\0hidden metadata, ignored")
    (train / "c003").mkdir()
    (val / "c003").mkdir()
    (val / "c009").mkdir()
    shutil.copy(sorted((val / "c000").iterdir())[0], val / "c009" / "extra.JPEG")
    expected = {
        ("corrupt", str(corrupt)),
        ("truncated", str(truncated)),
        ("corrupt", str(train / "c001" / "x.JPEG")),
        ("not_an_image", str(train / "c001" / "notes.txt")),
        ("empty_class", str(train / "c003")),
        ("empty_class", str(val / "c003")),
        ("class_mismatch", str(val / "c009")),
    }
    return root, expected


def found(report) -> set[tuple[str, str]]:
    return {(problem.kind, problem.path) for problem in report.problems}


def test_clean_folder_is_ok(tmp_path):
    report = check_folder(clean_folder(tmp_path / "data"), workers=0)
    assert report.ok and report.problems == [] and report.bad_files == set()
    assert report.checked == TRAIN_IMAGES + VAL_IMAGES
    assert report.summary() == f"ok: {TRAIN_IMAGES + VAL_IMAGES} images checked, no problems"


def test_every_damage_is_reported_with_its_kind_and_path(damaged):
    root, expected = damaged
    report = check_folder(root, workers=2)
    assert found(report) == expected
    assert not report.ok
    assert report.checked == TRAIN_IMAGES + VAL_IMAGES + 2  # x.JPEG and val/c009/extra.JPEG
    assert report.bad_files == {path for kind, path in expected if kind in ("corrupt", "truncated", "not_an_image")}
    assert report.counts == {"corrupt": 2, "truncated": 1, "not_an_image": 1, "empty_class": 2, "class_mismatch": 1}
    truncated = next(p for p in report.problems if p.kind == "truncated")
    assert "image file is truncated" in truncated.detail
    # Decoding here gives the same report as decoding in worker processes.
    assert check_folder(root, workers=0).problems == report.problems


def test_summary_groups_by_kind_with_counts_and_a_total(damaged):
    root, _ = damaged
    summary = check_folder(root, workers=0).summary().splitlines()
    assert summary[0] == "corrupt (2):"
    assert "  train/c001/x.JPEG: not an image file that PIL can identify" in summary
    assert "truncated (1):" in summary and "class_mismatch (1):" in summary
    assert summary[-1] == f"total: 7 problems ({TRAIN_IMAGES + VAL_IMAGES + 2} images checked)"


def test_train_class_without_val_folder_is_a_class_mismatch(tmp_path):
    root = clean_folder(tmp_path / "data")
    shutil.rmtree(root / "val" / "c002")
    report = check_folder(root, workers=0)
    assert found(report) == {("class_mismatch", str(root / "train" / "c002"))}
    assert report.bad_files == set()


def test_truncated_images_found_even_when_pil_is_told_to_load_them(tmp_path, monkeypatch):
    """A caller (a torchvision loader, say) may have set LOAD_TRUNCATED_IMAGES; the check must
    still see the truncation, and leave the caller's setting as it was."""
    root = clean_folder(tmp_path / "data")
    truncated = sorted((root / "val" / "c001").iterdir())[0]
    cut_in_half(truncated)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    report = check_folder(root, workers=0)
    assert found(report) == {("truncated", str(truncated))}
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True


def test_file_lists_check_the_listed_files(tmp_path):
    """A missing listed file is unreadable, a listed text file is not an image, and a train
    class the val list never names is a class mismatch; the val folder is not read."""
    root = clean_folder(tmp_path / "data")
    (root / "val" / "c001" / "stray.txt").write_text("not listed, not examined\n")
    (root / "flat").mkdir()
    (root / "flat" / "readme.txt").write_text("listed by mistake\n")
    listed = [sorted((root / "val" / name).glob("*.JPEG"))[0] for name in ("c000", "c001")]
    val_list = tmp_path / "val.txt"
    val_list.write_text(f"{listed[0].relative_to(root)} c000\n{listed[1]} 1\nflat/missing.JPEG 0\nflat/readme.txt 1\n")
    report = check_folder(root, val_list=str(val_list), workers=0)
    assert found(report) == {
        ("unreadable", str(root / "flat" / "missing.JPEG")),
        ("not_an_image", str(root / "flat" / "readme.txt")),
        ("class_mismatch", str(root / "train" / "c002")),
    }
    assert report.checked == TRAIN_IMAGES + 4


def test_train_list_class_without_samples_is_an_empty_class(tmp_path):
    root = clean_folder(tmp_path / "data")
    train_list = tmp_path / "train.txt"
    train_list.write_text("".join(f"{path.relative_to(root)} {path.parent.name}\n"
                                  for name in ("c000", "c002") for path in sorted((root / "train" / name).iterdir())))
    report = check_folder(root, train_list=str(train_list), workers=0)
    assert found(report) == {("empty_class", str(root / "train" / "c001"))}
    assert report.checked == 8 + VAL_IMAGES


def test_bad_files_are_spelled_like_the_split_index(damaged, monkeypatch):
    """The loader drops ``report.bad_files`` from ``index_split(...).paths``: same spelling,
    also for a relative data.root, and the cache sits beside the splits."""
    root, expected = damaged
    monkeypatch.chdir(root.parent)
    data = DataConfig(root="data", workers=0)
    bad_images = check_data(data).bad_files & set(index_split(data, "train").paths)
    assert bad_images == {str(Path("data") / Path(path).relative_to(root))
                          for kind, path in expected if kind in ("corrupt", "truncated")}
    assert len(bad_images) == 3
    assert list((root / CACHE_FOLDER).glob("report-*.json"))


def test_cache_is_used_when_nothing_changed_and_invalidated_by_any_change(tmp_path, monkeypatch):
    root = clean_folder(tmp_path / "data")
    cache = tmp_path / "cache"
    first = check_folder(root, workers=0, cache_dir=cache)
    assert not first.cached and first.ok
    again = check_folder(root, workers=0, cache_dir=cache)
    assert again.cached and again.ok and again.checked == first.checked

    image = sorted((root / "train" / "c001").iterdir())[0]
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # touch: content unchanged
    touched = check_folder(root, workers=0, cache_dir=cache)
    assert not touched.cached and touched.ok

    cut_in_half(image)  # replaced by a damaged file
    after_damage = check_folder(root, workers=0, cache_dir=cache)
    assert not after_damage.cached and found(after_damage) == {("truncated", str(image))}
    cached = check_folder(root, workers=0, cache_dir=cache)
    assert cached.cached and cached.problems == after_damage.problems

    (root / "val" / "c005").mkdir()  # no file changes, but a new (empty) class folder
    new_class = check_folder(root, workers=0, cache_dir=cache)
    assert not new_class.cached and ("empty_class", str(root / "val" / "c005")) in found(new_class)

    # The same folder spelled relative to another working directory reads the cache back
    # with paths in that spelling.
    monkeypatch.chdir(tmp_path)
    relative = check_folder("data", workers=0, cache_dir=cache)
    assert relative.cached and ("truncated", str(Path("data") / image.relative_to(root))) in found(relative)


def test_flat_class_folder_keeps_its_cache_out_of_the_data(tmp_path, monkeypatch):
    """A root of class folders is a val split; a .gppq_check folder there would be a class to
    torchvision's ImageFolder, so check_data caches in the user cache instead."""
    root = clean_folder(tmp_path / "data") / "val"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user_cache"))
    data = DataConfig(root=str(root), workers=0)
    first, second = check_data(data), check_data(data)
    assert first.ok and not first.cached and second.cached
    assert not (root / CACHE_FOLDER).exists()
    assert list((tmp_path / "user_cache" / "gppq_dist" / "check").glob("report-*.json"))


def test_missing_or_empty_root_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        check_folder(tmp_path / "nowhere", workers=0)
    with pytest.raises(DataError, match="neither a train/ nor a val/"):
        check_folder(tmp_path, workers=0)


def test_cli_reports_problems_with_exit_status_1(damaged):
    root, expected = damaged
    result = gppq("data", "check", root, "--workers", "2")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    for _, path in expected:
        assert str(Path(path).relative_to(root)) in result.stdout
    assert "corrupt (2):" in result.stdout and "empty_class (2):" in result.stdout
    assert result.stdout.rstrip().endswith(f"total: 7 problems ({TRAIN_IMAGES + VAL_IMAGES + 2} images checked)")

    as_json = gppq("data", "check", root, "--json")
    assert as_json.returncode == 1
    report = json.loads(as_json.stdout)
    assert set(report) == {"ok", "checked", "problems", "counts"}
    assert report["ok"] is False and report["checked"] == TRAIN_IMAGES + VAL_IMAGES + 2
    assert {(p["kind"], p["path"]) for p in report["problems"]} == expected
    assert all(p["detail"] for p in report["problems"])
    assert report["counts"] == {"corrupt": 2, "truncated": 1, "not_an_image": 1, "empty_class": 2,
                                "class_mismatch": 1}


def test_cli_clean_folder_exits_0(tmp_path):
    root = clean_folder(tmp_path / "data")
    result = gppq("data", "check", root, "--workers", "0")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == f"ok: {TRAIN_IMAGES + VAL_IMAGES} images checked, no problems"
    report = json.loads(gppq("data", "check", root, "--json", check=True).stdout)
    assert report == {"ok": True, "checked": TRAIN_IMAGES + VAL_IMAGES, "problems": [], "counts": {}}


def test_cli_missing_folder_is_a_one_line_error(tmp_path):
    result = gppq("data", "check", tmp_path / "nowhere")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error:") and len(result.stderr.strip().splitlines()) == 1
