"""One run = (suite, method, seed): load data -> pretrain -> evaluate -> write the record."""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import importlib.metadata
import logging
import os
import platform
import subprocess
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from benchmarks.augment import BatchAugment, Normalization, ViewSpec
from benchmarks.backbones import build_backbone
from benchmarks.config import method_settings
from benchmarks.data import ImageDataset
from benchmarks.errors import CheckpointError, ConfigError, DivergedError, RunLockedError, UnknownMethodError
from benchmarks.evaluation import semi as semi_protocol
from benchmarks.evaluation.protocols import PER_LAYER_KNN_K, evaluate_model, resolve_evaluation
from benchmarks.records import atomic_write, read_record, record_path, write_record
from benchmarks.suite_data import SuiteData, check_data_matches, load_suite_data  # noqa: F401  (re-exported)
from benchmarks.training import MonitorData, PretrainModule, config_fingerprint, fit, training_fingerprint
from methods import available_methods, get_method
from methods.base import DataInfo, SSLMethod, validate_hparams

log = logging.getLogger("benchmarks")

MODEL_FORMAT = "ssl-bench-model/1"
REPO_ROOT = Path(__file__).resolve().parent.parent


def build_augment(config: dict) -> BatchAugment:
    norm = config["augment"]["normalization"]
    views = [ViewSpec.from_dict(v) for v in config["augment"]["views"]]
    return BatchAugment(views, Normalization(tuple(norm["mean"]), tuple(norm["std"])))


def check_method_settings(config: dict, method_names: list[str]) -> None:
    """Before any data is loaded: every name is registered, the suite's `methods` section names only
    registered methods, and each method's hyperparameters and optimizer are known keys of the right type."""
    for name in config["methods"]:
        if name not in available_methods():
            raise UnknownMethodError(f"methods.{name}: no method is registered under this name (the suite's "
                                     f"`methods` section configures registered methods; available: "
                                     f"{', '.join(available_methods())}). Fix the name, or import the module that "
                                     "registers it with --import MODULE_OR_FILE")
    for name in method_names:
        cls = get_method(name)
        hparams, _ = method_settings(config, name)
        validate_hparams(name, cls.default_hparams, hparams)


def check_backbone_input(backbone: torch.nn.Module, config: dict) -> None:
    """A forward pass on blank images of every view size, so a backbone that cannot take them fails now."""
    sizes = sorted({v["size"] for v in config["augment"]["views"]})
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            for size in sizes:
                try:
                    out = backbone(torch.zeros(2, config["in_channels"], size, size))
                except RuntimeError as exc:
                    raise ConfigError(
                        f"backbone: {config['backbone']} cannot take {config['in_channels']}x{size}x{size} views "
                        f"({(str(exc).splitlines() or [''])[0]}); use larger views (augment.views[].size) or a "
                        "backbone made for small images (small_cnn for 8x8/28x28, resnet18_cifar for 32x32)") from exc
                if out.dim() != 2 or out.shape[0] != 2:
                    raise ConfigError(f"backbone: {config['backbone']} returned {tuple(out.shape)} for a batch of 2 "
                                      f"{size}x{size} views; a backbone must return [batch, feature_dim]")
    finally:
        backbone.train(was_training)


def check_evaluation_fits(eval_cfg: dict, data: SuiteData) -> None:
    """Evaluation settings that depend on the data's size, checked before training (not after it)."""
    bank = len(data.train)
    protocols = eval_cfg["protocols"]
    ks = list(eval_cfg["knn"]["ks"]) if "knn" in protocols else []
    if eval_cfg.get("per_layer") and "knn" in protocols:
        ks.append(PER_LAYER_KNN_K)
    for k in ks:
        if k > bank:
            raise ConfigError(f"evaluation.knn.ks: k = {k} is larger than the kNN bank (the {bank} images of the "
                              f"{data.train.split} split); use k <= {bank}")
    if "semi" in protocols:
        for fraction in eval_cfg["semi"]["fractions"]:
            semi_protocol.images_per_class(bank, data.num_classes, fraction)


def check_pretrain_size(method: SSLMethod, data: SuiteData, config: dict) -> None:
    if method.skips_training or config["train"]["epochs"] == 0:
        return
    images = len(data.train if method.uses_labels else data.pretrain)
    if images < config["train"]["batch_size"]:
        raise ConfigError(f"train.batch_size: {config['train']['batch_size']} is more than the {images} pretraining "
                          f"images, so an epoch would have no full batch; use --batch-size {images} or less")


def preflight(config: dict, method_names: list[str], data: SuiteData) -> None:
    """Every check that needs the data, for every method, before the first run starts."""
    check_evaluation_fits(resolve_evaluation(config["evaluation"]), data)
    for name in method_names:
        method, _ = build_method(config, name, data)
        check_backbone_input(method.backbone, config)
        check_pretrain_size(method, data, config)


def build_method(config: dict, method_name: str, data: SuiteData) -> tuple[SSLMethod, dict]:
    cls = get_method(method_name)
    hparams, optimizer = method_settings(config, method_name)
    backbone = build_backbone(config["backbone"], config["in_channels"])
    info = DataInfo(num_classes=config["num_classes"], num_train=len(data.pretrain if not cls.uses_labels else data.train),
                    in_channels=config["in_channels"], image_size=config["image_size"])
    return cls(backbone, info, hparams), optimizer


def resolve_device(train_cfg: dict) -> torch.device:
    if train_cfg["accelerator"] == "cpu":
        return torch.device("cpu")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def package_versions() -> dict:
    names = ["torch", "torchvision", "pytorch-lightning", "lightly", "faiss-cpu", "faiss-gpu", "scikit-learn",
             "numpy", "pandas", "ssl-cluster-bench"]
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


def run_dir_for(work_dir: str | Path, suite: str, method: str, epochs: int, seed: int) -> Path:
    return Path(work_dir) / suite / f"{method}_e{epochs}_s{seed}"


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


def load_model_file(path: str | Path) -> dict:
    """Load a model file safely (weights_only=True); refuses anything that is not one of ours."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors for unsafe objects, truncated zip files, ...
        raise CheckpointError(f"{path}: refused to load ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                              "only checkpoints holding tensors and plain metadata are accepted") from exc
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{path}: not an ssl-bench model file (format {MODEL_FORMAT})")
    return payload


def run_one(config: dict, method_name: str, seed: int, results_dir="results", work_dir="runs",
            data: SuiteData | None = None, data_root=None, download=False, force=False, restart=False,
            progress=True) -> dict:
    """Pretrain, evaluate and record one (suite, method, seed). Returns the record.

    Every check of the input runs before any work (nothing is written when one fails). The run
    then holds a lock on its folder, resumes from its last epoch checkpoint there (unless
    `restart`), and ends with one atomically written record; an existing record is returned
    unchanged unless `force`.
    """
    suite, epochs = config["name"], config["train"]["epochs"]
    out_path = record_path(results_dir, suite, method_name, epochs, seed)
    if out_path.exists() and not force:
        log.info("%s exists; skipping (use --force to redo)", out_path)
        return read_record(out_path)
    check_method_settings(config, [method_name])
    eval_cfg = resolve_evaluation(config["evaluation"])
    data = data or load_suite_data(config, data_root, download)
    check_evaluation_fits(eval_cfg, data)
    pl.seed_everything(seed, workers=True, verbose=False)
    method, optimizer = build_method(config, method_name, data)
    check_backbone_input(method.backbone, config)
    check_pretrain_size(method, data, config)
    run_dir = run_dir_for(work_dir, suite, method_name, epochs, seed)
    with run_lock(run_dir, f"{suite}/{method_name} ({epochs} epochs, seed {seed})"):
        if out_path.exists() and not force:  # finished by another process while this one was checking
            return read_record(out_path)
        return _train_evaluate_record(config, method_name, seed, method, optimizer, data, eval_cfg, run_dir,
                                      out_path, results_dir, data_root, force, restart, progress)


def _train_evaluate_record(config, method_name, seed, method, optimizer, data, eval_cfg, run_dir, out_path,
                           results_dir, data_root, force, restart, progress) -> dict:
    suite, epochs = config["name"], config["train"]["epochs"]
    augment = build_augment(config)
    train_cfg = config["train"]
    device = resolve_device(train_cfg)
    resolved = copy.deepcopy({k: v for k, v in config.items() if not k.startswith("_")})
    resolved["method_hparams"], resolved["method_optimizer"] = method.hparams, optimizer
    status, message, started = "completed", None, time.perf_counter()
    history, images_seen, train_seconds, peak = [], 0, 0.0, None
    trained = not method.skips_training and epochs > 0
    if trained:
        pretrain_set = data.train if method.uses_labels else data.pretrain
        on_gpu = device.type == "cuda"
        channels_last = on_gpu if train_cfg["channels_last"] == "auto" else bool(train_cfg["channels_last"])
        module = PretrainModule(method, augment, optimizer, pretrain_set, train_cfg["batch_size"], epochs, seed,
                                MonitorData(_cap(data.train, train_cfg["online_knn_max_bank"]), data.test,
                                            data.num_classes, train_cfg["online_knn_every"]),
                                channels_last=channels_last, divergence_check_every=20 if on_gpu else 1)
        if train_cfg["compile"]:
            method.backbone = torch.compile(method.backbone)
        fingerprint = training_fingerprint(config, method_name, method.hparams, optimizer, seed)
        try:
            result = fit(module, train_cfg, run_dir, fingerprint, restart=restart, progress=progress)
            history, images_seen, train_seconds, peak = (result.history, result.images_seen, result.train_seconds,
                                                         result.peak_memory_mb)
        except DivergedError as exc:
            status, message, history = "diverged", str(exc), module.history
            log.warning("%s/%s seed %d diverged: %s", suite, method_name, seed, exc)
    if getattr(rank_zero_only, "rank", 0) != 0:  # DDP ranks > 0: rank 0 evaluates and writes
        return {"status": status, "metrics": {}}
    method.to(device)
    eval_result = None
    if status == "completed":
        model_path = run_dir / "model.pt"
        save_model(model_path, method, {"suite": suite, "method": method_name, "seed": seed, "epochs": epochs,
                                        "backbone": config["backbone"], "in_channels": config["in_channels"],
                                        "fingerprint": config_fingerprint({"config": resolved})})
        eval_result = evaluate_model(method, data, augment.clean, eval_cfg, device=device, seed=seed,
                                     config=config, data_root=data_root, results_dir=results_dir,
                                     progress=progress)
    cls = type(method)
    record = {
        "schema_version": 1,
        "status": status,
        "suite": suite,
        "dataset": data.display_name,
        "method": method_name,
        "method_display": cls.display_name,
        "is_reference": bool(cls.is_reference),
        "seed": seed,
        "epochs": epochs,
        "backbone": config["backbone"],
        "batch_size": train_cfg["batch_size"],
        "config": resolved,
        "metrics": eval_result.metrics if eval_result else {},
        "evaluation": eval_result.evaluation if eval_result else {},
        "clusters": eval_result.clusters if eval_result else None,
        "history": history,
        "paper_reference": cls.paper,
        "versions": package_versions(),
        "git_commit": git_commit(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "wall_time_s": round(time.perf_counter() - started, 3),
        "throughput_images_per_s": round(images_seen / train_seconds, 1) if train_seconds > 0 else None,
        "peak_memory_mb": round(peak, 1) if peak is not None else None,
        "checkpoint": str(run_dir / "model.pt") if status == "completed" else None,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if message:
        record["message"] = message
    write_record(record, out_path, force=force)
    return record


def _cap(dataset: ImageDataset, max_images: int) -> ImageDataset:
    if max_images <= 0 or len(dataset) <= max_images:
        return dataset
    generator = torch.Generator().manual_seed(0)
    return dataset.subset(torch.randperm(len(dataset), generator=generator)[:max_images].sort().values)
