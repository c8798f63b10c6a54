"""Command line: `python -m benchmarks {run,evaluate,list} ...` (see --help of each)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from benchmarks.cli_common import deep_update, default_data_root, import_modules, parse_set, quiet_libraries
from benchmarks.errors import BenchmarkError, ConfigError

EPILOG = """examples:
  python -m benchmarks run --suite digits                      # the quick main job (CPU, minutes)
  python -m benchmarks run --suite digits --methods simclr byol swav --seeds 0 1 2 --epochs 20
  python -m benchmarks run --suite cifar10 --data-root ~/data --download
  python -m benchmarks run --suite my_suite.yaml --import my_methods.py --methods my_method
  python -m benchmarks evaluate --checkpoint runs/digits/simclr_e40_s0/model.pt --protocols knn clustering
  python -m benchmarks list
"""


def build_parser(with_evaluate: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark self-supervised methods under one protocol: pretrain, evaluate, record, report.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="show Lightning's and the libraries' logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="pretrain and evaluate methods on a suite, write run records",
                         description="Pretrain each method for each seed on the suite's data, evaluate it with "
                         "the suite's protocols and write one record per run under --out. Finished runs are "
                         "skipped (records are never overwritten without --force); interrupted runs resume "
                         "from their last epoch checkpoint under --work-dir.")
    run.add_argument("--suite", required=True, help="suite name (digits, mnist, cifar10, cifar100, cifar100-20, "
                     "stl10) or a path to a suite YAML file")
    run.add_argument("--methods", nargs="+", metavar="NAME", help="registered method names (default: the suite's "
                     "methods_to_run); see `python -m benchmarks list`")
    run.add_argument("--seeds", nargs="+", type=int, metavar="SEED", help="seeds (default: the suite's)")
    run.add_argument("--epochs", type=int, help="pretraining epochs (default: the suite's)")
    run.add_argument("--batch-size", type=int, help="per-device batch size (default: the suite's)")
    run.add_argument("--data-root", help="folder holding the dataset (default: $SSL_BENCH_DATA or ./data)")
    run.add_argument("--download", action="store_true", help="download the dataset into --data-root if missing")
    run.add_argument("--out", default="results", help="folder for run records (default: results)")
    run.add_argument("--work-dir", default="runs", help="folder for checkpoints and logs (default: runs)")
    run.add_argument("--no-references", action="store_true", help="skip the random-init and supervised rows")
    run.add_argument("--force", action="store_true", help="redo runs whose record exists and overwrite it (a "
                     "finished checkpoint is reused, so only the evaluation reruns; add --restart to retrain)")
    run.add_argument("--restart", action="store_true", help="delete the run's epoch checkpoint and train from "
                     "scratch instead of resuming")
    run.add_argument("--accelerator", choices=["auto", "cpu", "gpu"], help="device (default: auto)")
    run.add_argument("--devices", help="number of devices, or 'auto'")
    run.add_argument("--precision", help="32, bf16-mixed, 16-mixed or auto (bf16 on GPU)")
    run.add_argument("--protocols", nargs="+", help="evaluation protocols (default: the suite's)")
    run.add_argument("--logger", choices=["csv", "tensorboard", "wandb", "mlflow"],
                     help="experiment tracker beside the step CSV log (default: the suite's train.logger, csv); "
                     "wandb runs offline, mlflow writes to <run dir>/mlruns unless MLFLOW_TRACKING_URI is set")
    run.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                     help="override any suite key, e.g. --set train.batch_size=128 methods.simclr.temperature=0.5")
    run.add_argument("--import", dest="imports", nargs="+", default=[], metavar="MODULE",
                     help="import a module (dotted name or .py path) that registers your own methods")
    run.add_argument("--no-report", action="store_true", help="do not rebuild the report at the end")
    run.add_argument("--report-dir", default=None, help="where the report goes (default: reports/generated)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")

    lst = sub.add_parser("list", help="list registered methods, suites (with their methods) and datasets")
    lst.add_argument("--import", dest="imports", nargs="+", default=[], metavar="MODULE")

    cfg = sub.add_parser("config", help="print a suite's resolved config (YAML) or the suite-file JSON schema",
                         description="Resolve a suite file plus --set overrides exactly as `run` does and print "
                         "the result as YAML (every default filled in), or one method's resolved settings "
                         "(--method), or the JSON schema of a suite file for editors (--schema).")
    cfg.add_argument("--suite", help="suite name or YAML path")
    cfg.add_argument("--method", help="print this method's (or variant's) resolved settings instead")
    cfg.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="overrides, as for run")
    cfg.add_argument("--schema", action="store_true", help="print the JSON schema of a suite file")
    cfg.add_argument("--import", dest="imports", nargs="+", default=[], metavar="MODULE")

    if with_evaluate:
        try:
            from benchmarks.evaluate_cli import add_evaluate_parser
        except ImportError:
            pass
        else:
            add_evaluate_parser(sub)
    return parser


def cmd_run(args) -> int:
    # Order: the config (a bad key is reported within seconds, before Lightning and the evaluation
    # libraries load) and the dataset files, then names and hyperparameters, then the checks that
    # need both; only then any training.
    import_modules(args.imports)
    from benchmarks.config import load_suite
    from benchmarks.suite_data import load_suite_data

    config = load_suite(args.suite, deep_update(parse_set(args.set), cli_overrides(args)))
    methods = args.methods or config.methods_to_run
    if not methods:
        raise ConfigError("--methods: none given and the suite has no methods_to_run")
    if not args.no_references:
        methods = list(methods) + [r for r in config.references if r not in methods]
    data_root = default_data_root(args.data_root)
    from benchmarks.runner import check_method_settings

    check_method_settings(config, methods)
    data = load_suite_data(config, data_root, args.download)

    quiet_libraries(args.verbose)
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    from benchmarks.runner import preflight, run_one

    # DDP ranks > 0 (Lightning reruns this command for them) train along but stay silent and write nothing
    rank_zero = getattr(rank_zero_only, "rank", 0) == 0
    say = print if rank_zero else (lambda *args, **kwargs: None)

    preflight(config, methods, data)
    seeds = config.train.seeds
    started = time.perf_counter()
    rows = []
    for seed in seeds:
        for name in methods:
            t0 = time.perf_counter()
            say(f"[{config.name}] {name} seed {seed}: pretraining {config.method(name).epochs} epochs ...",
                flush=True)
            record = run_one(config, name, seed, args.out, args.work_dir, data=data, data_root=data_root,
                             force=args.force, restart=args.restart, progress=not args.no_progress)
            rows.append(record)
            knn = record["metrics"].get("knn_k20", {}).get("top1")
            nmi = record["metrics"].get("clustering", {}).get("NMI")
            summary = f"status {record['status']}"
            if knn is not None:
                summary += f", kNN(k=20) top-1 {knn:.1f}%"
            if nmi is not None:
                summary += f", NMI {nmi:.1f}"
            say(f"[{config.name}] {name} seed {seed}: {summary} ({time.perf_counter() - t0:.1f} s)", flush=True)
    say(f"{len(rows)} runs in {time.perf_counter() - started:.1f} s; records under {args.out}/{config.name}/")
    if not args.no_report and rank_zero:
        try:
            from reports.build import build_report
        except ImportError:
            print("(report generator not available; skipping the report)")
        else:
            out_dir = args.report_dir or os.path.join("reports", "generated")
            build_report(args.out, out_dir)
            print(f"report written to {out_dir}/")
    return 0


def cli_overrides(args) -> dict:
    """The dedicated flags of `run` as suite overrides (they win over --set)."""
    train: dict = {}
    if args.epochs is not None:
        train["epochs"] = args.epochs
    if args.batch_size is not None:
        train["batch_size"] = args.batch_size
    if args.seeds:
        train["seeds"] = args.seeds
    if args.accelerator:
        train["accelerator"] = args.accelerator
    if args.devices:
        if not (args.devices.isdigit() or args.devices in ("auto", "-1")):
            raise ConfigError(f"--devices: expected a number of devices or 'auto', got {args.devices!r}")
        train["devices"] = int(args.devices) if args.devices.lstrip("-").isdigit() else args.devices
    if args.precision:
        train["precision"] = args.precision
    if args.logger:
        train["logger"] = args.logger
    overrides: dict = {"train": train} if train else {}
    if args.protocols:
        overrides["evaluation"] = {"protocols": args.protocols}
    return overrides


def cmd_config(args) -> int:
    """Print the resolved config of a suite (YAML), or the JSON schema of a suite file."""
    import json

    import yaml

    import_modules(args.imports)
    from benchmarks.config import json_schema, load_suite

    if args.schema:
        print(json.dumps(json_schema(), indent=2, sort_keys=True))
        return 0
    if not args.suite:
        raise ConfigError("--suite: needed (a suite name or YAML file), unless --schema is given")
    config = load_suite(args.suite, parse_set(args.set))
    dump = config.canonical()
    if args.method:
        dump = config.method(args.method).model_dump(mode="json")
    print(yaml.safe_dump(dump, sort_keys=False, default_flow_style=None, width=110), end="")
    return 0


def cmd_list(args) -> int:
    from benchmarks.config import available_suites, load_suite
    from benchmarks.data import available_datasets
    from methods import available_methods, get_method

    import_modules(args.imports)
    print("methods:")
    for name in available_methods():
        cls = get_method(name)
        print(f"  {name:16s} {cls.display_name}{'  (reference row)' if cls.is_reference else ''}")
    print("suites (methods and named variants they run by default):")
    for suite in available_suites():
        config = load_suite(suite)
        print(f"  {suite:12s} {', '.join(config.methods_to_run)}")
    print("datasets: " + ", ".join(available_datasets()))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    # `run` and `list` do not need the evaluate command's parser (and its imports: a slow start)
    parser = build_parser(with_evaluate=command not in ("run", "list", "config"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if args.command != "run":  # cmd_run quiets them once it imports them
        quiet_libraries(args.verbose)
    handlers = {"run": cmd_run, "list": cmd_list, "config": cmd_config}
    if args.command == "evaluate":
        from benchmarks.evaluate_cli import cmd_evaluate

        handlers["evaluate"] = cmd_evaluate
    try:
        return handlers[args.command](args)
    except BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume from the last epoch checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
