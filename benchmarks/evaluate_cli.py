"""`python -m benchmarks evaluate`: re-evaluate a saved model without retraining it.

The model file (written by run_one as <work-dir>/<suite>/<method>_e<E>_s<seed>/model.pt) is
loaded with weights_only=True, the method is rebuilt from the suite config (with the
hyperparameters recorded in the run's record, when one exists) and its weights loaded; the
chosen protocols run and their metrics replace those in the run's record (created, with
status completed, if there is none). Metrics a record already holds are only replaced with
--force; protocols it lacks are added.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import os
import time
from pathlib import Path

from benchmarks.cli_common import deep_update, default_data_root, import_modules, parse_set
from benchmarks.errors import CheckpointError, ConfigError, RecordExistsError
from benchmarks.evaluation.settings import PROTOCOLS


def protocol_of(metric_key: str) -> str | None:
    """Which protocol produced a metrics/evaluation key (knn_k20 -> knn, linear_B2 -> linear, ...)."""
    if metric_key.startswith("knn_k"):
        return "knn"
    if metric_key == "linear" or metric_key.startswith("linear_B"):
        return "linear"
    if metric_key.startswith("semi_"):
        return "semi"
    if metric_key.startswith("transfer_linear:"):
        return "transfer"
    if metric_key == "clustering":
        return "clustering"
    return None


def add_evaluate_parser(subparsers) -> None:
    ev = subparsers.add_parser(
        "evaluate", help="re-evaluate a saved model (no retraining) and update its run record",
        description="Load a model file written by `run` (safely: tensors and plain metadata only), run the "
        "chosen evaluation protocols and write their metrics into the run's record under --out (replacing "
        "metrics the record already has only with --force; creating the record if missing).")
    ev.add_argument("--checkpoint", required=True, help="model file, e.g. runs/digits/simclr_e40_s0/model.pt")
    ev.add_argument("--protocols", nargs="+", choices=PROTOCOLS, metavar="PROTOCOL",
                    help=f"protocols to run ({', '.join(PROTOCOLS)}); default: the suite's")
    ev.add_argument("--suite", help="suite name or YAML path (default: the suite stored in the model file); "
                    "refused if it names another suite than the model's")
    ev.add_argument("--method", help="refuse the checkpoint unless it belongs to this method")
    ev.add_argument("--out", default="results", help="folder of run records (default: results)")
    ev.add_argument("--data-root", help="folder holding the datasets (default: $SSL_BENCH_DATA or ./data)")
    ev.add_argument("--force", action="store_true", help="replace metrics the record already holds")
    ev.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                    help="override suite keys for this evaluation, e.g. --set evaluation.per_layer=true")
    ev.add_argument("--accelerator", choices=["auto", "cpu", "gpu"], help="device (default: the suite's)")
    ev.add_argument("--import", dest="imports", nargs="+", default=[], metavar="MODULE",
                    help="import a module that registers your own methods")
    ev.add_argument("--no-progress", action="store_true", help="no progress bars")


def _merge_into(record: dict, protocols: list[str], metrics: dict, evaluation: dict, clusters) -> dict:
    record = copy.deepcopy(record)
    record["metrics"] = {k: v for k, v in record["metrics"].items() if protocol_of(k) not in protocols}
    record["metrics"].update(metrics)
    record["evaluation"] = {k: v for k, v in record.get("evaluation", {}).items() if protocol_of(k) not in protocols}
    record["evaluation"].update(evaluation)
    if "clustering" in protocols:
        record["clusters"] = clusters
    return record


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
    import torch

    from benchmarks.config import load_suite
    from benchmarks.data import dataset_display_name
    from benchmarks.evaluation.protocols import evaluate_model
    from benchmarks.records import read_record, record_path, write_record
    from benchmarks.runner import (
        build_augment,
        build_method,
        git_commit,
        load_suite_data,
        package_versions,
        resolve_device,
    )

    suite, method_name = payload["suite"], payload["method"]
    seed, epochs = int(payload["seed"]), int(payload["epochs"])
    if args.method and args.method != method_name:
        raise CheckpointError(f"{args.checkpoint}: the model belongs to method '{method_name}', not '{args.method}'")
    overrides = parse_set(args.set)
    if args.accelerator:
        deep_update(overrides, {"train": {"accelerator": args.accelerator}})
    config = load_suite(args.suite or suite, overrides)
    if config.name != suite:
        raise CheckpointError(f"{args.checkpoint}: the model was trained on suite '{suite}', not "
                              f"'{config.name}'; pass --suite {suite} (or its YAML file)")
    for key in ("backbone", "in_channels"):
        if payload.get(key) != getattr(config, key):
            raise CheckpointError(f"{args.checkpoint}: the model's {key} is {payload.get(key)!r} but the suite "
                                  f"says {getattr(config, key)!r}")
    out_path = record_path(args.out, suite, method_name, epochs, seed)
    existing = read_record(out_path) if out_path.exists() else None
    if existing is not None and existing["method"] != method_name:
        raise CheckpointError(f"{out_path} belongs to method {existing['method']}, the model to {method_name}")
    # rebuild the method with the hyperparameters the run trained with
    recorded = (existing or {}).get("config", {}).get("method", {}).get("hparams")
    eval_cfg = config.evaluation
    protocols = list(args.protocols or eval_cfg.protocols)
    if args.protocols and "transfer" in protocols and not eval_cfg.transfer.targets:
        raise ConfigError("evaluation.transfer.targets: empty, so there is nothing to transfer to; set it in the "
                          "suite or with --set 'evaluation.transfer.targets=[cifar100]'")
    if existing is not None and not args.force:
        held = sorted(k for k in existing["metrics"] if protocol_of(k) in protocols)
        if held:
            raise RecordExistsError(f"{out_path} already holds {', '.join(held)}; pass --force to replace them")

    data_root = default_data_root(args.data_root)
    data = load_suite_data(config, data_root)
    method, settings = build_method(config, method_name, data, hparams=recorded)
    try:
        method.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"{args.checkpoint}: its weights do not fit method '{method_name}' as configured "
                              f"in suite '{suite}' ({str(exc).splitlines()[0]})") from exc
    device = resolve_device(config.train)
    method.to(device)
    augment = build_augment(config.augment).to(device)
    started = time.perf_counter()
    print(f"[{suite}] {method_name} seed {seed}: evaluating {', '.join(protocols)} ...", flush=True)
    result = evaluate_model(method, data, augment.clean, config.evaluation, device=device, seed=seed,
                            protocols=protocols, config=config, data_root=data_root, results_dir=args.out,
                            progress=not args.no_progress)
    seconds = round(time.perf_counter() - started, 3)
    if existing is not None:
        record = _merge_into(existing, protocols, result.metrics, result.evaluation, result.clusters)
    else:
        cls = type(method)
        resolved = config.canonical()
        resolved["train"]["epochs"] = epochs
        resolved["method"] = settings.model_copy(update={"hparams": method.hparams, "epochs": epochs}).model_dump(
            mode="json")
        record = {
            "schema_version": 1, "status": "completed", "suite": suite, "dataset": data.display_name,
            "method": method_name, "method_display": cls.display_name, "is_reference": bool(cls.is_reference),
            "seed": seed, "epochs": epochs, "backbone": config.backbone,
            "batch_size": settings.batch_size, "config": resolved, "metrics": result.metrics,
            "evaluation": result.evaluation, "clusters": result.clusters, "history": [],
            "paper_reference": cls.paper, "versions": package_versions(), "git_commit": git_commit(),
            "device": str(device) if not torch.cuda.is_available() else torch.cuda.get_device_name(),
            "wall_time_s": seconds, "throughput_images_per_s": None, "peak_memory_mb": None,
            "checkpoint": str(Path(args.checkpoint)),
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "message": f"record created by `evaluate` from {args.checkpoint} (training history not available)",
        }
    write_record(record, out_path, force=True)
    for key, values in sorted(result.metrics.items()):
        shown = ", ".join(f"{m} {v:.2f}" for m, v in values.items())
        print(f"  {key}: {shown}")
    print(f"[{suite}] {method_name} seed {seed}: {len(result.metrics)} metrics in {seconds:.1f} s -> {out_path} "
          f"({dataset_display_name(config.dataset.name)})")
    return 0
