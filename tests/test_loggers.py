"""`logger=wandb`: offline W&B runs read back from their files, resume, failures, secrets.

Every W&B run here is offline, in a temp dir, with W&B's stats, console capture and
telemetry off: no network, no login. What a run logged is read back from its `.wandb`
file (W&B's record log: a LevelDB-style log of protobuf `Record`s, see `_wandb_records`).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dgbench import loggers
from dgbench.config import WandbLoggerConfig
from dgbench.errors import ConfigError
from dgbench.loggers import (
    REDACTED,
    WANDB_STATE_FILE,
    NullSink,
    WandbSink,
    build_sink,
    check_logger,
    redact_secrets,
    wandb_metrics,
)
from dgbench.records import read_records

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = (
    "trainer.steps=3",
    "trainer.checkpoint_freq=1",
    "algorithm.batch_size=4",
    "dataset.images_per_domain=24",
)
FAKE_API_KEY = "fake0api0key0" + "5" * 27  # 40 characters, like a real one


def _wandb_installed() -> bool:
    try:
        return importlib.util.find_spec("wandb") is not None
    except (ImportError, ValueError):
        return False


needs_wandb = pytest.mark.skipif(not _wandb_installed(), reason="wandb is not installed")

# Offline, quiet, nothing W&B does not need for the history: fast and network-free.
WANDB_TEST_ENV = {
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "WANDB_CONSOLE": "off",
    "WANDB_DISABLE_GIT": "true",
    "WANDB_DISABLE_CODE": "true",
    "WANDB_ERROR_REPORTING": "false",
    "WANDB_X_DISABLE_STATS": "true",
    "WANDB_X_DISABLE_META": "true",
    "WANDB_X_DISABLE_MACHINE_INFO": "true",
    "WANDB_X_SAVE_REQUIREMENTS": "false",
}


@pytest.fixture(autouse=True)
def offline_wandb(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in (
        "WANDB_DIR",
        "WANDB_PROJECT",
        "WANDB_ENTITY",
        "WANDB_API_KEY",
        "WANDB_RUN_ID",
        "WANDB_RESUME",
    ):
        monkeypatch.delenv(key, raising=False)
    for key, value in WANDB_TEST_ENV.items():
        monkeypatch.setenv(key, value)
    for key in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(key, str(tmp_path / "wandb-home" / key.lower()))


def _record(step: int, test_envs: tuple[int, ...] = (1,)) -> dict[str, Any]:
    return {
        "run_id": "0123456789abcdef",
        "dataset": "embedded",
        "algorithm": "erm",
        "backbone": "small_cnn",
        "test_envs": list(test_envs),
        "hparams_seed": 0,
        "trial_seed": 2,
        "hparams": {"lr": 1e-3},
        "step": step,
        "epoch": step / 10,
        "loss": 1.0 / (step + 1),
        "metrics": {"penalty": 0.5},
        "acc": {"photo": {"in": 0.5, "out": 0.25}, "sketch": {"in": 0.75, "out": 1.0}},
        "step_time": 0.01,
        "mem_gb": 1.5,
    }


CONFIG = {"name": "sweep", "dataset": {"name": "embedded"}, "algorithm": {"name": "erm"}, "trial_seed": 2}


def _wandb_cfg(**overrides: Any) -> WandbLoggerConfig:
    return WandbLoggerConfig(**{"mode": "offline", **overrides})


def _wandb_records(path: Path) -> list[Any]:
    """The protobuf records of a `.wandb` file.

    Layout: a 7-byte header (`:W&B`, magic 0xBEE1, version 0), then 32 KiB blocks of chunks
    (crc32 u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last; a block tail shorter
    than a chunk header is padding).
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:7] == b":W&B\xe1\xbe\x00", f"unknown .wandb header {data[:7]!r}"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _offline_run(folder: Path) -> dict[str, Any]:
    """What the single offline run under `folder` (a W&B dir) logged: run, config, history rows."""
    (run_dir,) = sorted(folder.glob("wandb/offline-run-*"))
    (log_file,) = run_dir.glob("run-*.wandb")
    out: dict[str, Any] = {"config": {}, "history": {}, "exit_code": None}
    for record in _wandb_records(log_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["run"] = record.run
            out["config"].update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            out["history"][record.history.step.num] = {k: v for k, v in row.items() if not k.startswith("_")}
        elif kind == "exit":
            out["exit_code"] = record.exit.exit_code
    return out


def _capture_sinks(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    import dgbench.train as train_module

    sinks: list[Any] = []

    def capturing_build_sink(*args: Any, **kwargs: Any) -> Any:
        sinks.append(build_sink(*args, **kwargs))
        return sinks[-1]

    monkeypatch.setattr(train_module, "build_sink", capturing_build_sink)
    return sinks


# ---------------------------------------------------------------- without wandb


def test_dgbench_never_imports_wandb_at_import_time() -> None:
    for path in sorted((REPO_ROOT / "dgbench").rglob("*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:  # module level only
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] == "wandb" for n in names), f"{path} imports wandb at import time"
    code = "import sys, dgbench, dgbench.loggers, dgbench.cli; print('wandb' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_missing_wandb_is_a_one_line_config_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(ConfigError) as error:
        build_sink(_wandb_cfg(mode="online"), tmp_path, "0123456789abcdef", CONFIG)
    assert str(error.value) == 'logger=wandb needs the wandb package: pip install "dgbench[wandb]"'
    with pytest.raises(ConfigError, match="needs the wandb package"):  # before a run builds anything
        check_logger(_wandb_cfg(mode="offline"))
    assert check_logger(_wandb_cfg(mode="disabled")) is False
    # Nothing needs wandb when nothing goes to W&B.
    assert isinstance(build_sink(_wandb_cfg(mode="disabled"), tmp_path, "r", CONFIG), NullSink)
    assert not (tmp_path / WANDB_STATE_FILE).exists()


def test_logger_settings_are_validated(tmp_path):
    with pytest.raises(ConfigError, match=r"logger\.kind='tensorboard' is unknown"):
        build_sink(_wandb_cfg(kind="tensorboard"), tmp_path, "r", CONFIG)
    with pytest.raises(
        ConfigError, match=r"logger\.mode='offlin' is unknown; use online, offline or disabled"
    ):
        build_sink(_wandb_cfg(mode="offlin"), tmp_path, "r", CONFIG)
    sink = build_sink(WandbLoggerConfig(kind="jsonl"), tmp_path, "r", CONFIG)
    assert isinstance(sink, NullSink)
    sink.log(_record(0))
    sink.finish(exit_code=1)


def test_wandb_preset_takes_mode_and_project_from_wandb_env(make_cfg, monkeypatch):
    monkeypatch.delenv("WANDB_MODE")
    assert (make_cfg("logger=wandb").logger.mode, make_cfg("logger=wandb").logger.project) == (
        "online",
        "dgbench",
    )
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    cfg = make_cfg("logger=wandb")
    assert (cfg.logger.mode, cfg.logger.project, cfg.logger.entity) == ("offline", "from-env", None)
    cfg = make_cfg("logger=wandb", "logger.mode=disabled", "logger.project=explicit")
    assert (cfg.logger.mode, cfg.logger.project) == ("disabled", "explicit")  # overrides win


def test_wandb_metrics_flatten_every_number_of_a_record():
    assert wandb_metrics(_record(4)) == {
        "loss": 0.2,
        "epoch": 0.4,
        "step_time": 0.01,
        "mem_gb": 1.5,
        "metrics/penalty": 0.5,
        "acc/photo/in": 0.5,
        "acc/photo/out": 0.25,
        "acc/sketch/in": 0.75,
        "acc/sketch/out": 1.0,
    }


def test_redact_secrets_hides_credentials_and_keeps_hparams(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_API_KEY)
    monkeypatch.setenv("HF_TOKEN", "hf_0123456789")
    config = {
        "algorithm": {"name": "erm", "lr": 1e-3, "num_tokens": 4, "use_cls_token": True, "token": "cls"},
        "hub": {
            "api_key": "literal-key-in-config",
            "auth_token": "abc",
            "url": f"https://x?k={FAKE_API_KEY}",
        },
        "tags": ["a", "hf_0123456789"],
        "output_dir": "/tmp/out",
    }
    assert redact_secrets(config) == {
        "algorithm": {"name": "erm", "lr": 1e-3, "num_tokens": 4, "use_cls_token": True, "token": "cls"},
        "hub": {"api_key": REDACTED, "auth_token": REDACTED, "url": REDACTED},
        "tags": ["a", REDACTED],
        "output_dir": "/tmp/out",
    }


# ---------------------------------------------------------------- offline W&B runs


@needs_wandb
def test_training_mirrors_config_and_every_record_offline_without_secrets(make_cfg, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_API_KEY)
    overrides = [*TINY, "dataset.test_envs=[sketch]", "logger=wandb", "logger.tags=[mine]", "name=exp1"]
    from dgbench.train import train

    result = train(make_cfg(*overrides), overrides)

    records = read_records(result.run_dir / "results.jsonl")
    state = json.loads((result.run_dir / WANDB_STATE_FILE).read_text())
    assert state["id"].startswith(result.run_dir.name + "-") and state["last_step"] == 2
    logged = _offline_run(result.run_dir)  # W&B's files are in the run dir
    run = logged["run"]
    assert run.run_id == state["id"] and run.project == "dgbench"
    assert (run.run_group, run.job_type) == ("exp1", "erm")
    assert list(run.tags) == ["embedded", "sketch", "mine"]
    assert run.display_name == "erm embedded test=sketch hp0 trial0"
    config = logged["config"]
    assert config["run_id"] == result.run_dir.name and config["name"] == "exp1"
    assert config["dataset"]["test_envs"] == [3] and config["algorithm"]["batch_size"] == 4
    assert logged["history"] == {r["step"]: pytest.approx(wandb_metrics(r)) for r in records}
    assert [r["step"] for r in records] == [0, 1, 2] and logged["exit_code"] == 0

    files = [p for p in result.run_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files)
    leaked = [p for p in files if FAKE_API_KEY.encode() in p.read_bytes()]
    assert not leaked, f"the API key was written to {leaked}"


@needs_wandb
def test_resumed_run_continues_its_wandb_run_and_logs_each_step_once(make_cfg, monkeypatch, tmp_path):
    import dgbench.train as train_module

    sinks = _capture_sinks(monkeypatch)
    real_save = train_module.save_checkpoint
    saves = {"n": 0}

    def crash_before_second_checkpoint(*args, **kwargs):
        saves["n"] += 1
        if saves["n"] == 2:  # the step-1 record is written and mirrored, its checkpoint is not
            raise KeyboardInterrupt
        real_save(*args, **kwargs)

    overrides = [*TINY, "logger=wandb"]
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    monkeypatch.setenv("WANDB_DIR", str(first_dir))  # W&B's files go there, not into the run dir
    monkeypatch.setattr(train_module, "save_checkpoint", crash_before_second_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        train_module.train(make_cfg(*overrides), overrides)
    sinks[0].finish(exit_code=255)  # as W&B's exit hook would when the process dies (no-op if finished)

    monkeypatch.setenv("WANDB_DIR", str(second_dir))
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    result = train_module.train(make_cfg(*overrides), overrides)  # resumes after step 0, redoes step 1

    records = read_records(result.run_dir / "results.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2]
    before, after = _offline_run(first_dir), _offline_run(second_dir)
    assert before["run"].run_id == after["run"].run_id == sinks[1].run_id == sinks[0].run_id
    assert sorted(before["history"]) == [0, 1] and before["exit_code"] not in (None, 0)
    assert sorted(after["history"]) == [2] and after["exit_code"] == 0  # step 1 was not sent twice
    assert after["history"][2] == pytest.approx(wandb_metrics(records[-1]))
    assert not (result.run_dir / "wandb").exists()


@needs_wandb
def test_wandb_failures_warn_once_and_training_goes_on(make_cfg, monkeypatch, caplog):
    import wandb

    def network_down(self, *args, **kwargs):
        raise ConnectionError("api.wandb.ai is unreachable")

    monkeypatch.setattr(wandb.Run, "log", network_down)
    overrides = [*TINY, "logger=wandb"]
    from dgbench.train import train

    with caplog.at_level(logging.INFO, logger="dgbench.loggers"):
        result = train(make_cfg(*overrides), overrides)

    assert [r["step"] for r in read_records(result.run_dir / "results.jsonl")] == [0, 1, 2]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "api.wandb.ai is unreachable" in warnings[0]
    assert "results.jsonl" in warnings[0] and "\n" not in warnings[0]
    assert any("3 record(s) were not mirrored" in r.getMessage() for r in caplog.records)
    assert json.loads((result.run_dir / WANDB_STATE_FILE).read_text())["last_step"] == -1


# ---------------------------------------------------------------- what reaches wandb.init (faked)


class FakeRun:
    def __init__(self, resumed: bool = False, starting_step: int = 0) -> None:
        self.resumed, self.starting_step = resumed, starting_step
        self.logged: list[tuple[int, dict[str, Any]]] = []
        self.exit_code: int | None = None

    def log(self, data: dict[str, Any], step: int, commit: bool) -> None:
        assert commit  # a row is complete when logged: a crash must not lose it
        self.logged.append((step, data))

    def finish(self, exit_code: int = 0) -> None:
        self.exit_code = exit_code


@pytest.fixture
def fake_init(monkeypatch):
    wandb = pytest.importorskip("wandb")
    calls: list[dict[str, Any]] = []
    runs: list[FakeRun] = []

    def init(**kwargs: Any) -> FakeRun:
        calls.append(kwargs)
        return runs.pop(0) if runs else FakeRun()

    monkeypatch.setattr(wandb, "init", init)
    return calls, runs


def test_wandb_init_gets_identity_names_and_a_stable_resumable_id(fake_init, tmp_path):
    calls, _ = fake_init
    cfg = _wandb_cfg(project="dg", entity="lab", tags=["mine", "sketch"])
    config = {**CONFIG, "hparams_seed": 3, "hub": {"api_key": "x" * 40}}
    sink = build_sink(cfg, tmp_path / "a", "0123456789abcdef", config, test_domains=["sketch"])
    kwargs = calls[-1]
    assert kwargs["id"] == sink.run_id and sink.run_id.startswith("0123456789abcdef-")
    assert {k: kwargs[k] for k in ("project", "entity", "mode", "resume", "group", "job_type", "reinit")} == {
        "project": "dg",
        "entity": "lab",
        "mode": "offline",
        "resume": "allow",
        "group": "sweep",
        "job_type": "erm",
        "reinit": "create_new",  # never finishes nor reuses a W&B run the caller has open
    }
    assert (
        kwargs["tags"] == ["embedded", "sketch", "mine"]
        and kwargs["name"] == "erm embedded test=sketch hp3 trial2"
    )
    assert kwargs["dir"] == str(tmp_path / "a")
    assert kwargs["config"] == {**config, "hub": {"api_key": REDACTED}, "run_id": "0123456789abcdef"}

    again = build_sink(cfg, tmp_path / "a", "0123456789abcdef", config, test_domains=["sketch"])
    elsewhere = build_sink(cfg, tmp_path / "b", "0123456789abcdef", config, test_domains=["sketch"])
    assert again.run_id == sink.run_id  # the same run dir resumes its W&B run
    assert elsewhere.run_id != sink.run_id  # another experiment's copy of the run gets its own


def test_lazy_start_names_test_domains_from_the_first_record(fake_init, tmp_path):
    calls, _ = fake_init
    sink = build_sink(_wandb_cfg(), tmp_path, "r", CONFIG)  # no test_domains: starts at the first record
    assert calls == []
    sink.log(_record(0, test_envs=(0, 1)))
    assert calls[0]["tags"] == ["embedded", "photo", "sketch"] and "test=photo+sketch" in calls[0]["name"]


def test_resumed_online_run_skips_the_steps_wandb_already_has(fake_init, tmp_path):
    _, runs = fake_init
    run = FakeRun(resumed=True, starting_step=5)  # the server has steps up to 4
    runs.append(run)
    sink = build_sink(_wandb_cfg(mode="online"), tmp_path, "r", CONFIG, test_domains=["sketch"])
    for step in (3, 4, 5, 6, 6):
        sink.log(_record(step))
    sink.finish()
    sink.finish()
    assert [step for step, _ in run.logged] == [5, 6] and run.exit_code == 0
    assert json.loads((tmp_path / WANDB_STATE_FILE).read_text())["last_step"] == 6


def test_wandb_setup_errors_fail_fast_and_network_errors_only_warn(fake_init, monkeypatch, tmp_path, caplog):
    import wandb

    def raising(error: Exception):
        def init(**kwargs: Any) -> None:
            raise error

        return init

    monkeypatch.setattr(wandb, "init", raising(wandb.errors.UsageError("No API key configured.")))
    with pytest.raises(
        ConfigError, match=r"^logger=wandb: No API key configured\. \(log in with `wandb login`"
    ):
        build_sink(_wandb_cfg(mode="online"), tmp_path / "a", "r", CONFIG, test_domains=[])
    lazy = build_sink(_wandb_cfg(mode="online"), tmp_path / "b", "r", CONFIG)
    with caplog.at_level(logging.WARNING, logger="dgbench.loggers"):
        lazy.log(_record(0))  # training has started: never raise
    assert len(caplog.records) == 1

    caplog.clear()
    monkeypatch.setattr(wandb, "init", raising(wandb.errors.CommError("Network error (ConnectionError)")))
    with caplog.at_level(logging.WARNING, logger="dgbench.loggers"):
        sink = build_sink(_wandb_cfg(mode="online"), tmp_path / "c", "r", CONFIG, test_domains=[])
        for step in range(3):
            sink.log(_record(step))
        sink.finish()
    assert [r.getMessage() for r in caplog.records] == [
        "wandb: starting the W&B run failed (Network error (ConnectionError)); training goes on, "
        "records are kept in results.jsonl and no longer mirrored to W&B"
    ]


def test_old_wandb_is_a_config_error(fake_init, monkeypatch, tmp_path):
    import wandb

    monkeypatch.setattr(wandb, "__version__", "0.16.6")
    with pytest.raises(ConfigError, match=r"needs wandb>=0\.19\.10, found 0\.16\.6"):
        WandbSink(_wandb_cfg(), tmp_path, "r", CONFIG)
    assert loggers.WANDB_MIN_VERSION == (0, 19, 10)
