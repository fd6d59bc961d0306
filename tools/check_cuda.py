"""GPU checks of every algorithm and of the trainer's mixed-precision settings (needs CUDA).

1. Every registered algorithm, and ERM on the GMoE backbone, takes `--steps` updates on the GPU
   under the trainer's settings (bf16 autocast, channels_last): on timm's resnet18 (random init,
   BatchNorm training) at `--resolution` px, or on the algorithm's own small backbone when it
   needs one. Checked: every metric finite, `predict` finite in eval mode, the parameters moved.
   Reported: median ms per step, peak GPU memory, and the host syncs one update makes (each op
   that makes the host wait for the GPU, counted by CUDA's sync debug mode): a step that syncs
   cannot queue its kernels ahead of the GPU.
2. ERM on ResNet-50 at 224 px, 3 domains x 32 images (DomainBed's shape), side by side in one
   process: fp32, bf16 autocast, bf16 autocast + channels_last; median ms per step and ratio to fp32.

    python tools/check_cuda.py [--json out.json] [--resolution 64] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import traceback
import warnings
from typing import Any

import bench_algorithms  # tools/ is on sys.path when run as a script
import torch

from dgbench.components import load_components
from dgbench.registry import ALGORITHMS

DOMAINS = 3
DEVICE = torch.device("cuda")  # --device cpu: a smoke test of this script without a GPU


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def reset_peak() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if DEVICE.type == "cuda" else float("nan")


RESNET18 = {"arch": "timm", "name": "resnet18", "pretrained": False, "bn": "train"}
GMOE = {
    "arch": "gmoe",
    "name": "test_vit",
    "pretrained": False,
    "kwargs": {"img_size": 64, "patch_size": 8, "dynamic_img_size": True},
}


def build(name: str, backbone: dict[str, Any], batch: int) -> Any:
    """`bench_algorithms.build` on `DEVICE`, with a run long enough for short schedules to switch."""
    algorithm = bench_algorithms.build(name, backbone, DOMAINS, batch, DEVICE)
    algorithm.total_steps = 4  # short schedules: UDIM's warm-up and DomainDrop's LR step happen
    return algorithm


def update(algorithm: Any, data: list, amp: bool = True) -> dict:
    """One update as the trainer runs it on CUDA: under bf16 autocast unless `amp` is off."""
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=amp):
        return algorithm.update(data)


def timed_updates(algorithm: Any, data: list, steps: int, amp: bool) -> tuple[list[float], list[dict]]:
    """Milliseconds of each of `steps` updates (synchronized on CUDA) and their metrics."""
    metrics: list[dict] = []
    times = bench_algorithms.time_calls(
        lambda: metrics.append(update(algorithm, data, amp)), 0, steps, DEVICE
    )
    return times, metrics


def syncs_per_update(algorithm: Any, data: list) -> int | None:
    """How many times one update makes the host wait for the GPU; None off CUDA."""
    if DEVICE.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            update(algorithm, data)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    synchronize()
    return sum("synchroniz" in str(w.message) for w in caught)


def check_algorithm(name: str, backbone: dict[str, Any], resolution: int, batch: int, steps: int) -> dict:
    reset_peak()
    need = ALGORITHMS.get(name).obj.backbone_need
    if need is not None and backbone is RESNET18:
        backbone = need.default_for(resolution)
    algorithm = build(name, backbone, batch).to(DEVICE, memory_format=torch.channels_last).train()
    before = [p.detach().clone() for p in algorithm.parameters() if p.requires_grad]
    data = bench_algorithms.random_batches(DOMAINS, batch, resolution, DEVICE, torch.channels_last)
    times, metrics = timed_updates(algorithm, data, steps, amp=True)
    syncs = syncs_per_update(algorithm, data)
    moved = any(
        not torch.equal(b, p.detach())
        for b, p in zip(before, [p for p in algorithm.parameters() if p.requires_grad], strict=True)
    )
    algorithm.eval()
    with torch.no_grad(), torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        logits = algorithm.predict(data[0][0])
    finite = all(math.isfinite(float(v)) for m in metrics for v in m.values())
    return {
        "backbone": getattr(algorithm.featurizer, "name", "?"),
        "ok": bool(finite and moved and torch.isfinite(logits.float()).all()),
        "metrics_finite": finite,
        "parameters_moved": moved,
        "predict_finite": bool(torch.isfinite(logits.float()).all()),
        "loss": [round(float(m["loss"]), 4) for m in metrics],
        "ms_per_step": round(statistics.median(times[1:] or times), 2),
        "peak_gib": peak_gib(),
        "syncs_per_update": syncs,
    }


def precision_ratios(steps: int) -> dict[str, Any]:
    """ERM ResNet-50 224 px, 3 x 32: fp32 vs bf16 vs bf16 + channels_last, one process."""
    rows = {}
    settings = {
        "fp32": (False, torch.contiguous_format),
        "bf16": (True, torch.contiguous_format),
        "bf16+channels_last": (True, torch.channels_last),
    }
    for label, (amp, memory_format) in settings.items():
        torch.backends.cudnn.benchmark = True
        algorithm = build(
            "erm", {"arch": "timm", "name": "resnet50", "pretrained": False, "bn": "frozen"}, 32
        )
        algorithm = algorithm.to(DEVICE, memory_format=memory_format).train()
        data = bench_algorithms.random_batches(DOMAINS, 32, 224, DEVICE, memory_format)
        timed_updates(algorithm, data, 5, amp)  # warm-up, cudnn autotuning
        reset_peak()
        times, _ = timed_updates(algorithm, data, steps, amp)
        rows[label] = {
            "ms_per_step": round(statistics.median(times), 2),
            "images_per_s": round(3 * 32 / (statistics.median(times) / 1e3), 1),
            "peak_gib": peak_gib(),
        }
        del algorithm
    base = rows["fp32"]["ms_per_step"]
    for row in rows.values():
        row["speedup_vs_fp32"] = round(base / row["ms_per_step"], 2)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="", help="also write the results here")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16, help="images per domain in the algorithm checks")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cuda", help="cpu: a smoke test of the script itself")
    parser.add_argument("--skip-resnet50", action="store_true")
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("check_cuda needs a CUDA device (or --device cpu for a smoke test)")
    load_components()
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if DEVICE.type == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "settings": vars(args),
        "algorithms": {},
    }
    cases = [(name, RESNET18) for name in ALGORITHMS.names()] + [("erm", GMOE)]
    for name, backbone in cases:
        label = name if backbone is RESNET18 else f"{name} (gmoe)"
        try:
            row = check_algorithm(name, backbone, args.resolution, args.batch, args.steps)
        except Exception as error:  # report every algorithm, then fail at the end
            row = {
                "ok": False,
                "error": f"{type(error).__name__}: {error}",
                "trace": traceback.format_exc()[-1500:],
            }
        report["algorithms"][label] = row
        status = "ok" if row["ok"] else "FAILED " + row.get("error", "")
        print(
            f"{label:<14} {row.get('backbone', ''):<16} {row.get('ms_per_step', '')!s:>8} ms "
            f"{row.get('peak_gib', '')!s:>7} GiB {row.get('syncs_per_update', '')!s:>4} syncs  {status}",
            flush=True,
        )
    if not args.skip_resnet50:
        report["resnet50_224"] = precision_ratios(args.steps * 4)
        print(json.dumps(report["resnet50_224"], indent=1))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=1)
    failed = [label for label, row in report["algorithms"].items() if not row["ok"]]
    if failed:
        raise SystemExit(f"failed on CUDA: {', '.join(failed)}")


if __name__ == "__main__":
    main()
