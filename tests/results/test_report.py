"""Rendering and the `dgbench results` command: formats, listings, files and plots."""

from __future__ import annotations

import csv
import io
import json
import sys

import pytest

from dgbench import report
from dgbench.errors import DGBenchError
from dgbench.report import latex_escape
from dgbench.results import aggregate, load_results
from dgbench.results_cli import main

CELL_KEYS = {"dataset", "algorithm", "selection", "test_env", "mean", "sem", "n_trials"}


@pytest.fixture
def agg(golden_sweep):
    return aggregate(load_results([golden_sweep]))


def test_json_cells_follow_the_schema(agg):
    cells = json.loads(report.render(agg, "json"))
    # 3 rules x (embedded + pacs) x 2 algorithms x (4 domains + avg); empty cells are listed too
    assert len(cells) == 3 * 2 * 2 * 5
    for cell in cells:
        assert set(cell) == CELL_KEYS
        assert cell["selection"] in {"iid", "lodo", "oracle"}
        assert isinstance(cell["n_trials"], int)
        if cell["n_trials"] == 0:
            assert cell["mean"] is None and cell["sem"] is None
        else:
            assert 0 <= cell["mean"] <= 100 and isinstance(cell["sem"], float)  # percent
    by_key = {(c["selection"], c["dataset"], c["algorithm"], c["test_env"]): c for c in cells}
    assert by_key["oracle", "embedded", "erm", "photo"]["mean"] == pytest.approx(76.0)
    assert by_key["iid", "pacs", "coral", "avg"] == {
        "dataset": "pacs", "algorithm": "coral", "selection": "iid", "test_env": "avg",
        "mean": None, "sem": None, "n_trials": 0,
    }  # fmt: skip


def test_csv_has_one_row_per_cell(agg):
    rows = list(csv.DictReader(io.StringIO(report.render(agg, "csv"))))
    assert len(rows) == 60 and set(rows[0]) == CELL_KEYS
    row = next(
        r for r in rows if (r["selection"], r["algorithm"], r["test_env"]) == ("lodo", "coral", "cartoon")
    )
    assert float(row["mean"]) == pytest.approx(84.0) and row["n_trials"] == "2"
    empty = next(r for r in rows if (r["dataset"], r["algorithm"]) == ("pacs", "coral"))
    assert (empty["mean"], empty["sem"], empty["n_trials"]) == ("", "", "0")


def test_terminal_report_lists_tables_lodo_message_and_failures(agg):
    text = report.render(agg, "terminal")
    assert "-------- Dataset: embedded, model selection: training-domain validation" in text
    assert "LODO needs runs with two test domains; this sweep has none for pacs" in text
    assert "-------- Dataset: pacs, model selection: leave-one-domain-out" not in text
    assert "erm        61.0 ± 0.7  62.0 ± 0.7  63.0 ± 0.7  64.0 ± 0.7  62.5" in text
    assert "coral      73.6 ± 1.5  X           X" in text
    assert "87 runs: 86 done, 0 incomplete (0 running, 0 dead), 1 failed" in text
    assert "coral_t1_h0_r1: DivergedError: nan" in text
    assert "embedded coral test_env=painting: no usable run for trial seed(s) 1" in text


def test_markdown_and_latex_contain_the_numbers(agg):
    md = report.render(agg, "markdown")
    assert "| Algorithm | photo | painting | cartoon | sketch | Avg |" in md
    assert "| coral | 87.0 ± 1.4 | 86.0 ± 0.0 | 89.0 ± 1.4 | 90.0 ± 1.4 | 88.0 |" in md
    assert "> LODO needs runs with two test domains" in md
    tex = report.render(agg, "latex")
    assert "\\toprule" in tex and "\\midrule" in tex and "\\bottomrule" in tex
    assert "\\begin{tabular}{lccccc}" in tex
    assert "\\textbf{art\\_painting}" in tex  # escaped
    assert "coral & 87.0 $\\pm$ 1.4 & 86.0 $\\pm$ 0.0 & 89.0 $\\pm$ 1.4 & 90.0 $\\pm$ 1.4 & 88.0 \\\\" in tex
    assert latex_escape("a_b & 50% {x}") == "a\\_b \\& 50\\% \\{x\\}"


def test_lodo_only_sweep_without_pairs_says_so(golden_sweep):
    agg = aggregate(load_results([golden_sweep]), ["lodo"], datasets=["pacs"])
    text = report.render(agg, "terminal")
    assert "LODO needs runs with two test domains; this sweep has none at all." in text
    assert "-------- " not in text  # no blank tables
    assert report.notes(agg, "json")[0].startswith("LODO needs runs with two test domains")


def test_best_hparams_listing(agg):
    rows = json.loads(report.render(agg, "json", best_hparams=True))
    key = ("lodo", "embedded", "erm", "sketch", 0)
    row = next(
        r
        for r in rows
        if (r["selection"], r["dataset"], r["algorithm"], r["test_env"], r["trial_seed"]) == key
    )
    assert (row["hparams_seed"], row["step"], row["hparams"]) == (1, 100, {"lr": 0.0003, "batch_size": 16})
    assert row["test_acc"] == pytest.approx(0.60 + 0.03 + 0.10) and row["val_acc"] == pytest.approx(0.62)
    text = report.render(agg, "terminal", best_hparams=True)
    assert "Chosen hyper-parameters" in text and '{"batch_size":16,"lr":0.0003}' in text
    lines = report.render(agg, "csv", best_hparams=True).splitlines()
    assert lines[0].startswith("dataset,algorithm,selection,test_env,trial_seed,hparams_seed,hparams")


def test_cli_json_to_stdout_and_file(golden_sweep, tmp_path, capsys):
    assert main([str(golden_sweep), "--format", "json", "--selection", "oracle", "--algorithm", "coral"]) == 0
    out, err = capsys.readouterr()
    cells = json.loads(out)
    assert {c["selection"] for c in cells} == {"oracle"} and {c["algorithm"] for c in cells} == {"coral"}
    assert "1 failed" in err
    target = tmp_path / "report" / "table.md"
    assert (
        main([str(golden_sweep), "--format", "markdown", "--output", str(target), "--dataset", "embedded"])
        == 0
    )
    out, err = capsys.readouterr()
    assert out == "" and f"wrote {target}" in err
    assert "| erm | 76.0 ± 0.7 |" in target.read_text()
    assert not list(target.parent.glob(".*.tmp"))  # atomic write left no temp file


def test_cli_errors_are_one_line_with_status_2(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"dgbench: error: results directory {tmp_path / 'nope'} does not exist"
    )
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "--selection", "iid,best"]) == 2
    assert "unknown selection method 'best'; known: iid, lodo, oracle" in capsys.readouterr().err


def test_cli_plots(golden_sweep, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    args = [
        str(golden_sweep),
        "--plot",
        str(tmp_path / "plots"),
        "--format",
        "csv",
        "--selection",
        "iid,lodo",
    ]
    assert main(args) == 0
    names = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert "curves_embedded.png" in names and "bars_iid_averages.png" in names
    assert "bars_lodo_embedded.png" in names and "bars_lodo_pacs.png" not in names  # no LODO for pacs
    assert all((tmp_path / "plots" / n).read_bytes()[:4] == b"\x89PNG" for n in names)


def test_plots_without_matplotlib_say_how_to_install(golden_sweep, tmp_path, monkeypatch):
    from dgbench import plots

    results = load_results([golden_sweep])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    with pytest.raises(DGBenchError, match=r'pip install "dgbench\[plot\]"'):
        plots.write_plots(results, aggregate(results), tmp_path / "plots")
    assert not (tmp_path / "plots").exists()
