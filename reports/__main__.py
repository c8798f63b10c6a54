"""Command line: ``python -m reports build [options]`` (see ``python -m reports build --help``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from benchmarks.errors import BenchmarkError
from reports import stats
from reports.build import FORMATS, build_report
from reports.render import text


def _resamples(value: str) -> int:
    if not value.isdigit() or int(value) < 100:
        raise argparse.ArgumentTypeError(f"takes a whole number >= 100, got {value!r}")
    return int(value)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m reports",
        description="Build the benchmark report (tables and figures) from the run records in results/.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    build = sub.add_parser("build", help="build Markdown/LaTeX/HTML tables and figures from the run records",
                           description=text("build_help"), formatter_class=argparse.RawDescriptionHelpFormatter)
    build.add_argument("--results", default="results", metavar="DIR",
                       help="folder of run records, searched recursively (default: %(default)s)")
    build.add_argument("--out", default="reports/generated", metavar="DIR",
                       help="output folder, created if missing; must not be a file (default: %(default)s)")
    build.add_argument("--suite", "--suites", dest="suites", nargs="+", action="extend", metavar="SUITE",
                       help="only these suites (e.g. digits cifar10)")
    build.add_argument("--methods", nargs="+", action="extend", metavar="METHOD",
                       help="only these methods, by registry, variant or display name (e.g. simclr byol "
                            "self_classifier/reimpl); reference rows are kept only if named (random_init, "
                            "supervised)")
    build.add_argument("--epochs", nargs="+", action="extend", metavar="N",
                       help="only runs with these numbers of pretraining epochs")
    build.add_argument("--format", dest="formats", nargs="+", action="extend", metavar="FMT",
                       help=f"output formats, any of {', '.join(FORMATS)} (default: all)")
    build.add_argument("--paper-csv", metavar="CSV",
                       help="papers' numbers (default: reports/paper_results.csv)")
    build.add_argument("--no-figures", action="store_true", help="skip the PNG figures (faster)")
    build.add_argument("--n-boot", type=_resamples, default=stats.N_BOOT, metavar="B",
                       help=f"bootstrap resamples for the intervals and tests (default: %(default)s, seed "
                            f"{stats.SEED})")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        result = build_report(args.results, args.out, suites=args.suites, methods=args.methods, epochs=args.epochs,
                              formats=args.formats or FORMATS, paper_csv=args.paper_csv,
                              figures=not args.no_figures, n_boot=args.n_boot)
    except BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not (len(result["cells"]) or result["excluded"] or result["skipped"] or result["superseded"]):
        which = " matches the filters" if (args.suites or args.methods or args.epochs) else ""
        print(f"warning: no run record under {args.results}{which} (nothing to report; run `python -m "
              "benchmarks run` first or pass --results the folder it wrote); the report written has no table",
              file=sys.stderr)
        return 1
    for path in result["paths"].values():
        print(f"wrote {path}")
    if result["figures"]:
        print(f"wrote {len(result['figures'])} figure(s) under {result['figures'][0].parent}")
    if result["excluded"]:
        print(f"{len(result['excluded'])} run(s) not completed are listed in the report, not in the tables",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
