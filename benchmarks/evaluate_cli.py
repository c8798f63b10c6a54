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

import contextlib
import copy
import os
import time
from pathlib import Path

from benchmarks.cli_common import deep_update, default_data_root, import_modules, parse_set
from benchmarks.errors import BenchmarkError, CheckpointError, ConfigError, RecordExistsError, first_line
from benchmarks.evaluation.settings import PROTOCOLS


def __getattr__(name: str):
    """`protocol_of`, re-exported for tests and tools, imported on first use: `--help` must not import torch."""
    if name == "protocol_of":
        from benchmarks.evaluation.protocols import protocol_of

        return protocol_of
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    from benchmarks.runner import load_model_file, run_lock

    import_modules(args.imports)
    payload = load_model_file(args.checkpoint)
    # the run folder's lock: no `run` or other `evaluate` of this run may write its record meanwhile
    # (a read-only folder of downloaded models cannot hold a lock, and no run can train there)
    run_dir = Path(args.checkpoint).resolve().parent
    lock = run_lock(run_dir, f"evaluate {args.checkpoint}") if os.access(run_dir, os.W_OK) else contextlib.nullcontext()
    with lock:
        return _evaluate(args, payload)


def _evaluate(args, payload: dict) -> int:
    from benchmarks.config import (
        config_from_dict,
        evaluation_fingerprint,
        load_suite,
        resolve_threads,
        run_fingerprint,
        settings_fingerprint,
        training_fingerprint,
    )
    from benchmarks.evaluation.protocols import evaluate_model, protocol_of
    from benchmarks.launcher import limit_threads
    from benchmarks.records import read_record, record_path, same_run_records, write_record
    from benchmarks.runner import (
        build_augment,
        build_method,
        build_record,
        load_suite_data,
        merge_evaluation,
        online_probe_of,
        provenance_entry,
        resolve_device,
    )

    suite, method_name = payload["suite"], payload["method"]
    seed, epochs = int(payload["seed"]), int(payload["epochs"])
    if args.method and args.method != method_name:
        raise CheckpointError(f"{args.checkpoint}: the model belongs to method '{method_name}', not '{args.method}'")
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
    protocols = list(config.evaluation.protocols)
    if "transfer" in protocols and args.protocols and not config.evaluation.transfer.targets:
        raise ConfigError("evaluation.transfer.targets: empty, so there is nothing to transfer to; set it in the "
                          "suite or with --set 'evaluation.transfer.targets=[cifar100]'")
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
    source = max(sources)[2] if sources else None
    evaluation_fp = evaluation_fingerprint(config)
    run_fp = run_fingerprint(training_fp, evaluation_fp) if training_fp else None
    out_path = record_path(args.out, suite, method_name, epochs, seed, run_fp)
    existing = read_record(out_path) if out_path.exists() else None
    if existing is not None and not args.force:
        held = sorted({e["key"] for e in existing["metrics"] if protocol_of(e["key"], existing["evaluation"])
                       in protocols})
        if held:
            raise RecordExistsError(f"{out_path} already holds {', '.join(held)}; pass --force to replace them")

    recorded = (source or payload).get("method_config", {}).get("hparams")
    data_root = default_data_root(args.data_root)
    data = load_suite_data(config, data_root)
    method, settings = build_method(config, method_name, data, hparams=recorded)
    try:
        method.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"{args.checkpoint}: its weights do not fit method '{method_name}' as configured "
                              f"in suite '{suite}' ({first_line(exc)})") from exc
    online_probe = online_probe_of(payload)
    device = resolve_device(config.train)
    method.to(device)
    augment = build_augment(config.augment).to(device)
    started = time.perf_counter()
    print(f"[{suite}] {method_name} seed {seed}: evaluating {', '.join(protocols)} ...", flush=True)
    result = evaluate_model(method, data, augment.clean, config.evaluation, device=device, seed=seed,
                            protocols=protocols, config=config, data_root=data_root,
                            results_dir=args.out, progress=not args.no_progress, online_probe=online_probe)
    seconds = round(time.perf_counter() - started, 3)
    entry = provenance_entry("evaluate", protocols, device)
    base = existing or source
    if base is not None:
        if existing is None:  # other evaluation settings: a record of its own, with this evaluation only
            base = {**copy.deepcopy(source), "metrics": [], "evaluation": {}, "clusters": {}, "predictions": None,
                    "provenance": {"pretraining": copy.deepcopy(source.get("provenance", {}).get("pretraining", {})),
                                   "evaluations": []}}
        record, predictions = merge_evaluation(base, out_path if existing is not None else None, result, protocols,
                                               entry)
        record["config"] = {**record["config"], "evaluation": config.evaluation.model_dump(mode="json")}
        record["fingerprints"] = {**record["fingerprints"], "evaluation": evaluation_fp, "run": run_fp}
    else:
        settings = settings.model_copy(update={"hparams": method.hparams, "epochs": epochs})
        training_fp = training_fp or training_fingerprint(config, settings, seed)
        fingerprints = {"training": training_fp, "settings": settings_fingerprint(config, settings),
                        "evaluation": evaluation_fp,
                        "run": run_fingerprint(training_fp, evaluation_fp)}
        record = build_record(config, settings, seed, data, method, fingerprints, "completed", result, [], device,
                              command="evaluate")
        record["provenance"] = {"pretraining": {"unknown": f"no record of the run was found under {args.out}"},
                                "evaluations": [entry]}
        record["message"] = f"record created by `evaluate` from {args.checkpoint} (training history not available)"
        record["checkpoint"] = str(Path(args.checkpoint))
        predictions = result.predictions
        out_path = record_path(args.out, suite, method_name, epochs, seed, record["fingerprints"]["run"])
    record["wall_time_s"] = float(record.get("wall_time_s") or 0.0)
    write_record(record, out_path, force=True, predictions=predictions)
    for key, values in sorted(result.metrics.items()):
        shown = ", ".join(f"{m} {v:.2f}" for m, v in values.items())
        print(f"  {key}: {shown}")
    print(f"[{suite}] {method_name} seed {seed}: {len(result.metrics)} metrics in {seconds:.1f} s -> {out_path}")
    return 0
