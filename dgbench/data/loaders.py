"""Split views and loaders whose randomness is a pure function of (seed, step).

DomainBed draws every training minibatch with replacement (`RandomSampler(
replacement=True)` in its `InfiniteDataLoader`). Here the indices of the batch at
step `s` come from a generator seeded with `seed_hash(seed, domain, s)`, and each
sample's augmentation from a seed derived from its position in the stream. Loaders
yield `(images, labels, n_skipped)`; `n_skipped` counts unreadable images dropped
under `data.skip_corrupt=true`. So the
data a run sees does not depend on worker count, prefetching or restarts: resuming
at step `s` needs no sampler state, and a resumed run is identical to an
uninterrupted one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from dgbench.data.base import DomainData
from dgbench.data.transforms import ImageTransform
from dgbench.errors import DataError
from dgbench.hparams import seed_hash

log = logging.getLogger(__name__)

SampleKey = tuple[int, int]  # (index into the split, augmentation seed)


class SplitView(Dataset):
    """The samples `indices` of one domain, with a transform.

    Items are addressed by an index, or by `(index, seed)` to make the random
    transform reproducible: its draws come from a generator seeded with `seed`. A
    view with a `seed` gives plain indices the seed `seed_hash(seed, index)`, so even
    an augmented evaluation (the `domainbed` protocol) is deterministic.

    With `skip_corrupt`, an unreadable image yields `None` (logged once per file);
    `collate_skipping` drops it from the batch and counts it.
    """

    def __init__(
        self,
        domain: DomainData,
        indices: Sequence[int],
        transform: ImageTransform,
        *,
        seed: int | None = None,
        skip_corrupt: bool = False,
    ) -> None:
        self.domain = domain
        self.indices = np.asarray(indices, dtype=np.int64)
        self.transform = transform
        self.seed = seed
        self.skip_corrupt = skip_corrupt

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | SampleKey) -> tuple[torch.Tensor, int] | None:
        if isinstance(key, tuple):
            position, seed = key
        else:
            position, seed = key, None if self.seed is None else seed_hash(self.seed, int(key))
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        try:
            image, label = self.domain[int(self.indices[position])]
        except DataError as error:
            if not self.skip_corrupt:
                raise
            _warn_skipped(str(error))
            return None
        return self.transform(image, generator), label


_SKIPPED: set[str] = set()


def _warn_skipped(message: str) -> None:
    if message not in _SKIPPED:
        _SKIPPED.add(message)
        log.warning("skipping (data.skip_corrupt=true): %s", message)


def collate_skipping(items: list[tuple[torch.Tensor, int] | None]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """`(images, labels, n_skipped)`: the default collation of the readable items."""
    kept = [item for item in items if item is not None]
    if not kept:
        raise DataError(
            f"all {len(items)} images of a batch are unreadable; run `dgbench data verify <dataset> "
            f"--decode` to list the corrupt files"
        )
    images, labels = default_collate(kept)
    return images, labels, len(items) - len(kept)


class StepBatchSampler(Sampler[list[SampleKey]]):
    """Infinite batches drawn with replacement; batch `s` is a function of (seed, s) alone."""

    def __init__(self, size: int, batch_size: int, seed: int, start_step: int = 0) -> None:
        self.size = size
        self.batch_size = batch_size
        self.seed = seed
        self.start_step = start_step

    def batch(self, step: int) -> list[SampleKey]:
        generator = torch.Generator().manual_seed(seed_hash(self.seed, step))
        indices = torch.randint(self.size, (self.batch_size,), generator=generator).tolist()
        first = step * self.batch_size
        return [(i, (self.seed + first + j) % 2**63) for j, i in enumerate(indices)]

    def __iter__(self) -> Iterator[list[SampleKey]]:
        step = self.start_step
        while True:
            yield self.batch(step)
            step += 1


def train_loader(
    view: SplitView, batch_size: int, seed: int, start_step: int, num_workers: int, pin_memory: bool
) -> DataLoader:
    """An infinite loader over one training domain, starting at `start_step`."""
    return DataLoader(
        view,
        batch_sampler=StepBatchSampler(len(view), batch_size, seed, start_step),
        num_workers=num_workers,
        pin_memory=pin_memory,
        collate_fn=collate_skipping,
        # An own generator keeps DataLoader from drawing its base seed from the global RNG,
        # which would make the training RNG stream depend on when loaders were created.
        generator=torch.Generator(),
    )


def eval_loader(view: SplitView, batch_size: int, num_workers: int, pin_memory: bool) -> DataLoader:
    return DataLoader(
        view,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        collate_fn=collate_skipping,
    )
