"""`dgbench results DIR...`: model selection and result tables from run directories.

Reads dgbench run directories and DomainBed sweep directories (see `dgbench.results`),
applies the selection rules (`dgbench.selection`) and prints the tables
(`dgbench.report`). Exit status: 0 on success, 2 on a user error (printed as one line).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from dgbench.errors import DGBenchError

FORMATS = ("terminal", "markdown", "latex", "csv", "json")


def build_parser() -> argparse.ArgumentParser:
    from dgbench.selection import DEFAULT_SELECTIONS, SELECTIONS

    rules = ", ".join(f"{name} ({method.title})" for name, method in SELECTIONS.items())
    parser = argparse.ArgumentParser(
        prog="dgbench results",
        description="Select models as DomainBed does and print result tables (test accuracy in %, "
        "mean ± standard error over trial seeds). Reads dgbench run directories and DomainBed "
        "sweep output (<sweep>/<hash>/results.jsonl).",
    )
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="run directories or folders above them")
    parser.add_argument(
        "--selection",
        default=",".join(DEFAULT_SELECTIONS),
        help=f"comma-separated selection rules (default: %(default)s); known: {rules}",
    )
    parser.add_argument("--format", choices=FORMATS, default="terminal", help="output format")
    parser.add_argument(
        "--output", metavar="FILE", help="write the report to FILE (atomically) instead of stdout"
    )
    parser.add_argument(
        "--best-hparams",
        action="store_true",
        help="list the hparams seed and hparams chosen per cell and trial seed "
        "(csv/json: instead of the cells)",
    )
    parser.add_argument(
        "--plot", metavar="DIR", help='write PNG plots into DIR (needs pip install "dgbench[plot]")'
    )
    parser.add_argument(
        "--dataset",
        action="append",
        metavar="NAMES",
        help="only these datasets (comma-separated; repeatable)",
    )
    parser.add_argument(
        "--algorithm",
        action="append",
        metavar="NAMES",
        help="only these algorithms (comma-separated; repeatable)",
    )
    parser.add_argument(
        "--only-done", action="store_true", help="leave out incomplete runs (DomainBed uses every record)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        return _run(args)
    except DGBenchError as error:
        print(f"dgbench: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `dgbench results ... | head`: the reader has gone; not an error
        sys.stdout = open(os.devnull, "w")  # so the exit flush does not fail again
        return 0


def _names(values: Sequence[str] | None) -> list[str] | None:
    if not values:
        return None
    return [name.strip() for value in values for name in value.split(",") if name.strip()]


def _run(args: argparse.Namespace) -> int:
    from dgbench import report
    from dgbench.atomic import atomic_write_text
    from dgbench.results import aggregate, load_results
    from dgbench.selection import get_selection

    selections = list(dict.fromkeys(_names([args.selection]) or []))
    if not selections:
        raise DGBenchError("--selection is empty; give one or more of iid, lodo, oracle")
    for name in selections:
        get_selection(name)  # fails with the known names
    results = load_results(args.dirs)
    agg = aggregate(
        results,
        selections,
        datasets=_names(args.dataset),
        algorithms=_names(args.algorithm),
        only_done=args.only_done,
    )
    text = report.render(agg, args.format, best_hparams=args.best_hparams)
    if args.output:
        atomic_write_text(args.output, text)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
    for line in report.notes(agg, args.format):
        print(f"dgbench: {line}", file=sys.stderr)
    if args.plot:
        from dgbench.plots import write_plots

        files = write_plots(results, agg, args.plot)
        print(f"wrote {len(files)} plot(s) to {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
