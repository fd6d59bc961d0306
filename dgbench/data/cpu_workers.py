"""Per-sample tensor work on CPU, spread over single-threaded workers, one per usable core.

PyTorch parallelises each CPU op over its OpenMP threads. For whole-batch ops that is right, but
a chain of ~60 cheap ops per image (the batched augmentation) then runs each op on a batch that
has left the cores' caches, and every op pays a fork-join (with OMP_WAIT_POLICY=PASSIVE, which
`dgbench` sets, a futex wake-up each). Giving each core its own samples, one at a time, with
single-threaded ops keeps a sample's ~2 MB working set in that core's L2 and costs no
synchronisation: `tools/bench_batch_augment.py` measures the difference.

The workers are threads (torch releases the GIL inside ops). Each one sets its own OpenMP thread
count to 1; the calling threads keep theirs.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")

_pool: ThreadPoolExecutor | None = None
_lock = threading.Lock()


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, e.g. a SLURM allocation), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _single_threaded(started: threading.Barrier) -> None:
    # torch sets up each thread's OpenMP count lazily on first use, from the process-wide value:
    # run that set-up first, or it would undo the 1 below.
    torch.get_num_threads()
    torch.set_num_threads(1)
    started.wait()


def _workers() -> ThreadPoolExecutor | None:
    """The process's worker pool, one thread per usable core; None on a single core."""
    global _pool
    with _lock:
        if _pool is None:
            size = available_cores()
            if size <= 1:
                return None
            callers_threads = torch.get_num_threads()
            started = threading.Barrier(size + 1)
            pool = ThreadPoolExecutor(size, "dgbench-cpu", initializer=_single_threaded, initargs=(started,))
            for _ in range(size):  # start every worker now, so each has run its initializer
                pool.submit(lambda: None)
            started.wait()
            # set_num_threads(1) in the workers also changed the count that new threads start
            # from; restore it (this thread's own count never changed).
            torch.set_num_threads(callers_threads)
            _pool = pool
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
