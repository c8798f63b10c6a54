"""One run = (suite, method, seed): load data -> pretrain -> evaluate -> write the record."""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import importlib.metadata
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from benchmarks.augment import BatchAugment, Normalization
from benchmarks.backbones import build_backbone
from benchmarks.config import (
    AugmentConfig,
    MethodConfig,
    SuiteConfig,
    TrainConfig,
    differing_keys,
    resolve_threads,
    run_fingerprints,
)
from benchmarks.data import ImageDataset
from benchmarks.errors import (
    BenchmarkError,
    CheckpointError,
    ConfigError,
    DivergedError,
    RunLockedError,
    first_line,
)
from benchmarks.evaluation import semi as semi_protocol
from benchmarks.evaluation.features import eval_mode
from benchmarks.evaluation.protocols import (
    PER_LAYER_KNN_K,
    EvalContext,
    EvalResult,
    evaluate_model,
    protocol_family,
)
from benchmarks.evaluation.settings import EvaluationConfig
from benchmarks.launcher import limit_threads
from benchmarks.records import (
    SCHEMA_VERSION,
    atomic_write,
    read_predictions,
    read_record,
    record_path,
    record_stem,
    same_run_records,
    write_record,
)
from benchmarks.suite_data import SuiteData, check_data_matches, load_suite_data  # noqa: F401  (re-exported)
from benchmarks.training import MonitorData, OnlineProbe, PretrainModule, PretrainSettings, Tracker, fit
from methods import get_method
from methods.base import DataInfo, SSLMethod, Stage

log = logging.getLogger("benchmarks")

MODEL_FORMAT = "ssl-bench-model/1"
REPO_ROOT = Path(__file__).resolve().parent.parent


def process_peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (``resource.getrusage``; ru_maxrss is KiB on Linux,
    bytes on macOS). On CPU it is the run's peak memory as far as one process can tell: the process may
    have run earlier runs, so it is an upper bound for this one."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def build_augment(augment: AugmentConfig | SuiteConfig) -> BatchAugment:
    """The views of a method (its `MethodConfig.augment`) or of the suite (its `augment` section)."""
    augment = augment.augment if isinstance(augment, SuiteConfig) else augment
    norm = augment.normalization
    return BatchAugment(list(augment.views), Normalization(tuple(norm.mean), tuple(norm.std)))


def check_method_settings(config: SuiteConfig, method_names: list[str]) -> None:
    """Before any data is loaded: every name is a registered method (or a variant the suite configures),
    with hyperparameters and optimizer of known keys and the right types."""
    for name in method_names:
        config.method(name)


def check_no_pretraining(config: SuiteConfig, method_names: list[str]) -> None:
    """0 pretraining epochs would record random-init numbers under a method's name: refuse (the random-init
    reference row is that measurement, labelled as such)."""
    untrained = [name for name in method_names if config.method(name).epochs == 0
                 and not get_method(config.method(name).method).is_reference]
    if untrained:
        raise ConfigError(f"train.epochs: 0 pretraining epochs for {', '.join(untrained)} would record the numbers of "
                          "an untrained backbone under the method's name; use --epochs 1 or more (the random_init "
                          "reference row measures the untrained backbone)")


def check_devices(train_cfg: TrainConfig) -> None:
    """An accelerator that is asked for must exist (before any work, not as a traceback from Lightning)."""
    if train_cfg.accelerator == "gpu" and not torch.cuda.is_available():
        raise ConfigError("--accelerator gpu: no CUDA GPU is visible here (torch.cuda.is_available() is False; "
                          f"torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}); use --accelerator "
                          "cpu or auto, or check CUDA_VISIBLE_DEVICES and the driver")
    if train_cfg.accelerator != "cpu" and isinstance(train_cfg.devices, int) and train_cfg.devices > 1 \
            and torch.cuda.is_available() and train_cfg.devices > torch.cuda.device_count():
        raise ConfigError(f"--devices {train_cfg.devices}: only {torch.cuda.device_count()} GPU(s) are visible; use "
                          f"--devices {torch.cuda.device_count()} or fewer")


def check_backbone_input(backbone: torch.nn.Module, config: SuiteConfig, augment: AugmentConfig) -> None:
    """A forward pass on blank images of every view size, so a backbone that cannot take them fails now."""
    sizes = sorted({v.size for v in augment.views})
    with eval_mode(backbone), torch.no_grad():
        for size in sizes:
            try:
                out = backbone(torch.zeros(2, config.in_channels, size, size))
            except RuntimeError as exc:
                raise ConfigError(
                    f"backbone: {config.backbone} cannot take {config.in_channels}x{size}x{size} views "
                    f"({(str(exc).splitlines() or [''])[0]}); use larger views (augment.views[].size) or a "
                    "backbone made for small images (small_cnn for 8x8/28x28, resnet18_cifar for 32x32)") from exc
            if out.dim() != 2 or out.shape[0] != 2:
                raise ConfigError(f"backbone: {config.backbone} returned {tuple(out.shape)} for a batch of 2 "
                                  f"{size}x{size} views; a backbone must return [batch, feature_dim]")


def check_evaluation_fits(eval_cfg: EvaluationConfig, data: SuiteData) -> None:
    """Evaluation settings that depend on the data's size, checked before training (not after it)."""
    bank = len(data.train)
    protocols = eval_cfg.protocols
    ks = list(eval_cfg.knn.ks) if "knn" in protocols else []
    if eval_cfg.per_layer and "knn" in protocols:
        ks.append(PER_LAYER_KNN_K)
    for k in ks:
        if k > bank:
            raise ConfigError(f"evaluation.knn.ks: k = {k} is larger than the kNN bank (the {bank} images of the "
                              f"{data.train.split} split); use k <= {bank}")
    if "semi" in protocols:
        for fraction in eval_cfg.semi.fractions:
            semi_protocol.images_per_class(bank, data.num_classes, fraction)
        for per_class in eval_cfg.semi.per_class:
            semi_protocol.check_count(data.train.labels, data.num_classes, per_class)


def check_pretrain_size(method: SSLMethod, data: SuiteData, settings: MethodConfig) -> None:
    if method.skips_training or settings.epochs == 0:
        return
    images = len(data.train if method.uses_labels else data.pretrain)
    if images < settings.batch_size:
        raise ConfigError(f"train.batch_size: {settings.batch_size} is more than the {images} pretraining "
                          f"images, so an epoch would have no full batch; use --batch-size {images} or less")


def preflight(config: SuiteConfig, method_names: list[str], data: SuiteData) -> None:
    """Every check that needs the data, for every method, before the first run starts."""
    check_evaluation_fits(config.evaluation, data)
    for name in method_names:
        method, settings = build_method(config, name, data)
        check_backbone_input(method.backbone, config, settings.augment)
        check_pretrain_size(method, data, settings)
        # a method with stages of their own (SSL++): each stage's settings and views are checked now too
        for stage in method.stages(settings) or []:
            if stage.augment is not None:
                check_backbone_input(method.backbone, config, stage.augment)
            check_pretrain_size(method, data, settings.model_copy(update={"batch_size": stage.batch_size,
                                                                           "epochs": stage.epochs}))


def build_method(config: SuiteConfig, method_name: str, data: SuiteData, hparams=None
                 ) -> tuple[SSLMethod, MethodConfig]:
    """The method with fresh weights and its resolved settings (`hparams`: recorded ones, to rebuild a run)."""
    settings = config.method(method_name)
    cls = get_method(settings.method)
    backbone = build_backbone(config.backbone, config.in_channels, **config.backbone_options)
    info = DataInfo(num_classes=config.num_classes, num_train=len(data.pretrain if not cls.uses_labels else data.train),
                    in_channels=config.in_channels, image_size=config.image_size)
    return cls(backbone, info, settings.hparams if hparams is None else hparams), settings


def resolve_device(train_cfg: TrainConfig) -> torch.device:
    if train_cfg.accelerator == "cpu":
        return torch.device("cpu")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def package_versions() -> dict:
    names = ["torch", "torchvision", "pytorch-lightning", "lightly", "faiss-cpu", "faiss-gpu", "faiss-gpu-cu12",
             "scikit-learn", "pydantic", "numpy", "pandas", "ssl-cluster-bench"]
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    versions["python"] = platform.python_version()
    return versions


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def run_dir_for(work_dir: str | Path, suite: str, method: str, epochs: int, seed: int,
                training_fp: str | None = None) -> Path:
    """`<work>/<suite>/<method>_e<epochs>_s<seed>_<training fingerprint>`: changed training settings train in a
    folder of their own (the checkpoint of other settings is never resumed, nor refused)."""
    return Path(work_dir) / suite / record_stem(method, epochs, seed, training_fp)


def cpu_model() -> str | None:
    """The processor's model name: CPU runs are bitwise reproducible on the same model, not across models
    (their vector units round differently)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def model_settings(config: SuiteConfig, settings: MethodConfig) -> dict:
    """What a model file carries so `evaluate` can rebuild the model from it alone: the suite's resolved settings
    (with the --set overrides of its run) and the method's (plain JSON values, loadable with weights_only=True)."""
    return {"config": config.canonical(), "method_config": settings.model_dump(mode="json")}


def save_model(path: Path, method: SSLMethod, meta: dict) -> None:
    """The final model for re-evaluation: tensors + plain metadata only (loadable with weights_only=True),
    written atomically (a reader or a killed process never leaves a half-written model.pt)."""
    payload = {"format": MODEL_FORMAT, **meta, "state_dict": {k: v.detach().cpu() for k, v in method.state_dict().items()}}
    atomic_write(path, lambda handle: torch.save(payload, handle))


@contextlib.contextmanager
def run_lock(run_dir: Path, what: str):
    """Hold an exclusive lock on the run folder while a process trains/evaluates/records the run.

    A second process on the same run (same work dir, suite, method, epochs, seed) gets
    RunLockedError instead of corrupting the checkpoint. The OS drops the lock when the
    holder exits, however it dies (SIGKILL included), so a stale lock never blocks a resume.
    DDP ranks other than 0 (started by Lightning with the same command) do not lock.
    """
    if getattr(rank_zero_only, "rank", 0) != 0:
        yield
        return
    try:
        import fcntl
    except ImportError:  # not POSIX: no advisory locks; running one run twice at once is then the user's to avoid
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            raise RunLockedError(f"{what}: another process (pid {holder}) is running it in {run_dir}; wait for it to "
                                 "finish (rerun the command then: finished runs are skipped) or use another "
                                 "--work-dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


MODEL_FIELDS = {"suite": str, "method": str, "seed": int, "epochs": int, "backbone": str, "in_channels": int,
                "state_dict": dict}


def load_model_file(path: str | Path) -> dict:
    """Load a model file safely (weights_only=True); refuses anything that is not one of ours, also a file with
    our format tag but a missing or mistyped field."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty (0 bytes), not a model file; use the model.pt that `run` "
                              "wrote (<work-dir>/<suite>/<run>/model.pt), or rerun the run to write it again")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors for unsafe objects, truncated zip files, ...
        raise CheckpointError(f"{path}: refused to load ({type(exc).__name__}: {first_line(exc)}); "
                              "only checkpoints holding tensors and plain metadata are accepted") from exc
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{path}: not an ssl-bench model file (format {MODEL_FORMAT})")
    for key, kind in MODEL_FIELDS.items():
        value = payload.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            got = "missing" if key not in payload else f"{type(value).__name__}"
            raise CheckpointError(f"{path}: a damaged ssl-bench model file: '{key}' must be {kind.__name__}, got "
                                  f"{got}; use the model.pt that `run` wrote, or rerun the run")
    for key in ("config", "method_config"):  # the settings that built it (model files of older versions lack them)
        if key in payload and not isinstance(payload[key], dict):
            raise CheckpointError(f"{path}: a damaged ssl-bench model file: '{key}' must be dict, got "
                                  f"{type(payload[key]).__name__}; use the model.pt that `run` wrote, or rerun the run")
    return payload


@dataclass
class RunContext:
    """Where runs read and write and how they behave, built once by the command (or a job) and passed down,
    instead of the same paths and flags threaded through every call."""

    results_dir: str | Path = "results"  # run records (and the semi-supervised splits under splits/)
    work_dir: str | Path = "runs"  # checkpoints, model files and logs
    data_root: str | Path | None = None  # datasets (None: $SSL_BENCH_DATA or ./data)
    download: bool = False
    force: bool = False  # redo a finished run: evaluate its model again and replace its record
    restart: bool = False  # train from scratch (no resume) and replace the record
    progress: bool = True  # progress bars
    checked: bool = False  # the caller ran `preflight` for the run's method (so run_one does not again)
    say: Callable[[str], None] = log.info  # where notes for the user go

    @property
    def redo(self) -> bool:
        """A finished record of the same settings is replaced (--force or --restart)."""
        return self.force or self.restart


@dataclass
class RunPlan:
    """One run's settings and where it goes, decided before any work."""

    config: SuiteConfig
    settings: MethodConfig
    seed: int
    fingerprints: dict
    out_path: Path  # the record
    run_dir: Path | None = None  # checkpoints and the model file (None: a record made by `evaluate`)


def plan_run(config: SuiteConfig, method_name: str, seed: int, context: RunContext) -> RunPlan:
    settings = config.method(method_name)
    fingerprints = run_fingerprints(config, settings, seed)
    out_path = record_path(context.results_dir, config.name, method_name, settings.epochs, seed, fingerprints["run"])
    run_dir = run_dir_for(context.work_dir, config.name, method_name, settings.epochs, seed, fingerprints["training"])
    return RunPlan(config, settings, seed, fingerprints, out_path, run_dir)


def run_one(config: SuiteConfig, method_name: str, seed: int, context: RunContext | None = None,
            data: SuiteData | None = None) -> dict:
    """Pretrain, evaluate and record one (suite, method, seed) with the config's settings. Returns the record.

    The record's name holds the run fingerprint (every setting that can change its result), so a finished
    run is reused only when its settings are the same -- and that skip is said -- while other settings give
    a new record and never the old numbers. Every check of the input runs before any work (`preflight`,
    here unless the caller ran it: context.checked; nothing is written when one fails). The run then holds a
    lock on its folder (named by the training fingerprint), resumes from its last epoch checkpoint there
    (unless context.restart: train from scratch and replace the record), and ends with one atomically written
    record and its predictions. `data`: the suite's data, if the caller loaded it already.
    """
    context = context or RunContext()
    if config.train.threads == "auto":  # a caller that did not resolve them (the CLI does, for its launcher)
        config = resolve_threads(config)
    limit_threads(config.train.threads)  # before the fingerprints: the thread count is part of them
    plan = plan_run(config, method_name, seed, context)
    if plan.out_path.exists() and not context.redo:
        return _finished_run(plan, context, data)
    _note_other_settings(plan, context)
    data = data or load_suite_data(config, context.data_root, context.download)
    if not context.checked:
        preflight(config, [method_name], data)
    pl.seed_everything(seed, workers=True, verbose=False)
    method, _ = build_method(config, method_name, data)
    with run_lock(plan.run_dir, f"{config.name}/{method_name} ({plan.settings.epochs} epochs, seed {seed})"):
        if plan.out_path.exists() and not context.redo:  # finished by another process while this one was checking
            return read_record(plan.out_path)
        return _train_evaluate_record(plan, method, data, context)


def _finished_run(plan: RunPlan, context: RunContext, data: SuiteData | None) -> dict:
    """A finished record of the same settings: skipped, or given the protocols it lacks."""
    record = read_record(plan.out_path)
    missing = [p for p in plan.config.evaluation.protocols if p not in evaluated_protocols(record)]
    if not missing or record["status"] != "completed":
        context.say(f"skipped: finished record {plan.out_path} (same settings; --force re-evaluates, --restart "
                    "retrains)")
        return record
    context.say(f"{plan.out_path} (same settings) lacks {', '.join(missing)}: evaluating them with the finished model")
    return add_protocols(plan, record, missing, context, data)


def run_job(spec: dict) -> dict:
    """One run as a job of benchmarks.launcher (its own process, or a SLURM task): the same suite, overrides,
    method and seed as the sequential loop, so the record is the one a sequential run writes. The command that
    launched the jobs ran `preflight` for every run before launching them (spec "checked", default true)."""
    from benchmarks.cli_common import import_modules
    from benchmarks.config import load_suite

    import_modules(spec.get("imports", []))
    overrides = dict(spec.get("overrides") or {})
    overrides["launcher"] = {"name": "none", "jobs": 1}  # inside a job, the run goes in this process
    config = load_suite(spec["suite"], overrides)
    context = RunContext(results_dir=spec["out"], work_dir=spec["work_dir"], data_root=spec["data_root"],
                         force=spec.get("force", False), restart=spec.get("restart", False), progress=False,
                         checked=spec.get("checked", True), say=print)
    record = run_one(config, spec["method"], spec["seed"], context)
    return {"status": record["status"], "metrics": record["metrics"]}


def evaluated_protocols(record: dict) -> set[str]:
    """The protocols a record's evaluations ran (some produce no metric, e.g. transfer without targets)."""
    return {p for entry in record.get("provenance", {}).get("evaluations", []) for p in entry.get("protocols", [])}


def model_lock(run_dir: Path, what: str):
    """The run folder's lock (run_lock) for re-evaluating its model: no `run` or other `evaluate` of the run may
    write its record meanwhile. A read-only folder of downloaded models cannot hold a lock (and no run can
    train there): no lock then."""
    return run_lock(run_dir, what) if os.access(run_dir, os.W_OK) else contextlib.nullcontext()


def add_protocols(plan: RunPlan, record: dict, protocols: list[str], context: RunContext,
                  data: SuiteData | None = None) -> dict:
    """Evaluate `protocols` with the run's finished model and merge them into its record (same settings)."""
    out_path = plan.out_path
    if not record.get("checkpoint") or not Path(record["checkpoint"]).is_file():
        raise CheckpointError(f"{out_path}: the record lacks {', '.join(protocols)} and its model file "
                              f"{record.get('checkpoint')} is gone; pass --force --restart to train again")
    with model_lock(Path(record["checkpoint"]).resolve().parent, f"{out_path.name}: adding {', '.join(protocols)}"):
        record = read_record(out_path)  # as it is now: another process may have added protocols meanwhile
        protocols = [p for p in protocols if p not in evaluated_protocols(record)]
        if not protocols:
            return record
        payload = load_model_file(record["checkpoint"])
        data = data or load_suite_data(plan.config, context.data_root, context.download)
        model = restore_model(plan.config, payload, data, record["method_config"]["hparams"], record["checkpoint"])
        evaluated = evaluate(plan.config, model, data, protocols, context, "run")
        merged, predictions = merge_evaluation(record, out_path, evaluated)
        write_record(merged, out_path, force=True, predictions=predictions)
        return merged


def online_probe_of(payload: dict):
    """The online linear probe saved in a model file, or None."""
    state = payload.get("online_probe")
    if not isinstance(state, dict) or "weight" not in state:
        return None
    probe = torch.nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
    probe.load_state_dict(state)
    return probe


@dataclass
class TrainedModel:
    """A model to evaluate: the method with its trained weights, the run's seed and the online probe trained
    beside pretraining (None without one)."""

    method: SSLMethod
    seed: int
    online_probe: torch.nn.Module | None = None


@dataclass
class Evaluated:
    """What one evaluation gives a record: the entries and their details (EvalResult), and the evaluation's
    provenance entry (command, protocols, commit, versions, device)."""

    method: SSLMethod
    result: EvalResult
    provenance: dict


def restore_model(config: SuiteConfig, payload: dict, data: SuiteData, hparams=None, checkpoint=None) -> TrainedModel:
    """The model of a model file (load_model_file's payload): the method rebuilt with `hparams` (the recorded
    ones; None: the config's) and its weights loaded."""
    name = payload["method"]
    method, _ = build_method(config, name, data, hparams=hparams)
    try:
        method.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"{checkpoint}: its weights do not fit method '{name}' as configured in suite "
                              f"'{config.name}' ({first_line(exc)})") from exc
    return TrainedModel(method, int(payload["seed"]), online_probe_of(payload))


def evaluate(config: SuiteConfig, model: TrainedModel, data: SuiteData, protocols: list[str], context: RunContext,
             command: str) -> Evaluated:
    """The one evaluation path (`run` after training or for protocols a record lacks, and `evaluate`): the
    model on the config's device, `protocols` with the suite's evaluation settings and clean views (the shared
    protocol, whatever views the method trained on) -> its entries, details and provenance entry."""
    device = resolve_device(config.train)
    model.method.to(device)
    preprocess = build_augment(config.augment).to(device).clean
    eval_context = EvalContext(device=device, seed=model.seed, config=config, data_root=context.data_root,
                               results_dir=context.results_dir, progress=context.progress)
    result = evaluate_model(model.method, data, preprocess, config.evaluation, eval_context, protocols,
                            model.online_probe)
    return Evaluated(model.method, result, provenance_entry(command, protocols, device))


def merge_evaluation(record: dict, record_file: Path | None, evaluated: Evaluated):
    """(record, predictions) with what the evaluation's protocols produce replaced by `evaluated` and its
    provenance entry added; the other protocols' entries, details and predictions are kept."""
    protocols = evaluated.provenance["protocols"]
    merged = copy.deepcopy(record)
    evaluation = merged.get("evaluation", {})
    gone = {k for k, details in evaluation.items() if protocol_family(details.get("protocol", "")) in protocols}
    gone |= {e["key"] for e in merged["metrics"] if protocol_family(e["protocol"]) in protocols}
    merged["metrics"] = [e for e in merged["metrics"] if e["key"] not in gone]
    merged["evaluation"] = {k: v for k, v in evaluation.items() if k not in gone}
    merged["clusters"] = {k: v for k, v in merged.get("clusters", {}).items() if k not in gone}
    kept = {e["key"] for e in merged["metrics"]} | {"labels"}
    old = read_predictions(record_file, record) if record_file is not None and record.get("predictions") else {}
    predictions = {k: v for k, v in old.items() if k in kept or k.removesuffix(":labels") in kept}
    result = evaluated.result
    merged["metrics"] += copy.deepcopy(result.entries)
    merged["evaluation"].update(result.evaluation)
    merged["clusters"].update(result.clusters)
    predictions.update(result.predictions)
    merged.setdefault("provenance", {}).setdefault("evaluations", []).append(evaluated.provenance)
    return merged, predictions


def _note_other_settings(plan: RunPlan, context: RunContext) -> None:
    """Say which records of the same run exist with other settings, and in which keys they differ."""
    config, settings, out_path = plan.config, plan.settings, plan.out_path
    for other in same_run_records(context.results_dir, config.name, settings.name, settings.epochs, plan.seed):
        if other == out_path:
            continue
        try:
            old = read_record(other, verify_predictions=False)
        except BenchmarkError:
            continue
        mine = {"config": config.canonical(), "method_config": settings.model_dump(mode="json")}
        theirs = {"config": old.get("config", {}), "method_config": old.get("method_config", {})}
        keys = [k for k in differing_keys(mine, theirs) if not k.startswith(("config.methods.", "config.launcher",
                                                                              "config.description"))]
        shown = ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")
        context.say(f"note: {other} holds this run with other settings ({shown or 'other settings'}); it is kept, "
                    f"and these settings get their own record {out_path.name}")


class AttemptLedger:
    """The attempts (processes) that worked on one run, in <run dir>/attempts.json, so that the record holds the
    wall time of all of them (a run requeued by SLURM, killed and resumed, interrupted and rerun) and their
    number, not only the last attempt's. Training from scratch (no epoch checkpoint in the run folder, or
    --restart) starts a new ledger. An attempt's time is written when it ends, however it ends except SIGKILL
    (then the time since its last epoch checkpoint is lost with it)."""

    def __init__(self, run_dir: Path, fresh: bool):
        self.path = Path(run_dir) / "attempts.json"
        self.attempts: list[float] = []
        if not fresh:
            try:
                self.attempts = [float(s) for s in json.loads(self.path.read_text())["seconds"]]
            except (OSError, ValueError, KeyError, TypeError):
                self.attempts = []
        self.started = time.perf_counter()

    @property
    def count(self) -> int:
        return len(self.attempts) + 1

    def total_seconds(self) -> float:
        return sum(self.attempts) + time.perf_counter() - self.started

    def close(self) -> None:
        if getattr(rank_zero_only, "rank", 0) != 0:  # DDP ranks > 0 train along; rank 0 keeps the ledger
            return
        seconds = self.attempts + [time.perf_counter() - self.started]
        try:
            atomic_write(self.path, lambda h: h.write(json.dumps({"seconds": seconds}).encode()))
        except OSError:
            pass  # the time of this attempt is lost, the run is not


def _train_evaluate_record(plan: RunPlan, method: SSLMethod, data: SuiteData, context: RunContext) -> dict:
    fresh = context.restart or not any(Path(plan.run_dir).rglob("last.ckpt"))
    ledger = AttemptLedger(plan.run_dir, fresh)
    try:
        return _attempt(plan, method, data, context, ledger)
    finally:
        ledger.close()


def _rank_zero() -> bool:
    """DDP ranks other than 0 (Lightning reruns the command for them) train along; rank 0 evaluates and writes."""
    return getattr(rank_zero_only, "rank", 0) == 0


@dataclass
class Pretraining:
    """What pretraining gave: its status (and why, if it stopped), the curve, throughput and memory, the
    online probe trained beside it."""

    status: str = "completed"
    message: str | None = None
    history: list = field(default_factory=list)
    images_seen: int = 0
    train_seconds: float = 0.0
    peak_memory_mb: float | None = None
    world_size: int = 1
    online_probe: torch.nn.Module | None = None


def _stages(method: SSLMethod, settings: MethodConfig) -> list[Stage]:
    return method.stages(settings) or [Stage("pretrain", settings.epochs, settings.batch_size, settings.optimizer,
                                             settings.augment)]


def _online_probe(config: SuiteConfig, pretrain_set: ImageDataset, data: SuiteData) -> OnlineProbe | None:
    """The online probe learns from the labelled images of the pretraining split (STL-10: its train part)."""
    if "online_linear" in config.evaluation.protocols and bool((pretrain_set.labels >= 0).any()):
        return OnlineProbe(data.num_classes, config.evaluation.online_linear.lr,
                           config.evaluation.online_linear.weight_decay)
    return None


def _pretrain(plan: RunPlan, method: SSLMethod, data: SuiteData, context: RunContext, tracker) -> Pretraining:
    """Train every stage of the method (one for most), each from its own epoch checkpoint; a diverged stage
    stops the run with status `diverged`."""
    config, settings, train_cfg = plan.config, plan.settings, plan.config.train
    outcome = Pretraining()
    if method.skips_training or settings.epochs == 0:
        return outcome
    pretrain_set = data.train if method.uses_labels else data.pretrain
    on_gpu = resolve_device(train_cfg).type == "cuda"
    channels_last = on_gpu if train_cfg.channels_last == "auto" else bool(train_cfg.channels_last)
    if train_cfg.compile:
        method.backbone = torch.compile(method.backbone)
    stages, probe = _stages(method, settings), _online_probe(config, pretrain_set, data)
    several = len(stages) > 1
    for index, stage in enumerate(stages):
        last = index == len(stages) - 1
        method.set_stage(index)
        module = PretrainModule(method, build_augment(stage.augment or settings.augment), stage.optimizer,
                                pretrain_set, PretrainSettings(stage.batch_size, stage.epochs, plan.seed, stage=index,
                                                               channels_last=channels_last,
                                                               divergence_check_every=20 if on_gpu else 1),
                                MonitorData(_cap(data.train, train_cfg.online_knn_max_bank), data.test,
                                            data.num_classes, train_cfg.online_knn_every),
                                online_probe=probe if last else None)
        # one stage: the run folder itself; several: a folder (and an epoch checkpoint) per stage
        stage_dir = plan.run_dir / f"stage{index + 1}-{stage.name}" if several else plan.run_dir
        stage_fp = f"{plan.fingerprints['training']}-{index}" if several else plan.fingerprints["training"]
        try:
            result = fit(module, train_cfg, stage_dir, stage_fp, restart=context.restart, progress=context.progress,
                         tracker=tracker)
        except DivergedError as exc:
            outcome.status, outcome.message = "diverged", f"{stage.name} stage: {exc}" if several else str(exc)
            outcome.history += [{**h, "stage": index + 1} if several else h for h in module.history]
            log.warning("%s/%s seed %d diverged: %s", config.name, settings.name, plan.seed, exc)
            break
        outcome.history += [{**h, "stage": index + 1} if several else h for h in result.history]
        outcome.images_seen += result.images_seen
        outcome.train_seconds += result.train_seconds
        if result.peak_memory_mb is not None:
            outcome.peak_memory_mb = max(outcome.peak_memory_mb or 0.0, result.peak_memory_mb)
        outcome.world_size = int(result.extra.get("world_size", 1))
        if last:
            outcome.online_probe = module.online_probe
    return outcome


def _save_final_model(plan: RunPlan, method: SSLMethod, online_probe) -> None:
    config, settings = plan.config, plan.settings
    meta = {"suite": config.name, "method": settings.name, "seed": plan.seed, "epochs": settings.epochs,
            "backbone": config.backbone, "in_channels": config.in_channels,
            "fingerprint": plan.fingerprints["training"], **model_settings(config, settings)}
    if online_probe is not None:
        meta["online_probe"] = {k: v.detach().cpu() for k, v in online_probe.state_dict().items()}
    save_model(plan.run_dir / "model.pt", method, meta)


def _run_costs(plan: RunPlan, outcome: Pretraining, ledger: AttemptLedger) -> dict:
    """The record's time, throughput and memory fields."""
    peak, world_size = outcome.peak_memory_mb, outcome.world_size
    seconds = outcome.train_seconds
    return {
        # every attempt's time (SLURM requeues, resumes after a kill or an interrupt), and how many there were
        "wall_time_s": round(ledger.total_seconds(), 3),
        "attempts": ledger.count,
        "devices": world_size,
        "global_batch_size": plan.settings.batch_size * world_size,
        "throughput_images_per_s": round(outcome.images_seen / seconds, 1) if seconds > 0 else None,
        "peak_memory_mb": round(peak, 1) if peak is not None else round(process_peak_rss_mb(), 1),
        # what peak_memory_mb measures: the accelerator's peak allocation, or (CPU) the process's peak RSS
        "peak_memory_source": "cuda_max_allocated" if peak is not None else "process_peak_rss",
        "checkpoint": str(plan.run_dir / "model.pt") if outcome.status == "completed" else None,
    }


def _attempt(plan: RunPlan, method: SSLMethod, data: SuiteData, context: RunContext, ledger: AttemptLedger) -> dict:
    config, settings = plan.config, plan.settings
    tracker = Tracker(config.train.logger, plan.run_dir) if _rank_zero() else None
    if tracker is not None:
        tracker.log_settings({"suite": config.name, "method": settings.name, "seed": plan.seed,
                              "config": config.canonical(), "method_config": settings.model_dump(mode="json")})
    outcome = _pretrain(plan, method, data, context, tracker)
    if not _rank_zero():  # DDP ranks > 0: rank 0 evaluates and writes
        return {"status": outcome.status, "metrics": []}
    device = resolve_device(config.train)
    method.to(device)
    evaluated = None
    if outcome.status == "completed":
        _save_final_model(plan, method, outcome.online_probe)
        evaluated = evaluate(config, TrainedModel(method, plan.seed, outcome.online_probe), data,
                             list(config.evaluation.protocols), context, "run")
    provenance = evaluated.provenance if evaluated is not None else provenance_entry("run", [], device)
    record = build_record(plan, data, method, evaluated, provenance, outcome.status, outcome.history)
    if tracker is not None and evaluated is not None:
        tracker.log_evaluation(evaluated.result.table(),
                               step=max(1, outcome.images_seen // max(1, settings.batch_size)))
    record.update(_run_costs(plan, outcome, ledger))
    if outcome.message:
        record["message"] = outcome.message
    write_record(record, plan.out_path, force=context.redo,
                 predictions=evaluated.result.predictions if evaluated is not None else None)
    return record


def provenance_entry(command: str, protocols: list[str], device: torch.device) -> dict:
    # threads: the CPU thread count the process computed with (CPU results are bitwise reproducible on the same
    # CPU model and thread count)
    return {"command": command, "protocols": list(protocols), "git_commit": git_commit(),
            "versions": package_versions(), "device": device_name(device), "cpu": cpu_model(),
            "threads": torch.get_num_threads(),
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)


def build_record(plan: RunPlan, data: SuiteData, method: SSLMethod, evaluated: Evaluated | None, provenance: dict,
                 status: str = "completed", history: list | None = None) -> dict:
    """A schema-3 record (benchmarks.records.RunRecord) of one run: its entries and details from `evaluated`
    (none when it did not finish), `provenance` (its pretraining's: the provenance entry of this process);
    timing fields are filled in by the caller."""
    config, settings = plan.config, plan.settings
    result = evaluated.result if evaluated is not None else None
    return {
        "schema_version": SCHEMA_VERSION,
        "status": status,
        "suite": config.name,
        "dataset": data.display_name,
        "method": settings.name,
        "method_base": settings.method,
        "variant": settings.variant,
        "method_display": settings.display_name,
        "paper_reference": settings.paper,
        "is_reference": bool(type(method).is_reference),
        "seed": plan.seed,
        "epochs": settings.epochs,
        "backbone": config.backbone,
        "batch_size": settings.batch_size,
        "fingerprints": plan.fingerprints,
        "config": config.canonical(),
        "method_config": settings.model_dump(mode="json"),
        "metrics": result.entries if result else [],
        "evaluation": result.evaluation if result else {},
        "clusters": result.clusters if result else {},
        "predictions": None,
        "history": history or [],
        "provenance": {"pretraining": {k: provenance[k] for k in ("git_commit", "versions", "device", "cpu",
                                                                  "threads", "created")},
                       "evaluations": [provenance] if evaluated is not None else []},
        "wall_time_s": 0.0,
        "throughput_images_per_s": None,
        "peak_memory_mb": None,
        "checkpoint": None,
        "created": provenance["created"],
        "checksum": "",
    }


def _cap(dataset: ImageDataset, max_images: int) -> ImageDataset:
    if max_images <= 0 or len(dataset) <= max_images:
        return dataset
    generator = torch.Generator().manual_seed(0)
    return dataset.subset(torch.randperm(len(dataset), generator=generator)[:max_images].sort().values)
