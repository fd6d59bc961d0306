"""Pairings of per-domain minibatches, as DomainBed draws them for Mixup and MLDG.

Reference: facebookresearch/DomainBed `domainbed/lib/misc.py`, `random_pairs_of_minibatches`
and `split_meta_train_test` (read at commit 0fbf4ce; unchanged in substance since the ICLR 2021
release). Both draw their domain permutation with `torch.randperm` from torch's global CPU
generator, which the trainer seeds and saves in every checkpoint, so a resumed run draws the same
pairs. A `generator` may be passed instead (tests, or callers that keep their own stream).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import cycle

import torch

from dgbench.algorithms.base import DomainBatch

BatchPair = tuple[DomainBatch, DomainBatch]


def domain_permutation(num_domains: int, generator: torch.Generator | None = None) -> list[int]:
    """`torch.randperm(num_domains)` on the CPU: DomainBed's draw, one per call."""
    return torch.randperm(num_domains, generator=generator).tolist()


def truncated_pair(batches: Sequence[DomainBatch], i: int, j: int) -> BatchPair:
    """Domains i and j, both cut to the shorter of the two minibatches (DomainBed's `min_n`)."""
    (xi, yi), (xj, yj) = batches[i], batches[j]
    n = min(len(xi), len(xj))
    return (xi[:n], yi[:n]), (xj[:n], yj[:n])


def cyclic_pair_indices(perm: Sequence[int]) -> list[tuple[int, int]]:
    """(perm[k], perm[k+1 mod n]) for k = 0..n-1: every domain is first once and second once."""
    n = len(perm)
    return [(perm[k], perm[(k + 1) % n]) for k in range(n)]


def random_pairs_of_minibatches(
    batches: Sequence[DomainBatch], generator: torch.Generator | None = None
) -> list[BatchPair]:
    """DomainBed's `random_pairs_of_minibatches`: a random permutation of the domains, each paired
    with the next one cyclically, both truncated to the shorter batch. One pair per domain (a
    single domain is paired with itself)."""
    perm = domain_permutation(len(batches), generator)
    return [truncated_pair(batches, i, j) for i, j in cyclic_pair_indices(perm)]


def split_meta_train_test(
    batches: Sequence[DomainBatch], num_meta_test: int, generator: torch.Generator | None = None
) -> list[BatchPair]:
    """DomainBed's later `split_meta_train_test` (MLDG after DomainBed issue #94): the last
    `num_meta_test` domains of a random permutation are meta-test, each of the other (meta-train)
    domains is paired with them in turn, cycling; n − num_meta_test pairs."""
    n = len(batches)
    if not 1 <= num_meta_test < n:
        raise ValueError(
            f"num_meta_test must be in [1, {n - 1}] for {n} training domains, got {num_meta_test}"
        )
    perm = domain_permutation(n, generator)
    meta_train, meta_test = perm[: n - num_meta_test], perm[n - num_meta_test :]
    return [truncated_pair(batches, i, j) for i, j in zip(meta_train, cycle(meta_test))]
