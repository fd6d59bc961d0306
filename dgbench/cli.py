"""The `dgbench` command: `train` (a Hydra app) and `list`.

User errors (`DGBenchError`: bad names, values, files) print one line and exit 2;
tracebacks are for bugs. Hydra reports composition errors (unknown keys, wrong
types, unknown group options) itself, naming the key and the valid options.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from dgbench.errors import DGBenchError

if TYPE_CHECKING:
    from dgbench.train import RunResult

log = logging.getLogger("dgbench")
USAGE = """usage: dgbench <command> [args]

commands:
  train [overrides...]              train one run (Hydra app: -m for multirun, --cfg job, --help)
  list [algorithms|datasets|backbones]  registered components with their hparams and defaults
  data list|info|download|verify|split|cache  obtain, inspect, audit and cache datasets (dgbench data -h)
  sweep NAME [key=value...] [--dry-run]  run sweeps/NAME.yaml as Hydra multiruns, then print the tables
  status DIR...                     runs under DIR: done, failed, running or dead; remaining compute
  results DIR... [--selection iid,lodo,oracle] [--format terminal|markdown|latex|csv|json]
                                    model selection and result tables (dgbench results -h)
"""


def conf_dir() -> Path:
    """The `conf/` directory shipped at the project root beside the package."""
    return Path(__file__).resolve().parent.parent / "conf"


def main(argv: Sequence[str] | None = None) -> None:
    quiet_openmp()
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"-h", "--help"}:
        print(USAGE, end="")
        sys.exit(0 if args else 2)
    command, rest = args[0], args[1:]
    try:
        if command == "data":  # no registry needed for most subcommands: skip importing torch
            from dgbench.data.commands import main as data_main

            sys.exit(data_main(rest))
        if command == "results":
            from dgbench.results_cli import main as results_main

            sys.exit(results_main(rest))
        if command == "status":  # run directories only: no torch (7 s, 0.9 GB) beside a running sweep
            sys.exit(_status(rest))
        from dgbench.components import load_components

        load_components()
        if command == "train":
            _run_hydra_train(rest)
        elif command == "list":
            _list(rest)
        elif command == "sweep":
            sys.exit(_sweep(rest))
        else:
            print(f"dgbench: unknown command {command!r}\n{USAGE}", file=sys.stderr, end="")
            sys.exit(2)
    except DGBenchError as error:
        _exit_with(error)


def quiet_openmp() -> None:
    """Make idle OpenMP threads sleep instead of spin, unless the user chose otherwise.

    Must run before torch is imported. When other processes share the cores (data workers,
    parallel sweep jobs), spinning threads starve the working ones: a small-CNN step measured
    0.70 s vs 0.18 s with PASSIVE on 2 busy vCPUs. On idle cores `tools/bench_openmp.py` shows no
    consistent difference (0.7x-1.4x across runs).
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _exit_with(error: BaseException) -> None:
    print(f"dgbench: error: {user_message(error)}", file=sys.stderr)
    sys.exit(2)


def user_message(error: BaseException) -> str:
    """The error's message; for an error re-raised from a DataLoader worker, the original one."""
    text = str(error)
    if "Original Traceback" in text:  # DataLoader wraps worker exceptions in a traceback dump
        last = text.strip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text


def _run_hydra_train(overrides: list[str]) -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig

    @hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")
    def train_app(cfg: DictConfig) -> None:
        from dgbench.components import load_components
        from dgbench.train import train

        load_components()  # again: launchers may run jobs in fresh processes
        hydra_cfg = HydraConfig.get()
        multirun = hydra_cfg.mode is not None and hydra_cfg.mode.name == "MULTIRUN"
        try:
            result = train(cfg, list(hydra_cfg.overrides.task))
        except Exception as error:
            if multirun:  # recorded in the run's status.json; the sweep carries on
                log.error("run failed (%s): %s", " ".join(hydra_cfg.overrides.task), user_message(error))
                return
            if isinstance(error, DGBenchError):
                _exit_with(error)
                return
            raise  # a bug: keep the traceback
        if multirun:
            state = "already done" if result.record is None else f"done, step {result.record['step']}"
            log.info("run %s: %s", result.run_dir, state)
        else:
            _print_summary(result)

    if not any(arg.startswith("-") for arg in overrides):  # single run: fail early, in one line
        _check_composes(overrides)
    sys.argv = [sys.argv[0], *overrides]
    train_app()


def _check_composes(overrides: list[str]) -> None:
    """Compose the config once to turn Hydra's multi-line composition errors into one line."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from dgbench.errors import ConfigError

    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            compose("config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as error:
        causes, cause = [], error
        while cause is not None:
            causes.append(str(cause))
            cause = cause.__cause__
        raise ConfigError(one_line("\n".join(causes))) from None


def one_line(message: str) -> str:
    """Hydra's error text on one line, without the search path and HYDRA_FULL_ERROR hint."""
    parts: list[str] = []
    for raw in message.splitlines():
        line = raw.strip()
        if line.startswith("Config search path"):
            break
        if not line or line.startswith("Set the environment variable HYDRA_FULL_ERROR"):
            continue
        if parts and parts[-1].endswith(":"):
            parts[-1] += " " + line
        elif parts and raw.startswith(("\t", "    ")) and ":" in parts[-1]:
            parts[-1] += ", " + line
        else:
            parts.append(line)
    return "; ".join(part.rstrip(".") for part in parts)


def _print_summary(result: RunResult) -> None:
    from dgbench.records import RESULTS_FILE, read_records

    if result.record is None:
        print(f"run already done: {result.run_dir}")
    record = result.record or (read_records(result.run_dir / RESULTS_FILE) or [None])[-1]
    if not record:
        return
    print(f"\n{record['algorithm']} on {record['dataset']} ({record['backbone']}), step {record['step']}")
    print(f"{'domain':<16}{'role':<7}{'in':>8}{'out':>8}")
    for index, domain in enumerate(result.domains):
        role = "test" if index in result.test_envs else "train"
        acc = record["acc"][domain]
        cells = "".join(f"{'-':>8}" if a is None else f"{100 * a:>7.1f}%" for a in (acc["in"], acc["out"]))
        print(f"{domain:<16}{role:<7}{cells}")
    print(f"records: {result.run_dir / RESULTS_FILE}")


def _sweep(args: list[str]) -> int:
    from dgbench.sweep import dry_run_report, launch, load_sweep, plan, sweep_names

    parser = argparse.ArgumentParser(
        prog="dgbench sweep",
        description="Run a named sweep (sweeps/<name>.yaml); relaunching it trains only what is missing.",
        epilog=f"sweeps: {', '.join(sweep_names())}. key=value sets a sweep key (datasets, algorithms, "
        "test_envs, hparams_seeds, trial_seeds) or adds a training override for every run.",
    )
    parser.add_argument("name", help="a sweep name or a path to a sweep YAML file")
    parser.add_argument("args", nargs="*", help="key=value sweep keys and training overrides")
    parser.add_argument(
        "--dry-run", action="store_true", help="count runs by state; estimate the compute left"
    )
    parser.add_argument("--no-table", action="store_true", help="do not print the result tables at the end")
    options = parser.parse_intermixed_args(args)  # flags may follow key=value arguments
    sweep = load_sweep(options.name, options.args)
    if options.dry_run:
        print(dry_run_report(sweep, plan(sweep)))
        return 0
    status = launch(sweep)
    if not options.no_table:
        output_dir = next(
            (o.split("=", 1)[1] for o in reversed(sweep.overrides) if o.startswith("output_dir=")), None
        )
        sweep_dir = Path(output_dir or "outputs") / sweep.name
        print(f"\nresults of {sweep_dir} (dgbench results {sweep_dir}):", flush=True)
        from dgbench.results_cli import main as results_main

        status = results_main([str(sweep_dir)]) or status
    return status


def _status(args: list[str]) -> int:
    from dgbench.sweep import status_report

    parser = argparse.ArgumentParser(prog="dgbench status", description="State of the runs under DIR...")
    parser.add_argument("dirs", nargs="+", type=Path, help="output or sweep directories")
    parser.add_argument("--stale-after", type=float, default=None, help="seconds without heartbeat = dead")
    options = parser.parse_args(args)
    print(status_report(options.dirs, options.stale_after))
    return 0


def _list(args: list[str]) -> None:
    from dgbench.algorithms.base import SMALL_IMAGE_PX
    from dgbench.hparams import describe_fields
    from dgbench.registry import ALGORITHMS, BACKBONES, DATASETS

    registries = {"algorithms": ALGORITHMS, "datasets": DATASETS, "backbones": BACKBONES}
    parser = argparse.ArgumentParser(prog="dgbench list")
    parser.add_argument("kind", nargs="?", choices=sorted(registries), help="what to list (default: all)")
    kind = parser.parse_args(args).kind
    for title, registry in registries.items():
        if kind not in (None, title):
            continue
        print(f"{title}:")
        for entry in registry:
            print(f"  {entry.name}  ({registry.kind}={entry.name})")
            need = getattr(entry.obj, "backbone_need", None)
            if need is not None:
                print(
                    f"      needs {need.family}; default backbone: {_describe_backbone(need.paper)}, "
                    f"{_describe_backbone(need.small)} for images of at most {SMALL_IMAGE_PX} px"
                )
            per_dataset = getattr(entry.config, "dataset_defaults", {})
            for dataset, values in per_dataset.items():
                print(
                    f"      on {dataset}: " + ", ".join(f"{registry.kind}.{k}={v}" for k, v in values.items())
                )
            skip = {registry.name_field, "name"} if registry.name_field == "name" else {registry.name_field}
            for name, default, search, help_text in describe_fields(entry.config, skip=skip):
                line = f"      {registry.kind}.{name}={default!s}"
                if search:
                    line += f"   search: {search}"
                if help_text:
                    line += f"   # {help_text}"
                print(line)
        for preset in sorted((conf_dir() / registry.kind).glob("*.yaml")):
            where = f"conf/{registry.kind}/{preset.name}"
            print(f"  {preset.stem}  ({registry.kind}={preset.stem}, preset: {where})")


def _describe_backbone(config: dict[str, object]) -> str:
    pretrained = " (pretrained)" if config.get("pretrained") else ""
    return f"{config.get('arch')}:{config.get('name')}{pretrained}"


if __name__ == "__main__":
    main()
