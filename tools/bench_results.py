"""Time `dgbench results --format json` on a large synthetic sweep (default 10,000 runs x 20 records).

The sweep has the dgbench layout (`<dir>/sweep/<run_id>/results.jsonl` + `done`) and
realistic records (identity, 8 hparams, metrics, 4 domains of in/out accuracy): PACS,
5 algorithms x 10 test-domain sets (4 single, 6 pairs, so LODO runs) x 20 hparams seeds
x 10 trial seeds. It is generated under /tmp and deleted afterwards unless --keep.

    python tools/bench_results.py               # generate, time the function, delete
    python tools/bench_results.py --cli --keep  # also time the command in a subprocess
    python tools/bench_results.py --dir /tmp/x  # reuse a kept sweep
"""

from __future__ import annotations

import argparse
import cProfile
import itertools
import json
import os
import pstats
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DOMAINS = ["art_painting", "cartoon", "photo", "sketch"]
ALGORITHMS = ["erm", "coral", "mixup", "fish", "sam"]


def generate(root: Path, runs: int, records: int) -> int:
    rng = random.Random(0)
    test_sets = [[i] for i in range(4)] + [list(p) for p in itertools.combinations(range(4), 2)]
    combos = itertools.product(range(10_000), ALGORITHMS, test_sets, range(20))  # trial, alg, envs, hparams
    written = 0
    for trial, algorithm, test_envs, hparams_seed in itertools.islice(combos, runs):
        run_id = f"{written:05d}{rng.getrandbits(40):010x}"
        folder = root / "sweep" / run_id
        folder.mkdir(parents=True)
        hparams = {
            "name": algorithm, "lr": 10 ** rng.uniform(-5, -3.5), "batch_size": rng.choice([16, 32, 64]),
            "weight_decay": 10 ** rng.uniform(-6, -2), "resnet_dropout": rng.choice([0.0, 0.1, 0.5]),
            "nonlinear_classifier": False, "class_balanced": False, "penalty_weight": rng.uniform(0, 10),
        }  # fmt: skip
        lines = []
        for k in range(records):
            step = k * 300 if k < records - 1 else 300 * (records - 1) + 1
            acc = {d: {"in": rng.random(), "out": rng.random()} for d in DOMAINS}
            lines.append(json.dumps({
                "run_id": run_id, "dataset": "pacs", "algorithm": algorithm, "backbone": "resnet50",
                "test_envs": test_envs, "hparams_seed": hparams_seed, "trial_seed": trial, "hparams": hparams,
                "step": step, "epoch": step / 48.0, "loss": rng.random(),
                "metrics": {"penalty": rng.random(), "grad_norm": rng.random() * 10},
                "acc": acc, "step_time": 0.2 + rng.random() / 10, "mem_gb": 7.5 + rng.random(),
            }))  # fmt: skip
        (folder / "results.jsonl").write_text("\n".join(lines) + "\n")
        (folder / "done").write_text("")
        written += 1
    return written


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--records", type=int, default=20, help="records per run")
    parser.add_argument("--dir", type=Path, help="an existing generated sweep to reuse")
    parser.add_argument("--keep", action="store_true", help="keep the generated sweep")
    parser.add_argument(
        "--cli", action="store_true", help="also time `python -m dgbench.results_cli` end to end"
    )
    parser.add_argument("--profile", action="store_true", help="print the top functions by time")
    args = parser.parse_args()

    from dgbench.report import render
    from dgbench.results import aggregate, discover_runs, load_results

    root = args.dir or Path(tempfile.mkdtemp(prefix="dgbench-bench-results-", dir="/tmp"))
    try:
        if args.dir is None:
            tick = time.perf_counter()
            n = generate(root, args.runs, args.records)
            seconds = time.perf_counter() - tick
            print(f"generated {n} runs x {args.records} records in {seconds:.1f} s under {root}")
        size = sum(f.stat().st_size for f in root.rglob("results.jsonl"))

        tick = time.perf_counter()
        found = discover_runs([root])
        t_discover = time.perf_counter() - tick
        profiler = cProfile.Profile() if args.profile else None
        tick = time.perf_counter()
        if profiler:
            profiler.enable()
        results = load_results([root])
        t_load = time.perf_counter() - tick
        agg = aggregate(results)
        t_aggregate = time.perf_counter() - tick - t_load
        text = render(agg, "json")
        total = time.perf_counter() - tick
        if profiler:
            profiler.disable()
        print(
            f"files {len(found)}, records {results.n_records}, {size / 1e6:.0f} MB, cells {len(agg.cells)}: "
            f"results(--format json) {total:.2f} s = load {t_load:.2f} s (discover alone {t_discover:.2f} s) "
            f"+ select/aggregate {t_aggregate:.2f} s + render {total - t_load - t_aggregate:.2f} s "
            f"[{len(text) / 1e3:.0f} kB out]"
        )
        if profiler:
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(15)
        if args.cli:
            tick = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, "-m", "dgbench.results_cli", str(root), "--format", "json"],
                capture_output=True,
                text=True,
                check=True,
            )
            cells = json.loads(proc.stdout)
            seconds = time.perf_counter() - tick
            print(f"CLI `dgbench results {root} --format json`: {seconds:.2f} s, {len(cells)} cells")
    finally:
        if args.dir is None and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        elif args.dir is None:
            print(f"kept {root}", file=sys.stderr)


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    main()
