"""Extra sinks for run records (`logger=jsonl|wandb`).

`results.jsonl` is always written by the trainer: resume and result tables depend on
it. A logger only mirrors records elsewhere, so `logger=jsonl` adds nothing, and a
mirror that fails never stops a run.

`logger=wandb` mirrors a run to one Weights & Biases run:

- config: the run's resolved config plus `run_id` (secret-looking values redacted);
- history: one row per record at W&B step = the record's `step`, with `loss`, `epoch`,
  `step_time`, `mem_gb`, `metrics/<name>` and `acc/<domain>/<in|out>`;
- group = the experiment name (`name=`), job_type = the algorithm, tags = the dataset,
  the test domains and `logger.tags`, a readable run name;
- run id: `<run_id>-<8 hex>`, drawn once and kept in `<run_dir>/wandb_run.json`, so a
  resumed dgbench run continues its W&B run (`resume="allow"`), while the same run in
  another experiment or output folder gets its own W&B run instead of overwriting one;
- resume: W&B refuses steps below its current one, so steps up to the last one mirrored
  (kept in `wandb_run.json`, or the server's when W&B resumed the run) are not sent again;
- files: W&B's local folder is `<run_dir>/wandb` unless `WANDB_DIR` is set. Offline runs
  (`logger.mode=offline` or `WANDB_MODE=offline`) upload later with
  `wandb sync <run_dir>/wandb/offline-run-*`;
- failures: a W&B setup error (no API key, bad setting) while the W&B run starts before
  training (`build_sink(..., test_domains=...)`) is a `ConfigError`; any other W&B failure
  (network) is one warning, and the run goes on with `results.jsonl` as the source of truth.

wandb is imported only when `logger=wandb` is selected (`pip install "dgbench[wandb]"`);
`check_logger` validates the logger node, wandb included, before a run builds anything.
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from omegaconf import OmegaConf

from dgbench.atomic import atomic_write_json
from dgbench.errors import ConfigError, one_line

log = logging.getLogger(__name__)

WANDB_STATE_FILE = "wandb_run.json"  # in the run dir: {"id": W&B run id, "last_step": last step mirrored}
WANDB_MIN_VERSION = (0, 19, 10)  # reinit="create_new": never finishes or reuses another active run
WANDB_MISSING = 'logger=wandb needs the wandb package: pip install "dgbench[wandb]"'
# logger.mode values -> W&B's mode; `run` and `dryrun` are W&B's legacy spellings (WANDB_MODE).
WANDB_MODES = {
    "online": "online",
    "offline": "offline",
    "disabled": "disabled",
    "run": "online",
    "dryrun": "offline",
}
REDACTED = "<redacted>"
# Config keys whose string values are credentials (`api_key`, `wandb.password`, `hub_auth_token`...).
_SECRET_KEY = re.compile(
    r"(^|[^a-z0-9])(api[_-]?key|access[_-]?key|secret([_-]?(access[_-]?)?key)?|password|passwd"
    r"|credentials?|(auth|access|api|bearer|refresh)[_-]?token)$",
    re.IGNORECASE,
)
# Environment variables holding credentials (WANDB_API_KEY, HF_TOKEN, AWS_SECRET_ACCESS_KEY...).
_SECRET_ENV = re.compile(r"(API_?KEY|ACCESS_?KEY|SECRET|SECRET_?KEY|TOKEN|PASSWORD|PASSWD)$", re.IGNORECASE)
_MIN_SECRET_LENGTH = 8  # shorter values ("1", "true") are no credentials and would match too much


class RecordSink(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...

    def finish(self, exit_code: int = 0) -> None: ...


class NullSink:
    def log(self, record: dict[str, Any]) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


def build_sink(
    cfg: Any,
    run_dir: Path,
    run_id: str,
    config: Mapping[str, Any],
    test_domains: Sequence[str] | None = None,
) -> RecordSink:
    """The sink `cfg` (the `logger` node) selects.

    `config` is the run's resolved config; `test_domains` the test domains' names. Without
    them the W&B run starts at the first record, which names the domains.
    """
    if not check_logger(cfg):
        return NullSink()
    return WandbSink(cfg, run_dir, run_id, config, test_domains)


def check_logger(cfg: Any) -> bool:
    """Validate the `logger` node (and that wandb imports when needed) before anything runs.

    True when records go to an extra sink. Raises a one-line ConfigError otherwise.
    """
    if cfg.kind == "jsonl":
        return False
    if cfg.kind != "wandb":
        raise ConfigError(f"logger.kind={cfg.kind!r} is unknown; use logger=jsonl or logger=wandb")
    if wandb_mode(cfg.mode) == "disabled":
        return False
    import_wandb()
    return True


def wandb_mode(mode: str | None) -> str:
    """W&B's mode for `logger.mode` (validated)."""
    try:
        return WANDB_MODES[str(mode).strip().lower()]
    except KeyError:
        raise ConfigError(f"logger.mode={mode!r} is unknown; use online, offline or disabled") from None


def wandb_metrics(record: Mapping[str, Any]) -> dict[str, Any]:
    """A record's numbers as flat W&B history keys (`acc/<domain>/<split>`, `metrics/<name>`)."""
    flat = {key: record[key] for key in ("loss", "epoch", "step_time", "mem_gb") if key in record}
    flat.update({f"metrics/{name}": value for name, value in record.get("metrics", {}).items()})
    for domain, splits in record.get("acc", {}).items():
        flat.update({f"acc/{domain}/{split}": acc for split, acc in splits.items()})
    return flat


def redact_secrets(value: Any) -> Any:
    """A plain copy of `value` (dicts, lists, scalars) with credentials replaced by `<redacted>`.

    Hidden: strings under a key named like a credential (`api_key`, `password`, `auth_token`...)
    and strings containing the value of an environment variable named like one (`WANDB_API_KEY`,
    `HF_TOKEN`...), e.g. interpolated with `${oc.env:...}`. The environment is only compared with,
    never copied.
    """
    secrets = [
        v for k, v in os.environ.items() if _SECRET_ENV.search(k) and len(v.strip()) >= _MIN_SECRET_LENGTH
    ]

    def scrub(node: Any, key: str = "") -> Any:
        if isinstance(node, Mapping):
            return {k: scrub(v, str(k)) for k, v in node.items()}
        if isinstance(node, Sequence) and not isinstance(node, (str, bytes)):
            return [scrub(v) for v in node]
        if isinstance(node, str) and (_SECRET_KEY.search(key) or any(s.strip() in node for s in secrets)):
            return REDACTED
        return node

    return scrub(value)


def import_wandb() -> Any:
    """The `wandb` module, or a one-line ConfigError saying how to install it."""
    try:
        import wandb
    except ImportError as error:
        if error.name == "wandb":
            raise ConfigError(WANDB_MISSING) from None
        raise ConfigError(f"logger=wandb: importing wandb failed: {one_line(error)}") from None
    except Exception as error:  # a broken install can raise anything at import
        raise ConfigError(f"logger=wandb: importing wandb failed: {one_line(error)}") from None
    version = getattr(wandb, "__version__", "0")
    if _version_tuple(version) < WANDB_MIN_VERSION:
        wanted = ".".join(map(str, WANDB_MIN_VERSION))
        raise ConfigError(
            f'logger=wandb needs wandb>={wanted}, found {version}: pip install -U "wandb>={wanted}"'
        )
    return wandb


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for part in version.split(".")[:3]:
        digits = re.match(r"\d*", part).group()  # type: ignore[union-attr]  # always matches
        parts.append(int(digits or 0))
    return tuple(parts)


class WandbSink:
    """Mirrors each record to a W&B run that a resumed dgbench run continues (see module doc)."""

    def __init__(
        self,
        cfg: Any,
        run_dir: Path,
        run_id: str,
        config: Mapping[str, Any],
        test_domains: Sequence[str] | None = None,
    ) -> None:
        self._wandb = import_wandb()
        self._mode = wandb_mode(cfg.mode)
        self._project = cfg.project
        if not isinstance(self._project, str) or not self._project.strip():
            raise ConfigError(f"logger.project must be a non-empty string, got {self._project!r}")
        self._entity = cfg.entity or None
        self._user_tags = [str(tag) for tag in (cfg.tags or [])]
        self._run_dir = Path(run_dir)
        if OmegaConf.is_config(config):
            config = OmegaConf.to_container(config, resolve=True, enum_to_str=True)  # type: ignore[assignment]
        self._config = {**redact_secrets(config), "run_id": run_id}
        state = self._read_state()
        self._id = state.get("id") or f"{run_id}-{uuid.uuid4().hex[:8]}"
        self._last_step: int = state.get("last_step", -1)
        self._save_state()  # before W&B starts: a crash right after must resume this id
        self._run: Any = None
        self._broken = False  # W&B failed: records are no longer mirrored
        self._missed = 0  # records not mirrored because W&B failed
        self._finished = False
        if test_domains is not None:
            self._start(list(test_domains), strict=True)

    @property
    def run_id(self) -> str:
        """The W&B run id (stable across resumes of this run dir)."""
        return self._id

    def log(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        if self._finished:
            return
        if self._run is None and not self._broken:
            self._start(_test_domains(record), strict=False)
        if step <= self._last_step:
            log.debug("wandb: step %d was already mirrored; not logging it again", step)
            return
        if self._broken:
            self._missed += 1
            return
        try:
            self._run.log(wandb_metrics(record), step=step, commit=True)
        except Exception as error:
            self._fail("logging", error)
            self._missed += 1
            return
        self._last_step = step
        self._save_state()

    def finish(self, exit_code: int = 0) -> None:
        """End the W&B run (exit_code != 0 marks it failed); later calls do nothing."""
        if self._finished:
            return
        self._finished = True
        if self._run is not None:
            try:
                self._run.finish(exit_code=exit_code)
            except Exception as error:
                self._fail("finishing", error)
        if self._missed:
            log.info("wandb: %d record(s) were not mirrored; results.jsonl has them all", self._missed)

    def _start(self, test_domains: list[str], strict: bool) -> None:
        wandb = self._wandb
        try:
            self._run = wandb.init(
                project=self._project,
                entity=self._entity,
                mode=self._mode,
                id=self._id,
                resume="allow",
                name=_run_name(self._config, test_domains),
                group=str(self._config.get("name", "default")),
                job_type=str(_node(self._config, "algorithm").get("name", "unknown")),
                tags=_unique([_node(self._config, "dataset").get("name"), *test_domains, *self._user_tags]),
                config=self._config,
                dir=os.environ.get("WANDB_DIR") or str(self._run_dir),  # read here: W&B reads it once
                reinit="create_new",
            )
        except (wandb.errors.UsageError, wandb.errors.AuthenticationError) as error:
            if strict:  # the run has not started training: a setup problem is the user's to fix
                raise ConfigError(
                    f"logger=wandb: {one_line(error)} (log in with `wandb login`, or use logger.mode=offline)"
                ) from None
            self._fail("starting", error)
            return
        except Exception as error:
            self._fail("starting", error)
            return
        try:
            if self._run.resumed:  # the server knows best what W&B will refuse
                self._last_step = int(self._run.starting_step) - 1
                self._save_state()
        except Exception as error:
            log.debug("wandb: could not read the resumed run's step: %s", one_line(error))

    def _fail(self, action: str, error: Exception) -> None:
        if not self._broken:
            log.warning(
                "wandb: %s the W&B run failed (%s); training goes on, records are kept in results.jsonl "
                "and no longer mirrored to W&B",
                action,
                one_line(error),
            )
        else:
            log.debug("wandb: %s failed again: %s", action, one_line(error))
        self._broken = True

    def _read_state(self) -> dict[str, Any]:
        path = self._run_dir / WANDB_STATE_FILE
        if not path.exists():
            return {}
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
            assert isinstance(state, dict) and isinstance(state.get("id"), str)
            assert isinstance(state.get("last_step", -1), int)
            return state
        except (OSError, ValueError, AssertionError):
            log.warning("wandb: ignoring unreadable %s; this run gets a new W&B run", path)
            return {}

    def _save_state(self) -> None:
        atomic_write_json(self._run_dir / WANDB_STATE_FILE, {"id": self._id, "last_step": self._last_step})


def _node(config: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = config.get(key)
    return value if isinstance(value, Mapping) else {}


def _test_domains(record: Mapping[str, Any]) -> list[str]:
    """Test domain names of a record: `acc` lists every domain in the dataset's order."""
    domains = list(record.get("acc", {}))
    return [domains[i] if 0 <= i < len(domains) else str(i) for i in record.get("test_envs", [])]


def _run_name(config: Mapping[str, Any], test_domains: Sequence[str]) -> str:
    """E.g. `erm pacs test=sketch hp0 trial1`."""
    algorithm = _node(config, "algorithm").get("name", "?")
    dataset = _node(config, "dataset").get("name", "?")
    tests = "+".join(test_domains) or "none"
    seeds = f"hp{config.get('hparams_seed', 0)} trial{config.get('trial_seed', 0)}"
    return f"{algorithm} {dataset} test={tests} {seeds}"


def _unique(tags: Sequence[Any]) -> list[str]:
    return list(dict.fromkeys(str(tag) for tag in tags if tag is not None and str(tag)))
