"""Sweeps end to end in subprocesses: kill and relaunch gives the same table; a failing run is reported."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dgbench.runs import CONFIG_FILE, DONE_FILE, find_run_dirs, run_state

pytestmark = pytest.mark.slow

SWEEP = """\
datasets: [embedded]
algorithms: [{algorithm}]
test_envs: {test_envs}
hparams_seeds: 2
trial_seeds: 1
overrides: [trainer.steps=30, trainer.checkpoint_freq=10, algorithm.batch_size=8, backbone.width=0.25,
            trainer.progress=false]
"""


def sweep_file(tmp_path: Path, algorithm: str = "erm", test_envs: str = "[[0], [1]]") -> Path:
    path = tmp_path / "mine.yaml"
    path.write_text(SWEEP.format(algorithm=algorithm, test_envs=test_envs))
    return path


def dgbench(*args: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "dgbench.cli", *args]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})}, **kwargs
    )


def table(output_dir: Path) -> list[dict]:
    result = dgbench("results", str(output_dir / "mine"), "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_killed_sweep_relaunched_trains_only_what_is_missing_and_gives_the_same_table(
    tmp_path: Path, data_root: Path
) -> None:
    spec = sweep_file(tmp_path)
    common = [str(spec), f"dataset.root={data_root}", "--no-table"]
    whole = tmp_path / "whole"
    assert dgbench("sweep", *common, f"output_dir={whole}").returncode == 0

    killed = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "dgbench.cli", "sweep", *common, f"output_dir={killed}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # the sweep's child `dgbench train -m` dies with it
    )
    deadline = time.time() + 300
    try:
        while time.time() < deadline:  # kill once one run is done and another has a checkpoint
            runs = find_run_dirs([killed]) if killed.exists() else []
            done = [r for r in runs if (r / DONE_FILE).exists()]
            mid = [r for r in runs if (r / "checkpoint.pt").exists() and not (r / DONE_FILE).exists()]
            if done and mid:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the sweep never had a finished and a checkpointed run at once")
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    finished_before = {r: (r / "results.jsonl").stat().st_mtime_ns for r in done}
    interrupted = mid[0]
    assert run_state(interrupted).status in {"running", "dead"}

    relaunch = dgbench("sweep", str(spec), f"dataset.root={data_root}", f"output_dir={killed}")
    assert relaunch.returncode == 0, relaunch.stderr[-2000:]
    assert "Model selection: training-domain validation" in relaunch.stdout  # the sweep ends in its tables
    for run, mtime in finished_before.items():  # finished runs were skipped, not retrained
        assert (run / "results.jsonl").stat().st_mtime_ns == mtime
    assert "resuming run" in (interrupted / "train.log").read_text()
    assert (
        all(run_state(r).status == "done" for r in find_run_dirs([killed]))
        and len(find_run_dirs([killed])) == 4
    )
    assert table(killed) == table(whole)


def test_a_failing_run_does_not_stop_the_sweep_and_the_table_reports_it(
    tmp_path: Path, data_root: Path
) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "flaky_plugin.py").write_text(
        textwrap.dedent(
            """
            from dgbench.algorithms.erm import ERM, ERMHParams
            from dgbench.registry import ALGORITHMS


            @ALGORITHMS.register("flaky", ERMHParams)
            class Flaky(ERM):
                def update(self, batches):
                    if len(batches) == 2:  # the runs with two test domains
                        raise RuntimeError("flaky: boom with two training domains")
                    return super().update(batches)
            """
        )
    )
    env = {"DGBENCH_PLUGINS": "flaky_plugin", "PYTHONPATH": str(plugins)}
    spec = sweep_file(tmp_path, algorithm="flaky", test_envs="[[0], [0, 1]]")
    result = dgbench("sweep", str(spec), f"dataset.root={data_root}", f"output_dir={tmp_path}", env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    states = [run_state(r) for r in find_run_dirs([tmp_path / "mine"])]
    assert sorted(s.status for s in states) == ["done", "done", "failed", "failed"]
    assert all("RuntimeError: flaky: boom" in s.error for s in states if s.status == "failed")
    assert all((s.run_dir / CONFIG_FILE).exists() for s in states)
    report = result.stdout + result.stderr
    assert "2 failed" in report and "flaky: boom with two training domains" in report
    assert "photo" in report  # the single-test-domain runs still make their table row
