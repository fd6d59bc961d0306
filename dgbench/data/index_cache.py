"""A cache of folder-dataset file indexes, so DomainNet's 586k files are not walked on every start.

Walking `<dataset>/<domain>/<class>/...` in ImageFolder order takes seconds for DomainNet (far
more on a network file system); the cached index loads in a fraction of that. The index itself
always comes from `dgbench.data.folder.list_class_files`, so the cache cannot change the order.

The cache file is named by a hash of the resolved dataset folder, the caller's `version`
(a manifest fingerprint), the domain and class lists, the image extensions, `FORMAT_VERSION`,
the source of `list_class_files`, and the mtimes of the dataset folder, every domain folder and
every class folder (~2k stat calls for DomainNet). Adding, removing or renaming a file directly in
a class folder changes that folder's mtime and so the key. Edits inside deeper nested sub-folders
(`<class>/<sub>/<file>`) do not change the class folder's mtime and are NOT detected, nor is
anything that restores old mtimes (e.g. `touch -d`). To force a rebuild, delete
`cache_dir()/index/` (or point `$DGBENCH_CACHE` at an empty folder).

The cache lives in `cache_dir()`, never in the data root, which may be read-only. A cache file
that cannot be read is rebuilt (with a warning); a cache folder that cannot be written only means
no caching (with a warning).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import warnings
import zipfile
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np

from dgbench.atomic import atomic_write
from dgbench.data import folder
from dgbench.data.folder import IMAGE_EXTENSIONS, list_class_files

CACHE_ENV = "DGBENCH_CACHE"
FORMAT_VERSION = 1  # bump when the file layout or the meaning of a cached index changes
KEEP_PER_DATASET = 4  # newest cache files kept per dataset folder; older keys are stale (files changed)
SEP = "\0"  # no file name contains NUL, whereas "\n" is legal in POSIX names

Index = dict[str, tuple[list[str], np.ndarray]]

_warned_dirs: set[Path] = set()


def cache_dir() -> Path:
    """`$DGBENCH_CACHE`, else `$XDG_CACHE_HOME/dgbench`, else `~/.cache/dgbench`: never the data root."""
    if env := os.environ.get(CACHE_ENV):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):  # the XDG spec says to ignore relative values
        return Path(xdg) / "dgbench"
    return Path.home() / ".cache" / "dgbench"


def index_domains(
    dataset_dir: Path,
    domains: Sequence[str],
    classes: Sequence[str],
    *,
    version: str,
    cache: Path | None = None,
) -> Index:
    """Per domain `(ids, labels)` exactly as `list_class_files` gives them, from the cache when valid.

    ids are `<class>/.../<file>` relative to the domain folder in ImageFolder order; labels are
    int64 positions in `classes`. A class folder missing from a domain contributes no ids.
    `cache` is the cache root (default `cache_dir()`); files go to `<cache>/index/`.
    """
    dataset_dir = Path(dataset_dir)
    domains, classes = list(domains), list(classes)
    root = (Path(cache) if cache is not None else cache_dir()) / "index"
    key = index_key(dataset_dir, domains, classes, version=version)
    path = root / f"{_file_prefix(dataset_dir)}{key}.npz"
    if (index := _load(path, key, domains, classes)) is not None:
        return index
    counts, ids = _walk(dataset_dir, domains, classes)
    # A folder changed during the walk would make this index disagree with its key: don't store it.
    if index_key(dataset_dir, domains, classes, version=version) == key:
        _save(path, key, domains, classes, counts, ids)
    return _split(domains, counts, ids)


def build_index(dataset_dir: Path, domains: Sequence[str], classes: Sequence[str]) -> Index:
    """The uncached index, exactly what a cache miss computes (for benchmarks and cache-less callers)."""
    domains, classes = list(domains), list(classes)
    counts, ids = _walk(Path(dataset_dir), domains, classes)
    return _split(domains, counts, ids)


def index_key(dataset_dir: Path, domains: Sequence[str], classes: Sequence[str], *, version: str) -> str:
    """Hash of everything the index depends on that can be checked cheaply (one stat per folder)."""
    root = os.fspath(dataset_dir)
    join = os.path.join  # plain strings: Path objects would double the cost of the ~2k stats
    folders = [root, *(join(root, d) for d in domains), *(join(root, d, c) for d in domains for c in classes)]
    payload = {
        "format": FORMAT_VERSION,
        "root": str(Path(root).resolve()),
        "version": version,
        "domains": list(domains),
        "classes": list(classes),
        "extensions": list(IMAGE_EXTENSIONS),
        "walker": _walker_fingerprint(),
        "mtimes": [_mtime_ns(p) for p in folders],
    }
    return hashlib.sha256(json.dumps(payload, separators=(",", ":")).encode()).hexdigest()[:32]


def _mtime_ns(path: str) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None  # a missing folder is part of the key too: creating it changes the key


@cache
def _walker_fingerprint() -> str:
    """Source hash of `folder.list_class_files`, so a change to the ordering code invalidates caches."""
    try:
        source = inspect.getsource(folder.list_class_files)
    except (OSError, TypeError):
        source = folder.list_class_files.__qualname__
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def _file_prefix(dataset_dir: Path) -> str:
    """`<dir name>-<hash of its resolved path>-`: readable, and groups one folder's files for pruning."""
    resolved = str(Path(dataset_dir).resolve())
    name = re.sub(r"[^A-Za-z0-9_.]+", "_", Path(resolved).name)[:40] or "root"
    return f"{name}-{hashlib.sha256(resolved.encode()).hexdigest()[:8]}-"


def _walk(dataset_dir: Path, domains: list[str], classes: list[str]) -> tuple[np.ndarray, list[str]]:
    """Per-(domain, class) file counts and all ids, domain-major then class order.

    Serial on purpose: a thread pool over class folders did not help on a 2-core machine with the
    tree in the page cache (tools/bench_index.py, 586k files, median of 6: 1.06 s serial, 1.08 s
    with 2 threads, 1.22 s with 4), since sorting and building path strings hold the GIL; only
    the scandir calls release it. (A cold network file system was not measured.)
    """
    per_class = [list_class_files(dataset_dir / d, c) for d in domains for c in classes]
    counts = np.array([len(f) for f in per_class], dtype=np.int64).reshape(len(domains), len(classes))
    return counts, [f for files in per_class for f in files]


def _split(domains: list[str], counts: np.ndarray, ids: list[str]) -> Index:
    """Cut the flat id list into domains; labels repeat each class position by its file count."""
    out: Index = {}
    start = 0
    for d, name in enumerate(domains):
        stop = start + int(counts[d].sum())
        labels = np.repeat(np.arange(counts.shape[1], dtype=np.int64), counts[d])
        out[name] = (ids[start:stop], labels)
        start = stop
    return out


def _meta(key: str, domains: list[str], classes: list[str]) -> np.ndarray:
    """What the file claims to be, checked on load (guards against a renamed or mixed-up file)."""
    text = json.dumps({"format": FORMAT_VERSION, "key": key, "domains": domains, "classes": classes})
    return np.frombuffer(text.encode(), dtype=np.uint8)


def _save(
    path: Path, key: str, domains: list[str], classes: list[str], counts: np.ndarray, ids: list[str]
) -> None:
    """Write atomically; a failure to write (read-only home, full disk) warns and is otherwise ignored."""
    try:
        # surrogateescape round-trips non-UTF-8 file names exactly as os.walk returned them
        blob = np.frombuffer(SEP.join(ids).encode("utf-8", "surrogateescape"), dtype=np.uint8)
        arrays = {"meta": _meta(key, domains, classes), "counts": counts, "ids": blob}
        # deflate: 17 MiB of DomainNet ids become 1.3 MiB, for ~25 ms more per load
        atomic_write(path, lambda handle: np.savez_compressed(handle, **arrays))
    except (OSError, UnicodeEncodeError) as err:
        if path.parent not in _warned_dirs:
            _warned_dirs.add(path.parent)
            warnings.warn(
                f"cannot write the file index cache in {path.parent} ({type(err).__name__}: {err}); "
                f"every start will re-index the dataset: set ${CACHE_ENV} to a writable folder",
                stacklevel=3,
            )
        return
    _prune(path)


def _load(path: Path, key: str, domains: list[str], classes: list[str]) -> Index | None:
    """The cached index, or None when absent; an unreadable or inconsistent file warns and reads as absent."""
    try:
        # our own handle: np.load(path) leaves its file open when the zip is corrupt (numpy 2.4)
        with open(path, "rb") as handle, np.load(handle, allow_pickle=False) as f:
            meta, counts, blob = f["meta"], f["counts"], f["ids"]
        if meta.tobytes() != _meta(key, domains, classes).tobytes():
            raise ValueError("its header names another index")
        if counts.shape != (len(domains), len(classes)) or counts.dtype != np.int64 or (counts < 0).any():
            raise ValueError(f"counts have shape {counts.shape} dtype {counts.dtype}")
        total = int(counts.sum())
        ids = blob.tobytes().decode("utf-8", "surrogateescape").split(SEP) if total else []
        if len(ids) != total:
            raise ValueError(f"{len(ids)} ids for {total} counted files")
    except (FileNotFoundError, NotADirectoryError):
        return None  # no cache yet (an unusable cache folder is reported once, when writing)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        warnings.warn(
            f"ignoring unreadable file index cache {path} ({type(err).__name__}: {err}); re-indexing",
            stacklevel=3,
        )
        return None
    return _split(domains, counts, ids)


def _prune(path: Path) -> None:
    """Keep the newest few files of this dataset folder: each edit of the tree leaves a stale key.

    The prefix holds only `[A-Za-z0-9_.-]` (see `_file_prefix`), so it is safe as a glob pattern.
    """
    prefix = path.name[: path.name.rindex("-") + 1]
    try:
        others = sorted(
            (p for p in path.parent.glob(f"{prefix}*.npz") if p != path), key=lambda p: p.stat().st_mtime_ns
        )
        for stale in others[: max(0, len(others) - (KEEP_PER_DATASET - 1))]:
            stale.unlink(missing_ok=True)
    except OSError:
        pass  # another process pruned first, or the folder is not ours to clean: harmless
