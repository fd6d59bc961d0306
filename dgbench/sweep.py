"""Named sweeps: `sweeps/<name>.yaml` expanded into Hydra multiruns over `dgbench train`.

A sweep file says what to cross (DomainBed's `sweep.py` grid):

    datasets: [pacs]                # one Hydra multirun per dataset (domain counts differ)
    algorithms: [erm, fish]         # or `all`: every registered algorithm
    # an entry {name: [overrides]} adds overrides for that entry alone, e.g. a backbone:
    #   algorithms: [erm, {erm: [backbone=gmoe_vit_32px]}]  (ERM and GMoE)
    test_envs: single               # single: each domain once; pairs: also every pair (LODO needs them)
    hparams_seeds: 20               # n -> seeds 0..n-1 (0 = the defaults), or an explicit list
    trial_seeds: 3                  # n -> 0..n-1, or a list
    overrides: [trainer.steps=5001] # fixed training overrides

On the command line, `key=value` for one of these keys replaces it (`test_envs=pairs`,
`algorithms=[erm]`, `hparams_seeds=2`); anything else is a training override passed to every
run (`output_dir=/scratch`, `hydra/launcher=joblib`). Runs are named by their config, so
relaunching the same command skips finished runs and resumes unfinished ones.
"""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dgbench.errors import ConfigError

SWEEP_KEYS = ("datasets", "algorithms", "test_envs", "hparams_seeds", "trial_seeds", "overrides")
TEST_ENV_MODES = ("single", "pairs")


def sweeps_dir() -> Path:
    """`sweeps/` at the project root, beside the package (like `conf/` and `datasets_manifest/`)."""
    return Path(__file__).resolve().parent.parent / "sweeps"


def sweep_names() -> list[str]:
    return sorted(p.stem for p in sweeps_dir().glob("*.yaml"))


@dataclass
class Sweep:
    """A parsed sweep: what to cross, and the fixed overrides of every run."""

    name: str
    datasets: list[str]
    algorithms: list[str]
    test_envs: str | list[list[Any]]
    hparams_seeds: list[int]
    trial_seeds: list[int]
    overrides: list[str] = field(default_factory=list)
    # overrides of each `algorithms` entry alone (parallel to `algorithms`; [] for a plain name)
    algorithm_overrides: list[list[str]] = field(default_factory=list)

    def groups(self) -> list[tuple[list[str], list[str]]]:
        """(algorithms, their own overrides): entries that share overrides run in one multirun."""
        own = self.algorithm_overrides or [[] for _ in self.algorithms]
        grouped: dict[tuple[str, ...], list[str]] = {}
        for name, extra in zip(self.algorithms, own, strict=True):
            names = grouped.setdefault(tuple(extra), [])
            if name not in names:
                names.append(name)
        return [(names, list(extra)) for extra, names in grouped.items()]

    def test_env_sets(self, domains: Sequence[str]) -> list[list[int]]:
        """DomainBed's `all_test_env_combinations` (pairs) or one domain at a time (single)."""
        if not isinstance(self.test_envs, str):
            return [list(envs) for envs in self.test_envs]
        singles = [[i] for i in range(len(domains))]
        if self.test_envs == "single":
            return singles
        return singles + [list(pair) for pair in itertools.combinations(range(len(domains)), 2)]


def load_sweep(name_or_path: str, cli_args: Sequence[str] = ()) -> Sweep:
    """Read `sweeps/<name>.yaml` (or a path), apply `key=value` sweep-key overrides from `cli_args`."""
    path = Path(name_or_path)
    if not name_or_path.endswith((".yaml", ".yml")):
        path = sweeps_dir() / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(f"no sweep {name_or_path!r}: {path} not found; sweeps: {', '.join(sweep_names())}")
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"sweep file {path} is not valid YAML: {' '.join(str(error).split())}") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"sweep file {path} must be a mapping of {', '.join(SWEEP_KEYS)}")
    extra_overrides = []
    for arg in cli_args:
        key, sep, value = arg.partition("=")
        if sep and key in SWEEP_KEYS and key != "overrides":
            spec[key] = yaml.safe_load(value)
        else:
            extra_overrides.append(arg)
    return _parse(path.stem, spec, str(path), extra_overrides)


def _parse(name: str, spec: dict[str, Any], where: str, extra_overrides: list[str]) -> Sweep:
    if unknown := sorted(set(spec) - set(SWEEP_KEYS)):
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(SWEEP_KEYS)}")
    for key in ("datasets", "algorithms"):
        if key not in spec:
            raise ConfigError(f"{where}: key {key!r} is required")
    algorithms = spec["algorithms"]
    if algorithms == "all":
        from dgbench.components import load_components
        from dgbench.registry import ALGORITHMS

        load_components()
        algorithms = ALGORITHMS.names()
    names, own_overrides = _algorithm_entries(algorithms, where)
    test_envs = spec.get("test_envs", "single")
    if isinstance(test_envs, str) and test_envs not in TEST_ENV_MODES:
        raise ConfigError(
            f"{where}: test_envs must be one of {', '.join(TEST_ENV_MODES)} or a list of lists, "
            f"got {test_envs!r}"
        )
    return Sweep(
        name=name,
        datasets=_names(spec["datasets"], "datasets", where),
        algorithms=names,
        test_envs=test_envs,
        hparams_seeds=_seeds(spec.get("hparams_seeds", 1), "hparams_seeds", where),
        trial_seeds=_seeds(spec.get("trial_seeds", 1), "trial_seeds", where),
        overrides=[str(o) for o in spec.get("overrides") or []] + list(extra_overrides),
        algorithm_overrides=own_overrides,
    )


def _algorithm_entries(value: Any, where: str) -> tuple[list[str], list[list[str]]]:
    """Names and own overrides of `algorithms` entries: `name` or `{name: [overrides]}`."""
    entries = [value] if isinstance(value, str | dict) else value
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{where}: algorithms must be a name or a non-empty list, got {value!r}")
    names, own = [], []
    for entry in entries:
        if isinstance(entry, dict) and len(entry) == 1:
            ((name, extra),) = entry.items()
            extra = [extra] if isinstance(extra, str) else extra
            if isinstance(name, str) and isinstance(extra, list) and all(isinstance(o, str) for o in extra):
                names.append(name)
                own.append(list(extra))
                continue
        elif isinstance(entry, str):
            names.append(entry)
            own.append([])
            continue
        raise ConfigError(
            f"{where}: algorithms entry {entry!r} must be a name or {{name: [overrides]}}, "
            f"e.g. {{erm: [backbone=gmoe_vit_32px]}}"
        )
    return names, own


def _names(value: Any, key: str, where: str) -> list[str]:
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"{where}: {key} must be a name or a non-empty list of names, got {value!r}")
    return names


def _seeds(value: Any, key: str, where: str) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return list(range(value))
    if isinstance(value, list) and value and all(isinstance(v, int) and v >= 0 for v in value):
        return list(value)
    raise ConfigError(f"{where}: {key} must be a positive count or a list of seeds >= 0, got {value!r}")


# ---------------------------------------------------------------- plan


@dataclass
class PlannedRun:
    overrides: list[str]
    dataset: str
    algorithm: str
    run_dir: Path
    steps: int | None


def multirun_overrides(sweep: Sweep, dataset: str, domains: Sequence[str]) -> list[list[str]]:
    """The `dgbench train -m` overrides of one dataset's share of the sweep: one cartesian product
    per group of algorithm entries that share their own overrides."""
    env_sets = ",".join("[" + ",".join(str(i) for i in envs) + "]" for envs in sweep.test_env_sets(domains))
    return [
        [
            f"dataset={dataset}",
            f"algorithm={','.join(names)}",
            f"dataset.test_envs={env_sets}",
            f"hparams_seed={','.join(map(str, sweep.hparams_seeds))}",
            f"trial_seed={','.join(map(str, sweep.trial_seeds))}",
            f"name={sweep.name}",
            *sweep.overrides,
            *extra,
        ]
        for names, extra in sweep.groups()
    ]


def plan(sweep: Sweep) -> list[PlannedRun]:
    """Every run of the sweep with its run directory (configs composed exactly as `train` would)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from dgbench.cli import conf_dir
    from dgbench.components import load_components
    from dgbench.config import prepare_run_config, run_id
    from dgbench.data.base import resolve_test_envs
    from dgbench.registry import DATASETS

    load_components()

    def training_only(overrides: list[str]) -> list[str]:
        return [o for o in overrides if not o.startswith(("hydra/", "hydra.", "+hydra"))]

    fixed = training_only(sweep.overrides)
    runs = []
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        for dataset in sweep.datasets:
            entry = DATASETS.get(dataset)
            domains = entry.config(name=dataset).domain_names()
            if domains is None:
                raise ConfigError(f"dataset {dataset} cannot list its domains without being built")
            entries = [(a, extra) for names, extra in sweep.groups() for a in names]
            for algorithm, extra in entries:
                # Composing costs ~0.1 s; one per (dataset, algorithm entry), then only seeds and test
                # domains change, which is exactly what train() does to a composed config.
                base_overrides = [f"dataset={dataset}", f"algorithm={algorithm}", f"name={sweep.name}"]
                base_overrides += fixed + training_only(extra)
                base = compose("config", overrides=base_overrides)
                grid = itertools.product(sweep.test_env_sets(domains), sweep.hparams_seeds, sweep.trial_seeds)
                for envs, hparams_seed, trial_seed in grid:
                    cfg = base.copy()
                    cfg.hparams_seed, cfg.trial_seed = hparams_seed, trial_seed
                    overrides = [
                        *base_overrides,
                        f"dataset.test_envs=[{','.join(map(str, envs))}]",
                        f"hparams_seed={hparams_seed}",
                        f"trial_seed={trial_seed}",
                    ]
                    prepare_run_config(cfg, overrides)
                    cfg.dataset.test_envs = resolve_test_envs(domains, envs, dataset)
                    run_dir = Path(cfg.output_dir) / cfg.name / run_id(cfg)
                    steps = OmegaConf.select(cfg, "trainer.steps")
                    runs.append(PlannedRun(overrides, dataset, algorithm, run_dir, steps))
    return runs


def dry_run_report(sweep: Sweep, runs: list[PlannedRun]) -> str:
    """Counts by state and the remaining compute, from step times measured by this sweep's runs."""
    from dgbench.runs import run_state

    counts: dict[str, int] = defaultdict(int)
    remaining: dict[tuple[str, str], int] = defaultdict(int)
    unknown_steps = 0
    for run in runs:
        state = run_state(run.run_dir) if run.run_dir.exists() else None
        status = state.status if state else "pending"
        counts[status] += 1
        if status == "done":
            continue
        if run.steps is None:
            unknown_steps += 1
            continue
        done_steps = (state.last_step + 1) if state and state.last_step is not None else 0
        remaining[run.dataset, run.algorithm] += max(0, run.steps - done_steps)
    lines = [
        f"sweep {sweep.name}: {len(runs)} runs "
        f"({len(sweep.datasets)} dataset(s) x {len(sweep.algorithms)} algorithm entries x test domains x "
        f"{len(sweep.hparams_seeds)} hparams seed(s) x {len(sweep.trial_seeds)} trial seed(s))",
        "  " + ", ".join(f"{counts[s]} {s}" for s in ("done", "failed", "running", "dead", "pending")),
    ]
    lines += _estimate(runs, remaining, unknown_steps)
    return "\n".join(lines)


def _estimate(runs: list[PlannedRun], remaining: dict[tuple[str, str], int], unknown_steps: int) -> list[str]:
    step_times = measured_step_times({run.run_dir.parent for run in runs})
    total, unmeasured = 0.0, []
    for key, steps in sorted(remaining.items()):
        if steps == 0:
            continue
        if key in step_times:
            total += steps * step_times[key]
        else:
            unmeasured.append(f"{key[1]} on {key[0]} ({steps:,} steps)")
    lines = []
    if any(remaining.values()):
        lines.append(f"  remaining training steps: {sum(remaining.values()):,}")
    if total:
        lines.append(
            f"  estimated remaining compute: {_duration(total)} of training (measured step times of this "
            f"sweep; evaluation not included)"
        )
    if unmeasured:
        lines.append(f"  no step time measured yet for {'; '.join(unmeasured)}")
    if unknown_steps:
        lines.append(f"  {unknown_steps} run(s) use the dataset's default step count (set trainer.steps)")
    return lines


def measured_step_times(sweep_dirs: set[Path]) -> dict[tuple[str, str], float]:
    """Mean `step_time` per (dataset, algorithm) over the last records of the runs in `sweep_dirs`."""
    from dgbench.runs import find_run_dirs, last_record

    times: dict[tuple[str, str], list[float]] = defaultdict(list)
    for run_dir in find_run_dirs([d for d in sorted(sweep_dirs) if d.is_dir()]):
        record = last_record(run_dir)
        try:
            times[record["dataset"], record["algorithm"]].append(float(record["step_time"]))  # type: ignore[index]
        except (KeyError, TypeError, ValueError):
            continue
    return {key: sum(v) / len(v) for key, v in times.items() if v and all(map(math.isfinite, v))}


def _duration(seconds: float) -> str:
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours} h {rest // 60:02d} min" if hours else f"{rest // 60} min {rest % 60:02d} s"


# ---------------------------------------------------------------- launch


def launch(sweep: Sweep) -> int:
    """Run the sweep: one `dgbench train -m` (a Hydra multirun) per dataset and algorithm group;
    returns the exit status."""
    from dgbench.components import load_components
    from dgbench.registry import DATASETS

    load_components()
    status = 0
    for dataset in sweep.datasets:
        domains = DATASETS.get(dataset).config(name=dataset).domain_names() or []
        for overrides in multirun_overrides(sweep, dataset, domains):
            command = [sys.executable, "-m", "dgbench.cli", "train", "-m", *overrides]
            print(f"dgbench sweep {sweep.name}: {dataset}: {' '.join(command[3:])}", flush=True)
            status = subprocess.call(command, env=os.environ.copy()) or status
    return status


# ---------------------------------------------------------------- status


def status_report(paths: Sequence[Path], stale_after: float | None = None) -> str:
    """`dgbench status`: every run directory under `paths` by state, with remaining compute."""
    from dgbench.runs import CONFIG_FILE, STALE_AFTER_S, find_run_dirs, run_state

    run_dirs = find_run_dirs(list(paths))
    if not run_dirs:
        return f"no run directories under {', '.join(map(str, paths))}"
    states = [run_state(d, stale_after=stale_after or STALE_AFTER_S) for d in run_dirs]
    counts: dict[str, int] = defaultdict(int)
    for state in states:
        counts[state.status] += 1
    lines = [
        f"{len(states)} runs: " + ", ".join(f"{counts[s]} {s}" for s in ("done", "failed", "running", "dead"))
    ]
    remaining: dict[tuple[str, str], int] = defaultdict(int)
    for state in states:
        if state.status == "done":
            continue
        step = "not started" if state.last_step is None else f"step {state.last_step}"
        if state.status == "failed":
            lines.append(f"  failed   {state.run_dir}  {step}: {state.error}")
        else:
            age = (
                "no heartbeat"
                if state.heartbeat_age_s is None
                else f"heartbeat {_duration(state.heartbeat_age_s)} ago"
            )
            lines.append(f"  {state.status:<8} {state.run_dir}  {step}, {age}")
        config = _read_config(state.run_dir / CONFIG_FILE)
        steps = (config.get("trainer") or {}).get("steps")
        if state.status != "failed" and isinstance(steps, int):
            key = (
                (config.get("dataset") or {}).get("name", "?"),
                (config.get("algorithm") or {}).get("name", "?"),
            )
            remaining[key] += max(0, steps - (state.last_step + 1 if state.last_step is not None else 0))
    if counts["dead"]:
        lines.append(
            "  dead runs resume from their checkpoint when the same sweep (or train command) is relaunched"
        )
    step_times = measured_step_times(set(map(Path, paths)))
    seconds = sum(steps * step_times[key] for key, steps in remaining.items() if key in step_times)
    if seconds:
        lines.append(f"  estimated remaining training compute of unfinished runs: {_duration(seconds)}")
    return "\n".join(lines)


def _read_config(path: Path) -> dict[str, Any]:
    """A run's config.yaml as plain containers; {} when it is missing or unreadable."""
    from dgbench.data.folder import read_mapping
    from dgbench.errors import DataError

    try:
        return read_mapping(path, "run config")
    except DataError:
        return {}
