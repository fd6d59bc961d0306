"""Where a GPU training step's time goes: eager vs CUDA graph vs torch.compile, side by side.

ERM on ResNet-50 (frozen BatchNorm, as DomainBed) at 224 px, 3 domains x 32 images, bf16 autocast,
in one process, each variant on a freshly built model:

    eager_nchw     the eager step, contiguous (NCHW) model and batches
    eager_native_bn  the eager step, channels_last, with PyTorch's own eval-mode BatchNorm backward
                   (`dgbench.backbones.fixed_stats_bn` off: it writes the input gradient NCHW)
    eager          the eager step, channels_last (the trainer's default)
    graph          `dgbench.graphs.GraphedStep`: the same step captured once, then replayed
    compile        `trainer.compile`: the featurizer torch.compiled in place, eager step around it
    compile+graph  both: the compiled step captured

Reported per variant: ms per step over `--steps` steps queued back to back (as the trainer runs
them: no sync between steps), the seconds its set-up took (compilation, capture), and for the
eager variants the GPU's busy time per step from the profiler (the sum of its kernels' times): when
a step's wall time is well above its kernels' time, the host's launches bound it. Every variant
is timed before any is profiled (see `time_then_profile`).

    python tools/bench_step.py [--steps 40] [--variants eager,graph] [--json out.json]
        [--device cpu --resolution 32 --batch 2]     (a smoke test of the script itself, eager only)
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import bench_algorithms  # tools/ is on sys.path when run as a script
import torch
from bench_data_pipeline import machine_info
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from dgbench.backbones.fixed_stats_bn import use_fixed_stats_kernels
from dgbench.components import load_components
from dgbench.devices import synchronize
from dgbench.graphs import GraphedStep

DOMAINS = 3
RESNET50 = {"arch": "timm", "name": "resnet50", "pretrained": False, "bn": "frozen"}
VARIANTS = ("eager_nchw", "eager_native_bn", "eager", "graph", "compile", "compile+graph")


def build_step(
    variant: str, device: torch.device, batch: int, resolution: int
) -> tuple[Callable[[], Any], float]:
    """A function running one training step of `variant`, and the seconds its set-up took."""
    memory_format = torch.contiguous_format if variant == "eager_nchw" else torch.channels_last
    algorithm = bench_algorithms.build("erm", RESNET50, DOMAINS, batch, device)
    algorithm = algorithm.to(memory_format=memory_format)
    use_fixed_stats_kernels(algorithm, on=variant != "eager_native_bn")
    batches = bench_algorithms.random_batches(DOMAINS, batch, resolution, device, memory_format)
    start = time.perf_counter()
    if variant.startswith("compile"):
        algorithm.featurizer.compile()
    if variant.endswith("graph"):
        graphed = GraphedStep(algorithm, batches, torch.bfloat16)
        synchronize(device)
        return (lambda: graphed(batches)), time.perf_counter() - start

    def eager() -> Any:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return algorithm.update(batches)

    for _ in range(3):  # cudnn autotuning, the optimizer's state, a compilation
        eager()
    synchronize(device)
    return eager, time.perf_counter() - start


def ms_per_step(step: Callable[[], Any], steps: int, device: torch.device) -> float:
    """Wall milliseconds per step over `steps` steps queued back to back, synchronized at the ends."""
    step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - start) * 1e3 / steps


def gpu_busy(step: Callable[[], Any], steps: int = 5) -> dict[str, Any]:
    """Per step: the summed time of the GPU's kernels and copies, their number, and those that take
    the most time."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    # the kernels and copies themselves: an op's row repeats its kernels' time as its own
    rows = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
    rows.sort(key=lambda e: e.self_device_time_total, reverse=True)
    return {
        "gpu_busy_ms": round(sum(e.self_device_time_total for e in rows) / 1e3 / steps, 2),
        "kernels_per_step": round(sum(e.count for e in rows) / steps),
        "top": [
            {
                "op": e.key[:90],
                "ms": round(e.self_device_time_total / 1e3 / steps, 2),
                "calls": e.count // steps,
            }
            for e in rows[:12]
        ],
    }


def time_then_profile(
    variants: list[str],
    build: Callable[[str], tuple[Callable[[], Any], float]],
    time_step: Callable[[Callable[[], Any]], float],
    profile_step: Callable[[Callable[[], Any]], dict[str, Any]] | None,
) -> dict[str, dict[str, Any]]:
    """Each variant's row: its ms per step and set-up seconds, then for the eager ones the
    profiler's view of the GPU.

    Every variant is timed before any is profiled: a profiling session leaves CUPTI running in the
    process (pytorch/pytorch#144455, 10-20% slower afterwards), which slows every later launch and
    most a step bound by its launches. The eager steps are kept until then.
    """
    rows: dict[str, dict[str, Any]] = {}
    to_profile: dict[str, Callable[[], Any]] = {}
    for variant in variants:
        try:
            step, set_up = build(variant)
            rows[variant] = {"ms_per_step": round(time_step(step), 2), "set_up_s": round(set_up, 1)}
            if profile_step is not None and variant.startswith("eager"):
                to_profile[variant] = step
        except Exception as error:  # report every variant
            rows[variant] = {"error": f"{type(error).__name__}: {error}"[:2000]}
        print(variant, json.dumps(rows[variant]), flush=True)
        step = None  # a graph or compiled model not kept for profiling is freed before the next
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    for variant, step in to_profile.items():
        assert profile_step is not None
        try:
            rows[variant].update(profile_step(step))
        except Exception as error:
            rows[variant]["profile_error"] = f"{type(error).__name__}: {error}"[:2000]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--json", default="")
    parser.add_argument("--device", default="cuda", help="cpu: a smoke test of the script itself")
    parser.add_argument("--batch", type=int, default=32, help="images per domain")
    parser.add_argument("--resolution", type=int, default=224)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_step needs a CUDA device (or --device cpu for a smoke test)")
    load_components()
    torch.backends.cudnn.benchmark = True  # the trainer's setting unless trainer.deterministic
    on_cuda = device.type == "cuda"
    report: dict[str, Any] = {
        "machine": machine_info(args),
        "settings": {"domains": DOMAINS, **{k: vars(args)[k] for k in ("batch", "resolution", "steps")}},
    }
    report["variants"] = time_then_profile(
        args.variants.split(","),
        lambda variant: build_step(variant, device, args.batch, args.resolution),
        lambda step: ms_per_step(step, args.steps, device),
        gpu_busy if on_cuda else None,
    )
    base = report["variants"].get("eager", {}).get("ms_per_step")
    for row in report["variants"].values():
        if base and "ms_per_step" in row:
            row["speedup_vs_eager"] = round(base / row["ms_per_step"], 2)
    print(json.dumps(report, indent=1))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
