"""One run = (suite, method, seed): load data -> pretrain -> evaluate -> write the record."""

from __future__ import annotations

import contextlib
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

from benchmarks.augment import BatchAugment, Normalization
from benchmarks.backbones import build_backbone
from benchmarks.config import (
    AugmentConfig,
    MethodConfig,
    SuiteConfig,
    TrainConfig,
    fingerprint,
    training_fingerprint,
)
from benchmarks.data import ImageDataset
from benchmarks.errors import CheckpointError, ConfigError, DivergedError, RunLockedError
from benchmarks.evaluation import semi as semi_protocol
from benchmarks.evaluation.protocols import PER_LAYER_KNN_K, evaluate_model
from benchmarks.evaluation.settings import EvaluationConfig
from benchmarks.records import atomic_write, method_slug, read_record, record_path, write_record
from benchmarks.suite_data import SuiteData, check_data_matches, load_suite_data  # noqa: F401  (re-exported)
from benchmarks.training import MonitorData, PretrainModule, fit
from methods import get_method
from methods.base import DataInfo, SSLMethod

log = logging.getLogger("benchmarks")

MODEL_FORMAT = "ssl-bench-model/1"
REPO_ROOT = Path(__file__).resolve().parent.parent


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


def check_backbone_input(backbone: torch.nn.Module, config: SuiteConfig, augment: AugmentConfig) -> None:
    """A forward pass on blank images of every view size, so a backbone that cannot take them fails now."""
    sizes = sorted({v.size for v in augment.views})
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
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
    finally:
        backbone.train(was_training)


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


def build_method(config: SuiteConfig, method_name: str, data: SuiteData, hparams=None
                 ) -> tuple[SSLMethod, MethodConfig]:
    """The method with fresh weights and its resolved settings (`hparams`: recorded ones, to rebuild a run)."""
    settings = config.method(method_name)
    cls = get_method(settings.method)
    backbone = build_backbone(config.backbone, config.in_channels)
    info = DataInfo(num_classes=config.num_classes, num_train=len(data.pretrain if not cls.uses_labels else data.train),
                    in_channels=config.in_channels, image_size=config.image_size)
    return cls(backbone, info, settings.hparams if hparams is None else hparams), settings


def resolve_device(train_cfg: TrainConfig) -> torch.device:
    if train_cfg.accelerator == "cpu":
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
    return Path(work_dir) / suite / f"{method_slug(method)}_e{epochs}_s{seed}"


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


def run_one(config: SuiteConfig, method_name: str, seed: int, results_dir="results", work_dir="runs",
            data: SuiteData | None = None, data_root=None, download=False, force=False, restart=False,
            progress=True) -> dict:
    """Pretrain, evaluate and record one (suite, method, seed). Returns the record.

    Every check of the input runs before any work (nothing is written when one fails). The run
    then holds a lock on its folder, resumes from its last epoch checkpoint there (unless
    `restart`), and ends with one atomically written record; an existing record is returned
    unchanged unless `force`.
    """
    settings = config.method(method_name)
    suite, epochs = config.name, settings.epochs
    out_path = record_path(results_dir, suite, method_name, epochs, seed)
    if out_path.exists() and not force:
        log.info("%s exists; skipping (use --force to redo)", out_path)
        return read_record(out_path)
    data = data or load_suite_data(config, data_root, download)
    check_evaluation_fits(config.evaluation, data)
    pl.seed_everything(seed, workers=True, verbose=False)
    method, settings = build_method(config, method_name, data)
    check_backbone_input(method.backbone, config, settings.augment)
    check_pretrain_size(method, data, settings)
    run_dir = run_dir_for(work_dir, suite, method_name, epochs, seed)
    with run_lock(run_dir, f"{suite}/{method_name} ({epochs} epochs, seed {seed})"):
        if out_path.exists() and not force:  # finished by another process while this one was checking
            return read_record(out_path)
        return _train_evaluate_record(config, settings, seed, method, data, run_dir, out_path, results_dir,
                                      data_root, force, restart, progress)


def _train_evaluate_record(config: SuiteConfig, settings: MethodConfig, seed, method, data, run_dir, out_path,
                           results_dir, data_root, force, restart, progress) -> dict:
    suite, epochs, method_name = config.name, settings.epochs, settings.name
    train_cfg = config.train
    device = resolve_device(train_cfg)
    resolved = config.canonical()
    resolved["method"] = settings.model_dump(mode="json")
    status, message, started = "completed", None, time.perf_counter()
    history, images_seen, train_seconds, peak = [], 0, 0.0, None
    trained = not method.skips_training and epochs > 0
    if trained:
        pretrain_set = data.train if method.uses_labels else data.pretrain
        on_gpu = device.type == "cuda"
        channels_last = on_gpu if train_cfg.channels_last == "auto" else bool(train_cfg.channels_last)
        module = PretrainModule(method, build_augment(settings.augment), settings.optimizer, pretrain_set,
                                settings.batch_size, epochs, seed,
                                MonitorData(_cap(data.train, train_cfg.online_knn_max_bank), data.test,
                                            data.num_classes, train_cfg.online_knn_every),
                                channels_last=channels_last, divergence_check_every=20 if on_gpu else 1)
        if train_cfg.compile:
            method.backbone = torch.compile(method.backbone)
        try:
            result = fit(module, train_cfg, run_dir, training_fingerprint(config, settings, seed), restart=restart,
                         progress=progress)
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
                                        "backbone": config.backbone, "in_channels": config.in_channels,
                                        "fingerprint": fingerprint(resolved)})
        # evaluation views are the suite's (the shared protocol), whatever views the method trained on
        eval_result = evaluate_model(method, data, build_augment(config.augment).clean, config.evaluation,
                                     device=device, seed=seed, config=config, data_root=data_root,
                                     results_dir=results_dir, progress=progress)
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
        "backbone": config.backbone,
        "batch_size": settings.batch_size,
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
