"""Render aggregated results: tables (terminal, Markdown, LaTeX), CSV and JSON cells.

Tables follow DomainBed's `collect_results.py`: one table per dataset and selection rule
(rows = algorithms, columns = test domains + Avg), entries `mean ± sem` in percent with one
decimal, "X" where there is no result; the per-dataset Avg is the plain mean of the
domain means (no error bar, "X" if a domain is missing). Then an "Averages" table across
datasets: each dataset's "avg" cell (per-trial average over test domains, mean ± sem
over trials) and a last Avg column, the plain mean of those (no error bar). See
`dgbench.results` for the numbers.

CSV and JSON list one cell per row/object (`Cell.to_json`: the stable schema of DESIGN.md).
Text formats end with what is missing: failed runs (with their error), incomplete runs
(last step, running or dead by their heartbeat), absent trial and hparams seeds, missing
two-test-domain runs, and unreadable files. Machine formats keep stdout parseable;
`notes` gives those lines for stderr.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass

from dgbench.results import Aggregate, BestChoice, Cell, Run
from dgbench.selection import get_selection

FORMATS = ("terminal", "markdown", "latex", "csv", "json")
LIST_LIMIT = 25  # entries per listing in text reports before "... and N more"
LODO_MESSAGE = (
    "LODO needs runs with two test domains; this sweep has none{where}. Relaunch it with pairs of "
    "test domains as well (dataset.test_envs=[i,j] for every pair i<j, as DomainBed's sweep does "
    "unless --single_test_envs) to get leave-one-domain-out results."
)


@dataclass
class Table:
    title: str  # DomainBed-style header line (terminal)
    header: list[str]
    rows: list[list[str]]
    label: str = ""  # short heading under a selection section (Markdown, LaTeX)


def render(agg: Aggregate, fmt: str = "terminal", best_hparams: bool = False) -> str:
    """The whole report in `fmt`; with `best_hparams`, machine formats list the choices instead."""
    if fmt == "json":
        items = [c.to_json() for c in agg.choices] if best_hparams else [c.to_json() for c in agg.cells]
        return json.dumps(items, indent=2) + "\n"
    if fmt == "csv":
        return choices_csv(agg.choices) if best_hparams else cells_csv(agg.cells)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    writer = _WRITERS[fmt]
    parts = [writer.preamble(agg)]
    for selection in agg.selections:
        parts.append(writer.section(f"Model selection: {get_selection(selection).title}"))
        for item in selection_tables(agg, selection):
            parts.append(writer.table(item) if isinstance(item, Table) else writer.note(item))
    if best_hparams:
        parts.append(writer.section("Chosen hyper-parameters (per test domain and trial seed)"))
        parts.append(writer.table(best_hparams_table(agg.choices)))
    parts.append(writer.coverage(coverage_lines(agg)))
    return "".join(part for part in parts if part)


# ---------------------------------------------------------------- table content


def entry(cell: Cell, pm: str = "±") -> str:
    if cell.mean is None:
        return "X"
    return f"{cell.mean:.1f} {pm} {cell.sem or 0.0:.1f}"


def selection_tables(agg: Aggregate, selection: str, pm: str = "±") -> list[Table | str]:
    """The per-dataset tables and the Averages table of one rule; a note where LODO cannot run."""
    title = get_selection(selection).title
    missing = agg.lodo_unavailable if selection == "lodo" else []
    out: list[Table | str] = []
    if missing:
        where = " at all" if len(missing) == len(agg.datasets) else f" for {', '.join(missing)}"
        out.append(LODO_MESSAGE.format(where=where))
        if len(missing) == len(agg.datasets):
            return out
    for dataset in agg.datasets:
        if dataset in missing:
            continue
        domains = agg.domains[dataset]
        rows = []
        for algorithm in agg.algorithms:
            cells = [agg.cell(selection, dataset, algorithm, d) for d in domains]
            means = [c.mean for c in cells]
            avg = "X" if any(m is None for m in means) else f"{sum(means) / len(means):.1f}"  # type: ignore[arg-type]
            rows.append([algorithm, *(entry(c, pm) for c in cells), avg])
        header = ["Algorithm", *domains, "Avg"]
        out.append(Table(f"Dataset: {dataset}, model selection: {title}", header, rows, dataset))
    rows = []
    for algorithm in agg.algorithms:
        cells = [agg.cell(selection, dataset, algorithm, "avg") for dataset in agg.datasets]
        means = [c.mean for c in cells]
        avg = "X" if any(m is None for m in means) else f"{sum(means) / len(means):.1f}"  # type: ignore[arg-type]
        rows.append([algorithm, *(entry(c, pm) for c in cells), avg])
    header = ["Algorithm", *agg.datasets, "Avg"]
    out.append(Table(f"Averages, model selection: {title}", header, rows, "Averages over datasets"))
    return out


def best_hparams_table(choices: list[BestChoice]) -> Table:
    header = ["Dataset", "Algorithm", "Selection", "Test domain", "Trial", "Hparams seed"]
    header += ["Val %", "Test %", "Step", "Hparams"]
    rows = [
        [
            c.dataset, c.algorithm, c.selection, c.test_env, str(c.trial_seed), str(c.hparams_seed),
            f"{100 * c.val_acc:.1f}", f"{100 * c.test_acc:.1f}", str(c.step),
            json.dumps(c.hparams, sort_keys=True, separators=(",", ":")),
        ]
        for c in choices
    ]  # fmt: skip
    return Table("Chosen hyper-parameters", header, rows, "Chosen hyper-parameters")


def cells_csv(cells: list[Cell]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["dataset", "algorithm", "selection", "test_env", "mean", "sem", "n_trials"])
    for cell in cells:
        row = cell.to_json()
        writer.writerow(["" if v is None else v for v in row.values()])
    return out.getvalue()


def choices_csv(choices: list[BestChoice]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    keys = list(BestChoice.__dataclass_fields__)
    writer.writerow(keys)
    for choice in choices:
        row = choice.to_json()
        row["hparams"] = json.dumps(row["hparams"], sort_keys=True)
        writer.writerow(["" if row[k] is None else row[k] for k in keys])
    return out.getvalue()


# ---------------------------------------------------------------- missing and failed runs


def coverage_lines(agg: Aggregate) -> list[tuple[str, list[str]]]:
    """(heading, lines) sections saying what the tables lack; the first is a one-line summary."""
    cov = agg.coverage
    running = sum(run.running for run in cov.incomplete)
    summary = (
        f"{cov.runs} runs: {cov.done} done, {len(cov.incomplete)} incomplete "
        f"({running} running, {len(cov.incomplete) - running} dead), {len(cov.failed)} failed; "
        f"{agg.n_records} records used"
    )
    sections = [("Runs", [summary])]
    if cov.failed:
        sections.append(
            ("Failed runs (left out of the tables)", [f"{run.path}: {run.error}" for run in cov.failed])
        )
    if cov.incomplete:
        use = "left out: --only-done" if agg.only_done else "their records so far are used"
        sections.append((f"Incomplete runs ({use})", [_incomplete(run) for run in cov.incomplete]))
    if cov.missing_trials:
        sections.append(("Missing trial seeds", cov.missing_trials))
    if cov.missing_hparams:
        sections.append(("Missing hparams seeds", cov.missing_hparams))
    if cov.missing_pairs:
        sections.append(("Missing two-test-domain runs (LODO needs every pair)", cov.missing_pairs))
    warnings = list(cov.problems)
    if cov.torn_files:
        warnings.insert(
            0,
            f"{len(cov.torn_files)} results file(s) end in a torn line (a run killed mid-write), skipped: "
            + ", ".join(cov.torn_files[:5])
            + (" ..." if len(cov.torn_files) > 5 else ""),
        )
    if warnings:
        sections.append(("Warnings", warnings))
    return sections


def _incomplete(run: Run) -> str:
    step = "no records yet" if run.last_step is None else f"last step {run.last_step}"
    if run.idle_seconds is None:
        state = "dead? (no heartbeat file)"
    elif run.running:
        state = f"running ({run.idle_source} updated {_age(run.idle_seconds)} ago)"
    else:
        state = f"dead ({run.idle_source} unchanged for {_age(run.idle_seconds)})"
    return f"{run.path}: {step}, {state}"


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def notes(agg: Aggregate, fmt: str) -> list[str]:
    """Lines for stderr when stdout is CSV or JSON: the LODO message and a coverage summary."""
    if fmt not in ("csv", "json"):
        return []
    lines = []
    if agg.lodo_unavailable:
        where = (
            " at all"
            if len(agg.lodo_unavailable) == len(agg.datasets)
            else f" for {', '.join(agg.lodo_unavailable)}"
        )
        lines.append(LODO_MESSAGE.format(where=where))
    sections = coverage_lines(agg)
    lines.append(sections[0][1][0])
    for heading, items in sections[1:]:
        lines.append(f"{heading}: {len(items)} (see --format terminal for the list)")
    return lines


# ---------------------------------------------------------------- writers


def _limited(items: list[str]) -> list[str]:
    if len(items) <= LIST_LIMIT:
        return items
    return [*items[:LIST_LIMIT], f"... and {len(items) - LIST_LIMIT} more"]


class _Terminal:
    def preamble(self, agg: Aggregate) -> str:
        return "Test accuracy (%) of the selected model: mean ± standard error over trial seeds.\n"

    def section(self, title: str) -> str:
        return f"\n======== {title}\n"

    def note(self, text: str) -> str:
        return f"\n{text}\n"

    def table(self, table: Table) -> str:
        rows = [table.header, *table.rows]
        widths = [max(len(row[i]) for row in rows) for i in range(len(table.header))]
        lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in rows]
        return f"\n-------- {table.title}\n" + "\n".join(lines) + "\n"

    def coverage(self, sections: list[tuple[str, list[str]]]) -> str:
        out = []
        for heading, items in sections:
            out.append(f"\n{heading}:\n" + "".join(f"  {item}\n" for item in _limited(items)))
        return "".join(out)


class _Markdown:
    def preamble(self, agg: Aggregate) -> str:
        return "Test accuracy (%) of the selected model: mean ± standard error over trial seeds.\n"

    def section(self, title: str) -> str:
        return f"\n## {title}\n"

    def note(self, text: str) -> str:
        return f"\n> {text}\n"

    def table(self, table: Table) -> str:
        def row(values: list[str]) -> str:
            return "| " + " | ".join(v.replace("|", "\\|") for v in values) + " |"

        align = ["---", *["--:"] * (len(table.header) - 1)]
        lines = [row(table.header), "|" + "|".join(align) + "|", *(row(r) for r in table.rows)]
        return f"\n### {table.label or table.title}\n\n" + "\n".join(lines) + "\n"

    def coverage(self, sections: list[tuple[str, list[str]]]) -> str:
        out = []
        for heading, items in sections:
            body = "".join("- " + item.replace("|", "\\|") + "\n" for item in _limited(items))
            out.append(f"\n**{heading}**\n\n{body}")
        return "".join(out)


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


class _Latex:
    def preamble(self, agg: Aggregate) -> str:
        return (
            "% dgbench results: test accuracy (%) of the selected model, mean $\\pm$ standard error over\n"
            "% trial seeds. Tables use booktabs: \\usepackage{booktabs}.\n"
        )

    def section(self, title: str) -> str:
        return f"\n\\subsection*{{{latex_escape(title)}}}\n"

    def note(self, text: str) -> str:
        return f"\n\\noindent {latex_escape(text)}\n"

    def table(self, table: Table) -> str:
        def row(values: list[str]) -> str:
            return " & ".join(values) + r" \\"

        header = [r"\textbf{" + latex_escape(h) + "}" for h in table.header]
        body = [row([latex_escape(v).replace("±", r"$\pm$") for v in r]) for r in table.rows]
        spec = "l" + "c" * (len(table.header) - 1)
        lines = [
            f"\\subsubsection*{{{latex_escape(table.label or table.title)}}}",
            "\\begin{center}",
            f"\\begin{{tabular}}{{{spec}}}",
            "\\toprule",
            row(header),
            "\\midrule",
            *body,
            "\\bottomrule",
            "\\end{tabular}",
            "\\end{center}",
        ]
        return "\n" + "\n".join(lines) + "\n"

    def coverage(self, sections: list[tuple[str, list[str]]]) -> str:
        out = []
        for heading, items in sections:
            out.append(f"\n% {heading}:\n" + "".join(f"%   {item}\n" for item in _limited(items)))
        return "".join(out)


_WRITERS: dict[str, _Terminal | _Markdown | _Latex] = {
    "terminal": _Terminal(),
    "markdown": _Markdown(),
    "latex": _Latex(),
}
