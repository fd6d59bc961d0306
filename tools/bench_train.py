"""Side by side: end-to-end ERM training through `dgbench train`, DomainBed's settings vs the fast path.

Both runs are the real CLI on the same dataset, backbone, batch and steps, each in its own
process (so each peak host memory, summed over the process and its loader workers, is its own):

    reference: DomainBed's settings: data.pipeline=reference (PIL + torchvision per image in
               DataLoader workers, as many as the trainer's default gives,
               `dgbench.data.pipeline.loader_workers`; `--workers 8` for DomainBed's 8 per loader),
               trainer.evaluate=all in batches of 64, no channels_last, and on CUDA fp32 (no
               autocast), deterministic cudnn kernels without autotuning
    fast:      data.pipeline=fast (decoded-image cache + batched augmentation on the device),
               trainer.evaluate=selection (only the splits model selection reads), and the
               trainer's defaults: evaluation batches of 256, channels_last; on CUDA bf16
               autocast, cudnn autotuning, and trainer.cuda_graph=true (each step replayed as
               one CUDA graph); with `--fast-override trainer.compile=true` the featurizer is also
               compiled, measured cold (a fresh inductor cache)

Reported per path: training steps/s (from the records' `step_time`, data loading included, first
record left out: it holds step 0 and the warm-up), evaluation seconds per evaluation (`eval_time`)
and evaluated images/s, seconds per checkpoint (`checkpoint_time`: what the loop waits for the
state saved after each evaluation), wall time and what of it is start-up (`start_up`), peak host
memory (RSS, anonymous RSS, PSS) and peak GPU memory (`mem_gb`), and `protocol_s`: the seconds of
a whole run of the dataset's protocol (PACS: 5001 steps, 18 evaluations and checkpoints) at the
measured rates, start-up left out, and `protocol_wall_s`, the same run with this run's start-up
in it (set-up, and the first step and evaluation at their measured cost: cudnn autotuning, a
`trainer.compile`); then the ratios.
The fast path's decoded-image cache is built by a first untimed run (with `--reference`, the
earlier result's run built it: same machine and settings).

    python tools/bench_train.py --root ../shared/datasets [--dataset pacs] [--backbone resnet50]
        [--steps 60] [--eval-every 30] [--batch 32] [--device cpu|cuda] [--json out.json]
        [--fast-override KEY=VALUE ...] [--reference EARLIER.json] [OVERRIDE ...]

Trailing `key=value` arguments are passed to both runs (e.g. `data.resolution=64` for a quick look);
`--fast-override` (repeatable) to the fast run only, e.g. `--fast-override trainer.compile=true`.
`--reference EARLIER.json` takes the reference side from an earlier result of this tool with the
same machine and settings instead of running it again: several fast variants compared to one
reference in a lent GPU's few minutes (`tools/gpu_checks.sh`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_data_pipeline import (  # tools/ is on sys.path when run as a script
    PeakMemory,
    machine_info,
    run_tool,
)

from dgbench.components import load_components
from dgbench.config import Protocol
from dgbench.errors import DGBenchError
from dgbench.registry import DATASETS

PATHS = {
    "reference": [
        "data.pipeline=reference",
        "trainer.evaluate=all",
        "trainer.eval_batch_size=64",
        "trainer.amp=false",
        "trainer.channels_last=false",
        "trainer.deterministic=true",
    ],
    "fast": ["data.pipeline=fast", "trainer.evaluate=selection"],
}
# On CUDA the fast path also replays each step as one CUDA graph: with frozen BatchNorm's backward
# kept in channels_last (FixedStatsBatchNorm2d) the eager ResNet-50 step does 25 ms of GPU work but
# takes ~36 ms to launch its ~1,100 kernels, which a graph replays in one call (tools/bench_step.py,
# tools/check_cuda.py). Compiling the model as well (`--fast-override trainer.compile=true`) trains
# faster still, but its cold compilation costs ~40 s and its compile workers ~0.9-1.5 GB of host
# memory: the README's Performance section.
FAST_ON_CUDA = ["trainer.cuda_graph=true"]


def overrides(args: argparse.Namespace, output_dir: str, name: str) -> list[str]:
    return [
        f"dataset={args.dataset}",
        f"dataset.root={args.root}",
        f"backbone={args.backbone}",
        "backbone.pretrained=false",  # speed only: no weights download
        "algorithm=erm",
        f"algorithm.batch_size={args.batch}",
        f"trainer.steps={args.steps}",
        f"trainer.checkpoint_freq={args.eval_every}",
        f"trainer.device={args.device}",
        "trainer.progress=false",
        f"output_dir={output_dir}",
        f"name={name}",
        *([] if args.workers is None else [f"trainer.num_workers={args.workers}"]),
        *args.extra,
    ]


def run_measured(command: list[str], **popen: Any) -> tuple[float, dict[str, float]]:
    """Run `command` to the end: its wall seconds and the peak memory of its process tree.

    Only the command's tree is measured: this process holds torch too (~0.7 GB of RSS), the
    same for every path, and would blur their comparison.
    """
    start = time.perf_counter()
    with subprocess.Popen(command, stdout=subprocess.DEVNULL, **popen) as process:
        with PeakMemory(process.pid) as memory:
            returncode = process.wait()
    if returncode:
        raise subprocess.CalledProcessError(returncode, command)
    return time.perf_counter() - start, memory.peak


def run(args: argparse.Namespace, extra: list[str], output_dir: str, name: str) -> dict[str, Any]:
    command = [sys.executable, "-m", "dgbench.cli", "train", *overrides(args, output_dir, name), *extra]
    # a cold compilation (trainer.compile), as a sweep's first run on a machine pays it
    inductor = {"TORCHINDUCTOR_CACHE_DIR": str(Path(output_dir) / "inductor")}
    wall, peak = run_measured(command, env={**os.environ, **inductor})
    (results,) = Path(output_dir, name).glob("*/results.jsonl")
    records = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    timed = records[1:] or records
    domains = len(records[0]["acc"]) - len(records[0]["test_envs"])
    step_time = sum(r["step_time"] for r in timed) / len(timed)
    eval_time = sum(r["metrics"]["eval_time"] for r in timed) / len(timed)
    written = [r["metrics"]["checkpoint_time"] for r in records if "checkpoint_time" in r["metrics"]]
    checkpoint_time = sum(written) / len(written) if written else 0.0
    evaluated = sum(v is not None for r in timed[:1] for splits in r["acc"].values() for v in splits.values())
    return {
        "steps_per_s": round(1 / step_time, 3),
        "images_per_s": round(domains * args.batch / step_time, 1),
        "eval_seconds": round(eval_time, 2),
        "checkpoint_seconds": round(checkpoint_time, 2),
        "splits_evaluated": evaluated,
        "wall_s": round(wall, 1),
        **start_up(records, wall, checkpoint_time),
        "gpu_peak_gb": records[-1]["mem_gb"] if args.device == "cuda" else None,
        **peak,
    }


def start_up(records: list[dict[str, Any]], wall: float, checkpoint_time: float) -> dict[str, float]:
    """Where a short run's wall time goes besides its steady steps, evaluations and checkpoints.

    `first_step_s` is step 0 (the first record holds it alone: on CUDA, cudnn's autotuning of the
    training shapes), `first_eval_s` the first evaluation (autotuning of each new evaluation
    shape), `outside_loop_s` the rest: before step 0 (interpreter, imports, data set-up, model,
    device copies) and the end of the run. A checkpoint follows every record, each taking
    `checkpoint_time` seconds.
    """
    looped, previous = 0.0, -1
    for record in records:
        looped += record["step_time"] * (record["step"] - previous) + record["metrics"]["eval_time"]
        looped += checkpoint_time
        previous = record["step"]
    first = records[0]
    return {
        "first_step_s": round(first["step_time"], 2),
        "first_eval_s": round(first["metrics"]["eval_time"], 2),
        "outside_loop_s": round(wall - looped, 1),
    }


def protocol_run(dataset: str, root: str) -> dict[str, int]:
    """The dataset's default protocol length (`steps`, `checkpoint_freq`), asked of it as the trainer does."""
    load_components()
    entry = DATASETS.get(dataset)
    return entry.obj(entry.config(name=dataset, root=root)).protocol_defaults(Protocol.default.value)


def protocol_seconds(summary: dict[str, Any], steps: int, checkpoint_freq: int) -> float:
    """Seconds of a whole protocol run at the measured rates, start-up left out.

    A benchmark run of tens of steps is mostly start-up (imports, CUDA, loader workers); a
    protocol run (PACS: 5001 steps, an evaluation every 300 and after the last) is steps,
    evaluations and the checkpoint written after each, so this is the figure a sweep's cost
    follows. Evaluations are counted as the trainer makes them: at every multiple of
    `checkpoint_freq` and at the last step.
    """
    evaluations = len(range(0, steps, checkpoint_freq)) + ((steps - 1) % checkpoint_freq != 0)
    per_evaluation = summary["eval_seconds"] + summary["checkpoint_seconds"]
    return round(steps / summary["steps_per_s"] + evaluations * per_evaluation, 1)


def ratios(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """How many times faster (or, for memory, how large) `after` is than `before`."""
    return {
        "train_steps_per_s": round(after["steps_per_s"] / before["steps_per_s"], 2),
        "eval_seconds": round(before["eval_seconds"] / after["eval_seconds"], 2),
        "wall": round(before["wall_s"] / after["wall_s"], 2),
        "protocol_run": round(before["protocol_s"] / after["protocol_s"], 2),
        "protocol_run_with_start_up": round(before["protocol_wall_s"] / after["protocol_wall_s"], 2),
        "host_rss": round(after["rss_mb"] / before["rss_mb"], 2),
    }


def protocol_wall_seconds(summary: dict[str, Any]) -> float:
    """`protocol_s` with this run's start-up in it: what ran outside the loop, and the first step
    and the first evaluation at their measured cost instead of the steady rates.

    A protocol run pays its start-up once; a switch that trades start-up for speed (cudnn
    autotuning, `trainer.compile`) is judged on this figure, where `protocol_s` would hide its cost.
    """
    steady_first = 1 / summary["steps_per_s"] + summary["eval_seconds"]
    start_up = summary["outside_loop_s"] + summary["first_step_s"] + summary["first_eval_s"]
    return round(summary["protocol_s"] + start_up - steady_first, 1)


def add_protocol_seconds(result: dict[str, Any], dataset: str, root: str, paths: list[str]) -> None:
    """Each path's `protocol_s` and `protocol_wall_s` (see above), and the protocol they assume."""
    result["protocol"] = protocol_run(dataset, root)
    for path in paths:
        summary = result[path]
        summary["protocol_s"] = protocol_seconds(summary, **result["protocol"])
        summary["protocol_wall_s"] = protocol_wall_seconds(summary)


def earlier_reference(path: str, result: dict[str, Any]) -> dict[str, Any]:
    """The reference side of the bench_train result at `path`, which must come from the same kind of
    machine (all of `machine` but its load) and the same settings (all but the fast side's)."""
    try:
        earlier = json.loads(Path(path).read_text())
        reference, machine, settings = earlier["reference"], earlier["machine"], earlier["settings"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DGBenchError(f"--reference {path}: not a bench_train result ({error!r})") from None
    if "checkpoint_seconds" not in reference:  # measured since checkpoints count per evaluation
        raise DGBenchError(
            f"--reference {path}: made by an older bench_train (no checkpoint_seconds); "
            "run the reference again: leave out --reference"
        )
    for part, then, ignored in (
        ("machine", machine, {"load_average"}),
        ("settings", settings, {"json", "fast_override", "reference"}),
    ):
        now = result[part]
        for key in sorted((set(now) | set(then)) - ignored):
            if now.get(key) != then.get(key):
                raise DGBenchError(
                    f"--reference {path}: its {part}.{key} is {then.get(key)!r}, "
                    f"this run's {now.get(key)!r}; a reference is reused only on the same machine "
                    "with the same settings"
                )
    return reference


def report(result: dict[str, Any], json_path: str) -> None:
    print(json.dumps(result, indent=1))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="data root holding the dataset folder (e.g. PACS/)")
    parser.add_argument("--dataset", default="pacs")
    parser.add_argument("--backbone", default="resnet50", help="a backbone preset (resnet50, resnet18, ...)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--eval-every", type=int, default=30)
    parser.add_argument("--batch", type=int, default=32, help="images per training domain")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, help="loader workers per loader (default: the trainer's)")
    parser.add_argument("--json", default="")
    parser.add_argument(
        "--fast-override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an override for the fast run only (repeatable), e.g. trainer.compile=true",
    )
    parser.add_argument(
        "--reference",
        metavar="EARLIER.json",
        help="reuse the reference side of an earlier result (same machine and settings), not run it again",
    )
    parser.add_argument("extra", nargs="*", help="more training overrides for both runs")
    args = parser.parse_args()

    result: dict[str, Any] = {"machine": machine_info(args), "settings": vars(args)}
    if args.reference:
        result["reference"] = earlier_reference(args.reference, result)
    with tempfile.TemporaryDirectory() as out:
        if "reference" not in result:  # else the earlier result's first run built it
            run(args, [*PATHS["fast"], "trainer.steps=1"], out, "cache")  # the decoded-image cache
        fast = [*(FAST_ON_CUDA if args.device == "cuda" else []), *args.fast_override]
        for path, extra in PATHS.items():
            if path not in result:
                result[path] = run(args, [*extra, *(fast if path == "fast" else [])], out, path)
    add_protocol_seconds(result, args.dataset, args.root, ["reference", "fast"])
    result["ratios"] = ratios(result["reference"], result["fast"])
    report(result, args.json)


if __name__ == "__main__":
    run_tool(main)
