import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from dgbench.atomic import BackgroundWrites, atomic_write_text
from dgbench.records import RECORD_KEYS, append_record, read_records, truncate_records, without_timing


def _record(step):
    return {key: None for key in RECORD_KEYS} | {"step": step, "acc": {"a": {"in": 0.5, "out": 0.25}}}


def test_append_read_truncate_round_trip(tmp_path):
    path = tmp_path / "results.jsonl"
    assert read_records(path) == []
    for step in (0, 100, 200):
        append_record(path, _record(step))
    assert [r["step"] for r in read_records(path)] == [0, 100, 200]
    assert read_records(path)[1]["acc"] == {"a": {"in": 0.5, "out": 0.25}}
    truncate_records(path, 100)
    assert [r["step"] for r in read_records(path)] == [0, 100]
    assert all(json.loads(line) for line in path.read_text().splitlines())


def test_atomic_write_leaves_old_file_when_killed_mid_write(tmp_path):
    target = tmp_path / "file.txt"
    atomic_write_text(target, "old content\n")
    # A child process starts replacing the file with a huge payload and is SIGKILLed mid-write.
    script = textwrap.dedent(
        f"""
        import os, sys
        from dgbench.atomic import atomic_write
        def slow(handle):
            handle.write(b"new" * 1000)
            handle.flush()
            print("writing", flush=True)
            import time; time.sleep(60)
        atomic_write({str(target)!r}, slow)
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "writing"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert target.read_text() == "old content\n"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "file.txt"]
    assert all(name.endswith(".tmp") for name in leftovers)  # never the target name


def test_without_timing_drops_the_wall_clock_measurements_only():
    metrics = {"eval_time": 4.0, "checkpoint_time": 0.5, "val_loss": 0.5}
    record = {"step": 3, "step_time": 0.2, "mem_gb": 1.0, "metrics": metrics}
    assert without_timing(record) == {"step": 3, "metrics": {"val_loss": 0.5}}
    assert record["metrics"]["eval_time"] == 4.0  # the record itself is left as it was


def test_atomic_write_gives_new_files_the_umask_mode_and_keeps_an_existing_files_mode(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    fresh = tmp_path / "fresh.txt"
    atomic_write_text(fresh, "x")
    assert fresh.stat().st_mode & 0o777 == 0o666 & ~umask  # as open(path, "w"), not mkstemp's 0o600
    kept = tmp_path / "kept.txt"
    kept.write_text("old")
    kept.chmod(0o640)
    atomic_write_text(kept, "new")
    assert kept.read_text() == "new" and kept.stat().st_mode & 0o777 == 0o640


def test_background_writes_land_in_order_off_the_callers_thread(tmp_path, monkeypatch):
    """`write` returns while the bytes are still on their way; `wait` (or the next `write`) joins."""
    import threading

    import dgbench.atomic as atomic

    release, writers = threading.Event(), []
    real_write = atomic.atomic_write_bytes

    def slow_write(path, data):
        writers.append(threading.current_thread())
        release.wait(timeout=10)
        real_write(path, data)

    monkeypatch.setattr(atomic, "atomic_write_bytes", slow_write)
    writes = BackgroundWrites()
    target = tmp_path / "checkpoint.pt"
    writes.write(target, b"first")
    assert not target.exists()  # still in flight: the caller did not wait for the disk
    release.set()
    writes.write(target, b"second")  # waits for the first, then writes in the background again
    writes.wait()
    assert target.read_bytes() == b"second"
    assert len(writers) == 2 and threading.current_thread() not in writers


def test_a_failed_background_write_raises_in_the_callers_thread_once(tmp_path):
    writes = BackgroundWrites()
    (tmp_path / "file").write_text("")
    writes.write(tmp_path / "file" / "checkpoint.pt", b"x")  # its folder is a file
    with pytest.raises(OSError):
        writes.wait()
    writes.wait()  # reported once; the writer is usable again
    writes.write(tmp_path / "checkpoint.pt", b"y")
    writes.wait()
    assert (tmp_path / "checkpoint.pt").read_bytes() == b"y"
