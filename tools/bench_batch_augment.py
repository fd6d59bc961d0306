"""Side-by-side: DomainBed's training augmentation per sample (PIL, `TrainTransform`) vs batched.

Both paths get the same uint8 images: the reference as PIL images, one `TrainTransform` call
each plus the collate `torch.stack`; the batched path as one uint8 (B, H, W, 3) tensor on the
CPU, through `sample_params` + `augment_batch` (on --device; for cuda the timing includes
the host-to-device copy of the uint8 batch and a synchronize). On CPU, `augment_batch` is the
compiled implementation (`dgbench.data.cpu_augment`); the column "tensor ops" times the
accelerators' implementation (`batch_augment._augment_tensors`) on the same CPU, for comparison.

    python tools/bench_batch_augment.py [--device cpu|cuda] [--batch 96] [--threads N]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads, as dgbench.cli.quiet_openmp
import argparse
import time
from collections.abc import Callable

import torch
from PIL import Image

from dgbench.data.batch_augment import _augment_tensors, augment_batch, sample_params
from dgbench.data.transforms import TrainTransform

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CASES = ((32, 32), (224, 224), (256, 224))  # (source size, resolution)


def images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth random uint8 (B, size, size, 3) images (upsampled noise, like photos more than noise is)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(batch, 3, max(2, size // 8), max(2, size // 8), generator=g)
    x = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Best of `repeats` timings of fn (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave as is)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device={name} torch_threads={torch.get_num_threads()} batch={args.batch}")
    on_cpu = device.type == "cpu"
    print(
        f"{'source->res':>12} {'PIL per-sample':>16} {'batched':>14} {'ratio':>7}"
        + (f" {'tensor ops':>14} {'batched/tensor ops':>19}" if on_cpu else "")
    )
    for size, resolution in CASES:
        batch = images(args.batch, size)
        pil = [Image.fromarray(a.numpy()) for a in batch]
        transform = TrainTransform(resolution, MEAN, STD)
        g = torch.Generator().manual_seed(1)

        def reference(pil=pil, transform=transform, g=g) -> torch.Tensor:
            return torch.stack([transform(im, g) for im in pil])

        def batched(batch=batch, size=size, resolution=resolution, g=g) -> torch.Tensor:
            params = sample_params(len(batch), size, size, g)
            return augment_batch(batch.to(device, non_blocking=True), params, resolution, MEAN, STD)

        def tensor_ops(batch=batch, size=size, resolution=resolution, g=g) -> torch.Tensor:
            return _augment_tensors(batch, sample_params(len(batch), size, size, g), resolution, MEAN, STD)

        ref_ips = args.batch / seconds(reference, torch.device("cpu"), args.repeats)
        new_ips = args.batch / seconds(batched, device, args.repeats)
        case = f"{size}->{resolution}"
        line = f"{case:>12} {ref_ips:11.0f} im/s {new_ips:9.0f} im/s {new_ips / ref_ips:6.1f}x"
        if on_cpu:
            ops_ips = args.batch / seconds(tensor_ops, device, args.repeats)
            line += f" {ops_ips:9.0f} im/s {new_ips / ops_ips:18.1f}x"
        print(line)


if __name__ == "__main__":
    main()
