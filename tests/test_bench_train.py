"""tools/bench_train.py: the protocol-length projection it prints beside the measured run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# the tools import each other as scripts do
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import bench_train


@pytest.mark.parametrize(("steps", "freq"), [(5001, 300), (5000, 300), (11, 5), (10, 5), (1, 1), (7, 100)])
def test_protocol_seconds_counts_the_evaluations_the_trainer_makes(steps: int, freq: int) -> None:
    evaluations = sum(1 for step in range(steps) if step % freq == 0 or step == steps - 1)  # dgbench/train.py
    summary = {"steps_per_s": 4.0, "eval_seconds": 3.0, "checkpoint_seconds": 0.5}
    projected = bench_train.protocol_seconds(summary, steps, freq)
    assert projected == pytest.approx(steps / 4.0 + 3.5 * evaluations, abs=0.06)  # rounded to 0.1 s


def test_protocol_run_asks_the_dataset_and_ratios_compare_it(tmp_path: Path) -> None:
    assert bench_train.protocol_run("embedded", str(tmp_path)) == {"steps": 1000, "checkpoint_freq": 100}
    no_start_up = {"outside_loop_s": 0.0, "first_step_s": 1.0, "first_eval_s": 30.0}  # = the steady rates
    written = {"checkpoint_seconds": 2.0}  # after each of the 11 evaluations, on either path
    result = {
        "protocol": {},
        "slow": {"steps_per_s": 1.0, "eval_seconds": 30.0, "wall_s": 10.0, "rss_mb": 100.0}
        | no_start_up
        | written,
        "quick": {  # a compile: 100 s of set-up and a first step of 200 s, then twice the speed
            "steps_per_s": 2.0,
            "eval_seconds": 3.0,
            "wall_s": 5.0,
            "rss_mb": 50.0,
            **{"outside_loop_s": 100.0, "first_step_s": 200.0, "first_eval_s": 3.0},
            **written,
        },
    }
    bench_train.add_protocol_seconds(result, "embedded", str(tmp_path), ["slow", "quick"])
    slow = 1000 + 11 * (30.0 + 2.0)
    assert result["slow"]["protocol_s"] == pytest.approx(slow)
    assert result["slow"]["protocol_wall_s"] == result["slow"]["protocol_s"]
    quick = 1000 / 2 + 11 * (3.0 + 2.0)
    assert result["quick"]["protocol_wall_s"] == pytest.approx(quick + 100 + (200 - 0.5), abs=0.06)
    ratios = bench_train.ratios(result["slow"], result["quick"])
    assert ratios["protocol_run"] == pytest.approx(slow / quick, abs=0.01)
    assert ratios["protocol_run_with_start_up"] == pytest.approx(slow / (quick + 299.5), abs=0.01)
    assert ratios["wall"] == 2.0 and ratios["host_rss"] == 0.5


def test_fast_overrides_reach_the_fast_run_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs: dict[str, list[str]] = {}
    summary = {
        "steps_per_s": 1.0,
        "eval_seconds": 1.0,
        "checkpoint_seconds": 0.1,
        "wall_s": 9.0,
        "rss_mb": 1.0,
    }
    summary |= {"outside_loop_s": 1.0, "first_step_s": 1.0, "first_eval_s": 1.0}

    def fake_run(args, extra, output_dir, name):
        runs[name] = list(extra)
        return dict(summary)

    monkeypatch.setattr(bench_train, "run", fake_run)
    argv = ["bench_train.py", "--root", str(tmp_path), "--dataset", "embedded"]
    argv += ["--json", str(tmp_path / "r.json")]
    argv += ["--fast-override", "trainer.compile=true", "--fast-override", "trainer.eval_batch_size=512"]
    argv += ["x.y=1"]  # for both runs
    monkeypatch.setattr(sys, "argv", argv)
    bench_train.main()
    overrides = ["trainer.compile=true", "trainer.eval_batch_size=512"]
    assert runs["fast"][-2:] == overrides
    assert not set(overrides) & set(runs["reference"]) and not set(overrides) & set(runs["cache"])
    assert bench_train.json.loads((tmp_path / "r.json").read_text())["settings"]["fast_override"] == overrides


def test_reference_is_reused_from_an_earlier_result_of_the_same_machine_and_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dgbench.errors import DGBenchError

    runs: list[str] = []

    def fake_run(args, extra, output_dir, name):
        runs.append(name)
        speed = {"reference": 1.0, "fast": 4.0}.get(name, 1.0) * (1 + len(runs))  # differs per run
        return {"steps_per_s": speed, "eval_seconds": 1.0, "checkpoint_seconds": 0.1, "wall_s": 9.0} | {
            "rss_mb": 1.0,
            "outside_loop_s": 1.0,
            "first_step_s": 1.0,
            "first_eval_s": 1.0,
        }

    monkeypatch.setattr(bench_train, "run", fake_run)
    monkeypatch.setattr(bench_train, "machine_info", lambda args: {"cores": 2, "load_average": [0.5]})
    base = ["bench_train.py", "--root", str(tmp_path), "--dataset", "embedded", "--steps", "10"]
    monkeypatch.setattr(sys, "argv", [*base, "--json", str(tmp_path / "first.json")])
    bench_train.main()
    first = bench_train.json.loads((tmp_path / "first.json").read_text())
    assert runs == ["cache", "reference", "fast"]

    runs.clear()
    monkeypatch.setattr(bench_train, "machine_info", lambda args: {"cores": 2, "load_average": [1.5]})
    again = [*base, "--fast-override", "trainer.amp=false", "--reference", str(tmp_path / "first.json")]
    monkeypatch.setattr(sys, "argv", [*again, "--json", str(tmp_path / "second.json")])
    bench_train.main()
    second = bench_train.json.loads((tmp_path / "second.json").read_text())
    assert runs == ["fast"]  # neither the reference nor the cache-building run again
    assert second["reference"] == first["reference"]
    assert second["fast"]["steps_per_s"] != first["fast"]["steps_per_s"]
    assert second["ratios"]["train_steps_per_s"] == pytest.approx(
        second["fast"]["steps_per_s"] / first["reference"]["steps_per_s"], abs=0.01
    )

    monkeypatch.setattr(sys, "argv", [*base, "--steps", "20", "--reference", str(tmp_path / "first.json")])
    with pytest.raises(DGBenchError, match=r"first.json: its settings.steps is 10, this run's 20"):
        bench_train.main()
    monkeypatch.setattr(bench_train, "machine_info", lambda args: {"cores": 16, "load_average": [0.5]})
    monkeypatch.setattr(sys, "argv", [*base, "--reference", str(tmp_path / "first.json")])
    with pytest.raises(DGBenchError, match=r"its machine.cores is 2, this run's 16"):
        bench_train.main()
    monkeypatch.setattr(sys, "argv", [*base, "--reference", str(tmp_path / "missing.json")])
    with pytest.raises(
        DGBenchError, match=r"--reference .*missing.json: not a bench_train result \(FileNotFound"
    ):
        bench_train.main()
    del first["reference"]["checkpoint_seconds"]  # a result from before checkpoints were measured
    (tmp_path / "old.json").write_text(bench_train.json.dumps(first))
    monkeypatch.setattr(sys, "argv", [*base, "--reference", str(tmp_path / "old.json")])
    with pytest.raises(
        DGBenchError, match=r"old.json: made by an older bench_train .* leave out --reference"
    ):
        bench_train.main()


def write_results(command: list[str], records: list[dict]) -> str:
    """The records a `dgbench train` run of `command` would leave for `bench_train.run`; its name."""
    value = dict(a.split("=", 1) for a in command if "=" in a)
    results = Path(value["output_dir"], value["name"], "run", "results.jsonl")
    results.parent.mkdir(parents=True)
    results.write_text("".join(bench_train.json.dumps(r) + "\n" for r in records))
    return value["name"]


def test_a_run_is_summarised_from_its_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Steps and evaluations from the records, the first left out of the rates; each record after
    the first tells the previous checkpoint's seconds, and a checkpoint follows every record."""
    records = [
        {"step": 0, "step_time": 5.0, "metrics": {"eval_time": 4.0}},
        {"step": 10, "step_time": 0.5, "metrics": {"eval_time": 1.0, "checkpoint_time": 0.2}},
        {"step": 19, "step_time": 0.25, "metrics": {"eval_time": 2.0, "checkpoint_time": 0.4}},
    ]
    looped = 5.0 + 4.0 + 10 * 0.5 + 1.0 + 9 * 0.25 + 2.0 + 3 * 0.3

    def fake_measured(command, env):
        write_results(
            command, [{**r, "acc": {"a": {}, "b": {}}, "test_envs": [1], "mem_gb": 1.0} for r in records]
        )
        return looped + 7.0, {"rss_mb": 1.0}

    monkeypatch.setattr(bench_train, "run_measured", fake_measured)
    args = bench_train.argparse.Namespace(batch=8, device="cpu")
    monkeypatch.setattr(
        bench_train, "overrides", lambda args, out, name: [f"output_dir={out}", f"name={name}"]
    )
    summary = bench_train.run(args, [], str(tmp_path), "fast")
    assert summary["steps_per_s"] == pytest.approx(1 / 0.375, abs=0.001)
    assert summary["images_per_s"] == pytest.approx(8 / 0.375, abs=0.1)  # one training domain
    assert summary["eval_seconds"] == 1.5 and summary["checkpoint_seconds"] == 0.3
    assert summary["first_step_s"] == 5.0 and summary["first_eval_s"] == 4.0
    assert summary["outside_loop_s"] == pytest.approx(7.0, abs=0.06)


def test_on_cuda_the_fast_run_replays_graphs_and_compiles_cold_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commands: dict[str, tuple[list[str], dict[str, str]]] = {}

    def fake_measured(command, env):
        record = {
            "step": 0,
            "step_time": 1.0,
            "metrics": {"eval_time": 1.0},
            "acc": {"a": {}},
            "test_envs": [],
        }
        commands[write_results(command, [{**record, "mem_gb": 1.0}])] = (command, env)
        return 9.0, {"rss_mb": 1.0}

    monkeypatch.setattr(bench_train, "run_measured", fake_measured)
    monkeypatch.setattr(bench_train, "machine_info", lambda args: {})  # no GPU to name here
    argv = ["bench_train.py", "--root", str(tmp_path), "--dataset", "embedded", "--device", "cuda"]
    monkeypatch.setattr(sys, "argv", [*argv, "--fast-override", "trainer.compile=true"])
    bench_train.main()
    fast, env = commands["fast"]
    assert fast[-2:] == ["trainer.cuda_graph=true", "trainer.compile=true"]
    assert not any("compile" in a or "cuda_graph" in a for a in commands["reference"][0])
    inductor = Path(env["TORCHINDUCTOR_CACHE_DIR"])
    assert inductor.name == "inductor" and not inductor.parent.exists()  # the run's temp dir, gone
    assert env["PATH"] == bench_train.os.environ["PATH"]  # the rest of the environment is passed on


def test_start_up_is_the_wall_time_outside_the_records_steps_and_evaluations() -> None:
    records = [  # steps 0 | 1-5 | 6-9, as the trainer records them with checkpoint_freq=5, steps=10
        {"step": 0, "step_time": 4.0, "metrics": {"eval_time": 3.0}},
        {"step": 5, "step_time": 0.5, "metrics": {"eval_time": 1.0}},
        {"step": 9, "step_time": 0.25, "metrics": {"eval_time": 1.0}},
    ]
    looped = 4.0 + 3.0 + 5 * 0.5 + 1.0 + 4 * 0.25 + 1.0 + 3 * 0.3  # a 0.3 s checkpoint after each
    assert bench_train.start_up(records, wall=looped + 20.0, checkpoint_time=0.3) == {
        "first_step_s": 4.0,
        "first_eval_s": 3.0,
        "outside_loop_s": 20.0,
    }


def test_benchmarks_end_a_user_error_or_a_failed_run_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    from bench_data_pipeline import run_tool

    from dgbench.errors import DataError

    monkeypatch.setattr(sys, "argv", ["bench_train.py"])

    def missing_data() -> None:
        raise DataError("pacs: dataset folder /nowhere/PACS not found")

    def failed_run() -> None:
        raise subprocess.CalledProcessError(2, ["python", "-m", "dgbench.cli", "train", "dataset=pacs"])

    with pytest.raises(SystemExit) as stop:
        run_tool(missing_data)
    assert str(stop.value.code) == "bench_train.py: error: pacs: dataset folder /nowhere/PACS not found"
    with pytest.raises(SystemExit) as stop:
        run_tool(failed_run)
    assert str(stop.value.code) == (
        "bench_train.py: a measured run failed with exit status 2; its error is above. "
        "The run: python -m dgbench.cli train dataset=pacs"
    )
    run_tool(lambda: None)  # a run that works ends normally
