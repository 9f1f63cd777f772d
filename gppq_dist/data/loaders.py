"""One entry point for training and validation batches: :func:`build_loader`.

Its samples are either given (``samples=``, from a run's data manifest,
:mod:`gppq_dist.data.manifest`: the data was checked once when the manifest was made, and
the loader neither checks nor walks the tree again) or found by :func:`checked_samples`,
which checks the data first (:func:`~gppq_dist.data.check.check_and_index`, cached, one walk
of the tree), so a bad file either stops the run before it starts (``data.on_bad_file:
error``) or is left out of the file list (``skip``) and never opened: no run dies half-way
through an epoch.

Then it picks the loader:

- ``data.loader: dali`` -> :class:`~gppq_dist.data.dali.DaliLoader`, on the GPU for
  ``data.device: gpu`` (nvJPEG decoding), on the CPU for ``cpu``, and for ``auto`` on the
  GPU when torch sees one. ``gpu`` with no GPU visible falls back to the DALI CPU pipeline,
  and a DALI that cannot be imported falls back to torchvision; each with one warning line.
- ``data.loader: torchvision`` -> :class:`~gppq_dist.data.folder.TorchvisionLoader`.

Where batches go. With ``device`` (a ``torch.device``, the model's) every batch is delivered
there and ``loader.device == device``: DALI decodes on that GPU (``device_id =
device.index``) unless ``data.device`` is ``cpu``; a DALI CPU pipeline's or torchvision's
batches are copied over with ``non_blocking=True``, torchvision's from pinned memory. So
``data.device: cpu`` on a GPU machine decodes on the CPU and still hands CUDA tensors to
the model. Without ``device``, DALI's GPU is ``cuda:local_rank`` (or the CPU), and
torchvision's batches stay on the CPU. Nothing here synchronizes with the GPU per batch.

Both take the same samples, so labels and skipped files are identical, shard the same way
and yield the same number of train steps per epoch on every rank.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator, Protocol, Sequence

import torch

from gppq_dist.data.check import FILE_KINDS, CheckedData, check_and_index
from gppq_dist.data.folder import LoaderSpec, TorchvisionLoader
from gppq_dist.data.layout import split_dir
from gppq_dist.errors import DataError

log = logging.getLogger(__name__)

NO_GPU_WARNING = "data.device is gpu but no GPU is visible; DALI decodes on the CPU"
CPU_TARGET_WARNING = "data.device is gpu but batches go to {device}; DALI decodes on the CPU"
NO_DALI_WARNING = "data.loader is dali but DALI cannot be imported ({error}); using torchvision's DataLoader"

_warned: set[str] = set()


class Loader(Protocol):
    """What :func:`build_loader` returns: one epoch of ``(images, labels)`` per ``iter()``."""

    device: torch.device

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int, start_step: int = 0, state: str = "") -> None:
        """Pick the epoch of the next ``iter()``; it yields batches ``start_step`` .. ``len - 1``.

        ``state``: what :meth:`position` returned on this rank after batch ``start_step``
        of that epoch, so the loader gets there without reading the skipped batches; with
        "" it reads and drops them (DALI) or skips their indices (torchvision).
        """

    def position(self) -> str:
        """Where the current ``iter()`` stands (after the batches yielded so far), as a string."""


def build_loader(
    data: Any,
    split: str,
    rank: int = 0,
    world_size: int = 1,
    local_rank: int = 0,
    seed: int = 0,
    batch_size: int | None = None,
    samples: Sequence[tuple[str, int]] | None = None,
    device: torch.device | None = None,
) -> Loader:
    """The ``split`` (``train`` or ``val``) loader of ``rank`` out of ``world_size``.

    ``data`` is a :class:`~gppq_dist.config.DataConfig`; ``batch_size`` defaults to
    ``data.batch_size``; ``seed`` fixes the shuffle (with ``set_epoch``) and augmentation.
    ``samples``: the split's checked (path, label) pairs (``Manifest.samples(split)``); the
    loader then neither checks nor lists the data; None: :func:`checked_samples`.
    ``device``: where batches are delivered (``loader.device == device``); None: DALI's
    pipeline device (``cuda:local_rank`` or the CPU), the CPU for torchvision.
    Yields ``(images float32 [B, 3, S, S], labels int64 [B])`` on ``loader.device``.
    Raises :class:`DataError` for data problems, before any batch is read.
    """
    if samples is None:
        samples = checked_samples(data, split)
    spec = LoaderSpec(samples, data, train=split == "train",
                      batch_size=batch_size or data.batch_size, rank=rank, world_size=world_size, seed=seed)
    if spec.train and spec.steps == 0:
        raise DataError(
            f"data.root: '{data.root}' has {len(spec.samples)} train images, fewer than one batch "
            f"of {spec.batch_size} per process for {world_size} process(es)"
        )
    if device is not None:
        device = torch.device(device)
    if data.loader == "dali":
        dali = _import_dali()
        if dali is not None:
            device_id = (_dali_device_id(data.device, local_rank) if device is None
                         else _dali_device_for(data.device, device))
            return dali.DaliLoader(spec, device_id=device_id, device=device)
    return TorchvisionLoader(spec, device=device)


def run_loader(data: Any, split: str, manifest: Any, context: Any, seed: int,
               batch_size: int | None = None) -> Loader:
    """A loader of a run: the samples of its :class:`~gppq_dist.data.manifest.Manifest`,
    this rank's shard (``context``: a :class:`~gppq_dist.distributed.DistContext`),
    batches delivered to ``context.device``."""
    return build_loader(data, split, rank=context.rank, world_size=context.world_size,
                        local_rank=context.local_rank, seed=seed, batch_size=batch_size,
                        samples=manifest.samples(split), device=context.device)


def checked_samples(data: Any, split: str) -> list[tuple[str, int]]:
    """The (path, label) samples of ``split``, after the pre-flight check of the data.

    Class problems (an empty class folder, train and val classes that differ) are errors
    whatever ``data.on_bad_file`` says; bad files are errors for ``error`` and are left
    out, with one log line, for ``skip``. One walk of the tree (the check's); a run with a
    run folder reads its data manifest instead (:mod:`gppq_dist.data.manifest`).
    """
    return usable_samples(data, check_and_index(data), split)


def usable_samples(data: Any, checked: CheckedData, split: str) -> list[tuple[str, int]]:
    """The samples of ``split`` that a loader may open, from a check's :class:`CheckedData`,
    with :func:`checked_samples`'s errors and its warning line for skipped files."""
    report = checked.report
    class_problems = [problem for problem in report.problems if problem.kind not in FILE_KINDS]
    if class_problems or (report.bad_files and data.on_bad_file == "error"):
        remedy = (
            "the class folders must be fixed (data.on_bad_file does not apply to them)" if class_problems
            else "fix or remove these files, or set data.on_bad_file: skip to leave them out"
        )
        raise DataError(f"data check of '{data.root}' failed; {remedy}:\n{report.summary()}")
    if split not in checked.samples:
        split_dir(data.root, split)  # raises the error naming the missing folder
        raise DataError(f"data.root: '{data.root}' has no {split} split")
    index = checked.samples[split]
    bad = report.bad_files
    samples = [(path, label) for path, label in index if path not in bad] if bad else list(index)
    skipped = len(index) - len(samples)
    if skipped:
        log.warning("data: skipping %d bad file(s) of %d in %s (data.on_bad_file: skip)",
                    skipped, len(index), split)
    if not samples:
        raise DataError(f"data.root: no usable images in the {split} split of '{data.root}'")
    return samples


def _import_dali():
    """:mod:`gppq_dist.data.dali`, or None (and one warning) when DALI cannot be loaded."""
    try:
        from gppq_dist.data import dali
    except (ImportError, OSError) as exc:  # OSError: libdali.so present but not loadable
        _warn_once(NO_DALI_WARNING.format(error=f"{type(exc).__name__}: {exc}"))
        return None
    return dali


def _dali_device_id(device: str, local_rank: int) -> int | None:
    """The GPU DALI runs on (``local_rank``), or None for its CPU pipeline."""
    visible = torch.cuda.is_available()
    if device == "gpu" and not visible:
        _warn_once(NO_GPU_WARNING)
    return local_rank if device != "cpu" and visible else None


def _dali_device_for(setting: str, target: torch.device) -> int | None:
    """The GPU DALI runs on when batches go to ``target``: ``target``'s, unless
    ``data.device`` (``setting``) is ``cpu`` or ``target`` is no CUDA device (None: the
    DALI CPU pipeline)."""
    if target.type != "cuda" or setting == "cpu":
        if setting == "gpu":
            visible = torch.cuda.is_available()
            _warn_once(NO_GPU_WARNING if not visible else CPU_TARGET_WARNING.format(device=target))
        return None
    return target.index if target.index is not None else torch.cuda.current_device()


def _warn_once(message: str) -> None:
    """Log ``message`` once per process (train and val loaders fall back for the same reason)."""
    if message not in _warned:
        _warned.add(message)
        log.warning(message)
