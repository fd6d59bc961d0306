"""Side by side: what a checkpoint costs the training loop, written in place vs in the background.

The trainer saves the model and optimizer state after every evaluation (PACS: 18 times a run; ERM
ResNet-50 with Adam: 283 MB, fsync'd). `in_place` is `save_checkpoint` writing the file itself,
as the trainer did; `background` is the trainer's way since e081a09 (`BackgroundWrites`): the
loop serialises the state and a thread writes it. Reported: the seconds the caller waited, per
round, the two alternating; each background write is finished before the next save starts, so
the disk never holds two at once. The file goes to `--dir` (default: the current directory, as a
run's output folder would be on the same disk) and is removed at the end.

    python tools/bench_checkpoint.py [--backbone resnet50] [--device cpu|cuda] [--rounds 5]
        [--dir DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

import bench_algorithms  # tools/ is on sys.path when run as a script
import torch
from bench_data_pipeline import machine_info

from dgbench.atomic import BackgroundWrites, atomic_write_bytes
from dgbench.checkpoint import save_checkpoint
from dgbench.components import load_components

DOMAINS = 3
MODES = ("in_place", "background")


def caller_seconds(algorithm: Any, path: Path, rounds: int, device: torch.device) -> dict[str, list[float]]:
    """Per mode, the seconds `save_checkpoint` kept its caller, `rounds` times, alternating."""
    writes = BackgroundWrites()
    waited: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(rounds):
        for mode in MODES:
            write = writes.write if mode == "background" else atomic_write_bytes
            save = partial(save_checkpoint, path, algorithm, 0, write=write)
            (milliseconds,) = bench_algorithms.time_calls(save, 0, 1, device)
            waited[mode].append(milliseconds / 1e3)
            writes.wait()  # untimed: the next save starts on an idle disk
    return waited


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet50", help="a timm model name")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", default=".", help="where the checkpoint is written (then removed)")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    device = torch.device(args.device)
    load_components()
    backbone = {"arch": "timm", "name": args.backbone, "pretrained": False}
    algorithm = bench_algorithms.build("erm", backbone, DOMAINS, 2, device)
    algorithm.update(bench_algorithms.random_batches(DOMAINS, 2, 32, device))  # Adam's state exists
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench_checkpoint.") as folder:
        path = Path(folder) / "checkpoint.pt"
        waited = caller_seconds(algorithm, path, args.rounds, device)
        size_mb = path.stat().st_size / 1e6
    medians = {mode: statistics.median(seconds) for mode, seconds in waited.items()}
    report = {
        "machine": machine_info(args),
        "settings": {"backbone": args.backbone, "rounds": args.rounds, "dir": str(Path(args.dir).resolve())},
        "checkpoint_mb": round(size_mb, 1),
        "seconds": {mode: [round(s, 4) for s in seconds] for mode, seconds in waited.items()},
        "median_seconds": {mode: round(m, 4) for mode, m in medians.items()},
        "ratio": round(medians["in_place"] / medians["background"], 2),
    }
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
