"""Side by side: ERM with torch's default Adam vs the fused Adam the algorithms use (`FUSED`).

torch's default Adam is a Python loop over the parameters on CPU (multi-tensor `foreach` kernels
on CUDA); `fused=True` steps all of them in one kernel. This measures, for each backbone the
trainer offers (its Hydra preset, random weights), the same ERM model (same seed, same start
weights) and the same random batches (3 domains x `--batch`), `--repeats` rounds alternating the
two optimizers, each round: one untimed step, `--steps` timed ERM steps, then `--steps` timed
optimizer steps alone (on the last gradients). Reported: medians, the ratio default / fused
(above 1: fused is faster), and how far apart the two leave the weights after the same steps.

    python tools/bench_optimizer.py [--backbones resnet18,resnet50,efficientnet_lite0,small_cnn]
        [--resolution 64] [--batch 32] [--steps 3] [--repeats 2] [--device cpu|cuda] [--json out.json]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads, as dgbench.cli.quiet_openmp
import argparse
import copy
import json
import statistics
from functools import partial
from pathlib import Path
from typing import Any

import bench_algorithms  # tools/ is on sys.path when run as a script
import torch
from bench_channels_last import backbone_config
from bench_data_pipeline import machine_info

from dgbench.components import load_components

DOMAINS = 3
OPTIMIZERS = {"default": {}, "fused": {"fused": True}}


def one_round(start: Any, data: list, args: argparse.Namespace, kind: str) -> tuple[float, float, list]:
    """(seconds per ERM step, seconds per optimizer step, the weights after the ERM steps)."""
    algorithm = copy.deepcopy(start)
    cfg = algorithm.cfg
    algorithm.optimizer = torch.optim.Adam(
        algorithm.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, **OPTIMIZERS[kind]
    )
    algorithm.update(data)  # untimed: first-call allocations, optimizer state
    step = statistics.median(bench_algorithms.time_steps(algorithm, [data], 0, args.steps, args.device))
    weights = [p.detach().clone() for p in algorithm.parameters()]
    optimizer_step = statistics.median(
        bench_algorithms.time_calls(algorithm.optimizer.step, 0, args.steps, args.device)
    )
    return step / 1e3, optimizer_step / 1e3, weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default="resnet18,resnet50,efficientnet_lite0,small_cnn")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32, help="images per training domain")
    parser.add_argument("--steps", type=int, default=3, help="timed ERM, then Adam steps per round")
    parser.add_argument("--repeats", type=int, default=2, help="rounds per optimizer, alternating")
    parser.add_argument("--device", type=torch.device, default=torch.device("cpu"))
    parser.add_argument("--json", default="", help="also write the results here")
    args = parser.parse_args()
    load_components()
    report: dict[str, Any] = {
        "machine": machine_info(argparse.Namespace(device=args.device.type)),
        "settings": {**vars(args), "device": str(args.device)},
        "backbones": {},
    }
    print(f"{DOMAINS} x {args.batch} images, {args.resolution} px, torch {torch.__version__}, {args.device}")
    for name in args.backbones.split(","):
        start = bench_algorithms.build("erm", backbone_config(name), DOMAINS, args.batch, args.device)
        data = bench_algorithms.random_batches(DOMAINS, args.batch, args.resolution, args.device)
        runs = bench_algorithms.alternating_rounds(
            list(OPTIMIZERS), args.repeats, partial(one_round, start, data, args)
        )
        row = bench_algorithms.median_row(runs, ("step", "optimizer_step"), digits=4)
        default, fused = row["default"], row["fused"]
        weights = zip(runs["default"][0][2], runs["fused"][0][2], strict=True)
        row["max_weight_difference"] = max(float((a - b).abs().max()) for a, b in weights)
        report["backbones"][name] = row
        print(
            f"{name:20s} ERM step {default['step_s']:7.3f} s vs {fused['step_s']:7.3f} s "
            f"({row['ratio_step']:.2f}x)   Adam step {default['optimizer_step_s'] * 1e3:7.1f} ms vs "
            f"{fused['optimizer_step_s'] * 1e3:7.1f} ms ({row['ratio_optimizer_step']:.2f}x)   "
            f"weights apart by {row['max_weight_difference']:.1e} after {args.steps + 1} steps",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
