from dataclasses import dataclass

import numpy as np
import pytest

from dgbench.algorithms.erm import ERMHParams
from dgbench.hparams import (
    Choice,
    IntLogUniform,
    IntUniform,
    LogUniform,
    Uniform,
    hparam,
    parse_distribution,
    sample_hparams,
    search_space,
    seed_hash,
)


def test_seed_hash_matches_domainbed_and_ignores_numpy_int_types():
    # Values from DomainBed's misc.seed_hash (reference/datasets.md §3).
    assert seed_hash(0, 0) == 894182419
    assert seed_hash(2, 5) == 941488192
    assert seed_hash(np.int64(0), 0) == 894182419


def test_hparams_seed_zero_means_defaults():
    assert sample_hparams(ERMHParams, 0, 0) == {}


def test_sampling_is_deterministic_in_range_and_differs_across_seeds():
    draws = [sample_hparams(ERMHParams, k, 0) for k in range(1, 21)]
    assert draws[0] == sample_hparams(ERMHParams, 1, 0)
    for draw in draws:
        assert set(draw) == {"lr", "weight_decay", "batch_size", "dropout"}
        assert 1e-5 <= draw["lr"] <= 10**-3.5
        assert 1e-6 <= draw["weight_decay"] <= 1e-2
        assert 8 <= draw["batch_size"] <= 45 and isinstance(draw["batch_size"], int)
        assert draw["dropout"] in (0.0, 0.1, 0.5)
    assert len({d["lr"] for d in draws}) == 20
    assert sample_hparams(ERMHParams, 1, 1) != draws[0]  # trial seed enters the draw


def test_sampling_matches_domainbed_per_name_random_states():
    # DomainBed HEAD: RandomState(seed_hash(seed_hash(hparams_seed, trial_seed), name)).
    seed = seed_hash(3, 1)
    expected_lr = 10 ** np.random.RandomState(seed_hash(seed, "lr")).uniform(-5, -3.5)
    expected_bs = int(2 ** np.random.RandomState(seed_hash(seed, "batch_size")).uniform(3, 5.5))
    expected_do = np.random.RandomState(seed_hash(seed, "dropout")).choice([0.0, 0.1, 0.5])
    draw = sample_hparams(ERMHParams, 3, 1)
    assert draw["lr"] == pytest.approx(expected_lr, rel=0, abs=0)
    assert draw["batch_size"] == expected_bs
    assert draw["dropout"] == expected_do


def test_adding_a_hparam_does_not_shift_the_others():
    @dataclass(kw_only=True)
    class Extended(ERMHParams):
        extra: float = hparam(1.0, LogUniform(-1, 1))

    base, extended = sample_hparams(ERMHParams, 7, 2), sample_hparams(Extended, 7, 2)
    assert {k: extended[k] for k in base} == base
    assert "extra" in extended


def test_distribution_descriptions_and_search_space():
    space = search_space(ERMHParams)
    assert space["lr"] == LogUniform(-5, -3.5)
    assert space["batch_size"].describe() == "int(2^U(3, 5.5))"
    assert Choice([0, 1]).describe() == "choice{0, 1}"
    assert isinstance(IntLogUniform(3, 5).sample(np.random.RandomState(0)), int)


@pytest.mark.parametrize(
    "dist",
    [
        LogUniform(-5, -3.5),
        IntLogUniform(3, 5.5),
        Uniform(0, 0.2),
        IntUniform(0, 5000),
        Choice([0.0, 0.1, 0.5]),
        Choice(["a", "b"]),
    ],
)
def test_describe_and_parse_round_trip(dist):
    assert parse_distribution(dist.describe()) == dist


def test_parse_rejects_unknown_specs_with_the_accepted_forms():
    with pytest.raises(
        ValueError, match=r"cannot parse search distribution 'gauss\(0, 1\)'.*10\^U\(lo, hi\)"
    ):
        parse_distribution("gauss(0, 1)")


def test_search_override_replaces_one_distribution_only():
    base = sample_hparams(ERMHParams, 4, 0)
    replaced = sample_hparams(ERMHParams, 4, 0, {"lr": LogUniform(-4.5, -2.5)})
    assert 10**-4.5 <= replaced["lr"] <= 10**-2.5 and replaced["lr"] != base["lr"]
    assert {k: v for k, v in replaced.items() if k != "lr"} == {k: v for k, v in base.items() if k != "lr"}
