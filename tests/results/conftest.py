"""Builders for synthetic run directories, and the golden sweep the result tests share.

The golden sweep (values chosen so that the three selection rules pick different
checkpoints; the expected tables are worked out by hand in test_results.py):

Dataset `embedded` (domains in registered order photo, painting, cartoon, sketch; the
records list them in another order on purpose), algorithms erm and coral, trial seeds 0
and 1, hparams seeds 0 and 1, checkpoints at steps 100 and 200.

Single-test-domain run (algorithm a, test domain index t, hparams h, trial r), step s:
    acc[t].in   = BASE[a] + 0.01 * t + TRIAL[a][r] + X[h, s]   (the test accuracy)
    acc[t].out  = O[h, s]                                       (oracle's validation)
    acc[i].out  = V[h, s] for every training domain i           (iid's validation)
    acc[i].in   = 0.9
Two-test-domain run {t, u} (every pair), step s:
    acc[t].in = acc[u].in = L[h, s]                             (LODO's validation)
    everything else 0.5

    (h, s)    V      O      L      X
    (0, 100)  0.80   0.99   0.50   0.00   <- iid picks this   (max V)
    (0, 200)  0.70   0.60   0.55   0.05
    (1, 100)  0.75   0.98   0.62   0.10   <- lodo picks this  (max L)
    (1, 200)  0.78   0.65   0.58   0.15   <- oracle picks this (max O at the LAST step)

BASE: erm 0.60, coral 0.70. TRIAL: erm (0.00, 0.02), coral (0.00, 0.04).
coral, test domain painting, trial 1: hparams 0 FAILED (status.json; its records would
win every rule if they were used: V = O = 0.99, test 0.99), hparams 1 absent.

Dataset `pacs` (art_painting, cartoon, photo, sketch): erm only, single test domains,
hparams 0, trial seeds 0 and 1, one checkpoint (step 100): every test accuracy
0.801 + (0.00, 0.02)[trial]; no two-test-domain runs, so no LODO for pacs.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

EMBEDDED = ["photo", "painting", "cartoon", "sketch"]
PACS = ["art_painting", "cartoon", "photo", "sketch"]
RECORD_ORDER = ["sketch", "photo", "cartoon", "painting"]  # not the registered order

V = {(0, 100): 0.80, (0, 200): 0.70, (1, 100): 0.75, (1, 200): 0.78}
O = {(0, 100): 0.99, (0, 200): 0.60, (1, 100): 0.98, (1, 200): 0.65}  # noqa: E741
L = {(0, 100): 0.50, (0, 200): 0.55, (1, 100): 0.62, (1, 200): 0.58}
X = {(0, 100): 0.00, (0, 200): 0.05, (1, 100): 0.10, (1, 200): 0.15}
BASE = {"erm": 0.60, "coral": 0.70}
TRIAL = {"erm": (0.00, 0.02), "coral": (0.00, 0.04)}
HPARAMS = {0: {"lr": 5e-05, "batch_size": 32}, 1: {"lr": 0.0003, "batch_size": 16}}


def record(
    dataset: str,
    algorithm: str,
    test_envs: list[int],
    hparams_seed: int,
    trial_seed: int,
    step: int,
    acc: dict[str, dict[str, float]],
    hparams: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A dgbench record (DESIGN.md schema)."""
    return {
        "run_id": f"{dataset}-{algorithm}-{test_envs}-{hparams_seed}-{trial_seed}",
        "dataset": dataset,
        "algorithm": algorithm,
        "backbone": "resnet50",
        "test_envs": test_envs,
        "hparams_seed": hparams_seed,
        "trial_seed": trial_seed,
        "hparams": hparams if hparams is not None else HPARAMS.get(hparams_seed, {}),
        "step": step,
        "epoch": step / 100,
        "loss": 0.5,
        "metrics": {},
        "acc": acc,
        "step_time": 0.1,
        "mem_gb": 1.0,
    }


def write_run(
    folder: Path,
    records: list[dict[str, Any]],
    status: str = "done",
    error: str = "RuntimeError: boom",
    heartbeat_age: float | None = None,
    tail: str = "",
) -> Path:
    """A dgbench run directory: results.jsonl (+ `tail` appended raw), done or status.json."""
    folder.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in records) + tail
    (folder / "results.jsonl").write_text(text)
    if status == "done":
        (folder / "done").write_text("")
    elif status == "failed":
        (folder / "status.json").write_text(json.dumps({"status": "failed", "error": error}))
    if heartbeat_age is not None:
        beat = folder / "heartbeat"
        beat.write_text("")
        stamp = time.time() - heartbeat_age
        os.utime(beat, (stamp, stamp))
    return folder


def build_golden(root: Path) -> Path:
    sweep = root / "outputs" / "golden"
    for algorithm, t, h, r in itertools.product(BASE, range(4), (0, 1), (0, 1)):
        if algorithm == "coral" and t == 1 and r == 1:
            if h == 0:  # failed; its records must not count
                acc = {d: {"in": 0.99, "out": 0.99} for d in RECORD_ORDER}
                recs = [record("embedded", algorithm, [t], h, r, s, acc) for s in (100, 200)]
                write_run(
                    sweep / f"{algorithm}_t{t}_h{h}_r{r}", recs, status="failed", error="DivergedError: nan"
                )
            continue
        recs = []
        for s in (100, 200):
            acc = {}
            for d in RECORD_ORDER:
                i = EMBEDDED.index(d)
                if i == t:
                    acc[d] = {
                        "in": BASE[algorithm] + 0.01 * t + TRIAL[algorithm][r] + X[h, s],
                        "out": O[h, s],
                    }
                else:
                    acc[d] = {"in": 0.9, "out": V[h, s]}
            recs.append(record("embedded", algorithm, [t], h, r, s, acc))
        write_run(sweep / f"{algorithm}_t{t}_h{h}_r{r}", recs)
    for algorithm, (t, u), h, r in itertools.product(
        BASE, itertools.combinations(range(4), 2), (0, 1), (0, 1)
    ):
        recs = []
        for s in (100, 200):
            acc = {}
            for d in RECORD_ORDER:
                i = EMBEDDED.index(d)
                acc[d] = {"in": L[h, s] if i in (t, u) else 0.5, "out": 0.5}
            recs.append(record("embedded", algorithm, [t, u], h, r, s, acc))
        write_run(sweep / f"{algorithm}_t{t}{u}_h{h}_r{r}", recs)
    for t, r in itertools.product(range(4), (0, 1)):
        acc = {d: {"in": 0.801 + (0.00, 0.02)[r], "out": 0.7} for d in PACS}
        write_run(
            root / "outputs" / "pacs_sweep" / f"erm_t{t}_r{r}", [record("pacs", "erm", [t], 0, r, 100, acc)]
        )
    return root / "outputs"


def embedded_records(
    test_envs: tuple[int, ...] = (0,),
    steps: tuple[int, ...] = (100, 200),
    hparams_seed: int = 0,
    trial_seed: int = 0,
    algorithm: str = "erm",
) -> list[dict[str, Any]]:
    acc = {d: {"in": 0.5, "out": 0.5} for d in EMBEDDED}
    return [record("embedded", algorithm, list(test_envs), hparams_seed, trial_seed, s, acc) for s in steps]


@pytest.fixture
def kit() -> SimpleNamespace:
    """The builders above, for test modules (pytest's importlib mode cannot import conftest)."""
    return SimpleNamespace(record=record, write_run=write_run, embedded_records=embedded_records)


@pytest.fixture
def golden_sweep(tmp_path: Path) -> Path:
    return build_golden(tmp_path)


@pytest.fixture(scope="session")
def domainbed_sweep() -> Path:
    return Path(__file__).parent / "fixtures" / "domainbed_sweep"
