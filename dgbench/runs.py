"""The life cycle of a run directory, as files: what `train` writes, `status` and `results` read.

`<output_dir>/<name>/<run_id>/` holds `config.yaml`, `results.jsonl`, `train.log`, and
- `heartbeat`: touched every `HEARTBEAT_INTERVAL_S` by a thread of the training process, so a
  run whose heartbeat is older than `STALE_AFTER_S` has no process behind it (killed, node lost)
  even if it never got to say so; a long evaluation keeps it fresh.
- `checkpoint.pt` while unfinished; `done` when finished (the checkpoint is then deleted);
- `status.json` (`{"status": "failed", "error": ...}`) when it raised.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from dgbench.errors import DGBenchError
from dgbench.records import RESULTS_FILE

CONFIG_FILE = "config.yaml"
DONE_FILE = "done"
STATUS_FILE = "status.json"
HEARTBEAT_FILE = "heartbeat"
HEARTBEAT_INTERVAL_S = 30.0
STALE_AFTER_S = 300.0  # 10 missed heartbeats: the process is gone
# Any of these makes a directory a run directory (DomainBed's sweep output included); discovery
# does not descend into run directories nor into hidden ones such as Hydra's `.multirun`.
RUN_MARKERS = frozenset({CONFIG_FILE, RESULTS_FILE, STATUS_FILE, DONE_FILE, HEARTBEAT_FILE})


class Heartbeat:
    """Touch `<run_dir>/heartbeat` now and every `interval` seconds until the block exits."""

    def __init__(self, run_dir: Path, interval: float = HEARTBEAT_INTERVAL_S) -> None:
        self.path = Path(run_dir) / HEARTBEAT_FILE
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="dgbench-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self.touch()
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()

    def touch(self) -> None:
        self.path.touch()
        os.utime(self.path)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.touch()
            except OSError:  # a full or vanished disk must not kill training; status shows it stale
                pass


@dataclass
class RunState:
    """What a run directory says about its run."""

    run_dir: Path
    status: str  # done | failed | running | dead (unfinished, no fresh heartbeat)
    last_step: int | None = None
    error: str | None = None
    heartbeat_age_s: float | None = None


def run_state(run_dir: Path, now: float | None = None, stale_after: float = STALE_AFTER_S) -> RunState:
    """Classify one run directory by its files (cheap: a few stats, one small read at most)."""
    run_dir = Path(run_dir)
    if (run_dir / DONE_FILE).exists():
        return RunState(run_dir, "done", _last_step(run_dir))
    status_file = run_dir / STATUS_FILE
    if status_file.exists():
        try:
            error = str(json.loads(status_file.read_text(encoding="utf-8")).get("error", "?"))
        except (OSError, ValueError):
            error = f"unreadable {STATUS_FILE}"
        return RunState(run_dir, "failed", _last_step(run_dir), error)
    age = _age(run_dir / HEARTBEAT_FILE, now)
    fresh = age is not None and age < stale_after
    return RunState(run_dir, "running" if fresh else "dead", _last_step(run_dir), None, age)


def _age(path: Path, now: float | None) -> float | None:
    try:
        return (time.time() if now is None else now) - path.stat().st_mtime
    except OSError:
        return None


def _last_step(run_dir: Path) -> int | None:
    """The step of the last complete record."""
    record = last_record(run_dir)
    try:
        return int(record["step"]) if record is not None else None
    except (KeyError, TypeError, ValueError):
        return None


def last_record(run_dir: Path) -> dict[str, Any] | None:
    """The last complete record of `results.jsonl`, reading only the file's tail (a torn line is skipped)."""
    try:
        with open(Path(run_dir) / RESULTS_FILE, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 65536))
            lines = handle.read().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            return record
    return None


def find_run_dirs(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Run directories (holding one of `RUN_MARKERS`) under `paths`, sorted."""
    return sorted(Path(folder) for folder, _ in discover_runs(paths))


def discover_runs(paths: Iterable[str | os.PathLike[str]]) -> list[tuple[str, frozenset[str]]]:
    """Run directories below `paths` (sorted, depth first) with the names of the files in them."""
    found: list[tuple[str, frozenset[str]]] = []
    seen: set[str] = set()
    for root in paths:
        top = os.fspath(root)
        if not os.path.isdir(top):
            what = "is not a directory" if os.path.exists(top) else "does not exist"
            raise DGBenchError(f"results directory {top} {what}")
        stack = [top]
        while stack:
            folder = stack.pop()
            try:
                with os.scandir(folder) as it:
                    entries = list(it)
            except OSError as error:
                raise DGBenchError(f"cannot list {folder}: {error.strerror or error}") from error
            names = frozenset(entry.name for entry in entries if _is_file(entry))
            if names & RUN_MARKERS:
                real = os.path.realpath(folder)
                if real not in seen:
                    seen.add(real)
                    found.append((folder, names))
                continue
            subdirs = sorted(
                entry.path for entry in entries if not entry.name.startswith(".") and _is_dir(entry)
            )
            stack.extend(reversed(subdirs))
    return found


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _is_file(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_file()
    except OSError:
        return False
