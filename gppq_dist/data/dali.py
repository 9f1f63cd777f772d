"""NVIDIA DALI input pipelines for ImageNet-style classification (train and val).

Train: decode with a random-resized crop (area fraction ``crop_scale``, aspect ratio 3/4 to
4/3), resize to ``image_size`` x ``image_size``, optional horizontal flip, normalize with
``mean``/``std``. Val: decode, resize the shorter side to ``resize_size``, center crop
``image_size``, normalize. Batches come out as ``(images float32 [B, 3, H, W],
labels int64 [B])`` torch tensors on the pipeline's device (a GPU with ``device_id``,
else the CPU).

The reader gets the file list explicitly (``files``/``labels`` from the split index), so
files that the pre-flight check excluded are never opened: DALI has no way to skip a file
that fails to decode, a bad file would end the pipeline for good.

Sharding and epochs. ``fn.readers.file`` with ``shard_id=rank, num_shards=world_size``
cuts the (shuffled) file list into ``world_size`` contiguous, disjoint shards. For train,
``shuffle_after_epoch=True`` shuffles the *whole* list with ``shuffle_after_epoch_seed``
before sharding; every rank uses the same seed, so every rank shuffles identically and the
shards stay disjoint (``random_shuffle`` would shuffle inside each rank's prefetch buffer
instead and is not used). Each epoch runs a freshly built pipeline whose seeds are derived
from ``(seed, epoch)``, so the order of an epoch depends on the seed and the epoch number
alone: resuming at epoch k gives the order an uninterrupted run has at epoch k, and
stopping early (``break``) leaves nothing behind for the next epoch. Building a pipeline
costs well under a second, small against an epoch.

Mid-epoch position. Train pipelines are built with DALI checkpointing on
(``enable_checkpointing``): :meth:`DaliLoader.position` is the DALI checkpoint of the batches
consumed so far (reader position and every random generator's state, as a string), and a
pipeline restored from it yields exactly the batches the interrupted one would have, the
reader skipping the consumed files without decoding them.

Last batch. Shards differ in size by at most one sample, so a rank could end up with one
batch more than another and hang a collective. Train uses ``LastBatchPolicy.DROP``: the
iterator, which knows every shard's size through ``reader_name``, drops partial batches
and ends the epoch on all ranks when the smallest shard has no full batch left, i.e.
after ``train_steps(N, world_size, batch_size)`` = ``floor(floor(N / world_size) /
batch_size)`` batches everywhere. Val yields every sample of its shard exactly once: the
reader pads the shard (``pad_last_batch``) and the iterator cuts the padding off
(``LastBatchPolicy.PARTIAL``), so the last batch may be smaller.
"""

from __future__ import annotations

from typing import Iterator

import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dmath
from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from gppq_dist.data.folder import ASPECT_RATIO, LoaderSpec, derived_seed

READER = "Reader"
# nvJPEG scratch buffers sized for ImageNet-scale images up front, so that the first large
# image does not force a reallocation in the middle of an epoch (NVIDIA's ResNet-50 recipe).
DEVICE_MEMORY_PADDING = 211_025_920
HOST_MEMORY_PADDING = 140_544_512


def build_pipeline(spec: LoaderSpec, device_id: int | None = None, shuffle_seed: int = 0, augment_seed: int = 0,
                   checkpoint: str | None = None):
    """An unbuilt DALI pipeline over ``spec.samples`` (path, label), shard ``spec.rank``.

    ``shuffle_seed`` orders the train files (equal on all ranks), ``augment_seed`` draws
    crops and flips. ``device_id=None`` runs everything on the CPU with
    ``max(1, data.workers)`` threads; an int decodes with nvJPEG (``mixed``) on that GPU
    and runs the other ops there. ``checkpoint`` (train only) restores a saved position.
    Outputs: images float32 [B, 3, image_size, image_size], labels int32 [B, 1].
    """
    data, samples, train = spec.data, spec.samples, spec.train
    on_gpu = device_id is not None
    size = data.image_size
    mean = [255.0 * m for m in data.mean]  # DALI normalizes the 0-255 pixel values
    std = [255.0 * s for s in data.std]

    # DALI's CPU-only mode needs device_id=None (not 0, not -1).
    @pipeline_def(batch_size=spec.batch_size, num_threads=max(1, data.workers), device_id=device_id,
                  seed=augment_seed, enable_checkpointing=train)
    def pipeline():
        jpegs, labels = fn.readers.file(
            files=[path for path, _ in samples],
            labels=[label for _, label in samples],
            shard_id=spec.rank,
            num_shards=spec.world_size,
            **({"shuffle_after_epoch": True, "shuffle_after_epoch_seed": shuffle_seed} if train else {}),
            pad_last_batch=True,
            name=READER,
        )
        decoder_device = "mixed" if on_gpu else "cpu"
        # adjust_orientation=False below: EXIF rotation is ignored, as PIL (torchvision) does,
        # so both loaders see the same pixels
        padding = (
            {"device_memory_padding": DEVICE_MEMORY_PADDING, "host_memory_padding": HOST_MEMORY_PADDING}
            if on_gpu else {}
        )
        if train:
            images = fn.decoders.image_random_crop(
                jpegs, device=decoder_device, output_type=types.RGB, adjust_orientation=False,
                random_area=list(data.crop_scale), random_aspect_ratio=list(ASPECT_RATIO),
                num_attempts=10, **padding,
            )
            images = fn.resize(images, resize_x=size, resize_y=size)
            mirror = fn.random.coin_flip(probability=0.5) if data.horizontal_flip else False
            images = fn.crop_mirror_normalize(
                images, dtype=types.FLOAT, output_layout="CHW", mean=mean, std=std, mirror=mirror,
            )
        else:
            images = fn.decoders.image(jpegs, device=decoder_device, output_type=types.RGB,
                                       adjust_orientation=False, **padding)
            images = _torchvision_resize_center_crop(jpegs, images, data.resize_size, size)
            images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", mean=mean, std=std)
        return images, labels.gpu() if on_gpu else labels

    return pipeline(**({"checkpoint": checkpoint} if checkpoint else {}))


def _torchvision_resize_center_crop(jpegs, images, resize_size: int, crop_size: int):
    """``Resize(resize_size)`` + ``CenterCrop(crop_size)`` with torchvision's exact geometry.

    DALI's own ``resize_shorter`` rounds the longer side where torchvision truncates it,
    and its centered crop rounds half a pixel up where torchvision rounds half to even, so
    a quarter of the images would come out shifted by a pixel. The output size and the
    crop window are computed here per image, from the encoded image's shape, instead.
    """
    # H, W, C of the stored image, as the decoder (adjust_orientation=False) will output it
    shape = fn.peek_image_shape(jpegs, dtype=types.INT64, adjust_orientation=False)
    height, width = shape[0], shape[1]
    short, long = dmath.min(height, width), dmath.max(height, width)
    new_long = resize_size * long // short
    landscape = fn.cast(width > height, dtype=types.INT64)
    new_width = resize_size + (new_long - resize_size) * landscape
    new_height = new_long + (resize_size - new_long) * landscape
    images = fn.resize(images, resize_x=fn.cast(new_width, dtype=types.FLOAT),
                       resize_y=fn.cast(new_height, dtype=types.FLOAT))
    start = fn.stack(_half_to_even(new_height - crop_size), _half_to_even(new_width - crop_size))
    return fn.slice(images, start=fn.cast(start, dtype=types.INT32), shape=[crop_size, crop_size], axes=[0, 1])


def _half_to_even(excess):
    """``round(excess / 2)`` with Python's round-half-to-even, on integer DALI nodes."""
    half = excess // 2
    return half + (excess - 2 * half) * (half - 2 * (half // 2))


class DaliLoader:
    """Batches of one rank's shard, one epoch per ``iter()``; ``set_epoch`` picks the order.

    Yields ``(images float32 [B, 3, S, S], labels int64 [B])`` on ``device``, by default
    the pipeline's own (``cuda:device_id``, or the CPU when ``device_id`` is None);
    ``spec.steps`` batches per epoch (for train the same on every rank). A pipeline on
    another device than ``device`` (the CPU pipeline feeding a GPU) has its batches copied
    there with ``non_blocking=True``. As with torch's ``DistributedSampler``, the order
    changes only when ``set_epoch`` is called.
    """

    def __init__(self, spec: LoaderSpec, device_id: int | None = None, device: torch.device | None = None):
        self.spec = spec
        self.device_id = device_id
        self.target = None if device is None else torch.device(device)
        self.epoch = 0
        self.start_step, self.state = 0, ""
        self._batches: DALIGenericIterator | None = None

    @property
    def pipeline_device(self) -> torch.device:
        """Where the pipeline's outputs are: ``cuda:device_id``, or the CPU."""
        return torch.device("cpu") if self.device_id is None else torch.device("cuda", self.device_id)

    @property
    def device(self) -> torch.device:
        return self.pipeline_device if self.target is None else self.target

    def set_epoch(self, epoch: int, start_step: int = 0, state: str = "") -> None:
        self.epoch, self.start_step, self.state = epoch, start_step, state

    def position(self) -> str:
        if self._batches is None or not self.spec.train:
            return ""
        return self._batches.checkpoints()[0]

    def __len__(self) -> int:
        return self.spec.steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if len(self) == 0:  # an empty shard: nothing to read
            return
        spec = self.spec
        pipe = build_pipeline(
            spec, self.device_id,
            # the shuffle seed must be equal on all ranks (disjoint shards), the
            # augmentation seed differs per rank (different crops of different images)
            shuffle_seed=derived_seed(spec.seed, self.epoch),
            augment_seed=derived_seed(spec.seed, self.epoch, spec.rank, 1),
            checkpoint=self.state or None,
        )
        # with no saved state, reach start_step by reading and dropping the batches before it
        skip = 0 if self.state else self.start_step
        self.start_step, self.state = 0, ""
        pipe.build()
        batches = DALIGenericIterator(
            [pipe], ["images", "labels"], reader_name=READER, auto_reset=False,
            last_batch_policy=LastBatchPolicy.DROP if spec.train else LastBatchPolicy.PARTIAL,
        )
        self._batches = batches
        # a CPU pipeline feeding a GPU copies each batch over; a GPU pipeline is already there
        move = self.target is not None and self.target != self.pipeline_device
        try:
            for index, [batch] in enumerate(batches):
                if index >= skip:
                    images, labels = batch["images"], batch["labels"].view(-1).long()
                    if move:
                        images = images.to(self.target, non_blocking=True)
                        labels = labels.to(self.target, non_blocking=True)
                    yield images, labels
        finally:
            self._batches = None
            del batches, pipe
