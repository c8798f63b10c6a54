"""Command line: ``python -m reports build [options]`` (see ``python -m reports build --help``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from benchmarks.errors import BenchmarkError
from reports import stats
from reports.build import FORMATS, build_report
from reports.render import text


def _split(values: Sequence[str] | None) -> list[str] | None:
    return None if values is None else [part.strip() for v in values for part in v.split(",") if part.strip()]


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 100:
        raise argparse.ArgumentTypeError(f"takes a whole number >= 100, got {text!r}")
    return int(text)


def make_parser() -> argparse.ArgumentParser:
    """The parser; the options' names and help are ``templates/text.yaml``'s `cli.options`."""
    parser = argparse.ArgumentParser(prog="python -m reports", description=text("cli.description"))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    build = sub.add_parser("build", help=text("cli.build"), description=text("build_help"),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    for option in text("cli.options", formats=", ".join(FORMATS), n_boot=stats.N_BOOT, seed=stats.SEED):
        flags = option.pop("flags")
        if flags == ["--n-boot"]:
            option.update(type=_positive, default=stats.N_BOOT)
        build.add_argument(*flags, **option)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    epochs = _split(args.epochs)
    bad = [e for e in epochs or [] if not e.isdigit()]
    if bad:
        parser.error(f"--epochs takes whole numbers, got {', '.join(bad)}")
    try:
        result = build_report(args.results, args.out, suites=_split(args.suites), methods=_split(args.methods),
                              epochs=None if epochs is None else [int(e) for e in epochs],
                              formats=_split(args.formats) or list(FORMATS), paper_csv=args.paper_csv,
                              figures=not args.no_figures, n_boot=args.n_boot)
    except BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not (len(result["cells"]) or result["excluded"] or result["skipped"] or result["superseded"]):
        which = " matches the filters" if (args.suites or args.methods or args.epochs) else ""
        print(text("cli.no_records", results=args.results, which=which), file=sys.stderr)
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
