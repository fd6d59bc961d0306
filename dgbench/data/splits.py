"""DomainBed's in/out split of each domain, reproduced exactly.

DomainBed (`scripts/train.py`, `lib/misc.py::split_dataset`) shuffles the sample
indices of every environment with `numpy.random.RandomState(seed_hash(trial_seed,
env_i)).shuffle` and holds out the first `int(n * holdout_fraction)` of them as the
`out` (validation) split; the rest is the `in` split. The seed depends only on the
trial and the domain index, so every run of a trial sees the same split, and so do
DomainBed's published sweeps: our splits must match theirs index for index.

DomainBed shuffles a Python list; shuffling `np.arange(n)` with the same legacy
`RandomState` gives the identical permutation (checked for n up to DomainNet size)
and is several times faster, so we shuffle the array.
"""

from __future__ import annotations

import numbers

import numpy as np

from dgbench.errors import ConfigError
from dgbench.hparams import seed_hash


def check_holdout_fraction(holdout_fraction: float) -> float:
    """Return `holdout_fraction` as a float, or raise if it is not in [0, 1).

    1.0 would leave no training data; a negative value would make slicing silently
    take samples from the end.
    """
    valid = isinstance(holdout_fraction, numbers.Real) and not isinstance(holdout_fraction, bool)
    if not valid or not 0.0 <= float(holdout_fraction) < 1.0:
        raise ConfigError(f"dataset.holdout_fraction must be a number in [0, 1), got {holdout_fraction!r}")
    return float(holdout_fraction)


def split_seed(trial_seed: int, domain_index: int) -> int:
    """The RandomState seed of one domain's split: `seed_hash(trial_seed, domain_index)`.

    Both must be integers: `seed_hash` hashes the tuple's repr, so a string "0" or a
    float 0.0 would silently give a different split from DomainBed's.
    """
    for key, value in (("trial_seed", trial_seed), ("domain index", domain_index)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
    return seed_hash(int(trial_seed), int(domain_index))


def split_indices(
    n: int, holdout_fraction: float, trial_seed: int, domain_index: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split `range(n)` into DomainBed's `(out_indices, in_indices)` for one domain.

    Both arrays are int64 and keep the shuffled order (DomainBed's Subset order).
    `out` has `int(n * holdout_fraction)` elements (truncated, e.g. 2048 * 0.2 -> 409).
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    fraction = check_holdout_fraction(holdout_fraction)
    keys = np.arange(int(n), dtype=np.int64)
    np.random.RandomState(split_seed(trial_seed, domain_index)).shuffle(keys)
    n_out = int(int(n) * fraction)
    return keys[:n_out], keys[n_out:]
