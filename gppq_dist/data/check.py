"""The pre-flight check of a data folder: every image decoded once, before any training.

A DALI pipeline cannot skip a file that fails to decode (it ends for good), so bad files
are found here first. What the check reports, as :class:`Problem` kinds:

- ``corrupt``: an image-named file that PIL cannot identify or fully decode (this includes
  a text file named ``x.JPEG``); ``truncated``: PIL's "image file is truncated", or an empty
  file; ``unreadable``: a file that cannot be read (a file list naming a missing file);
  ``not_an_image``: a file in a class folder without an image extension (hidden files such
  as ``.DS_Store`` excepted), or a listed file without one that does not decode;
- ``empty_class``: a class folder (train or val) with no image, or a train class that the
  train file list never names;
- ``class_mismatch``: a val class folder that train does not have, or a train class that
  val does not have (no val folder, or never named in the val file list).

Classes are the train split's class folders in sorted order (:mod:`gppq_dist.data.layout`).
Problem paths are spelled as :func:`~gppq_dist.data.layout.index_split` spells sample paths
(``Path(root) / ...``, the root as given), so ``report.bad_files`` can be matched against
``SplitIndex.paths``.

A decode finds what libjpeg gives up on; damage it recovers from silently (for example
zeroed bytes in the compressed data, which only garble pixels) decodes fine and is not
reported.

The report is cached as JSON under a key that covers every examined file (relative path,
size, mtime in ns), the class folders and the file lists, so a second check of an
unchanged folder decodes nothing; touching, replacing, adding or removing a file changes
the key.

The scan that finds the files to decode (and the cache key) is the one walk of the tree a
check makes, cached or not: :func:`check_and_index` returns the split indexes that walk
found along with the report (the samples :func:`~gppq_dist.data.layout.index_split` would
list, in its order and spelling), and the modification time of every folder it listed,
taken just before listing it, for :mod:`gppq_dist.data.manifest` to tell later whether
anything was added, removed or renamed since. :func:`tree_walks` counts the walks.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import stat
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import PIL
from PIL import Image, ImageFile, UnidentifiedImageError

from gppq_dist.data.layout import (class_folders, count_tree_walk, entries_under, is_image_name, read_file_list,
                                   relative_to_root, split_dir, tree_walks)
from gppq_dist.errors import DataError
from gppq_dist.io import write_text_atomic
from gppq_dist.progress import progress_bar

logger = logging.getLogger(__name__)

__all__ = ["CheckReport", "CheckedData", "Problem", "check_and_index", "check_data", "check_folder",
           "default_cache_dir", "tree_walks"]

FILE_KINDS = ("corrupt", "truncated", "not_an_image", "unreadable")
KINDS = (*FILE_KINDS, "empty_class", "class_mismatch")
CACHE_FOLDER = ".gppq_check"
# Bumped when what the check reports changes, so older cached reports are not reused.
CACHE_FORMAT = 1
# Files per task sent to a worker process: large enough that pickling and scheduling cost
# little against decoding, small enough that the workers finish together.
MAX_CHUNK = 256


@dataclass(frozen=True)
class Problem:
    """One finding: ``kind`` (one of :data:`KINDS`), the file or folder ``path``, a short ``detail``."""

    kind: str
    path: str
    detail: str


@dataclass
class CheckReport:
    """The ``problems`` found (sorted by kind, then path) and how many image files were decoded.

    ``cached`` is True when the report was read from the cache instead of decoding.
    ``root`` is the checked folder as given (paths in :meth:`summary` are shown relative to it).
    """

    problems: list[Problem]
    checked: int
    cached: bool = False
    root: str | None = None

    @property
    def bad_files(self) -> set[str]:
        """Paths of the files a loader must not open (corrupt, truncated, not images, unreadable)."""
        return {problem.path for problem in self.problems if problem.kind in FILE_KINDS}

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def counts(self) -> dict[str, int]:
        """Problems per kind, kinds in :data:`KINDS` order, only kinds that occur."""
        counts = {kind: 0 for kind in KINDS}
        for problem in self.problems:
            counts[problem.kind] += 1
        return {kind: count for kind, count in counts.items() if count}

    def to_dict(self) -> dict[str, Any]:
        """``{"ok", "checked", "problems": [{kind, path, detail}], "counts": {kind: n}}``."""
        return {
            "ok": self.ok,
            "checked": self.checked,
            "problems": [asdict(problem) for problem in self.problems],
            "counts": self.counts,
        }

    def summary(self) -> str:
        """Multi-line text: per kind a ``kind (n):`` header and one ``path: detail`` line per
        problem, then a total line."""
        if self.ok:
            return f"ok: {self.checked} images checked, no problems"
        lines = []
        for kind, count in self.counts.items():
            lines.append(f"{kind} ({count}):")
            lines += [f"  {self._shown(p.path)}: {p.detail}" for p in self.problems if p.kind == kind]
        plural = "" if len(self.problems) == 1 else "s"
        lines.append(f"total: {len(self.problems)} problem{plural} ({self.checked} images checked)")
        return "\n".join(lines)

    def _shown(self, path: str) -> str:
        if self.root is None:
            return path
        with contextlib.suppress(ValueError):
            return str(Path(path).relative_to(self.root))
        return path


@dataclass
class CheckedData:
    """What one check found: the ``report``, and the split indexes of the same walk.

    ``classes``: the train split's class folders in sorted order (the val folder's own for
    a root that holds only val). ``samples``: per split that exists (``train``, ``val``),
    every (path, label) :func:`~gppq_dist.data.layout.index_split` would list, bad files
    included, spelled and ordered as it does. ``stats``: (size, mtime in ns) of every
    examined file, by path as spelled in ``samples``. ``folders``: every folder listed (the
    root, split folders, class folders and the folders below them, and for file lists the
    folders of the listed files), by path as spelled, with its mtime in ns taken before it
    was listed (None: it could not be stat'ed). ``lists``: (size, mtime in ns) of each file
    list, by path as configured.
    """

    report: CheckReport
    classes: list[str]
    samples: dict[str, list[tuple[str, int]]]
    stats: dict[str, tuple[int, int]]
    folders: dict[str, int | None]
    lists: dict[str, tuple[int, int] | None]


def check_data(data: Any) -> CheckReport:
    """:func:`check_folder` for a :class:`~gppq_dist.config.DataConfig` (``root``,
    ``train_list``, ``val_list``, ``workers``), cached in :func:`default_cache_dir`."""
    return check_and_index(data).report


def check_and_index(data: Any) -> CheckedData:
    """:func:`check_data`, and the split indexes of its walk: one walk of the tree in all."""
    return _check(data.root, data.train_list, data.val_list, data.workers, default_cache_dir(data.root))


def check_folder(
    root: str | Path,
    train_list: str | None = None,
    val_list: str | None = None,
    workers: int = 2,
    cache_dir: str | Path | None = None,
) -> CheckReport:
    """Check the train and val splits under ``root`` (those that exist) and return the report.

    ``train_list``/``val_list``: ``path label`` files used instead of the split folders.
    ``workers``: decoding processes (0: decode in this process). ``cache_dir``: where the
    report is cached (None: no cache). A missing root, or one with neither split, is a
    :class:`DataError`; everything wrong with the data itself goes into the report.
    """
    return _check(root, train_list, val_list, workers, cache_dir).report


def _check(root: str | Path, train_list: str | None, val_list: str | None, workers: int,
           cache_dir: str | Path | None) -> CheckedData:
    cache_file = _cache_file(cache_dir, root, train_list, val_list) if cache_dir is not None else None
    if cache_file is not None:
        # Made before the walk: a cache folder created inside the root after it would change
        # the root's mtime, and a manifest would then take the tree for changed once.
        with contextlib.suppress(OSError):
            cache_file.parent.mkdir(parents=True, exist_ok=True)
    scan = _scan(Path(root), train_list, val_list)
    report = _report(scan, root, workers, cache_file)
    return CheckedData(report=report, classes=scan.classes, samples=scan.samples, stats=scan.stats,
                       folders=scan.folders, lists=scan.lists)


def _report(scan: _Scan, root: str | Path, workers: int, cache_file: Path | None) -> CheckReport:
    key = scan.cache_key()
    if cache_file is not None:
        cached = _read_cache(cache_file, key, root)
        if cached is not None:
            logger.info("data check: nothing changed since the last check, using %s", cache_file)
            return cached
    to_decode = list(dict.fromkeys(scan.to_decode))  # a file both lists name is decoded once
    problems = scan.problems + _decode_all(to_decode, workers)
    problems.sort(key=lambda problem: (KINDS.index(problem.kind), problem.path))
    report = CheckReport(problems=problems, checked=len(to_decode), root=str(root))
    if cache_file is not None:
        _write_cache(cache_file, key, report)
    return report


def default_cache_dir(root: str | Path) -> Path:
    """``<root>/.gppq_check`` when ``root`` holds ``train/`` or ``val/`` and is writable, else
    ``$XDG_CACHE_HOME/gppq_dist/check`` (default ``~/.cache/...``).

    A root that holds class folders directly (a flat val folder) gets the user cache too:
    torchvision's ``ImageFolder`` would take a ``.gppq_check`` folder there for a class.
    """
    root = Path(root)
    holds_splits = (root / "train").is_dir() or (root / "val").is_dir()
    if holds_splits and os.access(root, os.W_OK):
        return root / CACHE_FOLDER
    user_cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(user_cache) / "gppq_dist" / "check"


@dataclass
class _Scan:
    """What a check examines, found without decoding: the image files to decode, the
    problems visible from names and folders alone, and the cache key's ingredients; also
    the split indexes and folder mtimes of :class:`CheckedData`."""

    root: Path
    to_decode: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    fingerprint: list[Any] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    samples: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    stats: dict[str, tuple[int, int]] = field(default_factory=dict)
    folders: dict[str, int | None] = field(default_factory=dict)
    lists: dict[str, tuple[int, int] | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.prefix = str(self.root)

    def examine(self, path: str, info: os.stat_result | None = None) -> None:
        """Add ``path``'s (relative path, size, mtime in ns) to the key; (path, None, None) if missing."""
        relative = relative_to_root(path, self.prefix)
        try:
            info = info or os.stat(path)
        except OSError:
            self.fingerprint.append((relative, None, None))
            return
        self.fingerprint.append((relative, info.st_size, info.st_mtime_ns))
        self.stats[path] = (info.st_size, info.st_mtime_ns)

    def folder(self, path: Path) -> None:
        """Note ``path``'s mtime; called before the folder is listed, so that a change made
        while the walk runs shows as a later mtime."""
        with contextlib.suppress(OSError):
            self.folders[str(path)] = path.stat().st_mtime_ns
            return
        self.folders[str(path)] = None

    def cache_key(self) -> str:
        ingredients = [CACHE_FORMAT, PIL.__version__, sorted(self.fingerprint, key=repr)]
        return hashlib.sha256(json.dumps(ingredients).encode()).hexdigest()


def _scan(root: Path, train_list: str | None, val_list: str | None) -> _Scan:
    if not root.is_dir():
        raise DataError(f"data folder '{root}' does not exist")
    count_tree_walk()
    scan = _Scan(root)
    scan.folder(root)
    train_dir = root / "train"
    if train_dir.is_dir():
        scan.folder(train_dir)
    train_classes = class_folders(train_dir) if train_dir.is_dir() else None
    val_dir = _optional_val_dir(root)
    if train_classes is None and (train_list or val_list):
        raise DataError(f"a file list needs '{train_dir}/<class>/' folders to name the classes")
    if train_classes is None and val_dir is None:
        raise DataError(f"'{root}' has neither a train/ nor a val/ folder (expected {root}/train/<class>/<image>)")
    # Class folders are part of the key: a new empty one changes the report, not any file.
    scan.fingerprint.append(("train classes", train_classes))
    scan.classes = list(train_classes) if train_classes is not None else []
    if train_list:
        named = _scan_list(scan, "train", train_list, train_classes, "train_list")
        scan.problems += [Problem("empty_class", str(train_dir / name), f"no samples in {train_list}")
                          for name in train_classes if name not in named]
    elif train_classes is not None:
        _scan_folder(scan, "train", train_dir, train_classes)
    if val_list:
        named = _scan_list(scan, "val", val_list, train_classes, "val_list")
        scan.problems += [
            Problem("class_mismatch", str(train_dir / name), f"class '{name}' has no samples in {val_list}")
            for name in train_classes if name not in named
        ]
    elif val_dir is not None:
        if val_dir != root:
            scan.folder(val_dir)
        val_classes = _scan_folder(scan, "val", val_dir, train_classes)
        scan.fingerprint.append(("val classes", val_classes))
        if train_classes is not None:
            _compare_classes(scan, train_dir, train_classes, val_dir, val_classes)
        else:
            scan.classes = list(val_classes)
    return scan


def _optional_val_dir(root: Path) -> Path | None:
    try:
        return split_dir(root, "val")
    except DataError:
        return None


def _scan_list(scan: _Scan, split: str, list_path: str, classes: list[str], key: str) -> set[str]:
    """Queue every listed file for decoding; returns the class names the list uses."""
    try:
        info = os.stat(list_path)
        scan.lists[list_path] = (info.st_size, info.st_mtime_ns)
    except OSError:
        scan.lists[list_path] = None
    index = read_file_list(list_path, scan.root, classes, key=key)
    scan.examine(str(Path(list_path)))
    # The listed files' folders: a listed file removed or renamed changes its folder's mtime.
    for folder in dict.fromkeys(os.path.dirname(path) for path in index.paths):
        scan.folder(Path(folder or "."))
    for path in index.paths:
        scan.examine(path)
        scan.to_decode.append(path)
    scan.samples[split] = index.samples
    return {classes[label] for label in index.labels}


def _scan_folder(scan: _Scan, split: str, folder: Path, train_classes: list[str] | None) -> list[str]:
    """Queue the image files of every class folder of ``folder`` (recursively, as the split
    index reads them); report other files and empty class folders. Returns the class names.

    The images become ``split``'s samples, labelled by their class folder's position in
    ``train_classes`` (the folder's own classes when None); a class folder train lacks adds
    no samples (the check reports it as a class mismatch).
    """
    classes = class_folders(folder)
    position = {name: index for index, name in enumerate(classes if train_classes is None else train_classes)}
    samples = scan.samples.setdefault(split, [])
    for name in classes:
        images = 0
        label = position.get(name)
        scan.folder(folder / name)
        # dangling links are left out, as the split index leaves them out
        for path, info in entries_under(folder / name):
            if stat.S_ISDIR(info.st_mode):  # a folder below the class folder
                scan.folders[path] = info.st_mtime_ns
                continue
            if not stat.S_ISREG(info.st_mode):
                continue
            if is_image_name(path):
                images += 1
                scan.examine(path, info)
                scan.to_decode.append(path)
                if label is not None:
                    samples.append((path, label))
            elif not os.path.basename(path).startswith("."):
                scan.examine(path, info)
                detail = f"not an image extension ({Path(path).suffix or 'none'})"
                scan.problems.append(Problem("not_an_image", path, detail))
        if not images:
            scan.problems.append(Problem("empty_class", str(folder / name), "class folder without images"))
    return classes


def _compare_classes(scan: _Scan, train_dir: Path, train_classes: list[str], val_dir: Path,
                     val_classes: list[str]) -> None:
    train_set, val_set = set(train_classes), set(val_classes)
    scan.problems += [Problem("class_mismatch", str(val_dir / name), f"class '{name}' is not in {train_dir}")
                      for name in val_classes if name not in train_set]
    scan.problems += [Problem("class_mismatch", str(train_dir / name), f"class '{name}' has no folder in {val_dir}")
                      for name in train_classes if name not in val_set]


def _decode_all(paths: list[str], workers: int) -> list[Problem]:
    """Decode every path (in ``workers`` processes, or in this one for 0); the file problems found."""
    if not paths:
        return []
    found: list[tuple[str, str, str]] = []
    chunk = max(1, min(MAX_CHUNK, math.ceil(len(paths) / (max(workers, 1) * 8))))
    chunks = [paths[start:start + chunk] for start in range(0, len(paths), chunk)]
    with progress_bar("checking images", len(paths)) as advance:
        if workers <= 0:
            for part in chunks:
                found += _decode_chunk(part)
                advance(len(part))
        else:
            # forkserver: a fork of a parent that holds threads (torch, CUDA) can deadlock.
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
            with concurrent.futures.ProcessPoolExecutor(min(workers, len(chunks)), mp_context=context) as pool:
                futures = {pool.submit(_decode_chunk, part): len(part) for part in chunks}
                for future in concurrent.futures.as_completed(futures):
                    found += future.result()
                    advance(futures[future])
    return [Problem(kind, path, detail) for path, kind, detail in found]


def _decode_chunk(paths: list[str]) -> list[tuple[str, str, str]]:
    """``(path, kind, detail)`` for each path that does not decode (runs in a worker)."""
    with _truncated_images_refused():
        return [(path, *problem) for path in paths if (problem := _decode_problem(path)) is not None]


def _decode_problem(path: str) -> tuple[str, str] | None:
    """``(kind, detail)`` when ``path`` cannot be read or fully decoded by PIL, else None."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return "unreadable", exc.strerror or str(exc)
    if not data:
        return "truncated", "empty file (0 bytes)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # EXIF and palette warnings are not problems
            with Image.open(io.BytesIO(data)) as image:
                image.load()
    except UnidentifiedImageError:
        detail = "not an image file that PIL can identify"
    except Exception as exc:  # decoders raise OSError, ValueError, SyntaxError, ...: all mean a bad file
        detail = str(exc) or type(exc).__name__
        if "truncated" in detail.lower():
            return "truncated", detail
    else:
        return None
    return ("corrupt" if is_image_name(path) else "not_an_image"), detail


@contextlib.contextmanager
def _truncated_images_refused() -> Iterator[None]:
    """PIL's ``LOAD_TRUNCATED_IMAGES`` off while decoding (else a cut-off file loads with grey
    fill and passes), and back to the caller's value after."""
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _relative(path: str | Path, root: str | Path) -> str:
    """``path`` relative to ``root`` when it lies under it (as spelled), else unchanged."""
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


def _cache_file(cache_dir: str | Path, root: str | Path, train_list: str | None, val_list: str | None) -> Path:
    """One cache file per checked (root, file lists), named by their absolute paths."""
    where = [str(Path(p).absolute()) if p else None for p in (root, train_list, val_list)]
    return Path(cache_dir) / f"report-{hashlib.sha256(json.dumps(where).encode()).hexdigest()[:16]}.json"


def _write_cache(cache_file: Path, key: str, report: CheckReport) -> None:
    """Problem paths are stored relative to the root, so a root spelled another way (relative,
    absolute) reads them back in its own spelling."""
    stored = report.to_dict()
    for problem in stored["problems"]:
        problem["path"] = _relative(problem["path"], report.root)
    try:
        write_text_atomic(cache_file, json.dumps({"key": key, "report": stored}))
    except OSError as exc:
        logger.warning("data check: cannot write the cache %s (%s); the next check decodes again", cache_file, exc)


def _read_cache(cache_file: Path, key: str, root: str | Path) -> CheckReport | None:
    """The cached report when its key is ``key``; None when absent, stale or unreadable."""
    try:
        cached = json.loads(cache_file.read_text())
        if cached.get("key") != key:
            return None
        stored = cached["report"]
        problems = [Problem(p["kind"], str(Path(root) / p["path"]), p["detail"]) for p in stored["problems"]]
        return CheckReport(problems=problems, checked=stored["checked"], cached=True, root=str(root))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("data check: ignoring the unreadable cache %s (%s)", cache_file, exc)
        return None
