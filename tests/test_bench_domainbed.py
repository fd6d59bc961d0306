"""tools/bench_domainbed.py: DomainBed's command line and records, read as its train.py writes them.

DomainBed itself is not installable offline; a stand-in `domainbed/scripts/train.py` checks the
arguments the tool passes and writes `results.jsonl` the way DomainBed does (a record per
checkpoint, appended after that checkpoint's evaluation), sleeping for a known evaluation time.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))  # the tools import each other as scripts do

import bench_data_pipeline  # noqa: E402
import bench_domainbed  # noqa: E402

FAKE_TRAIN = """
import argparse, json, os, time
parser = argparse.ArgumentParser()
for flag in ("--data_dir", "--dataset", "--algorithm", "--output_dir", "--hparams"):
    parser.add_argument(flag)
for flag in ("--test_envs", "--steps", "--checkpoint_freq"):
    parser.add_argument(flag, type=int)
parser.add_argument("--skip_model_save", action="store_true")
args = parser.parse_args()
hparams = json.loads(args.hparams)
assert (args.dataset, args.algorithm, args.test_envs) == ("PACS", "ERM", 3), args
assert hparams == {"batch_size": 8, "resnet18": False}, hparams
assert os.environ["CUDA_VISIBLE_DEVICES"] == "" and args.skip_model_save
os.makedirs(args.output_dir, exist_ok=True)
for step in range(args.steps):
    time.sleep(0.01)  # the step
    if step % args.checkpoint_freq == 0 or step == args.steps - 1:
        time.sleep(EVAL_SECONDS)
        record = {"step": step, "step_time": 0.01, "mem_gb": 0.0}
        record.update({f"env{i}_{split}_acc": 0.5 for i in range(4) for split in ("in", "out")})
        with open(os.path.join(args.output_dir, "results.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\\n")
"""


ACCURACIES = {f"env{i}_{split}_acc": 0.5 for i in range(4) for split in ("in", "out")}


def _records(steps: list[int], step_time: float) -> list[dict]:
    return [{"step": s, "step_time": step_time, **ACCURACIES} for s in steps]


def test_summary_subtracts_the_steps_from_the_time_between_checkpoints() -> None:
    records = _records([0, 30, 59], 0.1)
    times = [10.0, 10.0 + 30 * 0.1 + 2.0, 10.0 + 30 * 0.1 + 2.0 + 29 * 0.1 + 4.0]
    summary = bench_domainbed.domainbed_summary(records, times, batch=32)
    assert summary["steps_per_s"] == pytest.approx(10.0)
    assert summary["eval_seconds"] == pytest.approx(3.0)  # the mean of 2 s and 4 s
    assert summary["images_per_s"] == pytest.approx(3 * 32 * 10.0)  # 3 training domains


def test_summary_needs_two_checkpoints() -> None:
    with pytest.raises(ValueError, match="--eval-every"):
        bench_domainbed.domainbed_summary(_records([0], 0.1), [1.0], batch=32)


def test_runs_a_domainbed_checkout_and_times_its_evaluations(tmp_path: Path) -> None:
    scripts = tmp_path / "checkout" / "domainbed" / "scripts"
    scripts.mkdir(parents=True)
    for package in (scripts.parent, scripts):
        (package / "__init__.py").write_text("")
    (scripts / "train.py").write_text("EVAL_SECONDS = 0.4\n" + textwrap.dedent(FAKE_TRAIN))
    args = argparse.Namespace(
        domainbed=str(tmp_path / "checkout"), root=str(tmp_path), backbone="resnet50", batch=8,
        steps=7, eval_every=3, device="cpu",
    )  # fmt: skip
    held = b"\x01" * (200 << 20)  # written, so resident: this process holds 200 MB the stand-in never does
    assert bench_data_pipeline._memory_kb(os.getpid())[0] > 200 << 10
    result = bench_domainbed.run_domainbed(args, tmp_path / "out")
    del held
    assert result["eval_seconds"] == pytest.approx(0.4, abs=0.15)
    assert result["steps_per_s"] == pytest.approx(100.0)
    assert result["gpu_peak_gb"] is None
    assert 0 < result["rss_mb"] < 100  # the stand-in's own tree (a bare Python), not this process
    assert result["wall_s"] >= 3 * 0.4
