"""`python -m benchmarks evaluate`: re-evaluate a saved model without retraining it.

The model file (written by `run` as <work-dir>/<suite>/<method>_e<E>_s<seed>_<training fp>/model.pt) is
loaded with weights_only=True, the method is rebuilt from the settings stored in the model file (the suite's
resolved settings with its run's --set overrides, and the method's; model files of older versions store none,
then the suite of the model's name is read) and the hyperparameters the run trained with (from its record, when
one exists), and its weights loaded; the chosen protocols run with those evaluation settings plus --set.
The result goes to the record of (this training run, these evaluation settings):
- the same settings as the run's record: its metrics for the chosen protocols are replaced (only with
  --force when it holds them already) and the other protocols are kept;
- other settings: a new record (its file name holds the new evaluation fingerprint), with the chosen
  protocols only, so the report never mixes two evaluation settings in one column.
Either way the record keeps the pretraining provenance (commit, versions, device, history) and adds an
entry for this evaluation (its own commit, versions, device, protocols).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.cli_common import deep_update, default_data_root, import_modules, parse_set
from benchmarks.errors import BenchmarkError, CheckpointError, ConfigError, RecordExistsError
from benchmarks.evaluation.settings import PROTOCOLS


def add_evaluate_parser(subparsers) -> None:
    ev = subparsers.add_parser(
        "evaluate", help="re-evaluate a saved model (no retraining) and update its run record",
        description="Load a model file written by `run` (safely: tensors and plain metadata only), run the "
        "chosen evaluation protocols and write their metrics into the run's record under --out (replacing "
        "metrics the record already has only with --force; creating the record if missing).")
    ev.add_argument("--checkpoint", required=True, help="model file, e.g. runs/digits/simclr_e20_s0_<training fingerprint>/model.pt")
    # checked with the suite's settings (evaluation.protocols), which name a near miss ("did you mean")
    ev.add_argument("--protocols", nargs="+", metavar="PROTOCOL",
                    help=f"protocols to run ({', '.join(PROTOCOLS)}); default: the suite's")
    ev.add_argument("--suite", help="suite name or YAML path whose settings to use instead of those stored in the "
                    "model file (model files of older versions store none: then the suite of the model's name); "
                    "refused if it names another suite than the model's")
    ev.add_argument("--method", help="refuse the checkpoint unless it belongs to this method")
    ev.add_argument("--out", default="results", help="folder of run records (default: results)")
    ev.add_argument("--data-root", help="folder holding the datasets (default: $SSL_BENCH_DATA or ./data)")
    ev.add_argument("--force", action="store_true", help="replace metrics the record already holds")
    ev.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                    help="override evaluation settings, e.g. --set evaluation.per_layer=true (the model is rebuilt "
                    "from the settings stored in its file, its run's --set included)")
    ev.add_argument("--accelerator", choices=["auto", "cpu", "gpu"], help="device (default: the suite's)")
    ev.add_argument("--import", dest="imports", nargs="+", default=[], metavar="MODULE",
                    help="import a module that registers your own methods")
    ev.add_argument("--no-progress", action="store_true", help="no progress bars")


def cmd_evaluate(args) -> int:
    from benchmarks.runner import load_model_file, model_lock

    import_modules(args.imports)
    payload = load_model_file(args.checkpoint)
    with model_lock(Path(args.checkpoint).resolve().parent, f"evaluate {args.checkpoint}"):
        return _evaluate(args, payload)


def _settings(args, payload: dict):
    """The suite config to evaluate with: the settings stored in the model file (its run's --set included), or
    the suite's (--suite, or a model file of an older version), with this command's --set, --accelerator and
    --protocols on top, at the model's thread count; refused if it does not describe the model."""
    from benchmarks.config import config_from_dict, load_suite, resolve_threads
    from benchmarks.launcher import limit_threads

    suite = payload["suite"]
    if args.method and args.method != payload["method"]:
        raise CheckpointError(f"{args.checkpoint}: the model belongs to method '{payload['method']}', not "
                              f"'{args.method}'")
    overrides = parse_set(args.set)
    if args.accelerator:
        deep_update(overrides, {"train": {"accelerator": args.accelerator}})
    if args.protocols:
        deep_update(overrides, {"evaluation": {"protocols": list(args.protocols)}})
    stored = payload.get("config")
    if args.suite or stored is None:  # a model file of an older version carries no settings: the suite's
        config = load_suite(args.suite or suite, overrides)
    else:  # the settings that built the model (its run's --set included), with this command's --set on top
        config = config_from_dict(deep_update(copy.deepcopy(stored), overrides))
    # the threads the model was trained with (stored), else this machine's: CPU results depend on the count
    config = resolve_threads(config)
    limit_threads(config.train.threads)
    if config.name != suite:
        raise CheckpointError(f"{args.checkpoint}: the model was trained on suite '{suite}', not "
                              f"'{config.name}'; pass --suite {suite} (or its YAML file)")
    for key in ("backbone", "in_channels"):
        if payload.get(key) != getattr(config, key):
            raise CheckpointError(f"{args.checkpoint}: the model's {key} is {payload.get(key)!r} but the suite "
                                  f"says {getattr(config, key)!r}")
    if "transfer" in config.evaluation.protocols and args.protocols and not config.evaluation.transfer.targets:
        raise ConfigError("evaluation.transfer.targets: empty, so there is nothing to transfer to; set it in the "
                          "suite or with --set 'evaluation.transfer.targets=[cifar100]'")
    return config


@dataclass
class _Destination:
    """Where the evaluation goes: the record of (this training run, these evaluation settings)."""

    out_path: Path
    existing: dict | None  # that record, if it exists
    source: dict | None  # the newest record of the same training run (any evaluation settings), if any
    training_fp: str  # "" for a model file of an older version (no fingerprint stored)
    evaluation_fp: str
    run_fp: str | None


def _destination(args, payload: dict, config) -> _Destination:
    """The record this evaluation writes, the record its training side comes from, and the refusal to replace
    metrics the record holds without --force."""
    from benchmarks.config import evaluation_fingerprint, run_fingerprint
    from benchmarks.evaluation.protocols import protocol_family
    from benchmarks.records import read_record, record_path, same_run_records

    suite, method_name, seed, epochs = payload["suite"], payload["method"], int(payload["seed"]), int(payload["epochs"])
    training_fp = str(payload.get("fingerprint") or "")
    # the run's records (any evaluation settings): the newest of the same training run is the source of the
    # training side (history, hyperparameters, pretraining provenance)
    sources = []
    for path in same_run_records(args.out, suite, method_name, epochs, seed):
        try:
            record = read_record(path)
        except BenchmarkError:  # an unreadable record is not a source (the report lists it)
            continue
        if record["fingerprints"]["training"] == training_fp:
            sources.append((record["created"], str(path), record))
    evaluation_fp = evaluation_fingerprint(config)
    run_fp = run_fingerprint(training_fp, evaluation_fp) if training_fp else None
    out_path = record_path(args.out, suite, method_name, epochs, seed, run_fp)
    existing = read_record(out_path) if out_path.exists() else None
    if existing is not None and not args.force:
        protocols = config.evaluation.protocols
        held = sorted({e["key"] for e in existing["metrics"] if protocol_family(e["protocol"]) in protocols})
        if held:
            raise RecordExistsError(f"{out_path} already holds {', '.join(held)}; pass --force to replace them")
    return _Destination(out_path, existing, max(sources)[2] if sources else None, training_fp, evaluation_fp, run_fp)


def _evaluate(args, payload: dict) -> int:
    from benchmarks.records import write_record
    from benchmarks.runner import RunContext, check_evaluation_fits, evaluate, load_suite_data, restore_model

    config = _settings(args, payload)
    destination = _destination(args, payload, config)
    context = RunContext(results_dir=args.out, data_root=default_data_root(args.data_root),
                         progress=not args.no_progress)
    data = load_suite_data(config, context.data_root)
    check_evaluation_fits(config.evaluation, data)
    recorded = (destination.source or payload).get("method_config", {}).get("hparams")
    model = restore_model(config, payload, data, recorded, args.checkpoint)
    protocols = list(config.evaluation.protocols)
    started = time.perf_counter()
    print(f"[{config.name}] {payload['method']} seed {model.seed}: evaluating {', '.join(protocols)} ...", flush=True)
    evaluated = evaluate(config, model, data, protocols, context, "evaluate")
    seconds = round(time.perf_counter() - started, 3)
    if destination.existing is not None or destination.source is not None:
        record, predictions, out_path = _merged_record(config, destination, evaluated)
    else:
        record, predictions, out_path = _new_record(args, payload, config, data, evaluated, destination)
    record["wall_time_s"] = float(record.get("wall_time_s") or 0.0)
    write_record(record, out_path, force=True, predictions=predictions)
    table = evaluated.result.table()
    for key, values in sorted(table.items()):
        shown = ", ".join(f"{m} {v:.2f}" for m, v in values.items())
        print(f"  {key}: {shown}")
    print(f"[{config.name}] {payload['method']} seed {model.seed}: {len(table)} metrics in {seconds:.1f} s -> "
          f"{out_path}")
    return 0


def _merged_record(config, destination: _Destination, evaluated):
    """(record, predictions, path): the evaluation merged into the record of these settings, or (other
    settings) into a record of its own holding this evaluation only and the training side of the source."""
    from benchmarks.runner import merge_evaluation

    existing, source = destination.existing, destination.source
    if existing is not None:
        record, predictions = merge_evaluation(existing, destination.out_path, evaluated)
    else:
        base = {**copy.deepcopy(source), "metrics": [], "evaluation": {}, "clusters": {}, "predictions": None,
                "provenance": {"pretraining": copy.deepcopy(source.get("provenance", {}).get("pretraining", {})),
                               "evaluations": []}}
        record, predictions = merge_evaluation(base, None, evaluated)
    record["config"] = {**record["config"], "evaluation": config.evaluation.model_dump(mode="json")}
    record["fingerprints"] = {**record["fingerprints"], "evaluation": destination.evaluation_fp,
                              "run": destination.run_fp}
    return record, predictions, destination.out_path


def _new_record(args, payload: dict, config, data, evaluated, destination: _Destination):
    """(record, predictions, path): no record of the run exists under --out, so one is made from the model file
    (no training history)."""
    from benchmarks.config import run_fingerprint, settings_fingerprint, training_fingerprint
    from benchmarks.records import record_path
    from benchmarks.runner import RunPlan, build_record

    seed, epochs = int(payload["seed"]), int(payload["epochs"])
    settings = config.method(payload["method"]).model_copy(update={"hparams": evaluated.method.hparams,
                                                                   "epochs": epochs})
    training_fp = destination.training_fp or training_fingerprint(config, settings, seed)
    fingerprints = {"training": training_fp, "settings": settings_fingerprint(config, settings),
                    "evaluation": destination.evaluation_fp,
                    "run": run_fingerprint(training_fp, destination.evaluation_fp)}
    out_path = record_path(args.out, config.name, settings.name, epochs, seed, fingerprints["run"])
    plan = RunPlan(config, settings, seed, fingerprints, out_path)
    record = build_record(plan, data, evaluated.method, evaluated, evaluated.provenance)
    record["provenance"] = {"pretraining": {"unknown": f"no record of the run was found under {args.out}"},
                            "evaluations": [evaluated.provenance]}
    record["message"] = f"record created by `evaluate` from {args.checkpoint} (training history not available)"
    record["checkpoint"] = str(Path(args.checkpoint))
    return record, evaluated.result.predictions, out_path
