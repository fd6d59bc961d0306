"""Side-by-side training-step time of the registered algorithms, relative to ERM.

Every algorithm gets the same backbone, the same random batches (one per training domain)
and its default hparams; each runs `--warmup` untimed steps, then `--steps` timed steps
(synchronized on CUDA), and the table shows the median ms/step and the ratio to ERM's.
ERM is always measured as the baseline.

    python tools/bench_algorithms.py [--algorithms erm,fish] [--backbone small_cnn|resnet18|<timm name>]
        [--resolution 32] [--batch 32] [--domains 3] [--device auto|cpu|cuda] [--steps 20]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads, as dgbench.cli.quiet_openmp
import argparse
import dataclasses
import itertools
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from dgbench.backbones import build_backbone
from dgbench.components import load_components
from dgbench.registry import ALGORITHMS

NUM_CLASSES = 7  # PACS


def backbone_config(name: str, width: float) -> dict[str, Any]:
    if name == "small_cnn":
        return {"arch": "small_cnn", "width": width}
    if name == "resnet18":  # conf/backbone/resnet18.yaml without the download: random init, frozen BN
        return {"arch": "timm", "name": "resnet18", "pretrained": False, "bn": "frozen"}
    return {"arch": "timm", "name": name, "pretrained": False}


def random_batches(
    domains: int,
    batch: int,
    resolution: int,
    device: torch.device,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One random (x, y) minibatch per domain on `device`, x in `memory_format`; the same draws every call."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(domains):
        x = torch.randn(batch, 3, resolution, resolution, generator=g).to(device)
        y = torch.randint(0, NUM_CLASSES, (batch,), generator=g).to(device)
        out.append((x.contiguous(memory_format=memory_format), y))
    return out


def build(name: str, backbone: dict[str, Any], domains: int, batch: int, device: torch.device) -> Any:
    torch.manual_seed(0)
    entry = ALGORITHMS.get(name)
    fields = {f.name for f in dataclasses.fields(entry.config)}
    cfg = entry.config(**({"name": name} if "name" in fields else {}))
    if "batch_size" in fields:
        cfg = dataclasses.replace(cfg, batch_size=batch)
    algorithm = entry.obj(build_backbone(backbone), NUM_CLASSES, domains, cfg)
    algorithm.total_steps = 1  # warm-up phases (UDIM's SAM warm-up: total_steps // 5) are over at once
    return algorithm.to(device).train()


def time_calls(call: Callable[[], Any], warmup: int, times: int, device: torch.device) -> list[float]:
    """Milliseconds of each timed call (after `warmup` untimed ones), synchronized on CUDA."""
    milliseconds = []
    for i in range(warmup + times):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            milliseconds.append((time.perf_counter() - start) * 1e3)
    return milliseconds


def time_steps(algorithm: Any, batches: list, warmup: int, steps: int, device: torch.device) -> list[float]:
    """Milliseconds of each timed `update` (after `warmup` untimed ones), cycling through `batches`."""
    cycle = itertools.cycle(batches)
    return time_calls(lambda: algorithm.update(next(cycle)), warmup, steps, device)


def alternating_rounds(
    variants: Sequence[str], repeats: int, one_round: Callable[[str], tuple[Any, ...]]
) -> dict[str, list[tuple[Any, ...]]]:
    """`repeats` rounds of every variant in turn, so a drift of the machine hits each alike: the
    results of each variant's rounds."""
    runs: dict[str, list[tuple[Any, ...]]] = {variant: [] for variant in variants}
    for _ in range(repeats):
        for variant in variants:
            runs[variant].append(one_round(variant))
    return runs


def median_row(
    runs: Mapping[str, list[tuple[Any, ...]]], fields: Sequence[str], digits: int
) -> dict[str, Any]:
    """Per variant the median of each field (`<field>_s`, the rounds' leading seconds, in order), and
    `ratio_<field>`: the first variant's median over the second's (above 1: the second is faster)."""
    row: dict[str, Any] = {
        variant: {
            f"{field}_s": round(statistics.median(r[i] for r in rounds), digits)
            for i, field in enumerate(fields)
        }
        for variant, rounds in runs.items()
    }
    baseline, variant = list(runs)[:2]
    for field in fields:
        row[f"ratio_{field}"] = round(row[baseline][f"{field}_s"] / row[variant][f"{field}_s"], 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithms", default="", help="comma-separated names (default: all registered)")
    parser.add_argument("--backbone", default="small_cnn", help="small_cnn, resnet18 or a timm model name")
    parser.add_argument("--width", type=float, default=1.0, help="small_cnn width multiplier")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32, help="images per domain")
    parser.add_argument("--domains", type=int, default=3, help="training domains per step")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave as is)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_components()
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    names = [n for n in args.algorithms.split(",") if n] or ALGORITHMS.names()
    names = ["erm", *[n for n in names if n != "erm"]]
    backbone = backbone_config(args.backbone, args.width)

    g = torch.Generator().manual_seed(0)
    batches = [
        [
            (
                torch.randn(args.batch, 3, args.resolution, args.resolution, generator=g).to(device),
                torch.randint(0, NUM_CLASSES, (args.batch,), generator=g).to(device),
            )
            for _ in range(args.domains)
        ]
        for _ in range(4)
    ]
    where = device.type if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(
        f"backbone {args.backbone} ({backbone}), {args.resolution}px, {args.domains} domains x {args.batch} "
        f"images, {args.warmup} warm-up + {args.steps} timed steps, on {where} "
        f"({torch.get_num_threads()} threads)"
    )
    rows = []
    for name in names:
        algorithm = build(name, backbone, args.domains, args.batch, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = time_steps(algorithm, batches, args.warmup, args.steps, device)
        memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        rows.append((name, statistics.median(times), min(times), memory))
        del algorithm
    base = rows[0][1]
    print(f"{'algorithm':<12}{'ms/step':>10}{'min ms':>10}{'x ERM':>8}{'peak GiB':>10}")
    for name, median, best, memory in rows:
        print(f"{name:<12}{median:>10.1f}{best:>10.1f}{median / base:>8.2f}{memory:>10.2f}")


if __name__ == "__main__":
    main()
