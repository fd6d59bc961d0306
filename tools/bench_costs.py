"""What GMoE, DomainDrop and PEGO cost next to ERM on the same backbone, measured side by side.

Each pair shares the backbone, the random batches and the step count; each measurement runs in
its own subprocess, so peak memory is the measurement's own (CUDA: max allocated; CPU: peak
resident set of the process, which includes the interpreter and libraries, ~0.4 GiB).

- GMoE is a backbone: ERM on the dense ViT against ERM on the same ViT with sparse-MoE blocks.
- DomainDrop and PEGO are algorithms: ERM against them on their own backbone.
- Parameter counts: GMoE on DeiT-S/16 (the paper's ≈34 M) and PEGO's trainable LoRA factors.

    python tools/bench_costs.py                      # 32-px test models, CPU-sized
    python tools/bench_costs.py --scale paper        # the papers' backbones at 224 px (GPU)
    python tools/bench_costs.py --json costs.json    # also write the figures
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
from typing import Any

import torch
from bench_algorithms import build, time_steps  # tools/ is on sys.path when run as a script

from dgbench.backbones import build_backbone
from dgbench.components import load_components

SMALL_VIT = {"arch": "timm", "name": "test_vit", "kwargs": {"img_size": 32, "patch_size": 4}}
SCALES: dict[str, dict[str, Any]] = {
    "small": {
        "resolution": 32,
        "batch": 16,
        "vit": SMALL_VIT,
        "gmoe": {**SMALL_VIT, "arch": "gmoe"},
        "resnet": {"arch": "timm", "name": "test_resnet", "bn": "train"},
        "clip": SMALL_VIT,
    },
    "paper": {
        "resolution": 224,
        "batch": 32,
        "vit": {"arch": "timm", "name": "deit_small_patch16_224", "kwargs": {"drop_path_rate": 0.1}},
        "gmoe": {"arch": "gmoe", "name": "deit_small_patch16_224"},
        "resnet": {"arch": "timm", "name": "resnet18", "bn": "train"},
        "clip": {"arch": "timm", "name": "vit_base_patch16_clip_quickgelu_224", "projection": True},
    },
}
PAIRS = [  # (row, baseline (algorithm, backbone key), measured (algorithm, backbone key))
    ("GMoE", ("erm", "vit"), ("erm", "gmoe")),
    ("DomainDrop", ("erm", "resnet"), ("domaindrop", "resnet")),
    ("PEGO", ("erm", "clip"), ("pego", "clip")),
]


def measure(algorithm: str, backbone: dict[str, Any], args: argparse.Namespace) -> dict[str, float]:
    """Run in a fresh process: median ms/step and peak memory of `algorithm` on `backbone`."""
    device = torch.device(args.device)
    load_components()
    model = build(algorithm, {**backbone, "pretrained": False}, args.domains, args.batch, device)
    g = torch.Generator().manual_seed(0)
    shape = (args.batch, 3, args.resolution, args.resolution)
    batches = [
        [
            (
                torch.randn(shape, generator=g).to(device),
                torch.randint(0, 7, (args.batch,), generator=g).to(device),
            )
        ]
        * args.domains
        for _ in range(2)
    ]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = time_steps(model, batches, args.warmup, args.steps, device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    return {"ms_per_step": statistics.median(times), "peak_gib": peak}


def in_subprocess(algorithm: str, backbone: dict[str, Any], args: argparse.Namespace) -> dict[str, float]:
    command = [sys.executable, __file__, "--worker", json.dumps([algorithm, backbone]), *forwarded(args)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def forwarded(args: argparse.Namespace) -> list[str]:
    keys = ("device", "resolution", "batch", "domains", "warmup", "steps")
    return [f"--{key}={getattr(args, key)}" for key in keys]


def parameter_counts() -> dict[str, int]:
    """GMoE on DeiT-S/16 against the dense model, and PEGO's trainable parameters (N = 2, 4)."""
    from dgbench.algorithms.pego import PEGO, PEGOHParams

    dense = build_backbone({"arch": "timm", "name": "deit_small_patch16_224"})
    gmoe = build_backbone({"arch": "gmoe", "name": "deit_small_patch16_224"})
    counts = {
        "deit_small_dense": sum(p.numel() for p in dense.parameters()),
        "gmoe_deit_small": sum(p.numel() for p in gmoe.parameters()),
    }
    for n in (2, 4):
        clip = build_backbone(SCALES["paper"]["clip"])
        pego = PEGO(clip, 7, 3, PEGOHParams(name="pego", num_lora=n))
        lora = sum(
            p.numel() for name, p in pego.named_parameters() if p.requires_grad and "classifier" not in name
        )
        counts[f"pego_lora_trainable_n{n}"] = lora
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None, help="images per domain")
    parser.add_argument("--domains", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    scale = SCALES[args.scale]
    args.resolution = args.resolution or scale["resolution"]
    args.batch = args.batch or scale["batch"]
    if args.worker:
        algorithm, backbone = json.loads(args.worker)
        print(json.dumps(measure(algorithm, backbone, args)))
        return

    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(
        f"{where}, torch {torch.__version__}, python {platform.python_version()}; scale {args.scale}: "
        f"{args.resolution}px, {args.domains} domains x {args.batch} images, {args.warmup} warm-up + "
        f"{args.steps} timed steps; memory = {'max allocated' if args.device == 'cuda' else 'peak RSS'}"
    )
    rows = []
    print(f"{'method':<12}{'backbone':<44}{'ms/step':>9}{'x ERM':>7}{'GiB':>7}{'x ERM':>7}")
    for label, (base_alg, base_key), (alg, key) in PAIRS:
        base = in_subprocess(base_alg, scale[base_key], args)
        cost = in_subprocess(alg, scale[key], args)
        time_ratio, memory_ratio = (
            cost["ms_per_step"] / base["ms_per_step"],
            cost["peak_gib"] / base["peak_gib"],
        )
        for name, result, ratio_t, ratio_m in (
            ("ERM", base, 1.0, 1.0),
            (label, cost, time_ratio, memory_ratio),
        ):
            backbone = scale[base_key if name == "ERM" else key]
            shown = f"{backbone['arch']}:{backbone['name']}"
            print(
                f"{name:<12}{shown:<44}{result['ms_per_step']:>9.1f}{ratio_t:>7.2f}"
                f"{result['peak_gib']:>7.2f}{ratio_m:>7.2f}"
            )
        rows.append({"method": label, "erm": base, "method_cost": cost, "time_x_erm": time_ratio,
                     "memory_x_erm": memory_ratio})  # fmt: skip
    counts = parameter_counts()
    extra = counts["gmoe_deit_small"] - counts["deit_small_dense"]
    print(
        f"parameters: DeiT-S/16 {counts['deit_small_dense'] / 1e6:.2f} M, GMoE-S/16 "
        f"{counts['gmoe_deit_small'] / 1e6:.2f} M (+{extra / 1e6:.2f} M; reference: ~34 M, +~12.0 M); "
        f"PEGO trainable LoRA on CLIP ViT-B/16: N=2 {counts['pego_lora_trainable_n2']:,}, "
        f"N=4 {counts['pego_lora_trainable_n4']:,} (reference: 294,912 and 589,824)"
    )
    if args.json:
        settings = {
            k: getattr(args, k) for k in ("scale", "device", "resolution", "batch", "domains", "steps")
        }
        payload = {"machine": where, "torch": torch.__version__, "settings": settings, "rows": rows,
                   "parameters": counts}  # fmt: skip
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2)


if __name__ == "__main__":
    main()
