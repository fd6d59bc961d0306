"""Named sweeps: parsing, the run plan, dry runs, status, and launching through Hydra launchers."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dgbench.components import load_components
from dgbench.errors import ConfigError
from dgbench.registry import ALGORITHMS
from dgbench.runs import find_run_dirs, run_state
from dgbench.sweep import Sweep, dry_run_report, load_sweep, multirun_overrides, plan, status_report

TINY = ["trainer.steps=2", "trainer.checkpoint_freq=1", "algorithm.batch_size=4"]


def write_sweep(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mine.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_shipped_sweeps_parse_with_domainbed_grids() -> None:
    quick = load_sweep("quickstart")
    assert quick.datasets == ["embedded"] and set(quick.algorithms) == {
        "erm",
        "fish",
        "sam",
        "udim",
        "coral",
        "groupdro",
        "mixup",
        "pego",
        "domaindrop",
    }
    assert (quick.hparams_seeds, quick.trial_seeds, quick.test_envs) == ([0], [0, 1], "pairs")
    gmoe = ["backbone=gmoe_vit_32px", "algorithm.lr=1e-3"]  # GMoE: ERM on the sparse-MoE ViT
    assert gmoe in quick.algorithm_overrides
    assert ["backbone.width=0.25", "trainer.swad=true"] in quick.algorithm_overrides  # "erm + swad" row
    for name in ("domainbed_pacs", "domainbed_vlcs", "domainbed_domainnet"):
        sweep = load_sweep(name)
        assert sweep.hparams_seeds == list(range(20)) and sweep.trial_seeds == [0, 1, 2]
        assert sweep.test_envs == "single" and "trainer.steps=5001" in sweep.overrides


def test_domainbed_table_sweep_has_every_domainbed_baseline_and_its_protocol() -> None:
    load_components()
    table = load_sweep("domainbed_table")
    domainbed = {
        name
        for name in ALGORITHMS.names()
        if ALGORITHMS.get(name).obj.reference.startswith("facebookresearch/DomainBed@")
    }
    assert set(table.algorithms) == domainbed and len(domainbed) >= 19  # a new baseline must join it
    assert table.datasets == ["vlcs", "pacs", "officehome", "terra_incognita", "domainnet"]
    assert (table.hparams_seeds, table.trial_seeds, table.test_envs) == (list(range(20)), [0, 1, 2], "pairs")
    assert {"backbone=resnet50", "protocol=domainbed", "trainer.steps=5001"} <= set(table.overrides)
    swad = load_sweep("swad_table")
    assert {"protocol=swad", "trainer.swad=true", "backbone=resnet50"} <= set(swad.overrides)
    assert (swad.hparams_seeds, swad.trial_seeds, swad.test_envs) == ([0], [0, 1, 2], "single")


def test_test_env_sets_are_domainbeds_combinations() -> None:
    sweep = Sweep("s", ["pacs"], ["erm"], "pairs", [0], [0])
    sets = sweep.test_env_sets(["a", "b", "c", "d"])
    assert sets == [[0], [1], [2], [3], [0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]]
    sweep.test_envs = "single"
    assert sweep.test_env_sets(["a", "b", "c"]) == [[0], [1], [2]]


def test_command_line_sets_sweep_keys_and_passes_the_rest_to_training(tmp_path: Path) -> None:
    path = write_sweep(tmp_path, "datasets: [embedded]\nalgorithms: [erm]\nhparams_seeds: 3\n")
    sweep = load_sweep(str(path), ["test_envs=pairs", "trial_seeds=[4, 7]", "trainer.steps=9"])
    assert (sweep.test_envs, sweep.trial_seeds, sweep.hparams_seeds) == ("pairs", [4, 7], [0, 1, 2])
    assert sweep.overrides == ["trainer.steps=9"]
    (overrides,) = multirun_overrides(sweep, "embedded", ["a", "b", "c"])
    assert "dataset.test_envs=[0],[1],[2],[0,1],[0,2],[1,2]" in overrides
    assert "hparams_seed=0,1,2" in overrides and "trial_seed=4,7" in overrides and "name=mine" in overrides


def test_algorithm_entries_with_own_overrides_run_as_separate_multiruns(tmp_path: Path) -> None:
    path = write_sweep(
        tmp_path,
        """
        datasets: [embedded]
        algorithms: [erm, fish, {erm: [backbone=gmoe_vit_32px]}, {pego: []}]
        overrides: [trainer.steps=9]
        """,
    )
    sweep = load_sweep(str(path))
    assert sweep.algorithms == ["erm", "fish", "erm", "pego"]
    assert sweep.groups() == [(["erm", "fish", "pego"], []), (["erm"], ["backbone=gmoe_vit_32px"])]
    plain, gmoe = multirun_overrides(sweep, "embedded", ["a", "b"])
    assert "algorithm=erm,fish,pego" in plain and not any(o.startswith("backbone") for o in plain)
    assert "algorithm=erm" in gmoe and gmoe[-2:] == ["trainer.steps=9", "backbone=gmoe_vit_32px"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("datasets: [embedded]\nalgorithms: [erm]\nseeds: 3\n", "unknown key(s) seeds"),
        ("datasets: [embedded]\n", "key 'algorithms' is required"),
        ("datasets: [embedded]\nalgorithms: [erm]\ntest_envs: triples\n", "test_envs must be one of"),
        ("datasets: [embedded]\nalgorithms: [erm]\nhparams_seeds: 0\n", "hparams_seeds must be a positive"),
        ("datasets: [embedded\n", "not valid YAML"),
        ("datasets: [embedded]\nalgorithms: [{erm: 3}]\n", "algorithms entry {'erm': 3} must be a name or"),
    ],
)
def test_bad_sweep_files_name_the_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = write_sweep(tmp_path, text)
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        load_sweep(str(path))
    assert str(path) in str(error.value)


def test_unknown_sweep_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"no sweep 'quikstart'.*quickstart"):
        load_sweep("quikstart")


def test_plan_matches_the_runs_train_creates_and_dry_run_counts_them(tmp_path: Path, data_root: Path) -> None:
    from dgbench.cli import conf_dir
    from dgbench.train import train

    sweep = load_sweep(
        "quickstart",
        ["algorithms=[erm]", "hparams_seeds=2", "trial_seeds=1", "test_envs=[[0], [1, 2]]",
         f"output_dir={tmp_path}", f"dataset.root={data_root}", *TINY],
    )  # fmt: skip
    runs = plan(sweep)
    assert len(runs) == 4 and len({r.run_dir for r in runs}) == 4
    assert "0 done, 0 failed, 0 running, 0 dead, 4 pending" in dry_run_report(sweep, runs)

    from hydra import compose, initialize_config_dir

    for run in runs[:2]:  # train two of them the way a multirun job would
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose("config", overrides=run.overrides)
        assert train(cfg, run.overrides).run_dir == run.run_dir
    report = dry_run_report(sweep, runs)
    assert "2 done, 0 failed, 0 running, 0 dead, 2 pending" in report
    assert "remaining training steps: 4" in report and "estimated remaining compute" in report
    status = status_report([tmp_path])
    assert status.startswith("2 runs: 2 done, 0 failed, 0 running, 0 dead")


def test_status_lists_failed_and_dead_runs(tmp_path: Path) -> None:
    for name, files in {
        "ok": {"done": "", "results.jsonl": '{"step": 1}\n'},
        "bad": {"status.json": '{"status": "failed", "error": "DivergedError: loss nan"}'},
        "gone": {"results.jsonl": '{"step": 3}\n', "config.yaml": "trainer: {steps: 10}\n"},
    }.items():
        run = tmp_path / "sweep" / name
        run.mkdir(parents=True)
        for file, text in files.items():
            (run / file).write_text(text)
    report = status_report([tmp_path])
    assert report.splitlines()[0] == "3 runs: 1 done, 1 failed, 0 running, 1 dead"
    assert f"failed   {tmp_path / 'sweep' / 'bad'}  not started: DivergedError: loss nan" in report
    assert f"dead     {tmp_path / 'sweep' / 'gone'}  step 3, no heartbeat" in report
    assert "resume from their checkpoint" in report


def test_status_command_reads_run_directories_without_importing_torch(tmp_path: Path) -> None:
    """`dgbench status` is run beside a training sweep: torch would cost it seconds and ~1 GB."""
    run = tmp_path / "sweep" / "gone"
    run.mkdir(parents=True)
    (run / "results.jsonl").write_text('{"step": 3}\n')
    (run / "config.yaml").write_text("trainer: {steps: 10}\n")  # an unfinished run's config is read
    code = (
        "import sys\nfrom dgbench.cli import main\ntry:\n    main(['status', sys.argv[1]])\n"
        "except SystemExit as done:\n    print(done.code, sorted({'torch', 'timm'} & set(sys.modules)))"
    )
    command = [sys.executable, "-c", code, str(tmp_path)]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    assert lines[0] == "1 runs: 0 done, 0 failed, 0 running, 1 dead", out.stdout
    assert lines[-1] == "0 []", out.stdout


@pytest.mark.slow
def test_submitit_local_launcher_runs_a_two_run_sweep(tmp_path: Path, data_root: Path) -> None:
    command = [
        sys.executable, "-m", "dgbench.cli", "train", "-m", "hydra/launcher=local", "hparams_seed=0,1",
        *TINY, "backbone.width=0.25", f"output_dir={tmp_path}", "name=sub", f"dataset.root={data_root}",
        "trainer.progress=false",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert result.returncode == 0, result.stderr[-2000:]
    runs = find_run_dirs([tmp_path / "sub"])
    assert len(runs) == 2 and all(run_state(r).status == "done" for r in runs)
    assert list((tmp_path / "sub" / ".multirun" / ".submitit").iterdir())  # submitit really ran the jobs
