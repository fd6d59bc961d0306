"""Extra sinks for run records (`logger=jsonl|wandb`).

`results.jsonl` is always written by the trainer: resume and result tables depend on
it. A logger only mirrors records elsewhere, so `logger=jsonl` adds nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from dgbench.errors import ConfigError


class RecordSink(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...

    def finish(self) -> None: ...


class NullSink:
    def log(self, record: dict[str, Any]) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbSink:
    """Mirrors each record to a Weights & Biases run whose id is the dgbench run id (resumable)."""

    def __init__(self, cfg: Any, run_dir: Path, run_id: str, config: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError:
            raise ConfigError("logger=wandb needs the wandb package: pip install 'dgbench[wandb]'") from None
        self._wandb = wandb
        self._run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            mode=cfg.mode,
            tags=list(cfg.tags),
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            config=config,
        )

    def log(self, record: dict[str, Any]) -> None:
        flat = {"loss": record["loss"], "epoch": record["epoch"], "step_time": record["step_time"]}
        flat.update({f"metrics/{k}": v for k, v in record["metrics"].items()})
        for domain, splits in record["acc"].items():
            flat.update({f"acc/{domain}/{split}": acc for split, acc in splits.items()})
        self._run.log(flat, step=record["step"])

    def finish(self) -> None:
        self._run.finish()


def build_sink(cfg: Any, run_dir: Path, run_id: str, config: dict[str, Any]) -> RecordSink:
    if cfg.kind == "jsonl":
        return NullSink()
    if cfg.kind == "wandb":
        return WandbSink(cfg, run_dir, run_id, config)
    raise ConfigError(f"logger.kind={cfg.kind!r} is unknown; use logger=jsonl or logger=wandb")
