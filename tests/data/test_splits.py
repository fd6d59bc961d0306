"""DomainBed's in/out splits: seed table, sizes, and the PACS test vectors (datasets.md §3)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from dgbench.data.folder import FolderDataset
from dgbench.data.splits import split_indices, split_seed
from dgbench.errors import ConfigError
from dgbench.hparams import seed_hash

# seed_hash(trial_seed, env_i) for trial 0..2 and env 0..5 (datasets.md §3).
SEED_TABLE = {
    0: [894182419, 1514274641, 1325548499, 1796103049, 1773288162, 1833038383],
    1: [785910682, 1442673865, 1981683110, 1739848239, 582996474, 65219121],
    2: [472130416, 181139023, 248334461, 1709828778, 402558190, 941488192],
}

# datasets.md §3.1: domain, env_i, trial_seed, n, first 5 shuffled keys, sha256 of the sorted out-split paths.
PACS_TABLE = """
art_painting 0 0 2048 548,677,1997,977,1553 6cfacc39ddb10d89887296bd14ee9ad460ebcad9d8f3a93ca9d721ea88be33bb
art_painting 0 1 2048 1394,1699,1095,19,1757 b1e74a20a9bf42aabd7fe537c6b631a09728763d805e83890ccca028133dfd13
art_painting 0 2 2048 388,1649,941,375,1008 87f8103fe8f7a702bc0411460e2ded6b9c66046fcffad04766df0ac0aa6ac9ec
cartoon 1 0 2344 1488,562,461,570,2092 73240f70c0dc1f1eec33178b44ef38a7b3577d3e8cb709dfdbf1b92b16b8b3fe
cartoon 1 1 2344 2104,1634,329,1581,977 5cad3267b034e3bc83d1c0d2309ec8dc4745c98079de4ce2a66788e7cd57456f
cartoon 1 2 2344 655,1275,780,1832,1409 6eb340bc5d3c17750724b3f17da244967bbd173292f4e943d4ac998954661534
photo 2 0 1670 1441,1432,282,669,637 8017dde3c81a678bacd085874e21e5b9faf049881a0d25dfd9075c226e2df59f
photo 2 1 1670 1114,1350,1111,1182,826 11907b7fcaf21a94d1ec45fbf828fa167679869e67ff1d17ee62fecd870f0fab
photo 2 2 1670 969,244,626,1517,1645 0d01f2dd5c33972783b16e7856ddb9b85d3270eacf0ec5ed72a8b39dba83dfdb
sketch 3 0 3929 2743,2083,2744,3449,1159 9eddc416a0592900e52bb7258ca9db878391ea41a656c00f1847c3b2ce009887
sketch 3 1 3929 2181,1642,2965,3408,1653 13364f73f123a82bbccb087e1d5a3644474831e93ad092d9ad7990091425429e
sketch 3 2 3929 3714,1165,1672,1675,3541 b8aee2bd02ccfbf186b40024f3f6728849dc4fbd4aae506d4fdbeb15a332e752
"""
PACS_VECTORS = {
    (d, int(e), int(t)): (int(n), [int(k) for k in keys.split(",")], sha)
    for d, e, t, n, keys, sha in (line.split() for line in PACS_TABLE.strip().splitlines())
}

# sha256 of each domain's sorted path list (datasets.md §4.3): proves the copy is DomainBed's PACS.
PACS_DOMAIN_SHA256 = {
    "art_painting": "a8d447f14e5cd02a78a2c4f51391dc3b66d43c64123dd751c76c7ecf65ae07a8",
    "cartoon": "ace0bce3230521d30a0eecbef11f6726573908d226b423240b5c0c4f9468d482",
    "photo": "1429162252b376f39b1161827ef4463d298903abef88faac1758711b7224e074",
    "sketch": "e9b0810a1930a9e10db80a69102b179e05f8f7475e57a4fff7401b0edf8569fb",
}


def sha256_lines(lines: list[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


@pytest.mark.parametrize("trial_seed", sorted(SEED_TABLE))
def test_seed_hash_table(trial_seed: int) -> None:
    assert [seed_hash(trial_seed, env) for env in range(6)] == SEED_TABLE[trial_seed]
    assert [split_seed(trial_seed, env) for env in range(6)] == SEED_TABLE[trial_seed]


def test_seed_hash_casts_numpy_ints() -> None:
    # str((np.int64(0), 0)) is "(np.int64(0), 0)" under NumPy 2: without the cast the seed would differ.
    assert seed_hash(np.int64(0), 0) == seed_hash(0, 0) == 894182419
    assert seed_hash(np.int32(2), np.int64(3)) == seed_hash(2, 3)
    numpy_seeds = split_indices(100, 0.2, np.int64(1), np.int64(2))[0]
    assert np.array_equal(numpy_seeds, split_indices(100, 0.2, 1, 2)[0])


@pytest.mark.parametrize(
    ("n", "fraction", "n_out"),
    [
        (2048, 0.2, 409),
        (2344, 0.2, 468),
        (1670, 0.2, 334),
        (3929, 0.2, 785),
        (10, 0.0, 0),
        (7, 0.5, 3),
        (0, 0.2, 0),
    ],
)
def test_split_sizes_truncate(n: int, fraction: float, n_out: int) -> None:
    out, in_ = split_indices(n, fraction, 0, 0)
    assert (len(out), len(in_)) == (n_out, n - n_out)
    assert out.dtype == in_.dtype == np.int64


def test_split_is_a_partition_and_deterministic() -> None:
    out, in_ = split_indices(2048, 0.2, 1, 3)
    assert sorted(np.concatenate([out, in_]).tolist()) == list(range(2048))
    again = split_indices(2048, 0.2, 1, 3)
    assert np.array_equal(out, again[0]) and np.array_equal(in_, again[1])
    assert not np.array_equal(out, split_indices(2048, 0.2, 2, 3)[0])  # the trial changes the split


def test_split_matches_python_list_shuffle() -> None:
    """DomainBed shuffles a list; we shuffle np.arange: the permutations must be identical."""
    for n, trial, env in [(1, 0, 0), (2048, 0, 0), (5001, 2, 5)]:
        keys = list(range(n))
        np.random.RandomState(seed_hash(trial, env)).shuffle(keys)
        out, in_ = split_indices(n, 0.2, trial, env)
        assert np.concatenate([out, in_]).tolist() == keys


@pytest.mark.parametrize("fraction", [1.0, 1.5, -0.1, float("nan"), "0.2", True, None])
def test_holdout_fraction_is_validated(fraction: object) -> None:
    with pytest.raises(ConfigError, match=r"dataset\.holdout_fraction"):
        split_indices(10, fraction, 0, 0)  # type: ignore[arg-type]


@pytest.mark.parametrize(("trial", "env"), [("0", 0), (0.0, 0), (0, 1.0)])
def test_seeds_must_be_integers(trial: object, env: object) -> None:
    with pytest.raises(ConfigError, match="integer"):
        split_indices(10, 0.2, trial, env)  # type: ignore[arg-type]


@pytest.mark.parametrize(("domain", "env_i", "trial_seed"), sorted(PACS_VECTORS))
def test_pacs_splits_match_domainbed(pacs_dir: Path, domain: str, env_i: int, trial_seed: int) -> None:
    # Through dgbench's own loader: its sample order and the split together must give DomainBed's files.
    dataset = FolderDataset(pacs_dir, "pacs")
    assert dataset.domains[env_i] == domain
    paths = [f"{domain}/{sample_id}" for sample_id in dataset[env_i].ids]
    assert sha256_lines(sorted(paths)) == PACS_DOMAIN_SHA256[domain], (
        f"{pacs_dir / domain} is not DomainBed's PACS"
    )
    n, first5, out_sha = PACS_VECTORS[domain, env_i, trial_seed]
    out, _ = split_indices(len(paths), 0.2, trial_seed, env_i)
    assert len(paths) == n
    assert out[:5].tolist() == first5
    assert sha256_lines(sorted(paths[k] for k in out)) == out_sha
