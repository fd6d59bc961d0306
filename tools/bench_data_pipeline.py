"""Side by side on real PACS: training-batch images/s of the reference data pipeline vs the fast one.

reference: PIL decode + DomainBed's torchvision augmentation per image, in DataLoader workers, one
    loader per training domain, exactly as the trainer builds them (`SplitView` + `train_loader`,
    `--workers` per loader, default: the trainer's, `dgbench.data.pipeline.loader_workers`).
fast: the decoded-image cache (`dgbench.data.image_cache`, memory-mapped uint8 at 224 px) +
    row gathers + `batch_augment.augment_batch` on `--device` (`dgbench.data.fast.train_streams`).

Same augmentation distributions, same splits and sample indices per step, same batch (3 training
domains x 32). Each path runs in its own fresh process, so each peak-memory figure (RSS, PSS and
anonymous RSS summed over the process and its loader workers, sampled every 50 ms) is its own.
The cache is built (or opened) in a first process, timed separately: pass `--rebuild` to time a
build from scratch into a temporary cache folder (the first run of a sweep).

    python tools/bench_data_pipeline.py --root ../shared/datasets [--device cpu|cuda] [--steps 30]
        [--rebuild] [--json out.json]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads, as dgbench.cli.quiet_openmp
import argparse
import importlib.metadata
import json
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet, as the timm backbones
SEED = 0


def run_tool(main: Callable[[], None]) -> None:
    """Run a benchmark's `main`, ending a user error or a failed measured run in one line.

    A measured run is a child process that has already printed its own error (a missing dataset
    folder, a bad override); the parent's traceback on top of it only hides that line.
    """
    from dgbench.errors import DGBenchError

    tool = Path(sys.argv[0]).name
    try:
        main()
    except DGBenchError as error:
        raise SystemExit(f"{tool}: error: {error}") from None
    except subprocess.CalledProcessError as error:
        command = " ".join(map(str, error.cmd))
        raise SystemExit(
            f"{tool}: a measured run failed with exit status {error.returncode}; its error is above. "
            f"The run: {command}"
        ) from None


# ---------------------------------------------------------------- memory of a process tree


def _descendants(root: int) -> list[int]:
    """`root` and every live descendant (from /proc/*/stat parent ids)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def _memory_kb(pid: int) -> tuple[int, int, int]:
    """(RSS, anonymous RSS, PSS) of one process in KiB; zeros once it has exited."""
    fields: dict[str, int] = {}
    try:
        for name in (f"/proc/{pid}/status", f"/proc/{pid}/smaps_rollup"):
            with open(name) as f:
                for line in f:
                    key, _, value = line.partition(":")
                    if key in ("VmRSS", "RssAnon", "Pss"):
                        fields[key] = int(value.split()[0])
    except (OSError, ValueError):
        return 0, 0, 0
    return fields.get("VmRSS", 0), fields.get("RssAnon", 0), fields.get("Pss", 0)


SamplerT = TypeVar("SamplerT", bound="Sampler")


class Sampler:
    """Calls `_sample` every `interval` s on a thread while the `with` block runs, and once at its end."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self: SamplerT) -> SamplerT:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        raise NotImplementedError


class PeakMemory(Sampler):
    """Peaks of RSS, anonymous RSS and PSS summed over process `root` (default: this one) and its descendants.

    RSS double-counts pages shared by forked workers and counts mapped file pages (the cache's
    memory map, which the kernel can drop); PSS splits shared pages among their users; anonymous
    RSS is the memory nothing but this process tree can give back.
    """

    def __init__(self, root: int | None = None, interval: float = 0.05) -> None:
        super().__init__(interval)
        self.root = os.getpid() if root is None else root
        self.peak = {"rss_mb": 0.0, "anon_mb": 0.0, "pss_mb": 0.0}

    def _sample(self) -> None:
        totals = [sum(v) / 1024 for v in zip(*(_memory_kb(p) for p in _descendants(self.root)), strict=True)]
        for key, value in zip(self.peak, totals, strict=True):
            self.peak[key] = max(self.peak[key], round(value, 1))


# ---------------------------------------------------------------- the two pipelines (child processes)


def _dataset(root: Path) -> Any:
    from dgbench.data.folder import FolderDataset

    return FolderDataset(root / "PACS", "pacs")


def _setup(args: argparse.Namespace) -> tuple[Any, list[int], list[tuple[Any, Any]]]:
    from dgbench.data.splits import split_indices

    dataset = _dataset(Path(args.root))
    train_envs = [i for i, d in enumerate(dataset.domains) if d != args.test_env]
    splits = [split_indices(len(d), 0.2, SEED, i) for i, d in enumerate(dataset)]
    return dataset, train_envs, splits


def _reference_stream(args: argparse.Namespace, device: Any) -> tuple[Callable[[], int], int]:
    """One training step's batches from the trainer's reference loaders (returning the images delivered),
    and the workers per loader."""
    from dgbench.data.loaders import SplitView, train_loader
    from dgbench.data.pipeline import loader_workers
    from dgbench.data.transforms import train_transform
    from dgbench.hparams import seed_hash

    dataset, train_envs, splits = _setup(args)
    workers, _ = loader_workers(args.workers, dataset, len(train_envs))
    transform = train_transform(args.resolution, MEAN, STD, augment=True)
    pin = device.type == "cuda"
    loaders = [
        iter(
            train_loader(
                SplitView(dataset[i], splits[i][1], transform),
                args.batch,
                seed_hash(SEED, i),
                0,
                workers,
                pin,
            )
        )
        for i in train_envs
    ]

    def step() -> int:
        batches = [next(it)[0].to(device, non_blocking=True) for it in loaders]
        return sum(len(x) for x in batches)

    return step, workers


def _fast_stream(
    args: argparse.Namespace, device: Any, augment: bool = True
) -> tuple[Callable[[], int], float]:
    """One training step's batches from the fast pipeline, and the seconds to open the cache."""
    from dgbench.data import fast
    from dgbench.data.image_cache import attach_arrays
    from dgbench.hparams import seed_hash

    dataset, train_envs, splits = _setup(args)
    start = time.perf_counter()
    attach_arrays(dataset, args.resolution, skip_corrupt=False, progress=False)
    opened = time.perf_counter() - start
    streams: list[Iterator[Any]] = fast.train_streams(
        [fast.FastSplit(dataset[i], splits[i][1], device) for i in train_envs],
        args.batch,
        [seed_hash(SEED, i) for i in train_envs],
        0,
        args.resolution,
        MEAN,
        STD,
        augment,
    )

    def step() -> int:
        return sum(len(next(s)[0]) for s in streams)

    return step, opened


def _timed(step: Callable[[], int], args: argparse.Namespace, device: Any) -> dict[str, float]:
    """images/s over `--steps` steps after `--warmup` (worker start-up and first batches excluded)."""
    import torch

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(args.warmup):
        step()
    sync()
    start, images = time.perf_counter(), 0
    for _ in range(args.steps):
        images += step()
    sync()
    seconds = time.perf_counter() - start
    return {"images": images, "seconds": round(seconds, 3), "images_per_s": round(images / seconds, 1)}


def _run_phase(args: argparse.Namespace) -> dict[str, Any]:
    """The work of one child process; its result is printed as the last line of its stdout."""
    import torch

    device = torch.device(args.device)
    with PeakMemory() as memory:
        if args.phase == "build":
            result = _build_cache(args)
        elif args.phase == "reference":
            step, workers = _reference_stream(args, device)
            result = {**_timed(step, args, device), "workers": workers}
        else:
            step, opened = _fast_stream(args, device)
            result = {**_timed(step, args, device), "cache_open_s": round(opened, 3)}
            # The same batches without augmentation (gather + normalise): what the cache side costs.
            plain = _timed(_fast_stream(args, device, augment=False)[0], args, device)
            result["no_augment_images_per_s"] = plain["images_per_s"]
    return {**result, "peak_memory": memory.peak}


def _build_cache(args: argparse.Namespace) -> dict[str, Any]:
    """Build the cache (or find it built): seconds, bytes, and whether anything was decoded."""
    from dgbench.data.cpu_workers import available_cores
    from dgbench.data.folder import manifest_fingerprint
    from dgbench.data.image_cache import attach_arrays, cache_key, cache_path

    dataset = _dataset(Path(args.root))
    version = manifest_fingerprint(dataset.manifest)
    paths = [
        cache_path(
            d.name, dataset.name, args.resolution, cache_key(d, dataset.name, version, args.resolution)
        )
        for d in dataset
    ]
    existed = all(p.exists() for p in paths)
    start = time.perf_counter()
    attach_arrays(dataset, args.resolution, skip_corrupt=False, progress=None)
    return {
        "built": not existed,
        "seconds": round(time.perf_counter() - start, 2),
        "images": sum(len(d) for d in dataset),
        "bytes": sum(p.stat().st_size for p in paths),
        "pool_workers": available_cores(),
        "folder": str(paths[0].parent),
    }


# ---------------------------------------------------------------- orchestration


def _child(phase: str, args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    forwarded = [
        f"--{k.replace('_', '-')}={v}"
        for k, v in vars(args).items()
        if k not in ("json", "phase", "rebuild") and v is not None
    ]
    command = [sys.executable, __file__, f"--phase={phase}", *forwarded]
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info(args: argparse.Namespace) -> dict[str, Any]:
    import numpy
    import PIL
    import torch
    import torchvision

    from dgbench.data.cpu_workers import available_cores

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), "?")
    info = {
        "cpu": cpu,
        "cores": available_cores(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pillow": PIL.__version__,
        "numpy": numpy.__version__,
        "numba": _version("numba"),  # the compiled CPU augmentation
        "torch_threads": torch.get_num_threads(),
    }
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _report(result: dict[str, Any]) -> str:
    ref, fast, build, s = result["reference"], result["fast"], result["cache_build"], result["settings"]
    m = result["machine"]
    lines = [
        f"machine: {m['cpu']}, {m['cores']} usable cores, load average before the run {m['load_average']}"
        + (f", {m['gpu']}" if "gpu" in m else ""),
        f"python {m['python']}, torch {m['torch']}, torchvision {m['torchvision']}, Pillow {m['pillow']}, "
        f"numpy {m['numpy']}, numba {m['numba']}, torch threads {m['torch_threads']}",
        f"PACS, training domains = all but {s['test_env']}, {s['domains']} x {s['batch']} images per step at "
        f"{s['resolution']} px, DomainBed augmentation, device {s['device']}, {s['steps']} timed steps after "
        f"{s['warmup']}, reference DataLoader workers {ref['workers']} per loader",
        f"cache: {'built' if build['built'] else 'already built'} in {build['seconds']:.1f} s "
        f"({build['images']} images, {build['bytes'] / 1e9:.2f} GB, pool of {build['pool_workers']}; "
        f"peak RSS {build['peak_memory']['rss_mb']:.0f} MB, PSS {build['peak_memory']['pss_mb']:.0f} MB); "
        f"opened by the fast run in "
        f"{fast['cache_open_s'] * 1000:.0f} ms",
        "",
        f"{'':>22} {'reference':>12} {'fast':>12} {'ratio':>8}",
        f"{'images/s':>22} {ref['images_per_s']:>12.1f} {fast['images_per_s']:>12.1f} "
        f"{fast['images_per_s'] / ref['images_per_s']:>7.2f}x",
    ]
    lines.append(
        f"{'fast, no augmentation':>22} {'':>12} {fast['no_augment_images_per_s']:>12.1f}"
        "   (row gathers from the cache + normalisation only)"
    )
    for key, label in (("rss_mb", "peak RSS MB"), ("pss_mb", "peak PSS MB"), ("anon_mb", "peak anon RSS MB")):
        a, b = ref["peak_memory"][key], fast["peak_memory"][key]
        lines.append(f"{label:>22} {a:>12.0f} {b:>12.0f} {b / a if a else float('nan'):>7.2f}x")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="../shared/datasets", help="data root holding PACS/")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--test-env", default="sketch", help="the held-out domain (3 training domains)")
    parser.add_argument("--batch", type=int, default=32, help="images per training domain per step")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--workers", type=int, help="reference workers per loader (default: the trainer's)")
    parser.add_argument(
        "--rebuild", action="store_true", help="time a cache build from scratch (temp folder)"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--phase", choices=["build", "reference", "fast"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(_run_phase(args)))
        return

    machine = machine_info(args)  # the load average before this benchmark adds its own
    env = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="dgbench-bench-cache-") as scratch:
        if args.rebuild:
            env["DGBENCH_CACHE"] = scratch
        build = _child("build", args, env)
        reference = _child("reference", args, env)
        fast = _child("fast", args, env)
    result = {
        "machine": machine,
        "settings": {
            "dataset": "PACS",
            "root": str(Path(args.root).resolve()),
            "test_env": args.test_env,
            "domains": 3,
            "batch": args.batch,
            "resolution": args.resolution,
            "device": args.device,
            "steps": args.steps,
            "warmup": args.warmup,
            "workers": args.workers,  # None: the trainer's default, `reference.workers`
        },
        "cache_build": build,
        "reference": reference,
        "fast": fast,
        "ratio_images_per_s": round(fast["images_per_s"] / reference["images_per_s"], 2),
    }
    print(_report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    run_tool(main)
