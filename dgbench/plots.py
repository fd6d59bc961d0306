"""PNG plots for `dgbench results --plot DIR` (matplotlib, an optional dependency).

- `curves_<dataset>.png`: one panel per test domain, test-domain accuracy (`in` split, %)
  against training step, one line per algorithm: the mean over trial seeds of the runs
  the selection rule chose (`iid` when it was asked for, else the first rule), with each
  chosen run drawn faintly.
- `bars_<selection>_<dataset>.png` and `bars_<selection>_averages.png`: each results table
  as grouped bars (one per algorithm) with the standard error as error bars.

matplotlib is imported only here, with the non-interactive Agg backend.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from dgbench.atomic import atomic_write
from dgbench.errors import DGBenchError
from dgbench.results import Aggregate, ResultSet, Run
from dgbench.selection import get_selection

INSTALL_HINT = 'pip install "dgbench[plot]"'


def pyplot() -> Any:
    """`matplotlib.pyplot` on the Agg backend, or a DGBenchError saying how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise DGBenchError(
            f"--plot needs matplotlib, which is not installed; install it with {INSTALL_HINT} "
            "(or pip install matplotlib)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(results: ResultSet, agg: Aggregate, out_dir: str | os.PathLike[str]) -> list[Path]:
    """Write the curve and bar plots into `out_dir`; returns the files written."""
    plt = pyplot()
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    written = [*_curves(plt, results, agg, folder), *_bars(plt, agg, folder)]
    return written


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=110))
    plt.close(fig)
    return path


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "x"


def _curves(plt: Any, results: ResultSet, agg: Aggregate, folder: Path) -> list[Path]:
    if not agg.selections:
        return []
    selection = "iid" if "iid" in agg.selections else agg.selections[0]
    by_path = {run.path: run for run in results.runs}
    chosen: dict[tuple[str, str, str], list[Run]] = {}
    for c in agg.choices:
        if c.selection == selection and c.run_dir in by_path:
            chosen.setdefault((c.dataset, c.algorithm, c.test_env), []).append(by_path[c.run_dir])
    written = []
    for dataset in agg.datasets:
        domains = agg.domains[dataset]
        if not any((dataset, a, d) in chosen for a in agg.algorithms for d in domains):
            continue
        cols = min(3, len(domains))
        rows = -(-len(domains) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for index, domain in enumerate(domains):
            ax = axes[index // cols][index % cols]
            for k, algorithm in enumerate(agg.algorithms):
                runs = chosen.get((dataset, algorithm, domain), [])
                if not runs:
                    continue
                color = colors[k % len(colors)]
                by_step: dict[int, list[float]] = {}
                for run in runs:
                    steps = [ck.step for ck in run.checkpoints]
                    values = [100 * ck.acc_in[index] for ck in run.checkpoints]
                    ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
                    for step, value in zip(steps, values, strict=True):
                        by_step.setdefault(step, []).append(value)
                steps = sorted(by_step)
                means = [sum(by_step[s]) / len(by_step[s]) for s in steps]
                ax.plot(steps, means, color=color, linewidth=1.8, label=algorithm)
            ax.set_title(f"test domain: {domain}", fontsize=9)
            ax.set_xlabel("step")
            ax.set_ylabel("test accuracy (in split, %)")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        for index in range(len(domains), rows * cols):
            axes[index // cols][index % cols].axis("off")
        fig.suptitle(f"{dataset}: runs chosen by {get_selection(selection).title}", fontsize=10)
        written.append(_save(plt, fig, folder / f"curves_{_slug(dataset)}.png"))
    return written


def _bars(plt: Any, agg: Aggregate, folder: Path) -> list[Path]:
    written = []
    for selection in agg.selections:
        title = get_selection(selection).title
        tables = [(dataset, [*agg.domains[dataset], "avg"]) for dataset in agg.datasets]
        for dataset, columns in tables:
            if dataset in agg.lodo_unavailable and selection == "lodo":
                continue
            cells = {
                (a, col): agg.cell(selection, dataset, a, col) for a in agg.algorithms for col in columns
            }
            name = f"bars_{_slug(selection)}_{_slug(dataset)}.png"
            written.append(
                _bar_chart(plt, folder / name, f"{dataset}: {title}", columns, agg.algorithms, cells)
            )
        if len(agg.datasets) > 0 and not (
            selection == "lodo" and len(agg.lodo_unavailable) == len(agg.datasets)
        ):
            cells = {(a, d): agg.cell(selection, d, a, "avg") for a in agg.algorithms for d in agg.datasets}
            name = f"bars_{_slug(selection)}_averages.png"
            written.append(
                _bar_chart(plt, folder / name, f"averages: {title}", agg.datasets, agg.algorithms, cells)
            )
    return written


def _bar_chart(
    plt: Any, path: Path, title: str, columns: list[str], algorithms: list[str], cells: dict[Any, Any]
) -> Path:
    width = 0.8 / max(1, len(algorithms))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(columns) * max(1, len(algorithms)) ** 0.5 + 2), 3.6))
    for k, algorithm in enumerate(algorithms):
        xs, means, errs = [], [], []
        for i, col in enumerate(columns):
            cell = cells[algorithm, col]
            if cell.mean is not None:
                xs.append(i + (k - (len(algorithms) - 1) / 2) * width)
                means.append(cell.mean)
                errs.append(cell.sem or 0.0)
        if xs:
            ax.bar(xs, means, width=width, yerr=errs, capsize=2, label=algorithm)
    ax.set_xticks(range(len(columns)))
    ax.set_xticklabels(columns, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    return _save(plt, fig, path)
