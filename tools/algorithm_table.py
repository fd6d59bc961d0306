"""The README's algorithm table, generated from the algorithm registry so it cannot go stale.

One row per built-in algorithm (registered from a module under `dgbench.`; plugins are left out):
its `algorithm=` name, the class's `paper` and `reference`, the backbone family it needs
(`backbone_need.family`, or "any"), and its invariant tests: the test functions under `tests/`
marked `@pytest.mark.algorithm("<name>", ...)` (or by a module's or class's `pytestmark`), read with
`ast` (no pytest run; a parametrised test counts once), plus the contract test, which runs every
registered algorithm.

Rows: ERM first, then the algorithms whose reference is DomainBed's code, then the others, each
group by the year of the paper (then by name).

    python tools/algorithm_table.py                     # print the table
    python tools/algorithm_table.py --write README.md   # replace the table between the markers
    python tools/algorithm_table.py --check README.md   # exit 1 if the README's table differs

The README holds the table between the lines `<!-- algorithm-table:start -->` and
`<!-- algorithm-table:end -->`; `--write` replaces what lies between them (atomically) and
nothing else.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dgbench.atomic import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
TESTS_DIR = ROOT / "tests"
CONTRACT_TEST = ROOT / "tests" / "algorithms" / "test_contract.py"
START = "<!-- algorithm-table:start -->"
END = "<!-- algorithm-table:end -->"
MARK = "algorithm"  # pytest.mark.algorithm(*names), registered in pyproject.toml
DOMAINBED_REPO = "facebookresearch/DomainBed"

_YEAR = re.compile(r"(?<![\w.:/])((?:19|20)\d\d)(?![\w.])")  # a year, not part of an arXiv id
_ARXIV = re.compile(r"arXiv:(\d{4}\.\d{4,5})(v\d+)?")
_REFERENCE = re.compile(
    r"(?P<repo>[\w.-]+/[\w.-]+)@(?P<commit>[0-9a-fA-F]{7,40}) (?P<path>[^\s:]+):(?P<obj>[\w.]+)"
)


class TableError(Exception):
    """A problem the user must fix (a README without markers, a mark that cannot be read)."""


# ---------------------------------------------------------------- marked tests, read with ast


@dataclass(frozen=True)
class MarkedTest:
    """One test function (a parametrised one counts once) and the algorithms its marks name."""

    path: Path  # the test file
    name: str  # "test_x" or "TestClass::test_x"
    line: int
    algorithms: frozenset[str]


def _is_algorithm_mark(node: ast.expr) -> bool:
    """`pytest.mark.algorithm` or `mark.algorithm` (`from pytest import mark`)."""
    if not (isinstance(node, ast.Attribute) and node.attr == MARK):
        return False
    owner = node.value
    if isinstance(owner, ast.Name):
        return owner.id == "mark"
    return (
        isinstance(owner, ast.Attribute)
        and owner.attr == "mark"
        and isinstance(owner.value, ast.Name)
        and owner.value.id == "pytest"
    )


def _mark_names(node: ast.expr, path: Path) -> set[str]:
    """The algorithm names of one mark expression; empty for any other mark (`slow`, `parametrize`)."""
    if _is_algorithm_mark(node):  # the bare attribute, not called
        raise TableError(
            f"{path}:{node.lineno}: `{ast.unparse(node)}` names no algorithm; call it with names"
        )
    if not (isinstance(node, ast.Call) and _is_algorithm_mark(node.func)):
        return set()
    names = [arg.value for arg in node.args if isinstance(arg, ast.Constant) and isinstance(arg.value, str)]
    if node.keywords or len(names) != len(node.args) or not names:
        raise TableError(
            f"{path}:{node.lineno}: `{ast.unparse(node)}`: write the algorithm names as string literals, "
            'e.g. @pytest.mark.algorithm("erm", "sam"), so tools/algorithm_table.py can read them'
        )
    return set(names)


def _pytestmark_names(body: Sequence[ast.stmt], path: Path) -> set[str]:
    """Names from `pytestmark = <mark>` or `pytestmark = [<mark>, ...]` in a module or class body."""
    names: set[str] = set()
    targets: list[ast.expr]
    for stmt in body:
        if isinstance(stmt, ast.Assign):
            targets, value = stmt.targets, stmt.value
        elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
            targets, value = [stmt.target], stmt.value
        else:
            continue
        if not any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in targets):
            continue
        marks = value.elts if isinstance(value, ast.List | ast.Tuple) else [value]
        for mark in marks:
            names |= _mark_names(mark, path)
    return names


def _decorator_names(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef, path: Path) -> set[str]:
    names: set[str] = set()
    for decorator in node.decorator_list:
        names |= _mark_names(decorator, path)
    return names


def _collect(
    body: Sequence[ast.stmt], path: Path, inherited: set[str], prefix: str, out: list[MarkedTest]
) -> None:
    """Test functions of a module or `Test*` class body, as pytest collects them by default."""
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test"):
            names = inherited | _decorator_names(node, path)
            if names:
                out.append(MarkedTest(path, prefix + node.name, node.lineno, frozenset(names)))
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            names = inherited | _decorator_names(node, path) | _pytestmark_names(node.body, path)
            _collect(node.body, path, names, f"{prefix}{node.name}::", out)


def marked_tests_in_file(path: Path) -> list[MarkedTest]:
    """The test functions of one file that carry an `algorithm` mark (their own, class or module)."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except SyntaxError as error:
        raise TableError(f"{path}:{error.lineno}: cannot parse: {error.msg}") from None
    out: list[MarkedTest] = []
    _collect(tree.body, path, _pytestmark_names(tree.body, path), "", out)
    return out


def collect_marked_tests(tests_dir: Path = TESTS_DIR) -> list[MarkedTest]:
    """Marked test functions in every test file (`test_*.py`, `*_test.py`) under `tests_dir`."""
    files = sorted(
        p for p in tests_dir.rglob("*.py") if p.name.startswith("test_") or p.name.endswith("_test.py")
    )
    return [test for path in files for test in marked_tests_in_file(path)]


def tests_by_algorithm(tests: Iterable[MarkedTest]) -> dict[str, list[MarkedTest]]:
    """Algorithm name -> the marked tests that name it."""
    by_name: dict[str, list[MarkedTest]] = {}
    for test in tests:
        for name in test.algorithms:
            by_name.setdefault(name, []).append(test)
    return by_name


# ---------------------------------------------------------------- the registry and the rows


@dataclass(frozen=True)
class Row:
    name: str
    paper: str
    reference: str
    backbone: str
    tests: tuple[MarkedTest, ...]


def builtin_algorithms() -> dict[str, type[Any]]:
    """Registered algorithms defined under `dgbench.` (plugins, if any are loaded, are left out)."""
    from dgbench.components import load_components
    from dgbench.registry import ALGORITHMS

    load_components()
    return {
        e.name: e.obj
        for e in ALGORITHMS
        if isinstance(e.obj, type) and e.obj.__module__.startswith("dgbench.")
    }


def paper_year(paper: str) -> int:
    """The first year in the paper string (arXiv ids are not years); 9999 if there is none."""
    match = _YEAR.search(paper)
    return int(match.group(1)) if match else 9999


def row_order(name: str, reference: str, paper: str) -> tuple[int, int, str]:
    """ERM, then DomainBed's algorithms, then the others; each group by paper year, then name."""
    group = 0 if name == "erm" else 1 if reference.startswith(DOMAINBED_REPO + "@") else 2
    return group, paper_year(paper), name


def build_rows(
    algorithms: dict[str, type[Any]] | None = None, tests: Iterable[MarkedTest] | None = None
) -> list[Row]:
    """One row per algorithm, in `row_order`."""
    algorithms = builtin_algorithms() if algorithms is None else algorithms
    by_name = tests_by_algorithm(collect_marked_tests() if tests is None else tests)
    rows = []
    for name, cls in algorithms.items():
        need = getattr(cls, "backbone_need", None)
        rows.append(
            Row(
                name=name,
                paper=str(getattr(cls, "paper", "")),
                reference=str(getattr(cls, "reference", "")),
                backbone="any" if need is None else need.family,
                tests=tuple(by_name.get(name, ())),
            )
        )
    return sorted(rows, key=lambda r: row_order(r.name, r.reference, r.paper))


def metadata_problems(
    algorithms: dict[str, type[Any]] | None = None, tests: Iterable[MarkedTest] | None = None
) -> list[str]:
    """What an algorithm still lacks for its row: its own `paper` and `reference` (set in its class
    body, not inherited from a parent algorithm) and at least one marked invariant test; and marks
    that name no registered algorithm."""
    algorithms = builtin_algorithms() if algorithms is None else algorithms
    tests = list(collect_marked_tests() if tests is None else tests)
    by_name = tests_by_algorithm(tests)
    problems = []
    for name, cls in sorted(algorithms.items()):
        where = f"algorithm {name!r} ({cls.__module__}.{cls.__qualname__})"
        for attribute, example in (
            ("paper", '"Authors, Title, Venue Year, arXiv:XXXX.XXXXX"'),
            ("reference", '"owner/repo@commit path/to/file.py:Class"'),
        ):
            value = vars(cls).get(attribute)
            if not (isinstance(value, str) and value.strip()):
                inherited = getattr(cls, attribute, "")
                why = f" (it inherits {inherited!r})" if inherited else ""
                problems.append(f"{where}: set `{attribute} = {example}` in its class body{why}")
        if not by_name.get(name):
            problems.append(
                f"{where}: no invariant test; mark one under tests/ with "
                f'@pytest.mark.algorithm("{name}") (the contract test alone does not count)'
            )
    for test in tests:
        for name in sorted(test.algorithms - set(algorithms)):
            problems.append(f"{test.path}:{test.line} {test.name}: marks unknown algorithm {name!r}")
    return problems


# ---------------------------------------------------------------- Markdown


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _paper_cell(paper: str) -> str:
    if not paper.strip():
        return "?"
    return _ARXIV.sub(lambda m: f"[{m.group(0)}](https://arxiv.org/abs/{m.group(1)})", _cell(paper))


def _reference_cell(reference: str) -> str:
    if not reference.strip():
        return "?"
    parts = []
    for part in reference.split(";"):
        match = _REFERENCE.fullmatch(part.strip())
        if match is None:
            parts.append(_cell(part.strip()))
        else:
            url = f"https://github.com/{match['repo']}/blob/{match['commit']}/{match['path']}"
            parts.append(f"[{match.group(0)}]({url})")
    return "; ".join(parts)


def _link(path: Path, base: Path) -> str:
    return Path(os.path.relpath(path, base)).as_posix()


def _tests_cell(tests: Sequence[MarkedTest], base: Path) -> str:
    contract = f"[contract]({_link(CONTRACT_TEST, base)})"
    if not tests:
        return f"none + {contract}"
    files = sorted({t.path for t in tests})
    links = ", ".join(f"[{p.name}]({_link(p, base)})" for p in files)
    return f"{len(tests)} ({links}) + {contract}"


def render_table(rows: Sequence[Row], base: Path = ROOT) -> str:
    """The Markdown table; links to test files are relative to `base` (the README's folder)."""
    lines = [
        "| `algorithm=` | paper | reference code followed | backbone | invariant tests |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [
            f"`{row.name}`",
            _paper_cell(row.paper),
            _reference_cell(row.reference),
            _cell(row.backbone),
            _tests_cell(row.tests, base),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def generated_block(readme: Path, table: str | None = None) -> str:
    """What goes between the markers of `readme`: a do-not-edit note and the table."""
    table = render_table(build_rows(), readme.resolve().parent) if table is None else table
    note = (
        f"<!-- Generated by `{write_command(readme)}` from the algorithm registry:\n"
        "     edit the algorithm classes (`paper`, `reference`, `backbone_need`) and the tests'\n"
        "     `algorithm` marks, not this table. -->"
    )
    return f"{note}\n\n{table}\n"


# ---------------------------------------------------------------- the README between the markers


def write_command(readme: Path) -> str:
    try:
        shown = readme.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        shown = str(readme)
    return f"python tools/algorithm_table.py --write {shown}"


def _marker_span(text: str, readme: Path) -> tuple[int, int]:
    """Character offsets of the text between the start marker's line and the end marker's line."""
    starts = [m.end() for m in re.finditer(re.escape(START) + r"[ \t]*\r?\n", text)]
    ends = [m.start() for m in re.finditer(r"(?m)^[ \t]*" + re.escape(END), text)]
    if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
        found = f"found {len(starts)} start and {len(ends)} end marker line(s)"
        raise TableError(
            f"{readme}: the algorithm table needs exactly one line `{START}` followed later by one line "
            f"`{END}` ({found}); add them where the table goes, then run `{write_command(readme)}`"
        )
    return starts[0], ends[0]


def replace_table(text: str, block: str, readme: Path) -> str:
    """`text` with everything between the marker lines replaced by `block`."""
    begin, end = _marker_span(text, readme)
    return text[:begin] + block + text[end:]


def _read(path: Path) -> str:
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            return handle.read()
    except FileNotFoundError:
        raise TableError(f"{path}: no such file") from None


def write_readme(readme: Path, block: str | None = None) -> bool:
    """Regenerate the table in `readme`; returns whether the file changed."""
    text = _read(readme)
    new = replace_table(text, generated_block(readme) if block is None else block, readme)
    if new == text:
        return False
    atomic_write_text(readme, new)  # keeps the README's permissions
    return True


def check_readme(readme: Path, block: str | None = None) -> str | None:
    """None when the table in `readme` is current, else a message with the diff and the command."""
    text = _read(readme)
    expected = generated_block(readme) if block is None else block
    begin, end = _marker_span(text, readme)
    current = text[begin:end]
    if current == expected:
        return None
    diff = difflib.unified_diff(
        current.splitlines(), expected.splitlines(), f"{readme} (now)", "generated", lineterm="", n=0
    )
    return f"{readme}: the algorithm table is out of date; run `{write_command(readme)}`\n" + "\n".join(diff)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", type=Path, metavar="README", help="replace the table between the markers")
    group.add_argument("--check", type=Path, metavar="README", help="exit 1 if the table is not current")
    args = parser.parse_args(argv)
    try:
        if args.write is not None:
            changed = write_readme(args.write)
            print(f"{args.write}: algorithm table {'updated' if changed else 'already up to date'}")
        elif args.check is not None:
            message = check_readme(args.check)
            if message is not None:
                print(message, file=sys.stderr)
                return 1
            print(f"{args.check}: algorithm table is up to date")
        else:
            print(render_table(build_rows()))
    except TableError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
