"""Per-image work on CPU, spread over worker threads, one per usable core.

The compiled augmentation (`dgbench.data.cpu_augment`) releases the GIL, so plain threads run it
on every core at once; each worker takes the next chunk of images when it finishes one. The pool
is made on first use and made again in a forked child, where the parent's threads do not exist.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

_pool: ThreadPoolExecutor | None = None
_lock = threading.Lock()


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, e.g. a SLURM allocation), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _workers() -> ThreadPoolExecutor | None:
    """The process's worker pool, one thread per usable core; None on a single core."""
    global _pool
    with _lock:
        if _pool is None and available_cores() > 1:
            _pool = ThreadPoolExecutor(available_cores(), "dgbench-cpu")
        return _pool


def _forget_pool() -> None:
    """In a forked child the parent's worker threads do not exist: start afresh on first use."""
    global _pool, _lock
    _pool, _lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


def run_on_cores(work: Callable[[T], None], items: Sequence[T]) -> None:
    """Run work(item) for every item on the workers, in that order of start; returns when all are done.

    Each worker takes the next item when it finishes one, so put the largest first. An exception
    in any item is re-raised here.
    """
    pool = _workers()
    if pool is None or len(items) <= 1:
        for item in items:
            work(item)
        return
    for future in [pool.submit(work, item) for item in items]:
        future.result()
