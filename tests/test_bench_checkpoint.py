"""tools/bench_checkpoint.py on a tiny timm model: both ways timed, alternating, the file cleaned up."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))  # the tools import each other
import bench_checkpoint


def test_both_ways_are_timed_side_by_side_and_nothing_is_left(tmp_path: Path, monkeypatch) -> None:
    order: list[str] = []
    real_save = bench_checkpoint.save_checkpoint

    def recording(path, algorithm, step, write):
        order.append("background" if write != bench_checkpoint.atomic_write_bytes else "in_place")
        real_save(path, algorithm, step, write=write)

    monkeypatch.setattr(bench_checkpoint, "save_checkpoint", recording)
    out = tmp_path / "r.json"
    argv = ["bench_checkpoint.py", "--backbone", "test_resnet", "--rounds", "2", "--dir", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", [*argv, "--json", str(out)])
    bench_checkpoint.main()
    report = json.loads(out.read_text())
    assert order == ["in_place", "background"] * 2
    assert all(len(s) == 2 and min(s) > 0 for s in report["seconds"].values())
    medians = report["median_seconds"]
    assert report["ratio"] == pytest.approx(medians["in_place"] / medians["background"], rel=0.05)
    assert report["checkpoint_mb"] > 0 and report["settings"]["backbone"] == "test_resnet"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # its folder is gone
