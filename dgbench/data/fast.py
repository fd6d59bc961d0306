"""`data.pipeline=fast`: whole minibatches from in-memory uint8 images, augmented as tensor ops.

The reference pipeline decodes and augments one PIL image at a time in DataLoader workers.
Here a domain's images are one uint8 array (`DomainData.arrays`, N x H x W x 3); a training
batch is a gather of rows plus `batch_augment.augment_batch` on the training device, and an
evaluation batch a gather plus `eval_batch`. The batch at step `s` uses the same sample
indices as the reference pipeline (`StepBatchSampler`), and its augmentation parameters come
from a generator seeded with `(seed, s)`: a resumed run sees the same data, as with the
reference pipeline. The augmentation follows the same distributions, not the same draws.

Datasets that decode files on demand have no `arrays` yet; for them the fast pipeline stops
with a message to use `data.pipeline=reference`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from dgbench.data.base import DomainData
from dgbench.data.batch_augment import augment_batch, eval_batch, sample_params
from dgbench.data.loaders import StepBatchSampler
from dgbench.errors import ConfigError
from dgbench.hparams import seed_hash

Batch = tuple[Tensor, Tensor, int]  # images, labels, skipped images (always 0 here)


def require_arrays(domains: Sequence[DomainData], dataset: str) -> None:
    """Fail with a clear message unless every domain holds its images as one uint8 array."""
    if not all(isinstance(getattr(d, "arrays", None), np.ndarray) for d in domains):
        raise ConfigError(
            f"data.pipeline=fast needs the images of {dataset} decoded in memory, which this dataset "
            f"does not provide yet; use data.pipeline=reference"
        )


class FastSplit:
    """The images and labels of one split, as tensors on the training device."""

    def __init__(self, domain: DomainData, indices: Sequence[int], device: torch.device) -> None:
        rows = np.asarray(indices, dtype=np.int64)
        self.images = torch.from_numpy(np.ascontiguousarray(domain.arrays[rows])).to(device)  # type: ignore[attr-defined]
        self.labels = torch.from_numpy(np.asarray(domain.labels)[rows]).to(device)

    def __len__(self) -> int:
        return len(self.labels)


def train_batches(
    split: FastSplit,
    batch_size: int,
    seed: int,
    start_step: int,
    resolution: int,
    mean: Sequence[float],
    std: Sequence[float],
    augment: bool,
) -> Iterator[Batch]:
    """Infinite training batches from `start_step`; batch `s` depends only on (seed, s)."""
    sampler = StepBatchSampler(len(split), batch_size, seed, start_step)
    _, height, width, _ = split.images.shape
    for step, keys in enumerate(sampler, start=start_step):
        rows = torch.tensor([position for position, _ in keys], device=split.images.device)
        images, labels = split.images[rows], split.labels[rows]
        if augment:
            generator = torch.Generator().manual_seed(seed_hash(seed, "augment", step))
            params = sample_params(len(rows), height, width, generator)
            yield augment_batch(images, params, resolution, mean, std), labels, 0
        else:
            yield eval_batch(images, resolution, mean, std), labels, 0


def eval_batches(
    split: FastSplit,
    batch_size: int,
    resolution: int,
    mean: Sequence[float],
    std: Sequence[float],
    augment_seed: int | None = None,
) -> Iterator[Batch]:
    """The split in order, in batches; augmented with a fixed seed for the `domainbed` protocol."""
    _, height, width, _ = split.images.shape
    for start in range(0, len(split), batch_size):
        images = split.images[start : start + batch_size]
        labels = split.labels[start : start + batch_size]
        if augment_seed is None:
            yield eval_batch(images, resolution, mean, std), labels, 0
        else:
            generator = torch.Generator().manual_seed(seed_hash(augment_seed, start))
            params = sample_params(len(images), height, width, generator)
            yield augment_batch(images, params, resolution, mean, std), labels, 0
