"""Decoded-image cache: each domain of a folder dataset decoded once into a memory-mapped uint8 array.

`data.pipeline=fast` gathers whole minibatches from one uint8 array per domain (`DomainData.arrays`,
N x R x R x 3). For folder datasets that array is built here, once per dataset, resolution and file
state, and every run of a sweep then opens it as a read-only memory map (PACS: ~0.2 s for the four
domains, mostly the per-file stats of the key and the sampled-row hashes): no image is decoded
again, and processes running side by side share one copy in the page cache.

What a row holds: the file decoded by `folder.read_image` (PIL, converted to RGB) and resized to
R x R with PIL's bilinear filter: exactly what the reference eval transform does before
`to_tensor` (`TF.resize(image, [R, R], antialias=True)` calls `PIL.Image.resize(..., BILINEAR)`
on a PIL image). With R the training resolution (the default), evaluation from the cache equals the
reference pipeline bit for bit; training crops are then taken from this R x R image instead of the
original file (see `dgbench.data.fast` for what that changes).

Files: `cache_dir()/images/<dataset>/<domain>-<R>px-<key>.npy` (numpy's .npy format, written with
`np.lib.format.open_memmap`) and a JSON sidecar `<same name>.json`. The key hashes
`FORMAT_VERSION`, the dataset name, the manifest fingerprint (name, dir, version, domains,
classes), the domain, R, the resize method, the Pillow version and, in index order, every image's
(relative path, size, mtime): replacing, adding, removing or touching any file gives a new key.
One os.stat per image (~10k for PACS, 586k for DomainNet) is the cost of that certainty. The
dataset root is not part of the key: a copy with the same files and mtimes shares the cache.

Build: a process pool sized to the usable cores decodes chunks of `CHUNK` images; workers write
their rows straight into the memory-mapped temp file `.<name>.<pid>.tmp` (space reserved first, so a
full disk fails cleanly instead of killing a worker with SIGBUS). Once every row is written and
fsynced, the sidecar is written atomically and the temp file renamed onto the final name: a build
that is killed leaves no `.npy`, only a temp file that the next build of that name deletes. One
build per dataset at a time (an exclusive `flock`): parallel runs of a sweep wait for the first
builder and then open its file.

Load: the sidecar must name the same key, shape and dtype, the file must have the size recorded at
build time, and `SAMPLE_ROWS` rows spread over the array must hash as they did at build time
(~10 MB read per domain at 224 px). Anything else is logged and rebuilt, never used. Rows outside
the sample are not checked: flipped bytes there go unnoticed (delete `cache_dir()/images/` to force
a rebuild).

Unreadable images (a file PIL cannot decode) get a zero row and are listed in the sidecar, with the
reference loader's error message. As in the reference pipeline, a run then fails naming the file,
unless `data.skip_corrupt=true`, where those rows are dropped from every batch and counted
(`dgbench.data.fast.FastSplit`).

Disk: N x R x R x 3 bytes per domain: PACS at 224 px 1.5 GB, DomainNet 88 GB. `KEEP_PER_DOMAIN`
files are kept per (dataset, domain, resolution); older keys are deleted when a new one is built.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import PIL
from PIL import Image
from tqdm import tqdm

from dgbench.atomic import atomic_write_json
from dgbench.data.cpu_workers import available_cores
from dgbench.data.folder import FolderDataset, FolderDomain, manifest_fingerprint, read_image
from dgbench.data.index_cache import CACHE_ENV, cache_dir
from dgbench.errors import DataError

try:
    import fcntl
except ImportError:  # not POSIX: no build lock (parallel builders would only duplicate work)
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the layout or the meaning of a row changes
RESIZE_METHOD = "PIL RGB, resize((R, R), BILINEAR)"  # EvalTransform's resize on a PIL image
CHUNK = 64  # images per task of the decoding pool
SAMPLE_ROWS = 64  # rows hashed at build time and checked on every load
KEEP_PER_DOMAIN = 2  # cache files kept per (dataset, domain, resolution), the current one included

Unreadable = dict[str, Any]  # {"row": int, "error": str}


# ---------------------------------------------------------------- public entry points


def attach_arrays(
    dataset: FolderDataset,
    resolution: int,
    *,
    skip_corrupt: bool,
    workers: int | None = None,
    progress: bool | None = None,
    cache: Path | None = None,
) -> None:
    """Set `arrays` (memory-mapped, from the cache, built when missing) and `unreadable` on every domain.

    An unreadable image fails like the reference pipeline (naming the file) unless `skip_corrupt`.
    `workers` defaults to the usable cores; `progress` None shows a bar on terminals only.
    """
    version = manifest_fingerprint(dataset.manifest)
    for domain in dataset.domain_data:
        arrays, unreadable = domain_arrays(
            domain, dataset.name, version, resolution, workers=workers, progress=progress, cache=cache
        )
        _check_unreadable(unreadable, skip_corrupt)
        domain.arrays = arrays
        domain.unreadable = np.array([u["row"] for u in unreadable], dtype=np.int64)


def domain_arrays(
    domain: FolderDomain,
    dataset: str,
    version: str,
    resolution: int,
    *,
    workers: int | None = None,
    progress: bool | None = None,
    cache: Path | None = None,
) -> tuple[np.ndarray, list[Unreadable]]:
    """The decoded images of one domain (read-only memory map, N x R x R x 3) and its unreadable rows."""
    key = cache_key(domain, dataset, version, resolution)
    path = cache_path(domain.name, dataset, resolution, key, cache)
    if (found := _load(path, key, len(domain), resolution)) is not None:
        return found
    with _build_lock(path.parent):
        # Another process may have built it while this one waited for the lock.
        if (found := _load(path, key, len(domain), resolution)) is None:
            _build(domain, path, key, resolution, workers, progress, f"{dataset}/{domain.name}")
            _prune(path)
            found = _load(path, key, len(domain), resolution)
    if found is None:
        raise DataError(
            f"the decoded-image cache {path} does not verify right after building it; see the log"
        )
    return found


def cache_key(domain: FolderDomain, dataset: str, version: str, resolution: int) -> str:
    """Hash of everything a row depends on, the (path, size, mtime) of every source file included."""
    payload = {
        "format": FORMAT_VERSION,
        "dataset": dataset,
        "version": version,
        "domain": domain.name,
        "resolution": resolution,
        "resize": RESIZE_METHOD,
        "pillow": PIL.__version__,
        "count": len(domain),
        "files": source_digest(domain),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def source_digest(domain: FolderDomain) -> str:
    """sha256 of `<id> NUL <size> NUL <mtime_ns>` per image, in index order (a missing file hashes as -1)."""
    digest = hashlib.sha256()
    for rel, path in zip(domain.ids, domain.paths, strict=True):
        try:
            stat = os.stat(path)
            size, mtime = stat.st_size, stat.st_mtime_ns
        except OSError:
            size = mtime = -1  # decoding will report it; the key changes when it reappears
        digest.update(f"{rel}\0{size}\0{mtime}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def cache_path(domain: str, dataset: str, resolution: int, key: str, cache: Path | None = None) -> Path:
    """`<cache>/images/<dataset>/<domain>-<R>px-<key>.npy`, names reduced to safe characters."""
    root = (Path(cache) if cache is not None else cache_dir()) / "images" / _safe(dataset)
    return root / f"{_safe(domain)}-{resolution}px-{key}.npy"


def decode_image(path: str, resolution: int) -> np.ndarray:
    """One cache row: the image as RGB, squashed to resolution x resolution as EvalTransform does."""
    image = read_image(path).resize((resolution, resolution), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


# ---------------------------------------------------------------- building


def _build(
    domain: FolderDomain,
    path: Path,
    key: str,
    resolution: int,
    workers: int | None,
    progress: bool | None,
    what: str,
) -> None:
    """Decode every image of `domain` into a temp file, then publish it (sidecar first, then the rename)."""
    _remove_stale_temps(path)  # under the build lock: any temp file of this name is a dead build's
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    shape = (len(domain), resolution, resolution, 3)
    log.info("decoding %s: %d images at %d px into %s", what, len(domain), resolution, path)
    start = time.perf_counter()
    try:
        _allocate(tmp, shape)
        unreadable = _decode_into(tmp, domain.paths, resolution, workers, progress, what)
        _fsync(tmp)
        meta = {
            "format": FORMAT_VERSION,
            "key": key,
            "shape": list(shape),
            "dtype": "uint8",
            "bytes": tmp.stat().st_size,
            "samples": _sample_digests(np.load(tmp, mmap_mode="r")),
            "unreadable": unreadable,
            "build_seconds": round(time.perf_counter() - start, 3),
        }
        atomic_write_json(_sidecar(path), meta)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        gigabytes = np.prod(shape) / 1e9
        raise DataError(
            f"cannot write the decoded-image cache {path} ({type(err).__name__}: {err}); "
            f"data.pipeline=fast needs {gigabytes:.2f} GB in a writable folder: set ${CACHE_ENV} to one, "
            f"or use data.pipeline=reference"
        ) from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    log.info("decoded %s in %.1f s (%d unreadable)", what, time.perf_counter() - start, len(unreadable))


def _allocate(tmp: Path, shape: tuple[int, ...]) -> None:
    """Create the .npy file and reserve its blocks: a full disk raises OSError here, not SIGBUS later."""
    tmp.parent.mkdir(parents=True, exist_ok=True)
    array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
    size = array.offset + array.nbytes
    del array
    if hasattr(os, "posix_fallocate"):
        with open(tmp, "r+b") as handle:
            os.posix_fallocate(handle.fileno(), 0, size)


def _decode_into(
    tmp: Path, paths: Sequence[str], resolution: int, workers: int | None, progress: bool | None, what: str
) -> list[Unreadable]:
    """Fill every row of `tmp`, `CHUNK` images per task; in-process when one worker suffices."""
    chunks = [(start, list(paths[start : start + CHUNK])) for start in range(0, len(paths), CHUNK)]
    workers = max(1, min(workers or available_cores(), len(chunks)))
    disable = None if progress is None else not progress  # None: tqdm shows it on terminals only
    unreadable: list[Unreadable] = []
    with tqdm(total=len(paths), desc=f"decoding {what}", unit="img", disable=disable) as bar:
        if workers == 1:
            for start, chunk in chunks:
                unreadable += _decode_chunk(str(tmp), start, chunk, resolution)
                bar.update(len(chunk))
        else:
            _decode_parallel(str(tmp), chunks, resolution, workers, bar, unreadable)
    return sorted(unreadable, key=lambda u: u["row"])


def _decode_parallel(
    tmp: str, chunks: list[tuple[int, list[str]]], resolution: int, workers: int, bar: tqdm, out: list
) -> None:
    """Decode the chunks in a process pool, appending unreadable images to `out`.

    On any error or interrupt, pending chunks are cancelled and the workers are gone before this
    returns: the caller then deletes the temp file they write into.
    """
    Image.init()  # import every PIL plugin now: a forked worker then never imports (or takes the import lock)
    pool = ProcessPoolExecutor(workers)  # the platform's start method, like DataLoader workers
    try:
        futures = {
            pool.submit(_decode_chunk, tmp, start, chunk, resolution): len(chunk) for start, chunk in chunks
        }
        for future in as_completed(futures):
            out += future.result()
            bar.update(futures[future])
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _decode_chunk(tmp: str, start: int, paths: Sequence[str], resolution: int) -> list[Unreadable]:
    """Decode `paths` into rows `start...` of the .npy file `tmp` (runs in a pool worker)."""
    out = np.load(tmp, mmap_mode="r+")
    unreadable = []
    for offset, path in enumerate(paths):
        try:
            out[start + offset] = decode_image(path, resolution)
        except DataError as error:  # out's row stays zero
            unreadable.append({"row": start + offset, "error": str(error)})
    out.flush()
    return unreadable


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _remove_stale_temps(path: Path) -> None:
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)


@contextmanager
def _build_lock(folder: Path) -> Iterator[None]:
    """Hold `<folder>/.lock` exclusively: one builder per dataset; the lock dies with its process."""
    if fcntl is None:
        yield
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / ".lock", "a+b")  # held for the whole block
    except OSError as err:
        raise DataError(
            f"cannot create the decoded-image cache folder {folder} ({err}); set ${CACHE_ENV} to a writable "
            f"folder, or use data.pipeline=reference"
        ) from err
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process to finish building the decoded-image cache in %s", folder)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _prune(path: Path) -> None:
    """Keep the newest `KEEP_PER_DOMAIN` caches of this (dataset, domain, resolution); each is large.

    Names are `_safe` (no glob metacharacters); the key must follow the prefix exactly, so domain
    `d0` never prunes the files of a domain `d0-224px-x`.
    """
    prefix = path.name[: -len("0" * 32 + ".npy")]
    pattern = re.compile(re.escape(prefix) + r"[0-9a-f]{32}\.npy")
    try:
        others = [p for p in path.parent.glob(f"{prefix}*.npy") if p != path and pattern.fullmatch(p.name)]
        others.sort(key=lambda p: p.stat().st_mtime_ns)
        for stale in others[: max(0, len(others) - (KEEP_PER_DOMAIN - 1))]:
            stale.unlink(missing_ok=True)
            _sidecar(stale).unlink(missing_ok=True)
    except OSError:
        pass  # another process pruned first: harmless


# ---------------------------------------------------------------- loading and verification


def _load(path: Path, key: str, count: int, resolution: int) -> tuple[np.ndarray, list[Unreadable]] | None:
    """The verified cache, or None when absent; a cache that fails a check is logged, deleted, rebuilt."""
    if not path.exists():
        return None  # never built, or killed before its rename (a lone sidecar is overwritten)
    try:
        return _verified(path, key, (count, resolution, resolution, 3))
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.warning("decoded-image cache %s is unusable (%s); rebuilding it", path, err)
        path.unlink(missing_ok=True)
        _sidecar(path).unlink(missing_ok=True)
        return None


def _verified(path: Path, key: str, shape: tuple[int, ...]) -> tuple[np.ndarray, list[Unreadable]]:
    """Open `path` read-only after checking it against its sidecar; raises ValueError on a mismatch."""
    with open(_sidecar(path), encoding="utf-8") as handle:
        meta = json.load(handle)
    claims = (meta["format"], meta["key"], tuple(meta["shape"]), meta["dtype"])
    if claims != (FORMAT_VERSION, key, shape, "uint8"):
        raise ValueError(f"its sidecar describes format/key/shape/dtype {claims}, expected {shape} uint8")
    if (size := path.stat().st_size) != meta["bytes"]:
        raise ValueError(f"the file has {size} bytes, {meta['bytes']} when built (truncated or replaced)")
    arrays = np.load(path, mmap_mode="r")
    if arrays.shape != shape or arrays.dtype != np.uint8:
        raise ValueError(f"the array is {arrays.dtype} {arrays.shape}, expected uint8 {shape}")
    if _sample_digests(arrays) != meta["samples"]:
        raise ValueError("sampled rows differ from the checksums recorded when it was built")
    return arrays, list(meta["unreadable"])


def _sample_digests(arrays: np.ndarray) -> dict[str, str]:
    """blake2b of `SAMPLE_ROWS` rows spread evenly over the array (first and last included)."""
    rows = np.unique(np.linspace(0, len(arrays) - 1, min(len(arrays), SAMPLE_ROWS)).round().astype(np.int64))
    return {str(r): hashlib.blake2b(arrays[r].tobytes(), digest_size=16).hexdigest() for r in rows}


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def _check_unreadable(unreadable: list[Unreadable], skip_corrupt: bool) -> None:
    """Fail on the first unreadable image as the reference loader would, or log each one when skipping."""
    if not unreadable:
        return
    if not skip_corrupt:
        more = f" ({len(unreadable) - 1} more unreadable in this domain)" if len(unreadable) > 1 else ""
        raise DataError(f"{unreadable[0]['error']}{more}; data.skip_corrupt=true skips unreadable images")
    for item in unreadable:
        log.warning("skipping (data.skip_corrupt=true): %s", item["error"])


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:60] or "_"
