"""`data.pipeline=fast`: whole minibatches from in-memory uint8 images, augmented as tensor ops.

The reference pipeline decodes and augments one PIL image at a time in DataLoader workers.
Here a domain's images are one uint8 array (`DomainData.arrays`, N x H x W x 3); a training
batch is a gather of rows plus `augment_batch` on the training device (on an accelerator, one
call for every training domain's batch of the step: `train_streams`), and an evaluation batch a
gather plus `eval_batch`. The batch at step `s` uses the same sample indices as the reference
pipeline (`StepBatchSampler`), and its augmentation parameters come from a generator seeded
with `(seed, s)`: a resumed run sees the same data, as with the reference pipeline. The
augmentation follows the same distributions, not the same draws.

Folder datasets get their `arrays` from the decoded-image cache (`dgbench.data.image_cache`): a
read-only memory map of every image squashed to R x R, the reference eval transform's resize.
Evaluation is then the reference's bit for bit. Training crops are taken from that R x R image
rather than from the original file, which differs from the reference in two ways. Sharpness: the
crop (area fraction 0.7-1 of R x R) is upscaled to R by 1-1.4x from an image already resampled
once, where the reference resamples the original once (downscaling it when the original is larger
than about 1.2 R): nearly equal for PACS's 227 px originals, softer for DomainNet-size images
(`data.cache_resolution` above R keeps more detail, at the price of evaluation being resized from
the cache instead of from the file). Aspect: for a non-square original of aspect A = W / H, the
crop's ratio r in [3/4, 4/3] applies to the squashed image, so objects end up scaled by 1/(r A)
horizontally relative to vertically instead of 1/r: centred on the eval transform's 1/A rather
than on 1 (identical for square originals such as PACS's).

Other datasets that decode files on demand have no `arrays`; for them the fast pipeline stops
with a message to use `data.pipeline=reference`.
"""

from __future__ import annotations

import itertools
import mmap
from collections import deque
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from dgbench.data.base import DomainData
from dgbench.data.batch_augment import AugmentParams, augment_batch, eval_batch, sample_params
from dgbench.data.loaders import StepBatchSampler
from dgbench.devices import to_device
from dgbench.errors import ConfigError, DataError
from dgbench.hparams import seed_hash

Batch = tuple[Tensor, Tensor, int]  # images, labels, unreadable images dropped (data.skip_corrupt)

# Splits up to this size are copied to an accelerator once; larger ones (DomainNet) are gathered
# from the host array batch by batch.
DEVICE_COPY_BYTES = 1 << 30


def release_mapped_pages(array: np.ndarray) -> None:
    """Drop the pages of a memory-mapped array from this process's resident memory; no-op otherwise.

    Once a split is on the device its rows are not read again, but the pages its copy touched
    stay mapped, and counted in the process's RSS (1.5 GB for PACS at 224 px), until the kernel
    needs the memory. They stay in the page cache: a later read (another split of the same
    domain) costs no disk access.
    """
    base = array
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None)
    if base is not None and hasattr(mmap, "MADV_DONTNEED"):  # Linux, macOS
        base.madvise(mmap.MADV_DONTNEED)


def require_arrays(domains: Sequence[DomainData], dataset: str) -> None:
    """Fail with a clear message unless every domain holds its images as one uint8 array."""
    if not all(isinstance(getattr(d, "arrays", None), np.ndarray) for d in domains):
        raise ConfigError(
            f"data.pipeline=fast needs the images of {dataset} decoded in memory, which this dataset "
            f"does not provide yet; use data.pipeline=reference"
        )


class FastSplit:
    """The images and labels of one split, gathered batch by batch from the domain's array.

    On CPU nothing is copied up front: each batch reads its rows from `domain.arrays`, which for
    folder datasets is a memory-mapped cache, so a split never sits twice in host memory. On an
    accelerator a split of at most `DEVICE_COPY_BYTES` is copied to the device once.
    Rows in `domain.unreadable` (kept only under `data.skip_corrupt`) are dropped from every batch
    and counted, as the reference pipeline drops and counts them.
    """

    def __init__(self, domain: DomainData, indices: Sequence[int], device: torch.device) -> None:
        self.rows = np.asarray(indices, dtype=np.int64)
        self.source: np.ndarray = domain.arrays  # type: ignore[attr-defined]
        self.device = device
        _, self.height, self.width, _ = self.source.shape
        self.labels = torch.from_numpy(np.asarray(domain.labels)[self.rows])
        unreadable = getattr(domain, "unreadable", None)
        self.readable = None if unreadable is None or not len(unreadable) else ~np.isin(self.rows, unreadable)
        self.images: Tensor | None = None
        if device.type != "cpu" and len(self.rows) * self.source[0].nbytes <= DEVICE_COPY_BYTES:
            self.images = torch.from_numpy(np.ascontiguousarray(self.source[self.rows])).to(device)
            self.labels = self.labels.to(device)
            release_mapped_pages(self.source)

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, positions: np.ndarray) -> Batch:
        """uint8 images and labels at `positions` of the split, on the device, minus unreadable ones."""
        skipped = 0
        if self.readable is not None:
            keep = self.readable[positions]
            skipped, positions = int(len(positions) - keep.sum()), positions[keep]
            if not len(positions):
                raise DataError(
                    f"all {skipped} images of a batch are unreadable; run `dgbench data verify <dataset> "
                    f"--decode` to list the corrupt files"
                )
        if self.images is not None:
            index = to_device(torch.from_numpy(positions), self.device)
            return self.images[index], self.labels[index], skipped
        images = torch.from_numpy(self.source[self.rows[positions]])  # a gather copies just these rows
        labels = self.labels[torch.from_numpy(positions)]
        return to_device(images, self.device), to_device(labels, self.device), skipped


def train_streams(
    splits: Sequence[FastSplit],
    batch_size: int,
    seeds: Sequence[int],
    start_step: int,
    resolution: int,
    mean: Sequence[float],
    std: Sequence[float],
    augment: bool,
) -> list[Iterator[Batch]]:
    """One infinite stream of training batches per split, from `start_step`.

    Split i's batch at step `s` depends only on (seeds[i], s). On an accelerator the streams
    share one producer that makes a step's batches of every split together, so their
    augmentation is one kernel sequence (`augment_splits`), not one per domain: on a GPU each op
    costs the host a launch (~14 us on the H100 machines) whatever the batch size, so the data
    path is bounded by the host there (with per-domain calls an ERM ResNet-50 step at 224 px,
    3 x 32 images, took 60 ms against the model step's 40). The trainer takes one batch of every
    stream per step; a stream read ahead of the others keeps the others' batches until they are
    read.
    On CPU (see `_together`) each stream makes its own batch when it is read.
    """
    samplers = [
        iter(StepBatchSampler(len(split), batch_size, seed, start_step))
        for split, seed in zip(splits, seeds, strict=True)
    ]
    everyone = list(range(len(splits)))
    groups = [everyone] if _together(splits) else [[i] for i in everyone]
    steps = [itertools.count(start_step) for _ in groups]
    pending: list[deque[Batch]] = [deque() for _ in splits]

    def produce(group: int) -> None:
        members, step = groups[group], next(steps[group])
        taken = [
            splits[i].take(np.array([position for position, _ in next(samplers[i])], dtype=np.int64))
            for i in members
        ]
        images = [x for x, _, _ in taken]
        if augment:
            params = [
                _draw(splits[i], len(x), seed_hash(seeds[i], "augment", step))
                for x, i in zip(images, members, strict=True)
            ]
            outputs = augment_splits(images, params, resolution, mean, std)
        else:
            outputs = [eval_batch(x, resolution, mean, std) for x in images]
        for i, x, (_, labels, skipped) in zip(members, outputs, taken, strict=True):
            pending[i].append((x, labels, skipped))

    def stream(i: int) -> Iterator[Batch]:
        group = next(g for g, members in enumerate(groups) if i in members)
        while True:
            if not pending[i]:
                produce(group)
            yield pending[i].popleft()

    return [stream(i) for i in everyone]


def _draw(split: FastSplit, count: int, seed: int) -> AugmentParams:
    """Augmentation parameters for `count` images of `split`, from a generator seeded with `seed`
    alone, so a batch's draw does not depend on what ran before it (a resumed run sees the same)."""
    return sample_params(count, split.height, split.width, torch.Generator().manual_seed(seed))


def _together(splits: Sequence[FastSplit]) -> bool:
    """Whether the splits' batches are made together: on accelerators, where it saves launches.

    On CPU the compiled augmentation works image by image, so a joint call saves nothing, and
    making every domain's batch before the first is read keeps three 224 px batches (58 MB) alive
    at once: freed together, glibc returns them to the system, and the next step faults in fresh
    pages (measured: 3.4x the page faults of one batch at a time, half the images/s).
    """
    return any(split.device.type != "cpu" for split in splits)


def augment_splits(
    images: Sequence[Tensor],
    params: Sequence[AugmentParams],
    resolution: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> list[Tensor]:
    """`augment_batch` of each (images[i], params[i]), as one call per image size.

    Each sample's output depends only on its image and parameters, so augmenting the batches
    concatenated gives each batch's own result (up to the float rounding of a reduction over
    a different batch shape on the GPU).
    """
    by_size: dict[tuple[int, ...], list[int]] = {}
    for i, x in enumerate(images):
        by_size.setdefault(tuple(x.shape[1:]), []).append(i)
    outputs: list[Tensor] = [torch.empty(0)] * len(images)
    for members in by_size.values():
        joined = augment_batch(
            torch.cat([images[i] for i in members]),
            AugmentParams.cat([params[i] for i in members]),
            resolution,
            mean,
            std,
        )
        for i, x in zip(members, joined.split([len(images[i]) for i in members]), strict=True):
            outputs[i] = x
    return outputs


def eval_batches(
    split: FastSplit,
    batch_size: int,
    resolution: int,
    mean: Sequence[float],
    std: Sequence[float],
    augment_seed: int | None = None,
) -> Iterator[Batch]:
    """The split in order, in batches; augmented with a fixed seed for the `domainbed` protocol."""
    for start in range(0, len(split), batch_size):
        images, labels, skipped = split.take(np.arange(start, min(start + batch_size, len(split))))
        if augment_seed is None:
            yield eval_batch(images, resolution, mean, std), labels, skipped
        else:
            params = _draw(split, len(images), seed_hash(augment_seed, start))
            yield augment_batch(images, params, resolution, mean, std), labels, skipped
