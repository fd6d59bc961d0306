"""The data a run consumes: training batch streams and evaluation batches, per pipeline.

`reference`: PIL decoding and torchvision transforms per sample in DataLoader workers
(DomainBed's path). `fast`: in-memory uint8 images, augmented per batch as tensor ops on
the training device (`dgbench.data.fast`); folder datasets are decoded once into a memory-mapped
cache for it (`dgbench.data.image_cache`). Both draw the same sample indices at every step
and yield `(images, labels, n_skipped)`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch import Tensor

from dgbench.data import fast
from dgbench.data.base import MultiDomainDataset
from dgbench.data.cpu_workers import available_cores
from dgbench.data.folder import FolderDataset
from dgbench.data.image_cache import attach_arrays
from dgbench.data.loaders import SplitView, eval_loader, train_loader
from dgbench.data.transforms import eval_transform, train_transform
from dgbench.hparams import seed_hash

Batch = tuple[Tensor, Tensor, int]


@dataclass
class Streams:
    train: list[Iterator[Batch]]  # one infinite stream per training domain
    eval: dict[tuple[str, str], Callable[[], Iterable[Batch]]]  # (domain, "in"|"out") -> batches


@dataclass
class PipelineSpec:
    """What both pipelines need to know."""

    pipeline: str  # reference | fast
    resolution: int
    mean: Sequence[float]
    std: Sequence[float]
    augment: bool
    augment_train_out: bool  # the `domainbed` protocol: training domains' out split augmented
    batch_size: int
    eval_batch_size: int
    seed: int
    start_step: int
    num_workers: int | None  # None: `loader_workers` decides
    skip_corrupt: bool
    device: torch.device
    cache_resolution: int | None = None  # folder datasets' decoded-image cache; None: `resolution`
    skip_train_in: bool = False  # no evaluation source for the training domains' `in` splits

    def evaluated(self, domain: int, split: str, train_envs: Sequence[int]) -> bool:
        return not (self.skip_train_in and split == "in" and domain in train_envs)


def build_streams(
    dataset: MultiDomainDataset,
    splits: Sequence[tuple[np.ndarray, np.ndarray]],
    train_envs: Sequence[int],
    spec: PipelineSpec,
) -> Streams:
    """Training streams (from `spec.start_step`) and evaluation sources for the evaluated splits."""
    build = _fast if spec.pipeline == "fast" else _reference
    return build(dataset, splits, train_envs, spec)


def loader_workers(requested: int | None, dataset: MultiDomainDataset, train_loaders: int) -> tuple[int, int]:
    """DataLoader workers per training loader and for evaluation: `requested`, else sized to the cores.

    The training loaders run together, so they share the usable cores (at least one worker each);
    evaluation runs alone and gets them all. Datasets held in memory get none: an item costs
    them less than a worker's inter-process copy. (DomainBed gives each of its loaders 8 workers
    whatever the machine: 96 processes and ~17 GB on a 2-core machine for PACS.)
    """
    if requested is not None:
        return requested, requested
    if not isinstance(dataset, FolderDataset):
        return 0, 0
    cores = available_cores()
    return max(1, cores // max(1, train_loaders)), cores


def _reference(
    dataset: MultiDomainDataset,
    splits: Sequence[tuple[np.ndarray, np.ndarray]],
    train_envs: Sequence[int],
    spec: PipelineSpec,
) -> Streams:
    train_workers, eval_workers = loader_workers(spec.num_workers, dataset, len(train_envs))
    train_tf = train_transform(spec.resolution, spec.mean, spec.std, spec.augment)
    eval_tf = eval_transform(spec.resolution, spec.mean, spec.std)
    pin = spec.device.type == "cuda"
    train = [
        iter(
            train_loader(
                SplitView(dataset[i], splits[i][1], train_tf, skip_corrupt=spec.skip_corrupt),
                spec.batch_size,
                seed_hash(spec.seed, i),
                spec.start_step,
                train_workers,
                pin,
            )
        )
        for i in train_envs
    ]
    sources = {}
    for i, domain in enumerate(dataset.domains):
        for split, indices in (("in", splits[i][1]), ("out", splits[i][0])):
            if not spec.evaluated(i, split, train_envs):
                continue
            # DomainBed's quirk: the transform is attached before splitting, so a training domain's
            # `out` split is evaluated augmented. Only the `domainbed` protocol reproduces it.
            quirk = spec.augment_train_out and split == "out" and i in train_envs
            view = SplitView(
                dataset[i],
                indices,
                train_tf if quirk else eval_tf,
                seed=seed_hash(spec.seed, "eval", i) if quirk else None,
                skip_corrupt=spec.skip_corrupt,
            )
            sources[domain, split] = partial(eval_loader, view, spec.eval_batch_size, eval_workers, pin)
    return Streams(train, sources)


def _fast(
    dataset: MultiDomainDataset,
    splits: Sequence[tuple[np.ndarray, np.ndarray]],
    train_envs: Sequence[int],
    spec: PipelineSpec,
) -> Streams:
    if isinstance(dataset, FolderDataset):  # decode once into the memory-mapped cache, or open it
        resolution = spec.cache_resolution or spec.resolution
        attach_arrays(dataset, resolution, skip_corrupt=spec.skip_corrupt)
    fast.require_arrays(dataset.domain_data, dataset.name)
    norm = (spec.resolution, spec.mean, spec.std)
    # A training domain's `in` split feeds both its training stream and its evaluation: one copy.
    train_in = {i: fast.FastSplit(dataset[i], splits[i][1], spec.device) for i in train_envs}
    train = fast.train_streams(
        [train_in[i] for i in train_envs],
        spec.batch_size,
        [seed_hash(spec.seed, i) for i in train_envs],
        spec.start_step,
        *norm,
        spec.augment,
    )
    sources = {}
    for i, domain in enumerate(dataset.domains):
        for split, indices in (("in", splits[i][1]), ("out", splits[i][0])):
            if not spec.evaluated(i, split, train_envs):
                continue
            quirk = spec.augment_train_out and split == "out" and i in train_envs
            shared = split == "in" and i in train_in
            data = train_in[i] if shared else fast.FastSplit(dataset[i], indices, spec.device)
            seed = seed_hash(spec.seed, "eval", i) if quirk else None
            sources[domain, split] = partial(fast.eval_batches, data, spec.eval_batch_size, *norm, seed)
    return Streams(train, sources)
