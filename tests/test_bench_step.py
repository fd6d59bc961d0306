"""tools/bench_step.py, as a CPU smoke test: every eager variant runs and lands in the JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))  # the tools import each other

import bench_step


def test_eager_variants_run_on_cpu_and_only_the_native_one_keeps_pytorchs_batchnorm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    swaps: list[bool] = []
    real = bench_step.use_fixed_stats_kernels

    def recorded(model, on=True):
        swaps.append(on)
        return real(model, on)

    monkeypatch.setattr(bench_step, "use_fixed_stats_kernels", recorded)
    out = tmp_path / "step.json"
    argv = ["bench_step.py", "--device", "cpu", "--resolution", "32", "--batch", "2", "--steps", "1"]
    argv += ["--variants", "eager_nchw,eager_native_bn,eager", "--json", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    bench_step.main()
    report = json.loads(out.read_text())
    assert report["settings"] == {"domains": 3, "batch": 2, "resolution": 32, "steps": 1}
    rows = report["variants"]
    assert list(rows) == ["eager_nchw", "eager_native_bn", "eager"]
    assert all(row["ms_per_step"] > 0 and "error" not in row for row in rows.values())
    assert rows["eager"]["speedup_vs_eager"] == 1.0
    assert swaps == [True, False, True]


def test_every_variant_is_timed_before_any_is_profiled() -> None:
    """A profiling session slows the launches after it: no timing may follow one."""
    events: list[str] = []

    def build(variant: str):
        if variant == "broken":
            raise RuntimeError("no capture here")
        return (lambda: variant), 0.25

    def time_step(step) -> float:
        events.append(f"time {step()}")
        return 2.0

    def profile(step) -> dict:
        events.append(f"profile {step()}")
        return {"gpu_busy_ms": 1.0}

    rows = bench_step.time_then_profile(["eager_nchw", "broken", "graph", "eager"], build, time_step, profile)
    assert events == ["time eager_nchw", "time graph", "time eager", "profile eager_nchw", "profile eager"]
    assert rows["eager"] == {"ms_per_step": 2.0, "set_up_s": 0.2, "gpu_busy_ms": 1.0}
    assert rows["graph"] == {"ms_per_step": 2.0, "set_up_s": 0.2}
    assert rows["broken"] == {"error": "RuntimeError: no capture here"}
