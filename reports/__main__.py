"""Command line: ``python -m reports build [options]`` (see ``python -m reports build --help``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from benchmarks.errors import BenchmarkError
from reports.build import FORMATS, build_report

BUILD_HELP = """\
Read every run record (JSON) under --results, aggregate mean ± std over seeds, pair each cell with the
papers' number where the run is like-for-like (same method, dataset, protocol, metric and epochs), and
write under --out:

  report.md, report.tex (booktabs), report.html (self-contained: inline CSS, figures as base64 PNG)
  figures/bars_*.png (metric bars, error bars = std over seeds), figures/curves_*.png (training curves)

Cells show mean ± sample std (ddof=1) over seeds, the mean alone for a single seed, n = number of seeds;
bold = best non-reference method per column; "–" = not measured. Only completed runs enter the tables;
diverged/failed runs and malformed record files are listed in the report (malformed ones on stderr too)
and the build goes on without them. The same records always give byte-identical outputs.

List options take several values, space- or comma-separated (--epochs 100 200, --epochs 100,200).
Exit status: 0 on success (even with skipped records), 2 on a usage or input error.
"""


def _split(values: Sequence[str] | None) -> list[str] | None:
    if values is None:
        return None
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m reports",
        description="Build the benchmark report (tables and figures) from the run records in results/.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    build = sub.add_parser("build", help="build Markdown/LaTeX/HTML tables and figures from the run records",
                           description=BUILD_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    build.add_argument("--results", default="results", metavar="DIR",
                       help="folder of run records, searched recursively (default: results)")
    build.add_argument("--out", default="reports/generated", metavar="DIR",
                       help="output folder (default: reports/generated)")
    build.add_argument("--suite", "--suites", dest="suites", nargs="+", action="extend", metavar="SUITE",
                       help="only these suites (e.g. digits cifar10)")
    build.add_argument("--methods", nargs="+", action="extend", metavar="METHOD",
                       help="only these methods, by registry or display name (e.g. simclr byol); reference "
                            "rows are kept only if named (random_init, supervised)")
    build.add_argument("--epochs", nargs="+", action="extend", metavar="N",
                       help="only runs with these numbers of pretraining epochs")
    build.add_argument("--format", dest="formats", nargs="+", action="extend", metavar="FMT",
                       help=f"output formats, any of {', '.join(FORMATS)} (default: all)")
    build.add_argument("--paper-csv", metavar="CSV", default=None,
                       help="papers' numbers (default: reports/paper_results.csv)")
    build.add_argument("--no-figures", action="store_true", help="skip the PNG figures (faster)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    epochs = _split(args.epochs)
    if epochs is not None:
        bad = [e for e in epochs if not e.isdigit()]
        if bad:
            parser.error(f"--epochs takes whole numbers, got {', '.join(bad)}")
    formats = _split(args.formats) or list(FORMATS)
    try:
        result = build_report(args.results, args.out, suites=_split(args.suites), methods=_split(args.methods),
                              epochs=None if epochs is None else [int(e) for e in epochs], formats=formats,
                              paper_csv=args.paper_csv, figures=not args.no_figures)
    except BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in result["paths"].values():
        print(f"wrote {path}")
    if result["figures"]:
        print(f"wrote {len(result['figures'])} figure(s) under {result['figures'][0].parent}")
    n_excluded = len(result["excluded"])
    if n_excluded:
        print(f"{n_excluded} run(s) not completed are listed in the report, not in the tables", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
