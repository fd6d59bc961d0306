"""Start-up cost of indexing a DomainNet-sized folder tree: uncached walk vs cached load.

Why: DomainNet has 586,575 images in `<domain>/<class>/<file>`, and walking them in ImageFolder
order on every start dominates start-up; `dgbench.data.index_cache` caches the index. This builds
a synthetic tree of empty files with DomainNet's per-domain counts (spread evenly over its 345
classes), then times the first start (walk + write the cache), the second start (cached load),
the cache key alone, and the walk over class folders with a thread pool of several sizes (which
is why `index_cache` walks serially: see the figures in its `_walk` docstring).

    python tools/bench_index.py --scale 0.1          # ~59k files, a quick try
    python tools/bench_index.py                      # full size, 586,575 files
    python tools/bench_index.py --dir /tmp/dn --keep # create once, reuse with --dir /tmp/dn

The tree is read warm (just created, so in the OS page cache): a cold disk or a network file
system makes the uncached walk slower still, and the cached load hardly changes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from dgbench.data import index_cache
from dgbench.data.folder import list_class_files, load_manifest

# DomainNet per-domain image counts (DomainBed layout, cleaned lists; clipart 48,129).
DOMAIN_COUNTS = {
    "clipart": 48129,
    "infograph": 51605,
    "painting": 72266,
    "quickdraw": 172500,
    "real": 172947,
    "sketch": 69128,
}
N_CLASSES = 345


def class_names() -> list[str]:
    """The real 345 DomainNet class names when the manifest is available (realistic id lengths)."""
    for name in ("domainnet", "domain_net"):
        try:
            classes = load_manifest(name).get("classes") or []
        except Exception:  # the manifest is optional here: any failure means synthetic names
            continue
        if len(classes) == N_CLASSES:
            return list(classes)
    return [f"class_{i:03d}" for i in range(N_CLASSES)]


def per_class_counts(total: int, n_classes: int) -> list[int]:
    """`total` spread evenly, the remainder going to the first classes; at least one file per class."""
    base, extra = divmod(max(total, n_classes), n_classes)
    return [base + (i < extra) for i in range(n_classes)]


def create_tree(dataset_dir: Path, classes: list[str], scale: float) -> int:
    """Empty `.jpg` files named like DomainNet's (`<domain>_<class id>_<n>.jpg`); returns their number."""
    n = 0
    for domain, count in DOMAIN_COUNTS.items():
        for ci, (cls, k) in enumerate(
            zip(classes, per_class_counts(round(count * scale), len(classes)), strict=True)
        ):
            folder = dataset_dir / domain / cls
            folder.mkdir(parents=True, exist_ok=True)
            for j in range(k):
                os.close(os.open(folder / f"{domain}_{ci:03d}_{j:06d}.jpg", os.O_CREAT | os.O_WRONLY, 0o644))
            n += k
    return n


def walk_threaded(dataset_dir: Path, domains: list[str], classes: list[str], workers: int) -> int:
    """The uncached walk with `workers` threads over (domain, class) folders (1: `build_index` itself)."""
    if workers <= 1:
        return sum(len(ids) for ids, _ in index_cache.build_index(dataset_dir, domains, classes).values())
    jobs = [(dataset_dir / d, c) for d in domains for c in classes]
    with ThreadPoolExecutor(workers) as pool:
        return sum(len(files) for files in pool.map(lambda job: list_class_files(*job), jobs))


def timed(fn: Callable[[], Any], repeat: int = 1) -> tuple[float, Any]:
    """Median wall time of `repeat` calls, and the last result."""
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def same_index(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(a[d][0] == b[d][0] and np.array_equal(a[d][1], b[d][1]) for d in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of DomainNet's file count")
    parser.add_argument(
        "--dir", type=Path, help="folder holding (or to hold) the tree; reused, never deleted"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary tree and cache")
    parser.add_argument("--workers", default="1,2,4", help="thread counts to time the uncached walk with")
    parser.add_argument("--repeat", type=int, default=5, help="runs of the cached load (median)")
    args = parser.parse_args()

    base = args.dir or Path(tempfile.mkdtemp(prefix="dgbench-bench-index-", dir="/tmp"))
    dataset_dir, cache = base / "domain_net", base / "cache"
    domains, classes = list(DOMAIN_COUNTS), class_names()
    try:
        if dataset_dir.is_dir():
            print(f"reusing the tree in {dataset_dir}")
        else:
            seconds, n = timed(lambda: create_tree(dataset_dir, classes, args.scale))
            print(f"created {n:,} empty files in {dataset_dir} in {seconds:.1f}s")
        print(f"cpus: {os.cpu_count()}")

        key_s, _ = timed(lambda: index_cache.index_key(dataset_dir, domains, classes, version="bench"), 5)
        for workers in (int(w) for w in args.workers.split(",")):
            walk_s, _ = timed(lambda w=workers: walk_threaded(dataset_dir, domains, classes, w), 2)
            print(f"uncached walk, {workers} thread(s): {walk_s:7.3f} s")

        shutil.rmtree(cache, ignore_errors=True)
        run = lambda: index_cache.index_domains(dataset_dir, domains, classes, version="bench", cache=cache)  # noqa: E731
        first_s, first = timed(run)
        second_s, second = timed(run, args.repeat)
        files = sum(len(ids) for ids, _ in first.values())
        size = sum(p.stat().st_size for p in (cache / "index").glob("*.npz"))
        assert same_index(first, second), "cached index differs from the walked one"

        print(f"files:                          {files:,}")
        print(f"cache key ({1 + len(domains) * (1 + len(classes)):,} stats):       {key_s * 1e3:7.1f} ms")
        print(f"first start (walk + write):     {first_s:7.3f} s")
        print(f"second start (cached load):     {second_s:7.3f} s   (median of {args.repeat})")
        print(f"ratio first/second:             {first_s / second_s:7.1f}x")
        print(f"cache file:                     {size / 2**20:7.1f} MiB")
    finally:
        if args.dir is None and not args.keep:
            shutil.rmtree(base, ignore_errors=True)
        elif args.dir is None:
            print(f"kept {base} (reuse it with --dir {base})")


if __name__ == "__main__":
    main()
