"""Loading and aggregation: golden tables worked out by hand, DomainBed's own test sweep,
and robustness (torn lines, failed, incomplete and missing runs)."""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path

import pytest

from dgbench.errors import DGBenchError
from dgbench.report import selection_tables
from dgbench.results import aggregate, discover_runs, load_results, registered_domains

# With n = 2 trials: sem = 100 * np.std([a, b] / sqrt(2)) = 100 * |a - b| / (2 * sqrt(2)).
SQ8 = 2 * math.sqrt(2)


def cells_of(agg, selection):
    return {
        (c.dataset, c.algorithm, c.test_env): (c.mean, c.sem, c.n_trials)
        for c in agg.cells
        if c.selection == selection
    }


def assert_cells(actual, expected):
    for key, (mean, sem, n) in expected.items():
        got = actual[key]
        assert got[2] == n, key
        if mean is None:
            assert got[:2] == (None, None), key
        else:
            assert got[0] == pytest.approx(mean, abs=1e-9), key
            assert got[1] == pytest.approx(sem, abs=1e-9), key


# Golden sweep: see conftest.py for the data. Per group the rules pick
#   iid:    max V  -> (hparams 0, step 100), X = 0.00
#   lodo:   max L  -> (hparams 1, step 100), X = 0.10
#   oracle: max O among LAST checkpoints (step 200: 0.60 vs 0.65) -> (hparams 1, step 200), X = 0.15
# so test accuracy = BASE + 0.01 * t + TRIAL[r] + X.
# erm:   trials (0.00, 0.02): mean = BASE + 0.01 t + X + 0.01, sem = 100 * 0.02 / SQ8 = 0.7071
# coral: trials (0.00, 0.04): mean = BASE + 0.01 t + X + 0.02, sem = 100 * 0.04 / SQ8 = 1.4142;
#        painting (t = 1) has trial 0 only (trial 1 failed / absent): mean = 0.70 + 0.01 + X, sem = 0
# "avg" cell = per-trial mean over the domains that trial has, then mean/sem over trials:
#   erm   trial 0: (0.60 + 0.61 + 0.62 + 0.63) / 4 + X = 0.615 + X; trial 1: 0.635 + X
#         -> mean 62.5 + 100 X, sem 100 * 0.02 / SQ8
#   coral trial 0: (0.70 + 0.71 + 0.72 + 0.73) / 4 + X = 0.715 + X
#         trial 1 (no painting): (0.74 + 0.76 + 0.77) / 3 + X = 0.756667 + X
#         -> mean (0.715 + 0.756667) / 2 = 0.735833 + X, sem = 100 * (0.756667 - 0.715) / SQ8
#            = 100 * (1 / 24) / SQ8 = 1.4731
# pacs (erm only, one checkpoint): every domain 0.801 / 0.821 -> 81.1 +- 0.7071, avg the same.
CORAL_T1 = (0.74 + 0.76 + 0.77) / 3


def golden_expected(x):
    e = 100 * x
    erm = {
        d: (61.0 + t + e, 100 * 0.02 / SQ8, 2)
        for t, d in enumerate(["photo", "painting", "cartoon", "sketch"])
    }
    coral = {
        d: (72.0 + t + e, 100 * 0.04 / SQ8, 2)
        for t, d in enumerate(["photo", "painting", "cartoon", "sketch"])
    }
    coral["painting"] = (71.0 + e, 0.0, 1)
    out = {("embedded", "erm", d): v for d, v in erm.items()}
    out |= {("embedded", "coral", d): v for d, v in coral.items()}
    out[("embedded", "erm", "avg")] = (62.5 + e, 100 * 0.02 / SQ8, 2)
    out[("embedded", "coral", "avg")] = (100 * (0.715 + CORAL_T1) / 2 + e, 100 * (CORAL_T1 - 0.715) / SQ8, 2)
    return out


PACS_ERM = {
    ("pacs", "erm", d): (81.1, 100 * 0.02 / SQ8, 2)
    for d in ["art_painting", "cartoon", "photo", "sketch", "avg"]
}
PACS_CORAL = {
    ("pacs", "coral", d): (None, None, 0) for d in ["art_painting", "cartoon", "photo", "sketch", "avg"]
}


@pytest.fixture
def golden(golden_sweep):
    results = load_results([golden_sweep])
    return results, aggregate(results)


def test_golden_iid(golden):
    _, agg = golden
    assert_cells(cells_of(agg, "iid"), golden_expected(0.00) | PACS_ERM | PACS_CORAL)


def test_golden_lodo(golden):
    _, agg = golden
    assert_cells(cells_of(agg, "lodo"), golden_expected(0.10))
    # pacs has no two-test-domain runs: no LODO result, and it is said (not silently blank)
    assert agg.lodo_unavailable == ["pacs"]
    assert_cells(cells_of(agg, "lodo"), {k: (None, None, 0) for k in PACS_ERM})


def test_golden_oracle(golden):
    _, agg = golden
    assert_cells(cells_of(agg, "oracle"), golden_expected(0.15) | PACS_ERM | PACS_CORAL)


def test_golden_tables_use_domainbed_averages(golden):
    _, agg = golden
    tables = {t.title: t for t in selection_tables(agg, "iid") if not isinstance(t, str)}
    embedded = tables["Dataset: embedded, model selection: training-domain validation"]
    # registered domain order, although the records list sketch, photo, cartoon, painting
    assert embedded.header == ["Algorithm", "photo", "painting", "cartoon", "sketch", "Avg"]
    assert [row[0] for row in embedded.rows] == ["erm", "coral"]  # ERM first
    # per-dataset Avg = plain mean of the domain means, no error bar:
    #   erm (61 + 62 + 63 + 64) / 4 = 62.5; coral (72 + 71 + 74 + 75) / 4 = 73.0
    assert embedded.rows[0][1:] == ["61.0 ± 0.7", "62.0 ± 0.7", "63.0 ± 0.7", "64.0 ± 0.7", "62.5"]
    assert embedded.rows[1][1:] == ["72.0 ± 1.4", "71.0 ± 0.0", "74.0 ± 1.4", "75.0 ± 1.4", "73.0"]
    averages = tables["Averages, model selection: training-domain validation"]
    # Averages table: the avg cells (73.58 +- 1.47 for coral, unlike the 73.0 above: trial 1 lacks
    # painting), then the plain mean over datasets: erm (62.5 + 81.1) / 2 = 71.8; coral lacks pacs -> X
    assert averages.rows == [["erm", "62.5 ± 0.7", "81.1 ± 0.7", "71.8"], ["coral", "73.6 ± 1.5", "X", "X"]]


def test_golden_best_hparams(golden):
    _, agg = golden
    chosen = {
        (c.selection, c.algorithm, c.test_env, c.trial_seed): c
        for c in agg.choices
        if c.dataset == "embedded"
    }
    for selection, hparams_seed, step in (("iid", 0, 100), ("lodo", 1, 100), ("oracle", 1, 200)):
        c = chosen[selection, "erm", "cartoon", 1]
        assert (c.hparams_seed, c.step) == (hparams_seed, step)
        assert (
            c.hparams
            == {0: {"lr": 5e-05, "batch_size": 32}, 1: {"lr": 0.0003, "batch_size": 16}}[hparams_seed]
        )
        assert c.test_acc == pytest.approx(
            0.60 + 0.02 + 0.02 + {"iid": 0, "lodo": 0.10, "oracle": 0.15}[selection]
        )
        assert c.run_dir.endswith(f"erm_t2_h{hparams_seed}_r1")
    assert ("iid", "coral", "painting", 1) not in chosen  # failed run not used


def test_golden_coverage(golden):
    results, agg = golden
    cov = agg.coverage
    assert (cov.runs, cov.done, len(cov.failed), len(cov.incomplete)) == (87, 86, 1, 0)
    assert cov.failed[0].path.endswith("coral_t1_h0_r1") and cov.failed[0].error == "DivergedError: nan"
    assert cov.missing_trials == [
        "embedded coral test_env=painting: no usable run for trial seed(s) 1 "
        "(other runs of embedded have trial seeds 0, 1)"
    ]
    assert cov.missing_hparams == [] and cov.problems == [] and cov.torn_files == []
    assert cov.missing_pairs == []  # embedded has every pair; pacs has none (the LODO message says so)
    assert results.domains == {"embedded": ["photo", "painting", "cartoon", "sketch"], "pacs": [
        "art_painting", "cartoon", "photo", "sketch"]}  # fmt: skip


def test_filters_and_unknown_names(golden_sweep):
    results = load_results([golden_sweep])
    agg = aggregate(results, ["iid"], datasets=["PACS"], algorithms=["ERM"])  # DomainBed spelling works
    assert (agg.datasets, agg.algorithms, agg.selections) == (["pacs"], ["erm"], ["iid"])
    with pytest.raises(DGBenchError, match="datasets in these results: embedded, pacs"):
        aggregate(results, datasets=["vlcs"])


# ---------------------------------------------------------------- DomainBed interop

METHODS = {
    "training-domain validation set": "iid",
    "leave-one-domain-out cross-validation": "lodo",
    "test-domain validation set (oracle)": "oracle",
}


def parse_collect_results(text):
    """{(selection, table, algorithm): {column: entry}} from collect_results' text output."""
    tables, lines = {}, text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"-------- (Dataset: (\w+)|Averages), model selection method: (.*)$", line)
        if m:
            header = re.split(r"\s{2,}", lines[i + 1].strip())
            for row in lines[i + 2 :]:
                if not row.strip():
                    break
                values = re.split(r"\s{2,}", row.strip())
                key = (METHODS[m.group(3)], m.group(2) or "Averages", values[0])
                tables[key] = dict(zip(header[1:], values[1:], strict=True))
    return tables


def test_domainbed_test_sweep_matches_collect_results(domainbed_sweep):
    """DomainBed's own test sweep (VLCS, ERM, 2 hparams x 2 trials, all 1- and 2-domain test sets) and
    its `collect_results.py` output, vendored from facebookresearch/DomainBed (fixtures/NOTICE)."""
    expected_text = (domainbed_sweep.parent / "domainbed_collect_results.txt").read_text()
    expected = parse_collect_results(expected_text)
    assert len(expected) == 6
    results = load_results([domainbed_sweep])
    assert f"Total records: {results.n_records}" == expected_text.splitlines()[0]
    agg = aggregate(results)
    assert (agg.datasets, agg.algorithms) == (["vlcs"], ["ERM"])  # names mapped; algorithm kept
    short = dict(zip(["C", "L", "S", "V"], agg.domains["vlcs"], strict=True))  # DomainBed's env labels
    for selection in ("iid", "lodo", "oracle"):
        dataset_row = expected[selection, "VLCS", "ERM"]
        for label, domain in short.items():
            cell = agg.cell(selection, "vlcs", "ERM", domain)
            assert f"{cell.mean:.1f} +/- {cell.sem:.1f}" == dataset_row[label], (selection, domain)
        table = selection_tables(agg, selection, pm="+/-")[0]
        assert table.rows[0][-1] == dataset_row["Avg"]  # per-dataset Avg: mean of domain means
        averages_row = expected[selection, "Averages", "ERM"]
        avg = agg.cell(selection, "vlcs", "ERM", "avg")
        assert f"{avg.mean:.1f} +/- {avg.sem:.1f}" == averages_row["VLCS"]
        assert f"{avg.mean:.1f}" == averages_row["Avg"]


def test_domainbed_importer_maps_names(tmp_path):
    def db_record(dataset, test_envs, n_envs, step=100):
        rec = {"args": {"dataset": dataset, "algorithm": "ERM", "test_envs": test_envs, "hparams_seed": 0,
                        "trial_seed": 0}, "hparams": {"lr": 1e-4}, "step": step}  # fmt: skip
        for i in range(n_envs):
            rec[f"env{i}_in_acc"], rec[f"env{i}_out_acc"] = 0.5 + 0.1 * i, 0.4
        return rec

    for name, dataset, n in (("a", "PACS", 4), ("b", "MyData", 3)):
        folder = tmp_path / "sweep" / name
        folder.mkdir(parents=True)
        (folder / "results.jsonl").write_text(json.dumps(db_record(dataset, [1], n)) + "\n")
    (tmp_path / "sweep" / "a" / "done").write_text("")
    results = load_results([tmp_path / "sweep"])
    assert results.domains == {"pacs": ["art_painting", "cartoon", "photo", "sketch"],
                               "MyData": ["env0", "env1", "env2"]}  # fmt: skip
    by_dataset = {run.dataset: run for run in results.runs}
    assert by_dataset["pacs"].source == "domainbed" and by_dataset["pacs"].status == "done"
    assert by_dataset["MyData"].status == "incomplete"
    agg = aggregate(results, ["oracle"])
    assert agg.cell("oracle", "pacs", "ERM", "cartoon").mean == pytest.approx(60.0)


def test_dgbench_and_domainbed_runs_share_a_table(domainbed_sweep, tmp_path, kit):
    acc = {d: {"in": 0.9, "out": 0.8} for d in ["VOC2007", "SUN09", "LabelMe", "Caltech101"]}
    kit.write_run(tmp_path / "ours" / "r", [kit.record("vlcs", "erm", [2], 0, 0, 100, acc)])
    agg = aggregate(load_results([domainbed_sweep, tmp_path / "ours"]), ["oracle"])
    assert agg.algorithms == ["ERM", "erm"]  # DomainBed's spelling is kept: two rows
    assert agg.domains["vlcs"] == ["Caltech101", "LabelMe", "SUN09", "VOC2007"]
    assert agg.cell("oracle", "vlcs", "erm", "SUN09").mean == pytest.approx(90.0)
    assert agg.cell("oracle", "vlcs", "ERM", "SUN09").mean == pytest.approx(71.64889565879665)


def test_registered_domain_orders():
    assert registered_domains("embedded") == ["photo", "painting", "cartoon", "sketch"]
    assert registered_domains("rotated_mnist") == ["0", "15", "30", "45", "60", "75"]
    assert registered_domains("colored_mnist") == ["+90%", "+80%", "-90%"]
    assert registered_domains("officehome") == ["Art", "Clipart", "Product", "Real World"]
    assert registered_domains("my_plugin_dataset") is None


# ---------------------------------------------------------------- robustness


def test_torn_last_line_is_skipped_and_counted(tmp_path, kit):
    folder = kit.write_run(
        tmp_path / "runs" / "r1", kit.embedded_records(), tail='{"run_id": "x", "dataset": "emb'
    )
    results = load_results([tmp_path / "runs"])
    assert results.torn_files == [str(folder / "results.jsonl")]
    assert [ck.step for ck in results.runs[0].checkpoints] == [100, 200]
    assert results.problems == []


def test_bad_line_and_bad_record_are_reported_with_their_path(tmp_path, kit):
    recs = kit.embedded_records()
    folder = tmp_path / "runs" / "bad_line"
    kit.write_run(folder, [])
    (folder / "results.jsonl").write_text(json.dumps(recs[0]) + "\nnot json\n" + json.dumps(recs[1]) + "\n")
    broken = kit.embedded_records()
    del broken[1]["acc"]
    other = kit.write_run(tmp_path / "runs" / "no_acc", broken)
    results = load_results([tmp_path / "runs"])
    assert any(p.startswith(f"{folder / 'results.jsonl'}: line 2 is not JSON") for p in results.problems)
    assert any(
        p.startswith(f"{other / 'results.jsonl'}: unusable record (missing key 'acc')")
        for p in results.problems
    )
    by_path = {run.path: run for run in results.runs}
    assert len(by_path[str(folder)].checkpoints) == 2 and by_path[str(other)].checkpoints == []


def test_failed_and_incomplete_runs_are_listed(tmp_path, kit):
    root = tmp_path / "runs"
    kit.write_run(root / "done", kit.embedded_records())
    kit.write_run(
        root / "failed", kit.embedded_records(hparams_seed=1), status="failed", error="ValueError: bad lr"
    )
    kit.write_run(
        root / "running", kit.embedded_records(hparams_seed=2, steps=(100,)), status="", heartbeat_age=30
    )
    kit.write_run(
        root / "dead", kit.embedded_records(hparams_seed=3, steps=(100,)), status="", heartbeat_age=3 * 3600
    )
    quiet = kit.write_run(
        root / "no_heartbeat", kit.embedded_records(hparams_seed=4, steps=(100,)), status=""
    )
    old = time.time() - 7200
    os.utime(quiet / "results.jsonl", (old, old))
    (root / "early_failure").mkdir()  # failed before writing a record
    (root / "early_failure" / "status.json").write_text(
        json.dumps({"status": "failed", "error": "DataError: x"})
    )

    (root / "starting").mkdir()  # killed before its first record: identity from config.yaml
    (root / "starting" / "config.yaml").write_text(
        "dataset:\n  name: embedded\n  test_envs: [2]\nalgorithm:\n  name: erm\n"
        "hparams_seed: 7\ntrial_seed: 0\n"
    )

    agg = aggregate(load_results([root]))
    cov = agg.coverage
    assert sorted(Path(r.path).name for r in cov.failed) == ["early_failure", "failed"]
    assert {Path(r.path).name: r.error for r in cov.failed}["failed"] == "ValueError: bad lr"
    states = {Path(r.path).name: (r.last_step, r.running, r.idle_source) for r in cov.incomplete}
    assert states == {
        "running": (100, True, "heartbeat"),
        "dead": (100, False, "heartbeat"),
        "no_heartbeat": (100, False, "results.jsonl"),
        "starting": (None, False, None),
    }
    starting = next(r for r in cov.incomplete if r.path.endswith("starting"))
    assert (starting.dataset, starting.algorithm, starting.test_envs, starting.hparams_seed) == (
        "embedded", "erm", (2,), 7,
    )  # fmt: skip
    # DomainBed reads every record: incomplete runs count (hparams 2-4 at step 100), failed ones do not
    assert agg.n_records == 2 + 3
    assert aggregate(load_results([root]), only_done=True).n_records == 2


def test_missing_hparams_seeds_are_listed(tmp_path, kit):
    root = tmp_path / "runs"
    for h in (0, 1):
        kit.write_run(root / f"t0_h{h}", kit.embedded_records(test_envs=(0,), hparams_seed=h))
    kit.write_run(root / "t1_h0", kit.embedded_records(test_envs=(1,), hparams_seed=0))
    cov = aggregate(load_results([root])).coverage
    assert cov.missing_hparams == [
        "embedded erm test_env=painting trial_seed=0: no usable run for hparams seed(s) 1"
    ]
    # test domains never run at all are listed too
    assert [line.split(":")[0] for line in cov.missing_trials] == [
        "embedded erm test_env=cartoon",
        "embedded erm test_env=sketch",
    ]


def test_missing_lodo_pairs_are_listed(tmp_path, kit):
    root = tmp_path / "runs"
    for t in range(4):
        kit.write_run(root / f"t{t}", kit.embedded_records(test_envs=(t,)))
    kit.write_run(root / "t01", kit.embedded_records(test_envs=(0, 1)))
    agg = aggregate(load_results([root]))
    assert agg.lodo_unavailable == []
    assert agg.coverage.missing_pairs == [
        "embedded erm trial_seed=0: no run with test domains {photo, cartoon}, {photo, sketch}, "
        "{painting, cartoon}, {painting, sketch}, {cartoon, sketch}"
    ]
    assert agg.cell("lodo", "embedded", "erm", "photo").mean is None  # {photo, cartoon} etc. missing
    assert aggregate(load_results([root]), ["iid"]).coverage.missing_pairs == []


def test_discovery_skips_hidden_folders_and_does_not_descend_into_runs(tmp_path, kit):
    kit.write_run(tmp_path / "a" / "sweep" / "r1", kit.embedded_records())
    kit.write_run(tmp_path / "a" / "sweep" / "r1" / "nested", kit.embedded_records())  # inside a run: ignored
    kit.write_run(tmp_path / "a" / ".multirun" / "r2", kit.embedded_records())  # Hydra's folder: ignored
    kit.write_run(tmp_path / "b" / "r3", kit.embedded_records())
    found = [
        Path(p).relative_to(tmp_path).as_posix() for p, _ in discover_runs([tmp_path / "a", tmp_path / "b"])
    ]
    assert found == ["a/sweep/r1", "b/r3"]
    assert [Path(p).name for p, _ in discover_runs([tmp_path / "a" / "sweep" / "r1"])] == ["r1"]
    with pytest.raises(DGBenchError, match="does not exist"):
        discover_runs([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DGBenchError, match="no runs found"):
        load_results([tmp_path / "empty"])


def test_an_algorithm_on_several_backbones_gets_one_row_per_backbone(tmp_path, kit):
    """GMoE is ERM on another backbone: its runs must not be pooled into the CNN's ERM row."""
    for backbone, accuracy in (("small_cnn", 0.5), ("gmoe_test_vit", 0.9)):
        records = kit.embedded_records()
        for r in records:
            r["backbone"] = backbone
            r["acc"] = {d: {"in": accuracy, "out": accuracy} for d in r["acc"]}
        kit.write_run(tmp_path / "runs" / backbone, records)
    results = load_results([tmp_path / "runs"])
    assert sorted(r.algorithm for r in results.runs) == ["erm (gmoe_test_vit)", "erm (small_cnn)"]
    agg = aggregate(results, ["oracle"], algorithms=["erm"])  # the plain name selects both rows
    assert agg.algorithms == ["erm (gmoe_test_vit)", "erm (small_cnn)"]
    test_env = results.runs[0].test_envs[0]
    domain = results.domains["embedded"][test_env]
    assert agg.cell("oracle", "embedded", "erm (gmoe_test_vit)", domain).mean == pytest.approx(90.0)
    assert agg.cell("oracle", "embedded", "erm (small_cnn)", domain).mean == pytest.approx(50.0)
