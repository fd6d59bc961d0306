"""Selection rules on hand-made runs: DomainBed's exact choices, ties and corner cases."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from dgbench.errors import ConfigError
from dgbench.results import Checkpoint, Run
from dgbench.selection import SELECTIONS, get_selection, numpy_mean, select


def run(test_envs, hparams_seed, checkpoints, n_envs=3):
    """checkpoints: [(step, {env: (in, out)})]; unspecified accuracies are 0.5."""
    cks = []
    for step, accs in checkpoints:
        ins, outs = [0.5] * n_envs, [0.5] * n_envs
        for env, (acc_in, acc_out) in accs.items():
            ins[env], outs[env] = acc_in, acc_out
        cks.append(Checkpoint(step, ins, outs))
    return Run(
        f"run-{test_envs}-{hparams_seed}",
        "dgbench",
        "done",
        "d",
        "a",
        tuple(test_envs),
        hparams_seed,
        0,
        {},
        cks,
    )


IID, LODO, ORACLE = (get_selection(name) for name in ("iid", "lodo", "oracle"))


def test_registry_names_and_titles():
    assert list(SELECTIONS) == ["iid", "lodo", "oracle"]
    assert SELECTIONS["oracle"].title == "test-domain validation (last checkpoint)"
    with pytest.raises(ConfigError, match="known: iid, lodo, oracle"):
        get_selection("best")


def test_iid_validates_on_training_domain_out_splits_and_keeps_the_first_maximum():
    # test domain 0; training domains 1, 2. val(step 1) = (0.6 + 0.8) / 2 = 0.7,
    # val(step 2) = (0.9 + 0.5) / 2 = 0.7 (tie: the first checkpoint stays), val(step 3) = 0.65.
    r = run([0], 0, [(1, {0: (0.31, 0.99), 1: (0, 0.6), 2: (0, 0.8)}),
                     (2, {0: (0.32, 0.99), 1: (0, 0.9), 2: (0, 0.5)}),
                     (3, {0: (0.33, 0.99), 1: (0, 0.65), 2: (0, 0.65)})])  # fmt: skip
    choice = IID.run_acc([r], 0)
    assert (choice.step, choice.test_acc) == (1, 0.31)
    assert choice.val_acc == pytest.approx(0.7)


def test_iid_and_oracle_ignore_runs_with_two_test_domains():
    pair = run([0, 1], 0, [(5, {0: (0.99, 0.99)})])
    assert IID.run_acc([pair], 0) is None
    assert ORACLE.run_acc([pair], 0) is None


def test_oracle_takes_the_last_checkpoint_not_the_best():
    r = run([2], 0, [(100, {2: (0.9, 0.95)}), (300, {2: (0.4, 0.45)}), (200, {2: (0.8, 0.85)})])
    choice = ORACLE.run_acc([r], 2)
    assert (choice.step, choice.val_acc, choice.test_acc) == (300, 0.45, 0.4)


def test_oracle_equal_last_steps_take_the_one_read_last():
    first = run([0], 0, [(100, {0: (0.1, 0.1)})])
    second = run([0], 0, [(100, {0: (0.2, 0.2)})])
    assert ORACLE.run_acc([first, second], 0).test_acc == 0.2


def test_lodo_validates_on_held_out_domains_of_pair_runs():
    # 3 domains, test domain 0. Pairs {0,1} and {0,2} give in-accuracies of domains 1 and 2:
    # step 10: (0.6 + 0.7) / 2 = 0.65; step 20: (0.9 + 0.5) / 2 = 0.7 -> step 20, test = 0.42.
    single = run([0], 0, [(10, {0: (0.41, 0.0)}), (20, {0: (0.42, 0.0)})])
    pair1 = run([0, 1], 0, [(10, {1: (0.6, 0.0)}), (20, {1: (0.9, 0.0)})])
    pair2 = run([0, 2], 0, [(10, {2: (0.7, 0.0)}), (20, {2: (0.5, 0.0)})])
    choice = LODO.run_acc([single, pair1, pair2], 0)
    assert (choice.step, choice.test_acc) == (20, 0.42)
    assert choice.val_acc == pytest.approx(0.7)
    assert choice.run is single


def test_lodo_needs_every_held_out_domain_and_matching_steps():
    single = run([0], 0, [(10, {0: (0.41, 0.0)}), (20, {0: (0.42, 0.0)})])
    pair1 = run([0, 1], 0, [(10, {1: (0.6, 0.0)}), (20, {1: (0.9, 0.0)})])
    pair2_late = run([0, 2], 0, [(20, {2: (0.5, 0.0)})])  # no step 10: step 10 cannot be scored
    assert LODO.run_acc([single, pair1], 0) is None  # domain 2 never held out
    assert LODO.run_acc([single, pair1, pair2_late], 0).step == 20
    assert LODO.run_acc([pair1, run([0, 2], 0, [(10, {})])], 0) is None  # no single-test run
    twice = run([0], 0, [(10, {0: (0.3, 0.0)})])
    assert LODO.run_acc([single, twice, pair1, pair2_late], 0).step == 20  # two singles at step 10


def test_across_hparams_the_best_validation_wins_and_ties_go_to_the_largest_seed():
    a = run([0], 0, [(1, {0: (0.1, 0.0), 1: (0, 0.7), 2: (0, 0.7)})])
    b = run([0], 3, [(1, {0: (0.2, 0.0), 1: (0, 0.7), 2: (0, 0.7)})])
    c = run([0], 1, [(1, {0: (0.3, 0.0), 1: (0, 0.6), 2: (0, 0.6)})])
    choice = select([b, a, c], 0, IID)
    assert (choice.hparams_seed, choice.test_acc) == (3, 0.2)


def test_nan_validation_loses_to_any_number():
    nan = run([0], 5, [(1, {0: (0.9, 0.0), 1: (0, math.nan), 2: (0, 0.7)})])
    low = run([0], 0, [(1, {0: (0.1, 0.0), 1: (0, 0.1), 2: (0, 0.1)})])
    assert select([nan, low], 0, IID).hparams_seed == 0


def test_numpy_mean_is_bit_identical_to_numpy():
    rng = random.Random(0)
    for n in range(1, 14):
        for _ in range(200):
            values = [rng.random() for _ in range(n)]
            assert numpy_mean(values) == float(np.mean(values))
