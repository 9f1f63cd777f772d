"""Which images a split holds, and their labels.

Two input layouts:

- the ImageNet folder layout, ``<root>/<split>/<class>/<image>``; the class index is the
  position of the class folder's name in sorted order, as torchvision's ``ImageFolder``;
- a file list (``data.train_list`` / ``data.val_list``) with one ``path label`` per line,
  for sites whose val set is flat: ``path`` is relative to ``data.root`` (or absolute),
  ``label`` is a class folder name of the train split or an integer class index.

The train split defines the classes; val must use the same ones.

Listing every file of a split (:func:`index_folder`, and the data check's scan) is a *tree
walk*, the expensive part of starting a run on a large data set on a shared file system.
Each process counts them (:func:`tree_walks`), so tests and benchmarks can see how often a
run walks its data. Reading a file list is not a walk.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from gppq_dist.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

_tree_walks = 0


def tree_walks() -> int:
    """Full walks of a data tree this process has made so far (see the module docstring)."""
    return _tree_walks


def count_tree_walk() -> None:
    """Called once by every function that lists all the files of a data tree."""
    global _tree_walks
    _tree_walks += 1


@dataclass(frozen=True)
class SplitIndex:
    """The ``samples`` (absolute path, class index) of one split, in a stable order."""

    split: str
    classes: list[str]
    samples: list[tuple[str, int]]

    @property
    def paths(self) -> list[str]:
        return [path for path, _ in self.samples]

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self.samples]


def entries_under(folder: str | Path) -> list[tuple[str, os.stat_result]]:
    """Every entry below ``folder``, recursively, with its ``stat`` (links followed), in the
    order and spelling of ``sorted(Path(folder).rglob("*"))``.

    As ``rglob``, a linked folder is listed but not entered and an unreadable folder adds
    nothing; entries that cannot be stat'ed (dangling links) are left out. One ``scandir``
    per folder and one ``stat`` per entry, without pathlib's cost per path.
    """
    found: list[tuple[tuple[str, ...], str, os.stat_result]] = []

    def visit(path: str, parts: tuple[str, ...]) -> None:
        try:
            with os.scandir(path) as listing:
                entries = list(listing)
        except PermissionError:
            return
        for entry in entries:
            try:
                info = entry.stat()
            except OSError:
                continue
            key = (*parts, entry.name)
            found.append((key, entry.path, info))
            if stat.S_ISDIR(info.st_mode) and not entry.is_symlink():
                visit(entry.path, key)

    visit(str(Path(folder)), ())
    found.sort(key=lambda item: item[0])  # Path ordering: part by part
    return [(path, info) for _, path, info in found]


def relative_to_root(path: str, root_prefix: str) -> str:
    """``str(Path(path).relative_to(root))`` for ``root_prefix = str(Path(root))``, by string
    operations: "" for the root itself, ``path`` unchanged when it does not lie under the
    root as spelled (an absolute path outside a relative root, say)."""
    if path == root_prefix:
        return ""
    if root_prefix == ".":
        return path  # relative paths already are; absolute ones stay absolute
    head = root_prefix if root_prefix.endswith("/") else root_prefix + "/"
    return path[len(head):] if path.startswith(head) else path


def join_root(root_prefix: str, relative: str) -> str:
    """The inverse of :func:`relative_to_root`: ``str(Path(root_prefix) / relative)``."""
    if not relative:
        return root_prefix
    if relative.startswith("/") or root_prefix == ".":
        return relative
    return (root_prefix if root_prefix.endswith("/") else root_prefix + "/") + relative


def is_image_name(path: str | Path) -> bool:
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def class_folders(split_dir: Path) -> list[str]:
    """Sorted names of the class folders of a split (hidden folders ignored)."""
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def split_dir(root: str | Path, split: str, key: str = "data.root") -> Path:
    """``root/split``; for ``val``, a root that holds class folders directly also works."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{key}: data folder '{root}' does not exist")
    candidate = root / split
    if candidate.is_dir():
        return candidate
    if split == "val" and not (root / "train").is_dir() and class_folders(root):
        return root
    raise DataError(f"{key}: '{root}' has no '{split}/' folder (expected {root}/{split}/<class>/<image>)")


def index_folder(folder: Path, classes: list[str] | None = None) -> SplitIndex:
    """Every image file under ``folder/<class>/`` (sorted), labelled by ``classes``.

    ``classes`` defaults to the folder's own class folders; a class folder missing from
    ``classes`` is an error (val naming a class train does not have).
    """
    count_tree_walk()
    own = class_folders(folder)
    classes = own if classes is None else classes
    position = {name: index for index, name in enumerate(classes)}
    unknown = [name for name in own if name not in position]
    if unknown:
        raise DataError(
            f"'{folder}' has class folders that the train split does not: {', '.join(unknown[:10])}"
        )
    samples = [
        (path, position[name])
        for name in own
        for path, info in entries_under(folder / name)
        if stat.S_ISREG(info.st_mode) and is_image_name(path)
    ]
    return SplitIndex(split=folder.name, classes=list(classes), samples=samples)


def read_file_list(list_path: str | Path, root: str | Path, classes: list[str], key: str) -> SplitIndex:
    """``path label`` lines -> samples; blank lines and ``#`` comments are skipped."""
    list_path, root = Path(list_path), Path(root)
    if not list_path.is_file():
        raise DataError(f"{key}: file list '{list_path}' does not exist")
    position = {name: index for index, name in enumerate(classes)}
    samples = []
    for number, line in enumerate(list_path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        path_text, _, label_text = line.rpartition(" ")
        label = _label(label_text.strip(), position, len(classes))
        if not path_text or label is None:
            raise DataError(
                f"{list_path}:{number}: expected '<path> <label>' with a class name or an index "
                f"in 0..{len(classes) - 1}, got {line!r}"
            )
        path = Path(path_text.strip())
        samples.append((str(path if path.is_absolute() else root / path), label))
    return SplitIndex(split=list_path.stem, classes=list(classes), samples=samples)


def index_split(data, split: str) -> SplitIndex:
    """The samples of ``train`` or ``val`` for a :class:`~gppq_dist.config.DataConfig`.

    File lists name classes by the train split's class folders, which must exist.
    """
    root = Path(data.root)
    if not root.is_dir():
        raise DataError(f"data.root: data folder '{root}' does not exist")
    train_dir = root / "train"
    classes = class_folders(train_dir) if train_dir.is_dir() else None
    list_path = getattr(data, f"{split}_list", None)
    if list_path:
        if classes is None:
            raise DataError(f"data.{split}_list needs '{train_dir}/<class>/' folders to name the classes")
        return read_file_list(list_path, root, classes, key=f"data.{split}_list")
    return index_folder(split_dir(root, split), None if split == "train" else classes)


def _label(text: str, position: dict[str, int], count: int) -> int | None:
    if text in position:
        return position[text]
    if text.isdigit() and int(text) < count:
        return int(text)
    return None
