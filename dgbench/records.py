"""Run records: one JSON object per evaluation, in `<run_dir>/results.jsonl`.

The schema is a stable interface (DESIGN.md "Stable interfaces"): scripts outside
dgbench read these keys. Accuracies are fractions in [0, 1]. Every write rewrites
the whole (small) file atomically, so a crash never leaves a torn line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dgbench.atomic import atomic_write_text

RESULTS_FILE = "results.jsonl"
# Records of averaged models (dgbench.averaging), same schema, "algorithm": "<algorithm> + swad|ema|sma";
# their "loss" is the averaged model's training-domain validation loss (there is no training loss).
AVERAGED_FILE = "averaged.jsonl"
RECORD_KEYS = (
    "run_id",
    "dataset",
    "algorithm",
    "backbone",
    "test_envs",
    "hparams_seed",
    "trial_seed",
    "hparams",
    "step",
    "epoch",
    "loss",
    "metrics",
    "acc",
    "step_time",
    "mem_gb",
)


TIMING_KEYS = ("step_time", "mem_gb")  # wall-clock measurements: differ between identical runs
TIMING_METRICS = ("eval_time", "checkpoint_time")


def without_timing(record: dict[str, Any]) -> dict[str, Any]:
    """`record` minus its wall-clock measurements: what two runs computing the same thing share."""
    kept = {k: v for k, v in record.items() if k not in TIMING_KEYS}
    if isinstance(kept.get("metrics"), dict):
        kept["metrics"] = {k: v for k, v in kept["metrics"].items() if k not in TIMING_METRICS}
    return kept


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """All records of a results file ([] when it does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def write_records(path: str | Path, records: list[dict[str, Any]]) -> None:
    # Key order is kept (not sorted): `acc` then lists domains in the dataset's order.
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def append_record(path: str | Path, record: dict[str, Any]) -> None:
    """Append one record; the file is replaced atomically, old records included."""
    missing = [k for k in RECORD_KEYS if k not in record]
    assert not missing, f"record lacks {missing}"
    write_records(path, [*read_records(path), record])


def truncate_records(path: str | Path, last_step: int) -> None:
    """Drop records after `last_step`: a resumed run recomputes them from its checkpoint."""
    records = read_records(path)
    kept = [r for r in records if r["step"] <= last_step]
    if len(kept) != len(records):
        write_records(path, kept)
