"""Run life cycle: fast skip of done runs, heartbeat, failure records, run-state classification."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

import dgbench.train as train_module
from dgbench.errors import DataError
from dgbench.runs import HEARTBEAT_FILE, Heartbeat, find_run_dirs, run_state
from dgbench.train import train

FAST = ("trainer.steps=2", "trainer.checkpoint_freq=1", "algorithm.batch_size=4")


def test_done_run_is_skipped_without_building_the_dataset(make_cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    overrides = [*FAST, "dataset.test_envs=[sketch]"]
    first = train(make_cfg(*overrides), overrides)
    assert (first.run_dir / HEARTBEAT_FILE).exists() and run_state(first.run_dir).status == "done"

    def no_build(*args: object) -> None:
        raise AssertionError("the dataset was built for a run that is already done")

    monkeypatch.setattr(train_module, "_build_dataset", no_build)
    started = time.perf_counter()
    again = train(make_cfg(*overrides), overrides)
    assert again.record is None and again.run_dir == first.run_dir and again.test_envs == [3]
    assert time.perf_counter() - started < 0.5


def test_a_dataset_that_fails_to_build_is_recorded_as_a_failed_run(
    make_cfg, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object) -> None:
        raise DataError("embedded: cannot read /nowhere/embedded.npz")

    monkeypatch.setattr(train_module, "_build_dataset", broken)
    with pytest.raises(DataError):
        train(make_cfg(*FAST, "name=broken"), list(FAST))
    (run_dir,) = find_run_dirs([Path(make_cfg().output_dir) / "broken"])
    state = run_state(run_dir)
    assert state.status == "failed" and "cannot read /nowhere/embedded.npz" in state.error
    assert json.loads((run_dir / "status.json").read_text())["status"] == "failed"


def test_heartbeat_thread_touches_the_file_until_the_block_ends(tmp_path: Path) -> None:
    path = tmp_path / HEARTBEAT_FILE
    with Heartbeat(tmp_path, interval=0.05):
        os.utime(path, (0, 0))
        time.sleep(0.3)
        assert path.stat().st_mtime > time.time() - 5  # touched again by the thread
    os.utime(path, (0, 0))
    time.sleep(0.15)
    assert path.stat().st_mtime == 0  # the thread stopped with the block


def test_run_state_tells_running_from_dead(tmp_path: Path) -> None:
    run = tmp_path / "sweep" / "abc"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("{}")
    (run / "results.jsonl").write_text('{"step": 0}\n{"step": 300}\n{"step": 6')  # torn last line
    assert run_state(run).status == "dead" and run_state(run).heartbeat_age_s is None
    (run / HEARTBEAT_FILE).touch()
    state = run_state(run)
    assert state.status == "running" and state.last_step == 300 and state.heartbeat_age_s < 5
    assert run_state(run, now=time.time() + 3600).status == "dead"
    (run / "status.json").write_text(json.dumps({"status": "failed", "error": "boom"}))
    assert (run_state(run).status, run_state(run).error) == ("failed", "boom")
    (run / "done").touch()
    assert run_state(run).status == "done"
    (tmp_path / "sweep" / ".multirun" / "0").mkdir(parents=True)
    (tmp_path / "sweep" / ".multirun" / "0" / "config.yaml").write_text("{}")
    assert find_run_dirs([tmp_path]) == [run]
