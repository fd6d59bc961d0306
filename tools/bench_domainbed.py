"""Side by side: DomainBed's own training script vs `dgbench train` (fast path), ERM on the same PACS copy.

DomainBed is not a package: point --domainbed at a checkout of facebookresearch/DomainBed (the
folder holding `domainbed/`). Its `domainbed.scripts.train` runs with this interpreter on --root
(the folder holding PACS/), ERM, sketch held out (`--test_envs 3`), `--steps`, `--checkpoint_freq`
= --eval-every, batch --batch per domain, ResNet-50 (`"resnet18": false`; DomainBed loads
torchvision's ImageNet weights, so have them in the torch hub cache on a machine offline),
its own 8 workers per loader. With --device cpu it gets no GPU (CUDA_VISIBLE_DEVICES empty).

dgbench runs as `tools/bench_train.py` runs its fast path: data.pipeline=fast,
trainer.evaluate=selection, the same dataset root, held-out domain, backbone, batch and steps.

Reported per run: training steps/s (DomainBed's `step_time`, data loading included, the first
checkpoint's left out as warm-up), seconds per evaluation, wall time, peak host memory of the
process tree, peak GPU memory and `protocol_s` (as in tools/bench_train.py). DomainBed does not
time its evaluations; they are measured from the moments its `results.jsonl` lines appear (polled
every 50 ms): the time between two checkpoints minus their steps' `step_time`.

    python tools/bench_domainbed.py --domainbed ~/DomainBed --root ../shared/datasets --device cuda
        [--steps 60] [--eval-every 30] [--batch 32] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# tools/ is on sys.path when run as a script
from bench_data_pipeline import Sampler, machine_info, run_tool
from bench_train import PATHS, add_protocol_seconds, ratios, report, run, run_measured

HELD_OUT = ("sketch", 3)  # PACS's held-out domain: dgbench's name, DomainBed's index (A, C, P, S)


class LineTimes(Sampler):
    """The moments at which each line of a growing file first appears (polled)."""

    def __init__(self, path: Path, interval: float = 0.05) -> None:
        super().__init__(interval)
        self.path = path
        self.times: list[float] = []

    def _sample(self) -> None:
        try:
            lines = self.path.read_text().count("\n")
        except FileNotFoundError:
            return
        now = time.perf_counter()
        self.times.extend([now] * (lines - len(self.times)))


def domainbed_summary(records: list[dict[str, Any]], times: list[float], batch: int) -> dict[str, Any]:
    """Steps/s and seconds per evaluation from DomainBed's records and the moments they appeared.

    Record k (k >= 1) covers the steps after record k - 1 up to its own `step`, then the
    evaluation: the time between the two appearances minus those steps' mean `step_time` times
    their number is that evaluation.
    """
    if len(records) < 2 or len(times) != len(records):
        raise ValueError(
            f"need at least 2 checkpoints, each with its appearance time; got {len(records)} records "
            f"and {len(times)} times: raise --steps or lower --eval-every"
        )
    timed = list(zip(records, records[1:], times, times[1:], strict=False))
    step_time = sum(r["step_time"] for _, r, _, _ in timed) / len(timed)
    evals = [(t1 - t0) - (r1["step"] - r0["step"]) * r1["step_time"] for r0, r1, t0, t1 in timed]
    domains = sum(1 for key in records[0] if key.endswith("_in_acc")) - 1
    return {
        "steps_per_s": round(1 / step_time, 3),
        "images_per_s": round(domains * batch / step_time, 1),
        "eval_seconds": round(sum(evals) / len(evals), 2),
        "gpu_peak_gb": records[-1].get("mem_gb"),
    }


def run_domainbed(args: argparse.Namespace, output_dir: Path) -> dict[str, Any]:
    command = [
        sys.executable, "-m", "domainbed.scripts.train",
        "--data_dir", str(Path(args.root).resolve()),
        "--dataset", "PACS",
        "--algorithm", "ERM",
        "--test_envs", str(HELD_OUT[1]),
        "--steps", str(args.steps),
        "--checkpoint_freq", str(args.eval_every),
        "--output_dir", str(output_dir),
        "--skip_model_save",
        "--hparams", json.dumps({"batch_size": args.batch, "resnet18": args.backbone == "resnet18"}),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(args.domainbed).resolve())}
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    with LineTimes(output_dir / "results.jsonl") as lines:
        wall, peak = run_measured(command, env=env, cwd=args.domainbed)
    records = [json.loads(line) for line in (output_dir / "results.jsonl").read_text().splitlines() if line]
    summary = domainbed_summary(records, lines.times, args.batch)
    if args.device == "cpu":
        summary["gpu_peak_gb"] = None
    return {**summary, "wall_s": round(wall, 1), **peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domainbed", required=True, help="a checkout of facebookresearch/DomainBed")
    parser.add_argument("--root", required=True, help="data root holding PACS/")
    parser.add_argument("--backbone", default="resnet50", choices=["resnet50", "resnet18"])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--eval-every", type=int, default=30)
    parser.add_argument("--batch", type=int, default=32, help="images per training domain")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    if not Path(args.domainbed, "domainbed", "scripts", "train.py").is_file():
        parser.error(
            f"--domainbed {args.domainbed}: no domainbed/scripts/train.py there; pass a DomainBed checkout"
        )
    # What bench_train.run reads, for the dgbench run.
    args.dataset, args.workers, args.extra = "pacs", None, [f"dataset.test_envs=[{HELD_OUT[0]}]"]

    result: dict[str, Any] = {"machine": machine_info(args), "settings": vars(args)}
    with tempfile.TemporaryDirectory() as out:
        result["domainbed"] = run_domainbed(args, Path(out, "domainbed"))
        run(args, [*PATHS["fast"], "trainer.steps=1"], out, "cache")  # builds the decoded-image cache
        result["dgbench_fast"] = run(args, PATHS["fast"], out, "fast")
    add_protocol_seconds(result, args.dataset, args.root, ["domainbed", "dgbench_fast"])
    result["ratios"] = ratios(result["domainbed"], result["dgbench_fast"])
    report(result, args.json)


if __name__ == "__main__":
    run_tool(main)
