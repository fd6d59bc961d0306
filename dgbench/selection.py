"""Model selection: DomainBed's three rules for choosing (hyper-parameters, checkpoint).

A *group* is every run of one (dataset, algorithm, trial_seed) whose `test_envs` contain
one test domain `t`; a run with two test domains belongs to two groups (DomainBed
`lib/reporting.py`, `get_grouped_records`). Within a group each `hparams_seed` gets a
`run_acc`: a `Choice` (validation accuracy, test accuracy, checkpoint) or `None`. The
group's result is the test accuracy of the hparams_seed with the highest validation
accuracy (`select`). References are to facebookresearch/DomainBed
`domainbed/model_selection.py` (lines as of commit 29b1bf5) and `domainbed/lib/query.py`:

- `iid`, training-domain validation (`IIDAccuracySelectionMethod`, l.75-100): only records
  whose single test domain is `t` (`get_test_records`, l.6-9; l.97). Each checkpoint's
  validation accuracy is the mean `out` accuracy of every other domain (`_step_acc`,
  l.79-93); `run_acc` is the checkpoint with the highest one, the FIRST such checkpoint on
  ties (l.100: `Q.argmax` is Python's `max`, which replaces only on strictly greater).
  Test accuracy: the `in` split of `t`.
- `lodo`, leave-one-domain-out cross-validation (`LeaveOneOutSelectionMethod`, l.102-141):
  one hparams_seed's records of the group are grouped by step (steps ascending, l.135). A
  step counts only if exactly one record at it comes from a run whose single test domain
  is `t` (l.110-112); every record at that step with test domains {t, v} supplies the `in`
  accuracy of the held-out domain v (l.120-123). If any domain other than `t` has no such
  value the step is skipped (l.124-126); otherwise validation accuracy = their sum /
  (n_domains - 1) (l.127) and test accuracy = the `in` split of `t` in the single-test
  record (l.130). `run_acc` is the first step with the highest validation accuracy, `None`
  when no step qualifies (l.138-141): a sweep without two-test-domain runs has no LODO
  result at all.
- `oracle`, test-domain validation (`OracleSelectionMethod`, l.54-73): only records whose
  single test domain is `t` (l.62-65); the LAST checkpoint (largest step; on equal steps
  the last one read: `Q.sorted` is a stable sort, l.69), with validation accuracy = `out`
  split of `t` and test accuracy = `in` split of `t` (l.70-73). No early stopping: this is
  DomainBed's "oracle", not SWAD's best-checkpoint oracle.

Across hparams seeds (`SelectionMethod.hparams_accs`, l.26-40, and `sweep_acc`, l.42-52):
seeds in ascending order (`Q.group` sorts its keys), `None` dropped, sorted by validation
accuracy (NaN counts as -inf in `Q.sorted`) with a stable sort, then reversed and the
first taken: on a tie the LARGEST hparams_seed wins.

Accuracies here are fractions, as in the records. New rules register with
`@register_selection` and appear in `dgbench results --selection`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from dgbench.errors import ConfigError


class CheckpointLike(Protocol):
    step: int
    acc_in: Sequence[float]  # indexed by domain (the dataset's domain order)
    acc_out: Sequence[float]


class RunLike(Protocol):
    test_envs: tuple[int, ...]
    hparams_seed: int
    checkpoints: Sequence[Any]  # CheckpointLike, in file order


@dataclass(frozen=True, slots=True)
class Choice:
    """What a selection rule picked for one hparams_seed (or, from `select`, for a group)."""

    hparams_seed: int
    val_acc: float
    test_acc: float
    step: int
    run: Any  # the run whose checkpoint gives `test_acc` (its single-test-domain run)


class SelectionMethod:
    """A model-selection rule: `run_acc` scores one hparams_seed's runs of one group."""

    name: str = ""  # registry key, e.g. "iid"
    title: str = ""  # what tables print, e.g. "training-domain validation"

    def run_acc(self, runs: Sequence[RunLike], test_env: int) -> Choice | None:
        raise NotImplementedError


SELECTIONS: dict[str, SelectionMethod] = {}


def register_selection(cls: type[SelectionMethod]) -> type[SelectionMethod]:
    """Class decorator: register one instance under `cls.name`; duplicate names raise."""
    if not cls.name or cls.name in SELECTIONS:
        raise ConfigError(f"selection method name {cls.name!r} is empty or already registered")
    SELECTIONS[cls.name] = cls()
    return cls


def get_selection(name: str) -> SelectionMethod:
    try:
        return SELECTIONS[name]
    except KeyError:
        known = ", ".join(SELECTIONS)
        raise ConfigError(f"unknown selection method {name!r}; known: {known}") from None


def select(runs: Sequence[RunLike], test_env: int, method: SelectionMethod) -> Choice | None:
    """The group's choice: the hparams_seed with the best validation accuracy (ties: largest seed)."""
    by_seed: dict[int, list[RunLike]] = {}
    for run in runs:
        by_seed.setdefault(run.hparams_seed, []).append(run)
    best: Choice | None = None
    best_key = -math.inf
    for seed in sorted(by_seed):
        choice = method.run_acc(by_seed[seed], test_env)
        if choice is None:
            continue
        key = -math.inf if math.isnan(choice.val_acc) else choice.val_acc
        if best is None or key >= best_key:  # reversed stable sort: the later seed wins ties
            best, best_key = choice, key
    return best


def numpy_mean(values: Sequence[float]) -> float:
    """`float(np.mean(values))` bit for bit; short lists skip numpy's per-call overhead.

    numpy sums fewer than 8 float64 values left to right (pairwise summation starts at 8),
    so a plain loop gives the same bits; longer lists go to numpy itself.
    """
    n = len(values)
    if n >= 8:
        return float(np.mean(np.asarray(values, dtype=np.float64)))
    if n == 0:
        return math.nan
    total = 0.0
    for value in values:
        total += value
    return total / n


def _first_max(candidates: Callable[[], Any]) -> Choice | None:
    """The first candidate with the largest val_acc, as Python's `max` (strictly greater replaces)."""
    best: Choice | None = None
    for choice in candidates():
        if best is None or choice.val_acc > best.val_acc:
            best = choice
    return best


@register_selection
class TrainingDomainValidation(SelectionMethod):
    name = "iid"
    title = "training-domain validation"

    def run_acc(self, runs: Sequence[RunLike], test_env: int) -> Choice | None:
        best: tuple[float, RunLike, CheckpointLike] | None = None
        for run in runs:
            if len(run.test_envs) != 1:
                continue
            for ck in run.checkpoints:
                outs = ck.acc_out
                val = numpy_mean([outs[i] for i in range(len(outs)) if i != test_env])
                if best is None or val > best[0]:  # Python's max: the first maximum stays
                    best = (val, run, ck)
        if best is None:
            return None
        val, run, ck = best
        return Choice(run.hparams_seed, val, ck.acc_in[test_env], ck.step, run)


@register_selection
class LeaveOneDomainOut(SelectionMethod):
    name = "lodo"
    title = "leave-one-domain-out cross-validation"

    def run_acc(self, runs: Sequence[RunLike], test_env: int) -> Choice | None:
        by_step: dict[int, list[tuple[RunLike, CheckpointLike]]] = {}
        for run in runs:
            for ck in run.checkpoints:
                by_step.setdefault(ck.step, []).append((run, ck))

        def candidates() -> Any:
            for step in sorted(by_step):
                items = by_step[step]
                singles = [(run, ck) for run, ck in items if len(run.test_envs) == 1]
                if len(singles) != 1:
                    continue
                n_envs = len(items[0][1].acc_out)
                val_accs = [-1.0] * n_envs
                for run, ck in items:
                    if len(run.test_envs) == 2:
                        held_out = set(run.test_envs) - {test_env}
                        if held_out:
                            env = held_out.pop()
                            val_accs[env] = ck.acc_in[env]
                del val_accs[test_env]
                if any(v == -1 for v in val_accs):
                    continue
                run, ck = singles[0]
                val = numpy_mean(val_accs) if n_envs > 1 else math.nan
                yield Choice(run.hparams_seed, val, ck.acc_in[test_env], step, run)

        return _first_max(candidates)


@register_selection
class TestDomainValidation(SelectionMethod):
    name = "oracle"
    title = "test-domain validation (last checkpoint)"

    def run_acc(self, runs: Sequence[RunLike], test_env: int) -> Choice | None:
        last: tuple[RunLike, CheckpointLike] | None = None
        for run in runs:
            if len(run.test_envs) != 1:
                continue
            for ck in run.checkpoints:
                if last is None or ck.step >= last[1].step:  # stable sort by step, take the last
                    last = (run, ck)
        if last is None:
            return None
        run, ck = last
        return Choice(run.hparams_seed, ck.acc_out[test_env], ck.acc_in[test_env], ck.step, run)


DEFAULT_SELECTIONS = ("iid", "lodo", "oracle")
