"""Results: find run directories, load their records, and aggregate them into table cells.

Discovery: any directory (searched recursively below the given roots, hidden ones such
as Hydra's `.multirun/` skipped) that holds `results.jsonl`, `config.yaml`, `status.json`,
`done` or `heartbeat` is a run; the search does not descend into a run. Two layouts:

- dgbench (`dgbench.runs`): `<output_dir>/<name>/<run_id>/results.jsonl` (schema in
  `dgbench.records`), `done` when finished, `status.json` (`{"status": "failed", "error":
  ...}`) when failed, `heartbeat` touched while a process trains it. Anything else is
  *incomplete*: *running* if its heartbeat is younger than `dgbench.runs.STALE_AFTER_S`
  (the threshold `dgbench status` uses), else *dead*; without a heartbeat file the mtime
  of `results.jsonl` stands in (the listing says which).
- DomainBed: `<sweep>/<md5>/results.jsonl` with `{"args": {...}, "env{i}_in_acc": ...}`
  records and `done`. Dataset names become ours (`DOMAINBED_DATASETS`); env indices map
  to our domain names when the dataset is known and has that many domains, else
  `env{i}`. Algorithm names are kept as DomainBed spells them (`ERM`, not `erm`), so a
  DomainBed row and a dgbench row of the same algorithm stay separate rows.

A dgbench run may also hold `averaged.jsonl` (`dgbench.averaging`): each of its series
(`"algorithm": "erm + swad"`, `"erm + ema"`, ...) becomes a run of its own, with the run's status,
so it is a row of its own in the tables.

A run's identity (dataset, algorithm, test_envs, seeds, hparams) is read from its first
record. A torn last line (a process killed mid-write; dgbench itself writes atomically)
is skipped and counted; an unparsable line elsewhere, or a record without the required
keys, is reported with its path.

Domain order of a dataset: its registered order (manifest, embedded or MNIST env list),
else the first record's `acc` key order. Test domains in records are indices into it.

Aggregation follows DomainBed's `scripts/collect_results.py` exactly (see
`dgbench.selection` for the selection rules). Cells are in PERCENT:

- cell (dataset, algorithm, test domain): the selected test accuracy of every trial
  seed; `mean = 100 * mean(x)`, `sem = 100 * np.std(x / sqrt(n))` (ddof 0; `format_mean`).
- cell (dataset, algorithm, "avg"): per trial seed, the mean over the test domains that
  trial has a result for, then mean and sem over trial seeds (the dataset column of
  DomainBed's "Averages" table). A trial missing a test domain is averaged over the
  domains it has, as DomainBed does; the coverage report lists such gaps.
- DomainBed's per-dataset table prints a different "Avg": the plain mean of the
  per-domain means, no error bar, "X" if any domain is empty (`dgbench.report`
  reproduces it). With every trial present for every domain both agree.
- the cross-dataset average (last column of the Averages table) is the plain mean of
  the datasets' "avg" means, no error bar, "X" if a dataset is empty (`dgbench.report`).

Runs recorded as failed are left out of the tables and listed; incomplete runs are
used (DomainBed reads every record) unless `only_done`, and listed.
"""

from __future__ import annotations

import ast
import importlib.util
import itertools
import json
import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dgbench.errors import DGBenchError, one_line
from dgbench.records import AVERAGED_FILE, RESULTS_FILE
from dgbench.runs import CONFIG_FILE, DONE_FILE, HEARTBEAT_FILE, STALE_AFTER_S, STATUS_FILE, discover_runs
from dgbench.selection import DEFAULT_SELECTIONS, Choice, get_selection, numpy_mean, select

FRESH_SECONDS = STALE_AFTER_S  # a younger heartbeat means a process is still training the run

DOMAINBED_DATASETS = {
    "PACS": "pacs",
    "VLCS": "vlcs",
    "OfficeHome": "officehome",
    "TerraIncognita": "terra_incognita",
    "DomainNet": "domainnet",
    "RotatedMNIST": "rotated_mnist",
    "ColoredMNIST": "colored_mnist",
}
# Datasets whose domain list lives in a module constant (read with `ast`, so torch and
# torchvision are not imported): name -> (module, constant); dict constants give their keys.
_MODULE_DOMAINS = {
    "embedded": ("dgbench.data.embedded", "DOMAINS"),
    "rotated_mnist": ("dgbench.data.mnist", "ROTATIONS"),
    "colored_mnist": ("dgbench.data.mnist", "COLOR_FLIPS"),
}


@dataclass(slots=True)
class Checkpoint:
    """One evaluation: accuracies (fractions) indexed by the dataset's domain order."""

    step: int
    acc_in: list[float]
    acc_out: list[float]


@dataclass(slots=True, eq=False)
class Run:
    path: str
    source: str  # "dgbench" | "domainbed"
    status: str = "incomplete"  # "done" | "failed" | "incomplete"
    dataset: str = ""
    algorithm: str = ""  # table row: the algorithm, with " (backbone)" when it ran on several
    test_envs: tuple[int, ...] = ()
    hparams_seed: int = -1
    trial_seed: int = -1
    hparams: dict[str, Any] = field(default_factory=dict)
    checkpoints: list[Checkpoint] = field(default_factory=list)
    error: str | None = None  # why it failed (status.json)
    idle_seconds: float | None = None  # since its heartbeat (or results.jsonl) last changed
    idle_source: str | None = None  # which file `idle_seconds` comes from
    backbone: str = ""  # the record's backbone name

    @property
    def last_step(self) -> int | None:
        return max((ck.step for ck in self.checkpoints), default=None)

    @property
    def running(self) -> bool:
        idle = self.idle_seconds
        return self.status == "incomplete" and idle is not None and idle < FRESH_SECONDS

    @property
    def identified(self) -> bool:
        return bool(self.dataset and self.algorithm and self.test_envs) and self.trial_seed >= 0


@dataclass
class ResultSet:
    """Every run found, with the domain order used for each dataset and what went wrong reading."""

    runs: list[Run]
    domains: dict[str, list[str]]
    torn_files: list[str] = field(default_factory=list)  # last line skipped (killed mid-write)
    problems: list[str] = field(default_factory=list)  # bad files or records, with their path

    @property
    def n_records(self) -> int:
        return sum(len(run.checkpoints) for run in self.runs)


# ---------------------------------------------------------------- discovery and loading


def load_results(paths: Iterable[str | os.PathLike[str]], now: float | None = None) -> ResultSet:
    """Load every run below `paths`; raises `DGBenchError` when there is none."""
    paths = list(paths)
    dirs = discover_runs(paths)
    if not dirs:
        where = ", ".join(os.fspath(p) for p in paths)
        raise DGBenchError(
            f"no runs found under {where}: a run is a directory holding {RESULTS_FILE} "
            f"(dgbench: <output_dir>/<name>/<run_id>/, DomainBed: <sweep>/<hash>/)"
        )
    loader = _Loader(time.time() if now is None else now)
    runs = [run for folder, names in dirs for run in loader.load_runs(folder, names)]
    label_backbones(runs)
    return ResultSet(runs, loader.resolved, loader.torn, loader.problems)


def label_backbones(runs: Sequence[Run]) -> None:
    """Row label `erm (gmoe_test_vit)` for an algorithm run on more than one backbone.

    A backbone family of its own (GMoE) is used with existing algorithms, so "ERM" alone would
    pool ERM on a CNN with ERM on a mixture-of-experts ViT into one row. A run without a record
    (so without a known backbone) keeps the plain name.
    """
    backbones: dict[str, set[str]] = {}
    for run in runs:
        if run.backbone:
            backbones.setdefault(run.algorithm, set()).add(run.backbone)
    for run in runs:
        if run.backbone and len(backbones[run.algorithm]) > 1:
            run.algorithm = f"{run.algorithm} ({run.backbone})"


class _Loader:
    def __init__(self, now: float) -> None:
        self.now = now
        self.resolved: dict[str, list[str]] = {}  # dataset -> domain order in use
        self.torn: list[str] = []
        self.problems: list[str] = []

    def load_runs(self, folder: str, names: frozenset[str]) -> list[Run]:
        """The run in `folder`, then one run per averaged-model series it recorded (`X + swad`)."""
        run = self.load_run(folder, names)
        if AVERAGED_FILE not in names or run.source != "dgbench":
            return [run]
        series: dict[str, list[dict[str, Any]]] = {}
        for record in self._read(os.path.join(folder, AVERAGED_FILE)):
            series.setdefault(str(record.get("algorithm")), []).append(record)
        runs = [run]
        for records in series.values():
            averaged = Run(folder, run.source, run.status, error=run.error, idle_seconds=run.idle_seconds)
            averaged.idle_source = run.idle_source
            self._parse(averaged, records, os.path.join(folder, AVERAGED_FILE))
            runs.append(averaged)
        return runs

    def load_run(self, folder: str, names: frozenset[str]) -> Run:
        results_path = os.path.join(folder, RESULTS_FILE)
        records = self._read(results_path) if RESULTS_FILE in names else []
        domainbed = bool(records) and "args" in records[0]
        run = Run(folder, "domainbed" if domainbed else "dgbench")
        if records:
            self._parse(run, records, results_path)
        if DONE_FILE in names:
            run.status = "done"
        elif STATUS_FILE in names and (failure := self._failure(os.path.join(folder, STATUS_FILE))):
            run.status, run.error = "failed", failure
        if not run.identified and not domainbed and CONFIG_FILE in names:
            self._identity_from_config(run, os.path.join(folder, CONFIG_FILE))
        if run.status == "incomplete":
            for name in (HEARTBEAT_FILE, RESULTS_FILE):
                if name in names:
                    try:
                        run.idle_seconds = max(0.0, self.now - os.stat(os.path.join(folder, name)).st_mtime)
                        run.idle_source = name
                        break
                    except OSError:
                        continue
        return run

    def _parse(self, run: Run, records: list[dict[str, Any]], path: str) -> None:
        try:
            (self._domainbed if run.source == "domainbed" else self._dgbench)(run, records)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as error:
            what = f"missing key {error}" if isinstance(error, KeyError) else one_line(error)
            self.problems.append(f"{path}: unusable record ({what}); run skipped")
            run.checkpoints = []

    def _read(self, path: str) -> list[dict[str, Any]]:
        try:
            with open(path, "rb") as handle:
                text = handle.read().decode("utf-8")
        except (OSError, UnicodeDecodeError) as error:
            self.problems.append(f"{path}: cannot read ({one_line(error)}); run skipped")
            return []
        lines = [line for line in text.split("\n") if line.strip()]
        if not lines:
            return []
        try:  # one parse per file: much faster than one per line
            records = json.loads("[" + ",".join(lines) + "]")
        except json.JSONDecodeError:
            records = []
            for number, line in enumerate(lines, 1):
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    if number == len(lines):
                        self.torn.append(path)
                    else:
                        self.problems.append(f"{path}: line {number} is not JSON ({error.msg}); skipped")
        if not all(isinstance(record, dict) for record in records):
            self.problems.append(f"{path}: a line is not a JSON object; run skipped")
            return []
        return records

    def _failure(self, path: str) -> str | None:
        try:
            with open(path, encoding="utf-8") as handle:
                status = json.load(handle)
        except (OSError, ValueError) as error:
            return f"unreadable {STATUS_FILE} ({one_line(error)})"
        if not isinstance(status, dict) or status.get("status") != "failed":
            return None
        return str(status.get("error") or "no error message recorded")

    def _dgbench(self, run: Run, records: list[dict[str, Any]]) -> None:
        first = records[0]
        run.dataset = str(first["dataset"])
        run.algorithm = str(first["algorithm"])
        run.backbone = str(first.get("backbone") or "")
        run.hparams_seed = int(first["hparams_seed"])
        run.trial_seed = int(first["trial_seed"])
        run.hparams = dict(first.get("hparams") or {})
        domains = self._domains(run.dataset, list(first["acc"]), run.path)
        run.test_envs = tuple(_env_index(env, domains) for env in first["test_envs"])
        checkpoints = []
        for record in records:
            acc = record["acc"]
            ins = [acc[d]["in"] for d in domains]
            outs = [acc[d]["out"] for d in domains]
            checkpoints.append(Checkpoint(int(record["step"]), _floats(ins), _floats(outs)))
        run.checkpoints = checkpoints

    def _domainbed(self, run: Run, records: list[dict[str, Any]]) -> None:
        first = records[0]
        args = first["args"]
        run.dataset = DOMAINBED_DATASETS.get(args["dataset"], str(args["dataset"]))
        run.algorithm = str(args["algorithm"])
        run.hparams_seed = int(args["hparams_seed"])
        run.trial_seed = int(args["trial_seed"])
        run.hparams = dict(first.get("hparams") or {})
        run.test_envs = tuple(int(env) for env in args["test_envs"])
        n_envs = 0
        while f"env{n_envs}_out_acc" in first:  # DomainBed counts envs the same way
            n_envs += 1
        self._domainbed_domains(run.dataset, n_envs)
        ins = [f"env{i}_in_acc" for i in range(n_envs)]
        outs = [f"env{i}_out_acc" for i in range(n_envs)]
        run.checkpoints = [
            Checkpoint(int(r["step"]), _floats([r[k] for k in ins]), _floats([r[k] for k in outs]))
            for r in records
        ]
        if any(not 0 <= env < n_envs for env in run.test_envs):
            raise ValueError(f"test_envs {list(run.test_envs)} outside the {n_envs} envs")

    def _domains(self, dataset: str, keys: list[str], where: str) -> list[str]:
        domains = self.resolved.get(dataset)
        if domains is None:
            registered = registered_domains(dataset)
            if registered is not None and set(registered) == set(keys):
                domains = registered
            else:
                if registered is not None:
                    self.problems.append(
                        f"{where}: dataset {dataset!r} records domains {keys}, but its registered domains "
                        f"are {registered}; using the records' order"
                    )
                domains = keys
            self.resolved[dataset] = domains
        elif set(domains) != set(keys):
            raise ValueError(f"domains {keys} differ from {domains} of other {dataset!r} runs")
        return domains

    def _domainbed_domains(self, dataset: str, n_envs: int) -> list[str]:
        domains = self.resolved.get(dataset)
        if domains is None:
            registered = registered_domains(dataset)
            ok = registered is not None and len(registered) == n_envs
            domains = registered if ok else [f"env{i}" for i in range(n_envs)]  # type: ignore[assignment]
            self.resolved[dataset] = domains
        if len(domains) != n_envs:
            raise ValueError(f"{n_envs} envs, but other {dataset!r} runs have {len(domains)} domains")
        return domains

    def _identity_from_config(self, run: Run, path: str) -> None:
        """Identity of a run without records (it failed early) from its resolved config.yaml."""
        try:
            import yaml

            with open(path, encoding="utf-8") as handle:
                cfg = yaml.safe_load(handle) or {}
            dataset, algorithm = cfg.get("dataset") or {}, cfg.get("algorithm") or {}
            run.dataset = str(dataset.get("name") or "")
            run.algorithm = str(algorithm.get("name") or "")
            envs = dataset.get("test_envs") or []
            run.test_envs = tuple(e for e in envs if isinstance(e, int))
            run.hparams_seed = int(cfg.get("hparams_seed", -1))
            run.trial_seed = int(cfg.get("trial_seed", -1))
        except Exception:  # best effort: the run is listed by its path either way
            return


def _floats(values: list[Any]) -> list[float]:
    if None in values:  # NaN written by another tool as null
        return [math.nan if v is None else float(v) for v in values]
    return values


def _env_index(env: Any, domains: list[str]) -> int:
    if isinstance(env, str):  # a domain name instead of an index
        return domains.index(env)
    index = int(env)
    if not 0 <= index < len(domains):
        raise ValueError(f"test env {index} outside the {len(domains)} domains")
    return index


def registered_domains(dataset: str) -> list[str] | None:
    """The registered domain order of `dataset`, or None when dgbench does not know it."""
    if dataset in _MODULE_DOMAINS:
        module, constant = _MODULE_DOMAINS[dataset]
        value = _module_constant(module, constant)
        return [str(d) for d in value] if value is not None else None
    manifest = Path(__file__).resolve().parents[1] / "datasets_manifest" / f"{dataset}.yaml"
    if manifest.is_file():
        from dgbench.data.folder import domain_names, load_manifest

        try:
            return [str(d) for d in domain_names(load_manifest(dataset))]
        except DGBenchError:
            return None
    return None


def _module_constant(module: str, name: str) -> Any:
    """A literal module-level constant, read from the source without importing the module."""
    try:
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            return None
        tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == name for t in targets) and node.value:
                    return ast.literal_eval(node.value)
    except (OSError, SyntaxError, ValueError, ImportError):
        return None
    return None


# ---------------------------------------------------------------- aggregation


@dataclass(frozen=True, slots=True)
class Cell:
    """One table entry, in percent. `mean` None (and n_trials 0) when there is no result."""

    dataset: str
    algorithm: str
    selection: str
    test_env: str  # a domain name or "avg"
    mean: float | None
    sem: float | None
    n_trials: int

    def to_json(self) -> dict[str, Any]:
        """The stable `dgbench results --format json` schema (DESIGN.md)."""
        return {
            "dataset": self.dataset,
            "algorithm": self.algorithm,
            "selection": self.selection,
            "test_env": self.test_env,
            "mean": _finite(self.mean),
            "sem": _finite(self.sem),
            "n_trials": self.n_trials,
        }


@dataclass(frozen=True, slots=True)
class BestChoice:
    """What a selection rule chose for one (dataset, algorithm, test domain, trial seed)."""

    dataset: str
    algorithm: str
    selection: str
    test_env: str
    trial_seed: int
    hparams_seed: int
    hparams: dict[str, Any]
    val_acc: float  # fractions, as in the records
    test_acc: float
    step: int
    run_dir: str

    def to_json(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "algorithm": self.algorithm,
            "selection": self.selection,
            "test_env": self.test_env,
            "trial_seed": self.trial_seed,
            "hparams_seed": self.hparams_seed,
            "hparams": self.hparams,
            "val_acc": _finite(self.val_acc),
            "test_acc": _finite(self.test_acc),
            "step": self.step,
            "run_dir": self.run_dir,
        }


@dataclass
class Coverage:
    """What is missing from the tables and why: failed, unfinished and absent runs."""

    runs: int
    done: int
    failed: list[Run]
    incomplete: list[Run]
    missing_trials: list[str]  # (dataset, algorithm, test domain) lacking trial seeds others have
    missing_hparams: list[str]  # (..., trial seed) lacking hparams seeds others have
    missing_pairs: list[str]  # (dataset, algorithm, trial seed) lacking two-test-domain runs (LODO)
    torn_files: list[str]
    problems: list[str]


@dataclass
class Aggregate:
    selections: list[str]
    datasets: list[str]
    algorithms: list[str]
    domains: dict[str, list[str]]
    cells: list[Cell]
    choices: list[BestChoice]
    lodo_unavailable: list[str]  # datasets without two-test-domain runs (when lodo was asked for)
    coverage: Coverage
    n_records: int
    only_done: bool = False
    _index: dict[tuple[str, str, str, str], Cell] = field(default_factory=dict, repr=False)

    def cell(self, selection: str, dataset: str, algorithm: str, test_env: str) -> Cell:
        if not self._index:
            self._index = {(c.selection, c.dataset, c.algorithm, c.test_env): c for c in self.cells}
        return self._index[selection, dataset, algorithm, test_env]


def mean_sem(values: Sequence[float]) -> tuple[float, float]:
    """DomainBed's `format_mean` numbers: `100 * mean(x)` and `100 * np.std(x / sqrt(n))` (ddof 0)."""
    array = np.asarray(values, dtype=np.float64)
    return float(100 * np.mean(array)), float(100 * np.std(array / np.sqrt(len(array))))


def order_algorithms(names: Iterable[str]) -> list[str]:
    """ERM (the baseline) first, then alphabetical, case-insensitively."""
    return sorted(set(names), key=lambda name: (name.lower() != "erm", name.lower(), name))


def aggregate(
    results: ResultSet,
    selections: Sequence[str] = DEFAULT_SELECTIONS,
    datasets: Sequence[str] | None = None,
    algorithms: Sequence[str] | None = None,
    only_done: bool = False,
) -> Aggregate:
    """Select per group and trial seed, then average into cells (see the module docstring)."""
    methods = [get_selection(name) for name in selections]
    known = [run for run in results.runs if run.identified]
    known = _filter(known, "dataset", datasets, "datasets")
    known = _filter(known, "algorithm", algorithms, "algorithms")
    usable = [
        run
        for run in known
        if run.checkpoints and run.status != "failed" and (run.status == "done" or not only_done)
    ]
    dataset_names = sorted({run.dataset for run in known})
    algorithm_names = order_algorithms(run.algorithm for run in known)
    domains = {name: results.domains.get(name, []) for name in dataset_names}

    groups: dict[tuple[str, str, int, int], list[Run]] = {}
    for run in usable:
        for env in run.test_envs:
            groups.setdefault((run.dataset, run.algorithm, run.trial_seed, env), []).append(run)

    cells: list[Cell] = []
    choices: list[BestChoice] = []
    for method in methods:
        chosen: dict[tuple[str, str, int], dict[int, Choice]] = {}
        for (dataset, algorithm, trial, env), runs in groups.items():
            choice = select(runs, env, method)
            if choice is not None:
                chosen.setdefault((dataset, algorithm, env), {})[trial] = choice
        for dataset in dataset_names:
            for algorithm in algorithm_names:
                per_trial: dict[int, list[float]] = {}
                for env, domain in enumerate(domains[dataset]):
                    by_trial = chosen.get((dataset, algorithm, env), {})
                    trials = sorted(by_trial)
                    cells.append(
                        _cell(dataset, algorithm, method.name, domain, [by_trial[t].test_acc for t in trials])
                    )
                    for trial in trials:
                        c = by_trial[trial]
                        per_trial.setdefault(trial, []).append(c.test_acc)
                        choices.append(
                            BestChoice(
                                dataset, algorithm, method.name, domain, trial, c.hparams_seed,
                                c.run.hparams, c.val_acc, c.test_acc, c.step, c.run.path,
                            )
                        )  # fmt: skip
                averages = [numpy_mean(per_trial[t]) for t in sorted(per_trial)]
                cells.append(_cell(dataset, algorithm, method.name, "avg", averages))

    with_pairs = {run.dataset for run in usable if len(run.test_envs) == 2}
    lodo_unavailable = (
        [d for d in dataset_names if d not in with_pairs] if "lodo" in [m.name for m in methods] else []
    )
    return Aggregate(
        selections=[m.name for m in methods],
        datasets=dataset_names,
        algorithms=algorithm_names,
        domains=domains,
        cells=cells,
        choices=choices,
        lodo_unavailable=lodo_unavailable,
        coverage=_coverage(results, known, usable, domains, lodo="lodo" in [m.name for m in methods]),
        n_records=sum(len(run.checkpoints) for run in usable),
        only_done=only_done,
    )


def _cell(dataset: str, algorithm: str, selection: str, test_env: str, values: list[float]) -> Cell:
    if not values:
        return Cell(dataset, algorithm, selection, test_env, None, None, 0)
    mean, sem = mean_sem(values)
    return Cell(dataset, algorithm, selection, test_env, mean, sem, len(values))


def _filter(runs: list[Run], attribute: str, wanted: Sequence[str] | None, what: str) -> list[Run]:
    if not wanted:
        return runs
    available = sorted({getattr(run, attribute) for run in runs})
    if attribute == "dataset":
        wanted = [DOMAINBED_DATASETS.get(name, name) for name in wanted]
    keys = {name.lower() for name in wanted}
    # an algorithm name also selects its per-backbone rows: "erm" keeps "erm (gmoe_test_vit)"
    kept = [run for run in runs if {getattr(run, attribute).lower(), _base_name(run, attribute)} & keys]
    if not kept:
        raise DGBenchError(
            f"no runs of {what} {', '.join(wanted)}; "
            f"{what} in these results: {', '.join(available) or '(none)'}"
        )
    return kept


def _base_name(run: Run, attribute: str) -> str:
    return getattr(run, attribute).split(" (")[0].lower()


def _coverage(
    results: ResultSet, known: list[Run], usable: list[Run], domains: dict[str, list[str]], lodo: bool
) -> Coverage:
    unidentified = [run for run in results.runs if not run.identified]
    listed = known + unidentified
    failed = [run for run in listed if run.status == "failed"]
    incomplete = [run for run in listed if run.status == "incomplete"]

    trials: dict[str, set[int]] = {}
    seeds: dict[tuple[str, str], set[int]] = {}
    have: dict[tuple[str, str, int], dict[int, set[int]]] = {}  # (ds, alg, env) -> trial -> hparams seeds
    for run in known:
        trials.setdefault(run.dataset, set()).add(run.trial_seed)
        seeds.setdefault((run.dataset, run.algorithm), set()).add(run.hparams_seed)
    for run in usable:
        if len(run.test_envs) == 1:
            by_trial = have.setdefault((run.dataset, run.algorithm, run.test_envs[0]), {})
            by_trial.setdefault(run.trial_seed, set()).add(run.hparams_seed)
    missing_trials, missing_hparams = [], []
    for dataset, algorithm in sorted(seeds):
        for env, domain in enumerate(domains.get(dataset, [])):
            by_trial = have.get((dataset, algorithm, env), {})
            if absent := sorted(trials[dataset] - set(by_trial)):
                missing_trials.append(
                    f"{dataset} {algorithm} test_env={domain}: no usable run for trial seed(s) "
                    f"{_join(absent)} (other runs of {dataset} have trial seeds "
                    f"{_join(sorted(trials[dataset]))})"
                )
            for trial in sorted(by_trial):
                if lacking := sorted(seeds[dataset, algorithm] - by_trial[trial]):
                    missing_hparams.append(
                        f"{dataset} {algorithm} test_env={domain} trial_seed={trial}: "
                        f"no usable run for hparams seed(s) {_join(lacking)}"
                    )
    missing_pairs = []
    pairs: dict[tuple[str, str, int], set[tuple[int, ...]]] = {}
    for run in usable:
        if len(run.test_envs) == 2:
            pairs.setdefault((run.dataset, run.algorithm, run.trial_seed), set()).add(
                tuple(sorted(run.test_envs))
            )
    with_pairs = {dataset for dataset, _, _ in pairs}
    for dataset, algorithm in sorted(seeds) if lodo else []:
        if dataset not in with_pairs:
            continue  # no pairs at all: the LODO message says so once
        names = domains.get(dataset, [])
        every = set(itertools.combinations(range(len(names)), 2))
        for trial in sorted(trials[dataset]):
            if lacking := sorted(every - pairs.get((dataset, algorithm, trial), set())):
                shown = ", ".join(f"{{{names[a]}, {names[b]}}}" for a, b in lacking)
                missing_pairs.append(
                    f"{dataset} {algorithm} trial_seed={trial}: no run with test domains {shown}"
                )
    return Coverage(
        runs=len(listed),
        done=sum(run.status == "done" for run in listed),
        failed=failed,
        incomplete=incomplete,
        missing_trials=missing_trials,
        missing_hparams=missing_hparams,
        missing_pairs=missing_pairs,
        torn_files=results.torn_files,
        problems=results.problems,
    )


def _join(values: Iterable[int]) -> str:
    return ", ".join(str(v) for v in values)


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None
