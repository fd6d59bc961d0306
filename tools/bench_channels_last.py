"""Side by side on the CPU: ERM steps and evaluation in the default (NCHW) memory format vs channels_last.

`trainer.channels_last` decides the model's and the batches' memory format. oneDNN's CPU
convolutions prefer channels-last; whether that pays depends on the backbone, so this measures
each one the trainer offers: the same ERM model (same seed), the same random batches (3 domains x
`--batch`), `--repeats` rounds alternating the two formats, each round one untimed step, then
`--steps` timed training steps and one timed evaluation forward of `--eval-batch` images under
`torch.inference_mode`. Reported: the median seconds of each and the ratio NCHW / channels_last
(above 1: channels_last is faster).

    python tools/bench_channels_last.py [--backbones resnet18,resnet50,efficientnet_lite0,small_cnn]
        [--resolution 224] [--batch 32] [--steps 2] [--repeats 2] [--json out.json]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads, as dgbench.cli.quiet_openmp
import argparse
import json
import time
from functools import partial
from pathlib import Path
from typing import Any

import bench_algorithms  # tools/ is on sys.path when run as a script
import torch
from bench_data_pipeline import machine_info
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from dgbench.cli import conf_dir
from dgbench.components import load_components

DOMAINS = 3
CPU = torch.device("cpu")
FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def backbone_config(name: str) -> Any:
    """The backbone the trainer builds for `backbone=<name>` (Hydra preset), with random weights."""
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[f"backbone={name}", "backbone.pretrained=false"])
    return OmegaConf.to_object(cfg.backbone)


def one_round(backbone: Any, args: argparse.Namespace, label: str) -> tuple[float, float]:
    """(seconds per training step, seconds per evaluation forward) of one fresh model in `FORMATS[label]`."""
    memory_format = FORMATS[label]
    algorithm = bench_algorithms.build("erm", backbone, DOMAINS, args.batch, CPU)
    algorithm.to(memory_format=memory_format)
    data = bench_algorithms.random_batches(DOMAINS, args.batch, args.resolution, CPU, memory_format)
    algorithm.update(data)  # untimed: first-call allocations and kernel selection
    step = sum(bench_algorithms.time_steps(algorithm, [data], 0, args.steps, CPU)) / args.steps / 1e3
    images = torch.randn(args.eval_batch, 3, args.resolution, args.resolution).contiguous(
        memory_format=memory_format
    )
    algorithm.eval()
    with torch.inference_mode():
        algorithm.predict(images[:2])
        start = time.perf_counter()
        algorithm.predict(images)
        evaluation = time.perf_counter() - start
    return step, evaluation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default="resnet18,resnet50,efficientnet_lite0,small_cnn")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32, help="images per training domain")
    parser.add_argument("--eval-batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2, help="timed training steps per round")
    parser.add_argument("--repeats", type=int, default=2, help="rounds per format, alternating")
    parser.add_argument("--json", default="", help="also write the results here")
    args = parser.parse_args()
    load_components()
    report: dict[str, Any] = {
        "machine": machine_info(argparse.Namespace(device="cpu")),
        "settings": vars(args),
        "backbones": {},
    }
    print(
        f"{DOMAINS} x {args.batch} images at {args.resolution} px, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    for name in args.backbones.split(","):
        backbone = backbone_config(name)
        times = bench_algorithms.alternating_rounds(
            list(FORMATS), args.repeats, partial(one_round, backbone, args)
        )
        row = bench_algorithms.median_row(times, ("step", "eval"), digits=3)
        report["backbones"][name] = row
        nchw, last = row["nchw"], row["channels_last"]
        print(
            f"{name:20s} train step {nchw['step_s']:7.3f} s vs {last['step_s']:7.3f} s "
            f"({row['ratio_step']:.2f}x)   eval {args.eval_batch} images {nchw['eval_s']:7.3f} s vs "
            f"{last['eval_s']:7.3f} s ({row['ratio_eval']:.2f}x)",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
