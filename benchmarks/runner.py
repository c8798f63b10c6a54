"""One run = (suite, method, seed): load data -> pretrain -> evaluate -> write the record."""

from __future__ import annotations

import copy
import datetime as dt
import importlib.metadata
import logging
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch

from benchmarks.augment import BatchAugment, Normalization, ViewSpec
from benchmarks.backbones import build_backbone
from benchmarks.config import method_settings
from benchmarks.data import ImageDataset, dataset_display_name, load_split
from benchmarks.errors import CheckpointError, ConfigError, DivergedError
from benchmarks.evaluation.protocols import evaluate_model, resolve_evaluation
from benchmarks.records import read_record, record_path, write_record
from benchmarks.training import MonitorData, PretrainModule, config_fingerprint, fit
from methods import get_method
from methods.base import DataInfo, SSLMethod

log = logging.getLogger("benchmarks")

MODEL_FORMAT = "ssl-bench-model/1"
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class SuiteData:
    pretrain: ImageDataset  # unlabelled images for self-supervised pretraining
    train: ImageDataset  # labelled train split (kNN bank, linear/semi training, supervised reference)
    test: ImageDataset
    num_classes: int
    display_name: str


def load_suite_data(config: dict, data_root: str | Path | None = None, download: bool = False) -> SuiteData:
    ds = config["dataset"]
    root = data_root if data_root is not None else None
    opts = dict(ds["options"])

    def load(split):
        return load_split(ds["name"], split, root, download=download, **opts)

    train = load(ds["train_split"])
    test = load(ds["test_split"])
    pretrain = train if ds["pretrain_split"] == ds["train_split"] else load(ds["pretrain_split"])
    data = SuiteData(pretrain, train, test, config["num_classes"],
                     ds["display_name"] or dataset_display_name(ds["name"]))
    check_data_matches(config, data)
    return data


def check_data_matches(config: dict, data: SuiteData) -> None:
    channels, height, width = data.train.image_shape
    if channels != config["in_channels"]:
        raise ConfigError(f"in_channels: the suite says {config['in_channels']} but {data.train.name} images have "
                          f"{channels} channel(s); set in_channels: {channels} (and a matching normalization)")
    if data.train.num_classes != config["num_classes"]:
        raise ConfigError(f"num_classes: the suite says {config['num_classes']} but {data.train.name} has "
                          f"{data.train.num_classes} classes")
    for split in (data.train, data.test):
        labels = split.labels
        if len(labels) == 0:
            raise ConfigError(f"dataset: the {split.split} split of {split.name} is empty")
        if (labels < 0).any() or (labels >= config["num_classes"]).any():
            raise ConfigError(f"dataset: the {split.split} split of {split.name} must be fully labelled with "
                              f"labels in [0, {config['num_classes']})")


def build_augment(config: dict) -> BatchAugment:
    norm = config["augment"]["normalization"]
    views = [ViewSpec.from_dict(v) for v in config["augment"]["views"]]
    return BatchAugment(views, Normalization(tuple(norm["mean"]), tuple(norm["std"])))


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
    """The final model for re-evaluation: tensors + plain metadata only (loadable with weights_only=True)."""
    payload = {"format": MODEL_FORMAT, **meta, "state_dict": {k: v.detach().cpu() for k, v in method.state_dict().items()}}
    tmp = path.with_suffix(".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, tmp)
    tmp.replace(path)


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
    """Pretrain, evaluate and record one (suite, method, seed). Returns the record."""
    suite, epochs = config["name"], config["train"]["epochs"]
    out_path = record_path(results_dir, suite, method_name, epochs, seed)
    if out_path.exists() and not force:
        log.info("%s exists; skipping (use --force to redo)", out_path)
        return read_record(out_path)
    eval_cfg = resolve_evaluation(config["evaluation"])
    data = data or load_suite_data(config, data_root, download)
    pl.seed_everything(seed, workers=True, verbose=False)
    method, optimizer = build_method(config, method_name, data)
    augment = build_augment(config)
    train_cfg = config["train"]
    device = resolve_device(train_cfg)
    run_dir = run_dir_for(work_dir, suite, method_name, epochs, seed)
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
        fingerprint = config_fingerprint({"config": resolved, "method": method_name, "seed": seed})
        try:
            result = fit(module, train_cfg, run_dir, fingerprint, restart=restart, progress=progress)
            history, images_seen, train_seconds, peak = (result.history, result.images_seen, result.train_seconds,
                                                         result.peak_memory_mb)
        except DivergedError as exc:
            status, message, history = "diverged", str(exc), module.history
            log.warning("%s/%s seed %d diverged: %s", suite, method_name, seed, exc)
    method.to(device)
    eval_result = None
    if status == "completed":
        model_path = run_dir / "model.pt"
        save_model(model_path, method, {"suite": suite, "method": method_name, "seed": seed, "epochs": epochs,
                                        "backbone": config["backbone"], "in_channels": config["in_channels"],
                                        "fingerprint": config_fingerprint({"config": resolved})})
        eval_result = evaluate_model(method, data, augment.clean, eval_cfg, device=device, seed=seed)
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
        "device": str(device) if not torch.cuda.is_available() else torch.cuda.get_device_name(),
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
