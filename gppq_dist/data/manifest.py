"""A run's data manifest: the checked samples of train and val, listed once per run.

Walking a data tree (listing every file, a ``stat`` of each) is what starting a run costs on
a large data set: ImageNet's 1.28 M files on a shared file system take minutes, and every
loader built from :func:`~gppq_dist.data.loaders.checked_samples` walks again. A run does
it once instead: rank 0 calls :func:`prepare_manifest`, which runs the data check (cached
as always, one walk of the tree in all) and writes :data:`MANIFEST` into the run folder;
after the ranks synchronise, every other rank calls :func:`load_manifest`, which reads that
file and never touches the tree. Every loader of the run then takes its samples from
:meth:`Manifest.samples` (``build_loader(..., samples=...)``).

What it holds: for train and val (those that exist), every usable sample's path relative
to ``data.root``, its label, size and mtime in ns; the class names; the settings it was
made from (``data.root`` as given and absolute, the file lists, ``data.on_bad_file``, the
check's format and the Pillow version that decoded); and a fingerprint of the tree: the
mtime of every folder the walk listed (the root, split folders, class folders, folders
below them; for a file list, the folders of the listed files), taken just before listing
it, and each file list's size and mtime.

Reuse (a resumed run). :func:`prepare_manifest` keeps the manifest already in the run
folder when it was made from the same settings and no folder or file list of the
fingerprint has another mtime now: a ``stat`` per folder (about 2,000 for ImageNet), no
walk, no check. Adding, removing or renaming a file (``mv``, ``rsync``, an atomic replace
by rename) changes its folder's mtime and so makes a new manifest (a full walk and the
cached check). Not detected: a file rewritten in place under the same name (its folder
keeps its mtime; the manifest's size and mtime of it go stale), a change on a file system
whose folder mtimes do not follow such changes, and one made within the file system's
timestamp granularity of the walk listing that folder. ``rm <run>/data_manifest.json.gz``
forces a fresh walk.

Format: gzip-compressed JSON (:data:`MANIFEST`), written atomically. Per split the samples
are columns: the folders, runs of (folder index, count) and (label, count), the file names,
sizes and mtimes, so ImageNet's train split takes tens of MB before compression, not
hundreds.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import PIL

from gppq_dist.data.check import CACHE_FORMAT, check_and_index
from gppq_dist.data.layout import join_root, relative_to_root, split_dir
from gppq_dist.data.loaders import usable_samples
from gppq_dist.errors import DataError
from gppq_dist.io import atomic_path

log = logging.getLogger(__name__)

MANIFEST = "data_manifest.json.gz"
FORMAT = 1
SPLITS = ("train", "val")
# what a rank other than 0 must agree on with the manifest rank 0 wrote
DATA_KEYS = ("root", "train_list", "val_list", "on_bad_file")


@dataclass
class Manifest:
    """The checked samples of a run's data, as written to (or read from) ``path``.

    ``root``: ``data.root`` as given; ``classes``: the class names (label = position);
    ``settings``: what it was made from; ``fingerprint``: ``{"folders": {folder: mtime_ns},
    "lists": {file list: [size, mtime_ns]}}``, folders relative to the root;
    ``splits``: per split, the stored columns; ``reused``: True when
    :func:`prepare_manifest` kept an existing file.
    """

    path: Path
    root: str
    classes: list[str]
    settings: dict[str, Any]
    fingerprint: dict[str, Any]
    splits: dict[str, dict[str, Any]]
    reused: bool = False
    _samples: dict[str, list[tuple[str, int]]] = field(default_factory=dict, repr=False)

    def samples(self, split: str) -> list[tuple[str, int]]:
        """The usable (path, label) samples of ``split``, spelled and ordered exactly as
        :func:`~gppq_dist.data.loaders.checked_samples` returns them (a new list per call)."""
        if split not in self._samples:
            if split not in self.splits:
                split_dir(self.root, split)  # raises the error naming the missing folder
                raise DataError(f"data manifest {self.path} has no {split} split")
            self._samples[split] = _expand(self.root, self.splits[split])
        return list(self._samples[split])

    def sizes(self, split: str) -> list[int]:
        """Bytes of every sample of ``split``, in :meth:`samples` order ([] for a split the
        data does not have)."""
        return list(self.splits[split]["sizes"]) if split in self.splits else []

    def mtimes(self, split: str) -> list[int]:
        """Modification time in ns of every sample of ``split``, in :meth:`samples` order."""
        return list(self.splits[split]["mtime_ns"]) if split in self.splits else []

    def count(self, split: str) -> int:
        """How many usable samples ``split`` has (0 for a split the data does not have)."""
        return len(self.splits[split]["names"]) if split in self.splits else 0


def manifest_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / MANIFEST


def write_manifest(data: Any, run_dir: str | Path) -> Manifest:
    """Check the data (cached; one walk of the tree) and write the run's manifest (rank 0).

    Raises what :func:`~gppq_dist.data.loaders.checked_samples` raises, for the same data:
    class problems, and bad files unless ``data.on_bad_file: skip`` (then they are left out,
    with its warning line per split). Nothing is written when it raises.
    """
    checked = check_and_index(data)
    splits = {}
    for split in SPLITS:
        if split in checked.samples:
            samples = usable_samples(data, checked, split)
            splits[split] = _columns(data.root, samples, checked.stats)
            splits[split]["skipped"] = len(checked.samples[split]) - len(samples)
    if not splits:  # the check accepts no root without a split; this is a guard only
        raise DataError(f"data.root: '{data.root}' has neither a train/ nor a val/ folder")
    fingerprint = {
        "folders": {relative_to_root(folder, _prefix(data.root)): mtime for folder, mtime in checked.folders.items()},
        "lists": {name: list(stat) if stat else None for name, stat in checked.lists.items()},
    }
    manifest = Manifest(path=manifest_path(run_dir), root=str(data.root), classes=list(checked.classes),
                        settings=_settings(data), fingerprint=fingerprint, splits=splits)
    document = {"format": FORMAT, "settings": manifest.settings, "classes": manifest.classes,
                "fingerprint": fingerprint, "splits": splits}
    with atomic_path(manifest.path) as tmp:
        # mtime=0: the same data gives the same bytes
        with gzip.GzipFile(tmp, "wb", compresslevel=1, mtime=0) as out:
            out.write(json.dumps(document, separators=(",", ":")).encode())
    log.info("data manifest: %s (%s) written to %s",
             ", ".join(f"{manifest.count(split)} {split}" for split in splits), data.root, manifest.path)
    return manifest


def load_manifest(data: Any, run_dir: str | Path) -> Manifest:
    """The manifest rank 0 wrote into ``run_dir``, for ``data`` (every other rank).

    Never walks the tree, nor checks it. A manifest that is missing, unreadable or made
    for other data settings (root, file lists, on_bad_file) is a :class:`DataError`
    naming the file.
    """
    path = manifest_path(run_dir)
    if not path.is_file():
        raise DataError(f"data manifest {path} does not exist (rank 0 writes it with prepare_manifest "
                        "before the other ranks read it)")
    try:
        manifest = _read(path)
    except _Unreadable as exc:
        raise DataError(f"data manifest {path} is unreadable ({exc}); remove it and start the run again "
                        "(rank 0 writes a new one)") from None
    expected = _settings(data)
    changed = [f"data.{key} {manifest.settings.get(key)!r} (this run: {expected[key]!r})"
               for key in DATA_KEYS if manifest.settings.get(key) != expected[key]]
    if changed:
        raise DataError(f"data manifest {path} was made for other data settings: {', '.join(changed)}")
    return manifest


def prepare_manifest(data: Any, run_dir: str | Path) -> Manifest:
    """The run's manifest for rank 0: the one in ``run_dir`` when it can be reused, else a
    new one (:func:`write_manifest`).

    Reused when it was made from the same settings (data settings, absolute root, check
    format, Pillow version) and every folder and file list of its fingerprint has the mtime
    (and a list also the size) it had then: no walk of the tree. An unreadable manifest is
    replaced, with a warning.
    """
    path = manifest_path(run_dir)
    if path.is_file():
        try:
            existing = _read(path)
        except _Unreadable as exc:
            log.warning("data manifest %s is unreadable (%s); writing a new one", path, exc)
        else:
            why = _stale(existing, data)
            if why is None:
                existing.reused = True
                log.info("data manifest: reusing %s (no file added, removed or renamed in %s since)",
                         path, data.root)
                return existing
            log.info("data manifest: %s; writing a new one", why)
    return write_manifest(data, run_dir)


def _settings(data: Any) -> dict[str, Any]:
    return {
        "root": str(data.root),
        "root_absolute": str(Path(data.root).absolute()),
        "train_list": data.train_list,
        "val_list": data.val_list,
        "on_bad_file": data.on_bad_file,
        "check_format": CACHE_FORMAT,
        "pillow": PIL.__version__,
    }


def _stale(manifest: Manifest, data: Any) -> str | None:
    """Why ``manifest`` cannot be reused for ``data`` now, or None when it can."""
    settings = _settings(data)
    for key, value in settings.items():
        if manifest.settings.get(key) != value:
            return f"{manifest.path} was made with {key} {manifest.settings.get(key)!r}, not {value!r}"
    for folder, mtime in manifest.fingerprint["folders"].items():
        where = join_root(_prefix(data.root), folder)
        try:
            now = os.stat(where).st_mtime_ns
        except OSError:
            now = None
        if now != mtime:
            return f"'{where}' changed since {manifest.path} was written"
    for name, stat in manifest.fingerprint["lists"].items():
        try:
            info = os.stat(name)
            now = [info.st_size, info.st_mtime_ns]
        except OSError:
            now = None
        if now != stat:
            return f"file list '{name}' changed since {manifest.path} was written"
    return None


# Paths. Samples are spelled str(Path(root) / relative) by the check; the manifest stores
# them relative to the root (when they lie under it as spelled) and joins them back with
# string operations (layout.relative_to_root, join_root), which give the same text at a
# fraction of pathlib's cost per path.

def _prefix(root: str) -> str:
    """``str(Path(root))``: the root as the samples' paths begin with it."""
    return str(Path(root))


def _columns(root: str, samples: list[tuple[str, int]], stats: dict[str, tuple[int, int]]) -> dict[str, Any]:
    prefix = _prefix(root)
    folders: dict[str, int] = {}
    folder_runs: list[list[int]] = []
    label_runs: list[list[int]] = []
    names, sizes, mtimes = [], [], []
    for path, label in samples:
        folder, _, name = relative_to_root(path, prefix).rpartition("/")
        if folder == "" and path.startswith("/") and prefix != "/":
            folder = "/"  # a file in the file system's root, outside data.root
        index = folders.setdefault(folder, len(folders))
        if folder_runs and folder_runs[-1][0] == index:
            folder_runs[-1][1] += 1
        else:
            folder_runs.append([index, 1])
        if label_runs and label_runs[-1][0] == label:
            label_runs[-1][1] += 1
        else:
            label_runs.append([label, 1])
        names.append(name)
        size, mtime = stats[path]
        sizes.append(size)
        mtimes.append(mtime)
    return {"folders": list(folders), "folder_runs": folder_runs, "label_runs": label_runs,
            "names": names, "sizes": sizes, "mtime_ns": mtimes}


def _expand(root: str, columns: dict[str, Any]) -> list[tuple[str, int]]:
    prefix = _prefix(root)
    folders = []
    for folder in columns["folders"]:
        if folder == "/":
            folders.append("/")
        else:
            joined = join_root(prefix, folder)
            folders.append("" if joined == "." else joined if joined.endswith("/") else joined + "/")
    paths = [folders[index] for index, count in columns["folder_runs"] for _ in range(count)]
    labels = [label for label, count in columns["label_runs"] for _ in range(count)]
    return [(folder + name, label) for folder, name, label in zip(paths, columns["names"], labels)]


class _Unreadable(Exception):
    """A manifest file that cannot be read back (its text says why)."""


def _read(path: Path) -> Manifest:
    """The manifest in ``path``; :class:`_Unreadable` when it cannot be read."""
    try:
        with gzip.open(path, "rb") as stream:
            document = json.loads(stream.read())
        if document.get("format") != FORMAT:
            raise ValueError(f"format {document.get('format')!r}, this version reads {FORMAT}")
        splits = document["splits"]
        classes = document["classes"]
        for split, columns in splits.items():
            _validate(split, columns, len(classes))
        fingerprint = document["fingerprint"]
        if not (isinstance(fingerprint["folders"], dict) and isinstance(fingerprint["lists"], dict)):
            raise ValueError("the fingerprint is not two mappings")
        return Manifest(path=path, root=document["settings"]["root"], classes=classes,
                        settings=document["settings"], fingerprint=fingerprint, splits=splits)
    except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
        raise _Unreadable(f"{type(exc).__name__}: {exc}") from None


def _validate(split: str, columns: dict[str, Any], classes: int) -> None:
    count = len(columns["names"])
    lengths = {
        "folder_runs": sum(n for _, n in columns["folder_runs"]),
        "label_runs": sum(n for _, n in columns["label_runs"]),
        "sizes": len(columns["sizes"]),
        "mtime_ns": len(columns["mtime_ns"]),
    }
    wrong = [f"{key} covers {length}" for key, length in lengths.items() if length != count]
    if wrong:
        raise ValueError(f"{split}: {count} names but {', '.join(wrong)}")
    if any(not 0 <= index < len(columns["folders"]) for index, _ in columns["folder_runs"]):
        raise ValueError(f"{split}: a folder index out of range")
    if any(not 0 <= label < classes for label, _ in columns["label_runs"]):
        raise ValueError(f"{split}: a label out of range for {classes} classes")
