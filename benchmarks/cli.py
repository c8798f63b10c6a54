"""Command line: `python -m benchmarks {run,evaluate,list,config,init-suite} ...` (see --help of each)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from pathlib import Path

from benchmarks.cli_common import deep_update, default_data_root, import_modules, parse_set, quiet_libraries
from benchmarks.errors import BenchmarkError, ConfigError

EPILOG = """examples:
  python -m benchmarks run --suite digits                      # the quick main job (CPU, minutes)
  python -m benchmarks run --suite digits --methods simclr byol swav --seeds 0 1 2 --epochs 20
  python -m benchmarks run --suite cifar10 --data-root ~/data --download
  python -m benchmarks run --suite my_suite.yaml --import my_methods.py --methods my_method
  python -m benchmarks evaluate --checkpoint runs/digits/simclr_e20_s0_<fingerprint>/model.pt --protocols knn clustering
  python -m benchmarks list
  python -m benchmarks config --suite digits --method carl    # resolved settings
  python -m benchmarks init-suite --from-folder ~/my_images --out my_suite.yaml   # a suite for your own images
  python -m benchmarks reproduce carl-carp-dissertation --table 5.2 --dry-run   # a paper's table: plan, cost
"""


# benchmarks.evaluation.settings.PROTOCOLS, written out so that --help imports neither pydantic nor torch
# (tests/test_command_line.py checks that the two agree)
PROTOCOL_NAMES = ("knn", "linear", "online_linear", "semi", "finetune", "transfer", "clustering", "knn_k10",
                  "block_classifier")


def _suite_names() -> list[str]:
    # The same glob as benchmarks.config.available_suites, without importing torch for --help.
    return sorted(p.stem for p in (Path(__file__).parent / "configs").glob("*.yaml"))


def _add_run_selection_args(run: argparse.ArgumentParser) -> None:
    """`run`: what runs (suite, methods, seeds, budget) on which data."""
    run.add_argument("--suite", required=True, help=f"suite name ({', '.join(_suite_names())}) or a path to a "
                     "suite YAML file (`init-suite --from-folder DIR` writes one for a folder of your own images)")
    run.add_argument("--methods", nargs="+", metavar="NAME", help="registered method names or named variants "
                     "(method/variant, e.g. self_classifier/reimpl; default: the suite's methods_to_run); see "
                     "`python -m benchmarks list`")
    run.add_argument("--seeds", nargs="+", type=int, metavar="SEED", help="seeds (default: the suite's)")
    run.add_argument("--epochs", type=int, help="pretraining epochs of every method and variant of the run, also "
                     "over a method section's own train.epochs (default: the suite's, or the section's)")
    run.add_argument("--batch-size", type=int, help="per-device batch size of every method and variant of the run, "
                     "also over a method section's own train.batch_size (default: the suite's, or the section's)")
    run.add_argument("--data-root", help="folder holding the dataset (default: $SSL_BENCH_DATA or ./data); for an "
                     "imagefolder suite, the folder ROOT of ROOT/<split>/<class>/<image>")
    run.add_argument("--download", action="store_true", help="download the dataset into --data-root if missing")


def _add_run_output_args(run: argparse.ArgumentParser) -> None:
    """`run`: where records and checkpoints go, and which runs are redone."""
    run.add_argument("--out", default="results", help="folder for run records (default: results)")
    run.add_argument("--work-dir", default="runs", help="folder for checkpoints and logs (default: runs)")
    run.add_argument("--no-references", action="store_true", help="skip the random-init and supervised rows")
    run.add_argument("--force", action="store_true", help="redo runs whose record (of the same settings) exists "
                     "and overwrite it; a finished checkpoint is reused, so only the evaluation reruns")
    run.add_argument("--restart", action="store_true", help="delete the run's epoch checkpoint and train from "
                     "scratch instead of resuming (replaces the record of the same settings)")


def _add_run_setting_args(run: argparse.ArgumentParser) -> None:
    """`run`: device, precision, threads, protocols, tracker and overrides of the suite."""
    run.add_argument("--accelerator", choices=["auto", "cpu", "gpu"], help="device (default: auto)")
    run.add_argument("--devices", help="number of devices, or 'auto'")
    run.add_argument("--precision", help="32, bf16-mixed, 16-mixed or auto (bf16 on GPU)")
    run.add_argument("--threads", type=int, help="CPU threads per run (train.threads; default auto: this machine's "
                     "CPUs split between the runs at once, or the SLURM job's CPUs). CPU results are bitwise "
                     "reproducible on the same CPU model and thread count")
    run.add_argument("--protocols", nargs="+", metavar="PROTOCOL",
                     help=f"evaluation protocols: {', '.join(PROTOCOL_NAMES)} (default: the suite's)")
    run.add_argument("--logger", choices=["csv", "tensorboard", "wandb", "mlflow"],
                     help="experiment tracker beside the step CSV log (default: the suite's train.logger, csv); "
                     "wandb runs offline, mlflow writes to <run dir>/mlruns unless MLFLOW_TRACKING_URI is set")
    run.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                     help="override any suite key, e.g. --set train.batch_size=128 methods.simclr.temperature=0.5")
    run.add_argument("--import", dest="imports", nargs="+", default=[], metavar="MODULE",
                     help="import a module (dotted name or .py path) that registers your own methods")


def _add_run_launcher_args(run: argparse.ArgumentParser) -> None:
    """`run`: how the runs go (in this process, local workers, a SLURM job array)."""
    run.add_argument("--launcher", choices=["none", "local", "slurm"], help="how the runs go: one after another "
                     "in this process (none, the default), --jobs N at a time in local worker processes (local: "
                     "threads split between them, one GPU each where there are GPUs), or as a SLURM job array "
                     "through submitit (slurm: pre-empted jobs are requeued and resume)")
    run.add_argument("--jobs", type=int, help="runs at a time (local launcher; SLURM: array parallelism)")
    run.add_argument("--slurm-partition", help="SLURM partition (launcher.slurm.partition)")
    run.add_argument("--slurm-time-min", type=int, help="SLURM time limit per job, minutes")
    run.add_argument("--slurm-gpus", type=int, help="GPUs per job (launcher.slurm.gpus_per_node; default: none for a "
                     "CPU run, one per device otherwise)")
    run.add_argument("--slurm-cpus", type=int, help="CPUs per job (launcher.slurm.cpus_per_task; default: the run's "
                     "threads, which follow it when they are auto)")
    run.add_argument("--slurm-mem-gb", type=int, help="memory per job, GB")
    run.add_argument("--slurm-max-requeues", type=int, help="times a job that reaches its time limit (or is "
                     "pre-empted) is requeued to resume from its checkpoint (launcher.slurm.max_requeues, "
                     "default 100)")
    run.add_argument("--slurm-account", help="SLURM account to charge")


def _add_run_report_args(run: argparse.ArgumentParser) -> None:
    """`run`: the report rebuilt at the end, and the progress bars."""
    run.add_argument("--no-report", action="store_true", help="do not rebuild the report at the end")
    run.add_argument("--report-dir", default=None, help="where the report goes (default: <out>/report, or the "
                     "repository's reports/generated when --out is the repository's results/)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_run_parser(sub) -> None:
    """`run`: its arguments in the order --help lists them."""
    run = sub.add_parser("run", help="pretrain and evaluate methods on a suite, write run records",
                         description="Pretrain each method for each seed on the suite's data, evaluate it with "
                         "the suite's protocols and write one record per run under --out. Finished runs are "
                         "skipped (records are never overwritten without --force); interrupted runs resume "
                         "from their last epoch checkpoint under --work-dir.")
    _add_run_selection_args(run)
    _add_run_output_args(run)
    _add_run_setting_args(run)
    _add_run_launcher_args(run)
    _add_run_report_args(run)


def _add_list_parser(sub) -> None:
    lst = sub.add_parser("list", help="list registered methods, suites (with their methods) and datasets")
    lst.add_argument("--import", dest="imports", nargs="+", default=[], metavar="MODULE")


def _add_config_parser(sub) -> None:
    cfg = sub.add_parser("config", help="print a suite's resolved config (YAML) or the suite-file JSON schema",
                         description="Resolve a suite file plus --set overrides exactly as `run` does and print "
                         "the result as YAML (every default filled in), or one method's resolved settings "
                         "(--method), or the JSON schema of a suite file for editors (--schema).")
    cfg.add_argument("--suite", help="suite name or YAML path")
    cfg.add_argument("--method", help="print this method's (or variant's) resolved settings instead")
    cfg.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="overrides, as for run")
    cfg.add_argument("--schema", action="store_true", help="print the JSON schema of a suite file")
    cfg.add_argument("--import", dest="imports", nargs="+", default=[], metavar="MODULE")


def build_parser(with_evaluate: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark self-supervised methods under one protocol: pretrain, evaluate, record, report.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="show Lightning's and the libraries' logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_run_parser(sub)
    _add_list_parser(sub)
    _add_config_parser(sub)

    from benchmarks.init_suite import add_init_suite_parser

    add_init_suite_parser(sub)

    from benchmarks.reproduce import add_reproduce_parser  # light: its heavy imports are inside functions

    add_reproduce_parser(sub)

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
    from benchmarks.config import load_suite, resolve_threads
    from benchmarks.suite_data import load_suite_data

    config = load_suite(args.suite, deep_update(parse_set(args.set), cli_overrides(args)))
    methods = run_methods(args, config)
    runs = [(seed, name) for seed in config.train.seeds for name in methods]
    at_once = min(config.launcher.jobs, len(runs)) if config.launcher.name == "local" else 1
    config = resolve_threads(config, at_once)
    data_root = default_data_root(args.data_root)
    notes = check_run_settings(args, config, methods)
    report_dir = None if args.no_report else report_dir_for(args.out, args.report_dir)
    check_output_folders(args.out, args.work_dir, report_dir)
    data = load_suite_data(config, data_root, args.download)

    quiet_libraries(args.verbose)
    failed, rank_zero = execute_runs(args, config, methods, runs, data, data_root, notes)
    if report_dir is not None and rank_zero:
        from reports.build import build_report

        build_report(args.out, report_dir)
        print(f"report written to {report_dir}/")
    return 1 if failed else 0


def run_methods(args, config) -> list[str]:
    """The methods `run` runs: --methods, else the suite's methods_to_run; then the reference rows (random init,
    supervised) unless --no-references."""
    methods = args.methods or config.methods_to_run
    if not methods:
        raise ConfigError("--methods: none given and the suite has no methods_to_run")
    if not args.no_references:
        methods = list(methods) + [r for r in config.references if r not in methods]
    return methods


def check_run_settings(args, config, methods: list[str]) -> list[str]:
    """The checks of `run` that need the methods and the config (before any data is loaded); returns the notes on
    what --epochs / --batch-size replace."""
    from benchmarks.runner import check_devices, check_method_settings, check_no_pretraining
    from benchmarks.training import check_tracker

    check_method_settings(config, methods)
    notes = budget_notes(args, methods)
    check_no_pretraining(config, methods)
    check_devices(config.train)
    check_tracker(config.train.logger)
    if config.launcher.name == "none" and config.launcher.jobs > 1:
        raise ConfigError(f"--jobs {config.launcher.jobs}: needs --launcher local (or slurm); runs go one after "
                          "another without a launcher")
    return notes


def execute_runs(args, config, methods: list[str], runs: list[tuple[int, str]], data, data_root: str,
                        notes: list[str]) -> tuple[int, bool]:
    """Every run (in this process, or through the launcher); returns the number of failed runs and whether this
    process is DDP rank 0 (the one that writes)."""
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    from benchmarks.runner import preflight

    # DDP ranks > 0 (Lightning reruns this command for them) train along but stay silent and write nothing
    rank_zero = getattr(rank_zero_only, "rank", 0) == 0
    say = print if rank_zero else (lambda *args, **kwargs: None)
    for note in notes:
        say(note, flush=True)

    preflight(config, methods, data)
    started = time.perf_counter()
    launcher = config.launcher
    if launcher.name == "none":
        run_in_process(args, config, runs, data, data_root, say)
        failed = 0
    else:
        failed = launch_runs(args, config, runs, data_root, say)
    say(f"{len(runs)} runs in {time.perf_counter() - started:.1f} s; records under {args.out}/{config.name}/")
    return failed, rank_zero


def run_in_process(args, config, runs: list[tuple[int, str]], data, data_root: str, say) -> None:
    """The runs one after another in this process (no launcher), each said before and after."""
    from benchmarks.runner import RunContext, run_one

    # execute_runs ran preflight for every run just before: run_one does not check again (context.checked)
    context = RunContext(results_dir=args.out, work_dir=args.work_dir, data_root=data_root, force=args.force,
                         restart=args.restart, progress=not args.no_progress, checked=True, say=say)
    for seed, name in runs:
        t0 = time.perf_counter()
        say(f"[{config.name}] {name} seed {seed}: pretraining {config.method(name).epochs} epochs "
            f"({config.train.threads} CPU thread(s)) ...", flush=True)
        record = run_one(config, name, seed, context, data=data)
        say(f"[{config.name}] {name} seed {seed}: {run_summary(record)} ({time.perf_counter() - t0:.1f} s)",
            flush=True)


def run_summary(record: dict) -> str:
    from benchmarks.records import metric_value

    knn = metric_value(record, "knn", "top1", k=20)
    nmi = metric_value(record, "clustering", "NMI")
    summary = f"status {record['status']}"
    if knn is not None:
        summary += f", kNN(k=20) top-1 {knn:.1f}%"
    if nmi is not None:
        summary += f", k-means NMI {nmi:.1f}"
    return summary


def launch_runs(args, config, runs: list[tuple[int, str]], data_root: str, say) -> int:
    """The runs as independent jobs (benchmarks.launcher): N local worker processes, or a SLURM job array
    through submitit. Each job rebuilds the config from the same suite and overrides (with the threads resolved
    here, so a job computes what a run without a launcher computes at that thread count) and calls run_one, so
    its record is the one a sequential run writes. Returns the number of failed jobs (each reported with its
    log)."""
    from benchmarks.launcher import launch_local, launch_submitit, summarize
    from benchmarks.runner import run_job

    overrides = deep_update(parse_set(args.set), cli_overrides(args))
    deep_update(overrides, {"train": {"threads": config.train.threads}})
    specs = [{"key": f"{config.name}/{name}/seed{seed}", "suite": args.suite, "overrides": overrides, "method": name,
              "seed": seed, "out": args.out, "work_dir": args.work_dir, "data_root": data_root,
              "imports": list(args.imports), "force": args.force, "restart": args.restart}
             for seed, name in runs]
    launcher = config.launcher
    threads = config.train.threads
    if launcher.name == "local":
        import torch

        at_once = min(launcher.jobs, len(specs))
        say(f"[{config.name}] {len(specs)} runs as local jobs, {at_once} at a time, {threads} CPU thread(s) each; "
            f"logs: {Path(args.work_dir) / config.name / 'logs'}/", flush=True)
        gpus = list(range(torch.cuda.device_count())) if config.train.accelerator != "cpu" else []
        results = launch_local(run_job, specs, launcher.jobs, Path(args.work_dir) / config.name / "logs",
                               cpus=threads * at_once, gpus=gpus or None, progress=lambda line: say(line, flush=True))
    else:
        slurm = launcher.slurm
        at_once = min(slurm.array_parallelism, launcher.jobs) if launcher.jobs > 1 else slurm.array_parallelism
        say(f"[{config.name}] {len(specs)} runs as a SLURM job array: per job {slurm.cpus_per_task} CPU(s) "
            f"({threads} thread(s)), {slurm.gpus_per_node} GPU(s), {slurm.mem_gb} GB, {slurm.time_min} min, "
            f"partition {slurm.partition or '(the default)'}; requeued up to {slurm.max_requeues} times at the time "
            "limit", flush=True)
        results = launch_submitit(run_job, specs, Path(args.work_dir) / "submitit", "slurm",
                                  progress=lambda line: say(line, flush=True), poll_s=slurm.poll_s,
                                  partition=slurm.partition, time_min=slurm.time_min,
                                  gpus_per_node=slurm.gpus_per_node, cpus_per_task=slurm.cpus_per_task,
                                  mem_gb=slurm.mem_gb, account=slurm.account, array_parallelism=at_once,
                                  max_requeues=slurm.max_requeues, signal_delay_s=slurm.signal_delay_s,
                                  threads=threads, extra=slurm.extra)
    for result in results:
        if result.ok:
            say(f"[{result.key}] {run_summary(result.result)} ({result.seconds:.1f} s)", flush=True)
    failures = [r for r in results if not r.ok]
    if failures:
        print(summarize(results), file=sys.stderr)
    return len(failures)


REPO_ROOT = Path(__file__).resolve().parent.parent


def report_dir_for(out: str, given: str | None) -> Path:
    """Where `run` writes its report: --report-dir, else next to its records (<out>/report) -- the
    repository's committed report (reports/generated) only when --out is the repository's results/."""
    if given:
        return Path(given)
    if Path(out).resolve() == (REPO_ROOT / "results").resolve():
        return REPO_ROOT / "reports" / "generated"
    return Path(out) / "report"


def check_output_folders(out: str, work_dir: str, report_dir: Path | None) -> None:
    """Before any work: every folder the run writes to can be created and written (not a file, not read-only,
    not a path the file system refuses), so a bad --out is not found only after training."""
    from benchmarks.records import check_writable_folder

    check_writable_folder(out, "--out")
    check_writable_folder(work_dir, "--work-dir")
    if report_dir is not None:
        check_writable_folder(report_dir, "--report-dir")


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
    if args.threads is not None:
        train["threads"] = args.threads
    overrides: dict = {"train": train} if train else {}
    budget = {key: train[key] for key in ("epochs", "batch_size") if key in train}
    if budget:  # the command line wins over the method sections' own train values too
        from benchmarks.config import command_line_budget

        methods = command_line_budget(method_sections(args), budget)[0]
        if methods:
            overrides["methods"] = methods
    launcher: dict = {}
    if args.launcher:
        launcher["name"] = args.launcher
    if args.jobs is not None:
        launcher["jobs"] = args.jobs
    slurm = {key: value for key, value in (("partition", args.slurm_partition), ("time_min", args.slurm_time_min),
                                            ("gpus_per_node", args.slurm_gpus), ("cpus_per_task", args.slurm_cpus),
                                            ("mem_gb", args.slurm_mem_gb), ("account", args.slurm_account),
                                            ("max_requeues", args.slurm_max_requeues))
             if value is not None}
    if slurm:
        launcher["slurm"] = slurm
    if launcher:
        overrides["launcher"] = launcher
    if args.protocols:
        overrides["evaluation"] = {"protocols": args.protocols}
    return overrides


def method_sections(args) -> dict:
    """The suite file's `methods:` sections with the --set overrides merged in (as load_suite merges them)."""
    from benchmarks.config import read_suite_file, suite_path

    sections = read_suite_file(suite_path(args.suite)).get("methods")
    sections = dict(sections) if isinstance(sections, dict) else {}
    extra = parse_set(args.set).get("methods")
    return deep_update(sections, extra) if isinstance(extra, dict) else sections


def budget_notes(args, methods: list[str]) -> list[str]:
    """What --epochs / --batch-size replace of the run's method sections (said in the first lines of `run`)."""
    from benchmarks.config import command_line_budget

    budget = {key: value for key, value in (("epochs", args.epochs), ("batch_size", args.batch_size))
              if value is not None}
    if not budget:
        return []
    notes = command_line_budget(method_sections(args), budget)[1]
    return [note for name in methods for note in notes.get(name, [])]


def cmd_reproduce(args) -> int:
    """`reproduce` (benchmarks.reproduce): its missing runs go through cmd_run, exactly as `run` would run them."""
    from benchmarks.reproduce import reproduce

    return reproduce(args, lambda argv: cmd_run(build_parser(with_evaluate=False).parse_args(argv)))


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
    from benchmarks.evaluation.knn import faiss_info

    info = faiss_info()
    print(f"faiss:    {info['faiss_version']}, {'GPU' if info['gpu_build'] else 'CPU'} build, GPUs seen: "
          f"{info['num_gpus']}; kNN and k-means run on the {info['device']}"
          + (f" ({info['cpu_reason']})" if info.get("cpu_reason") else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    # `run` and `list` do not need the evaluate command's parser (and its imports: a slow start)
    parser = build_parser(with_evaluate=command not in ("run", "list", "config", "init-suite", "reproduce"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if args.command not in ("run", "init-suite"):  # cmd_run quiets them once it imports them; init-suite needs none
        quiet_libraries(args.verbose)
    handlers = {"run": cmd_run, "list": cmd_list, "config": cmd_config, "reproduce": cmd_reproduce}
    if args.command == "init-suite":
        from benchmarks.init_suite import cmd_init_suite

        handlers["init-suite"] = cmd_init_suite
    if args.command == "evaluate":
        from benchmarks.evaluate_cli import cmd_evaluate

        handlers["evaluate"] = cmd_evaluate
    previous = _on_sigterm_raise()
    try:
        return handlers[args.command](args)
    except BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Terminated:
        print("terminated (SIGTERM); rerun the same command to resume from the last epoch checkpoint "
              "(finished runs are skipped)", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume from the last epoch checkpoint", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class Terminated(KeyboardInterrupt):
    """SIGTERM outside the trainer (e.g. during evaluation): stop like Ctrl+C, say so, exit 143."""


def _raise_terminated(signum, frame):
    raise Terminated


def _on_sigterm_raise():
    """SIGTERM raises Terminated (the trainer installs its own handler while it trains, and restores this one);
    returns the previous handler, or None where signals cannot be set (not the main thread)."""
    try:
        return signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:
        return None


if __name__ == "__main__":
    sys.exit(main())
