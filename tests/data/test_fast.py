"""The fast pipeline's training streams: one producer for all domains, each domain's batches its own."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dgbench.data import fast
from dgbench.data.batch_augment import augment_batch, eval_batch, sample_params
from dgbench.data.fast import FastSplit, train_streams
from dgbench.data.loaders import StepBatchSampler
from dgbench.hparams import seed_hash

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
BATCH, START, RES = 4, 5, 8
SEEDS = (11, 12, 13)


def split(size: int, seed: int) -> FastSplit:
    rng = np.random.default_rng(seed)
    domain = SimpleNamespace(
        arrays=rng.integers(0, 256, (10, size, size, 3), dtype=np.uint8), labels=np.arange(10) % 3
    )
    return FastSplit(domain, range(10), torch.device("cpu"))  # type: ignore[arg-type]


def alone(data: FastSplit, seed: int, step: int, augment: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of `data` at `step` made by itself: its sampler's rows, augmented by themselves."""
    sampler = iter(StepBatchSampler(len(data), BATCH, seed, START))
    for _ in range(step - START):
        next(sampler)
    keys = next(sampler)
    images, labels, _ = data.take(np.array([position for position, _ in keys], dtype=np.int64))
    if not augment:
        return eval_batch(images, RES, MEAN, STD), labels
    generator = torch.Generator().manual_seed(seed_hash(seed, "augment", step))
    params = sample_params(len(images), data.height, data.width, generator)
    return augment_batch(images, params, RES, MEAN, STD), labels


@pytest.mark.parametrize("together", [True, False], ids=["together", "one-by-one"])
@pytest.mark.parametrize("augment", [True, False])
def test_each_stream_equals_its_domain_made_alone_in_any_reading_order(
    augment: bool, together: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Making the domains' batches together (as on a GPU) changes no sample; two domains share
    an image size (one augmentation call), one does not (its own call)."""
    monkeypatch.setattr(fast, "_together", lambda splits: together)
    splits = [split(16, 0), split(16, 1), split(12, 2)]
    streams = train_streams(splits, BATCH, SEEDS, START, RES, MEAN, STD, augment)
    # the trainer reads one batch of each stream per step; here stream 0 runs two steps ahead
    order = [(0, START), (0, START + 1), (1, START), (2, START), (1, START + 1), (2, START + 1)]
    order.append((0, START + 2))
    for i, step in order:
        x, y, skipped = next(streams[i])
        want_x, want_y = alone(splits[i], SEEDS[i], step, augment)
        assert x.shape == (BATCH, 3, RES, RES) and skipped == 0
        assert torch.equal(x, want_x), (i, step)
        assert torch.equal(y, want_y), (i, step)


def test_streams_need_a_seed_per_split() -> None:
    with pytest.raises(ValueError):
        train_streams([split(16, 0), split(16, 1)], BATCH, SEEDS, START, RES, MEAN, STD, True)
