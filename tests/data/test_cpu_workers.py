"""CPU worker threads: every item runs once, errors surface, a forked child gets its own pool."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from dgbench.data import cpu_workers
from dgbench.data.cpu_workers import run_on_cores


@pytest.fixture
def two_cores(monkeypatch: pytest.MonkeyPatch):
    """A fresh pool of two workers, whatever this machine has."""
    monkeypatch.setattr(cpu_workers, "available_cores", lambda: 2)
    cpu_workers._forget_pool()
    yield
    pool = cpu_workers._pool
    cpu_workers._forget_pool()
    if pool is not None:
        pool.shutdown()


def test_every_item_runs_once_on_the_workers(two_cores: None) -> None:
    seen: list[tuple[int, str]] = []
    lock = threading.Lock()

    def work(item: int) -> None:
        with lock:
            seen.append((item, threading.current_thread().name))

    run_on_cores(work, range(50))
    assert sorted(item for item, _ in seen) == list(range(50))
    assert all(name.startswith("dgbench-cpu") for _, name in seen)


def test_an_error_in_one_item_is_raised_to_the_caller(two_cores: None) -> None:
    def work(item: int) -> None:
        if item == 3:
            raise ValueError("item 3 failed")

    with pytest.raises(ValueError, match="item 3 failed"):
        run_on_cores(work, range(6))


def test_a_single_core_runs_inline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_workers, "available_cores", lambda: 1)
    cpu_workers._forget_pool()
    names: list[str] = []
    run_on_cores(lambda _: names.append(threading.current_thread().name), range(3))
    assert names == [threading.current_thread().name] * 3


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_starts_its_own_workers(two_cores: None) -> None:
    run_on_cores(lambda _: None, range(4))  # the parent's pool exists
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: the parent's threads are gone; this must not hang
        done: list[int] = []
        run_on_cores(done.append, range(4))
        os.write(write, bytes([len(done)]))
        os._exit(0)
    os.close(write)
    deadline = time.monotonic() + 60
    while (waited := os.waitpid(pid, os.WNOHANG)) == (0, 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    if waited == (0, 0):
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung waiting for the parent's worker threads")
    assert os.read(read, 1) == bytes([4]) and waited[1] == 0
