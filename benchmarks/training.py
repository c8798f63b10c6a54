"""Pretraining with PyTorch Lightning: devices, precision, DDP, checkpoints, resume.

The loop itself is Lightning's. What this module adds:
- batches of uint8 images fetched by index (in-memory data: one tensor slice per
  batch) and turned into views on the training device (benchmarks.augment);
- per-step random generators seeded by (seed, step) and per-epoch sample orders
  seeded by (seed, epoch), so an interrupted run resumes to bitwise the same result
  on CPU from its last epoch checkpoint;
- a per-epoch history (mean loss, online kNN top-1, method schedules) kept in the
  checkpoint and copied into the run record;
- epoch checkpoints (last.ckpt) written atomically and read back with
  weights_only=True (SafeCheckpointIO), holding only plain data: the global
  torch/numpy/python RNG states are stored as tensors and numbers, and a config
  fingerprint refuses a checkpoint of another run before any training starts.
"""

from __future__ import annotations

import csv
import logging
import math
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from lightning_fabric.loggers.logger import rank_zero_experiment
from pytorch_lightning.callbacks import ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.plugins import TorchCheckpointIO
from pytorch_lightning.utilities.rank_zero import rank_zero_only
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from benchmarks.augment import BatchAugment, step_generator
from benchmarks.config import TrainConfig
from benchmarks.data import ImageDataset
from benchmarks.errors import CheckpointError, ConfigError, DivergedError
from benchmarks.evaluation.features import backbone_features, batches_of, eval_mode, is_streamed
from benchmarks.evaluation.knn import knn_classify, topk_accuracy
from benchmarks.records import atomic_write
from methods.base import EpochContext, SSLMethod, TrainBatch
from ssl_common.typed import OptimizerConfig

CHECKPOINT_FORMAT = "ssl-bench-trainer/1"
log = logging.getLogger("benchmarks")


class IndexedBatches(Dataset):
    """`dataset[list_of_indices]` -> (uint8 images [B,C,H,W], labels [B], indices [B])."""

    def __init__(self, data: ImageDataset):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, indices):
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.data.get_batch(idx), self.data.labels[idx], idx


class EpochBatchSampler(Sampler):
    """Yields this rank's index batches; the epoch's order depends only on (seed, epoch).

    The method may impose the order (UIC's class-balanced epochs); by default a
    random permutation. The last incomplete global batch is dropped so every rank
    sees equal batch sizes.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, order_fn=None, rank: int = 0,
                 world_size: int = 1):
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.order_fn, self.rank, self.world_size = order_fn, rank, world_size
        self.epoch = 0
        if self.num_samples < batch_size * world_size:
            raise ConfigError(f"train.batch_size: the pretraining set has {num_samples} images, fewer than one "
                              f"global batch ({batch_size} x {world_size} ranks); lower train.batch_size")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples // (self.batch_size * self.world_size)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = self.order_fn(self.epoch, generator) if self.order_fn is not None else None
        if order is None:
            order = torch.randperm(self.num_samples, generator=generator)
        global_batch = self.batch_size * self.world_size
        for b in range(len(order) // global_batch):
            start = b * global_batch + self.rank * self.batch_size
            yield order[start:start + self.batch_size].tolist()


def build_optimizer(params, cfg: OptimizerConfig, batch_size: int):
    lr = cfg.lr * (batch_size / cfg.lr_scale_batch if cfg.lr_scale_batch else 1.0)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.name == "lars":
        from lightly.utils.lars import LARS

        return LARS(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)


class CombinedOptimizer(torch.optim.Optimizer):
    """Optimizers over disjoint parameter sets, stepped as one (Lightning's automatic optimization
    and one LR schedule drive them all: the schedule scales every group's own base lr)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = list(optimizers)
        super().__init__([p for o in self.optimizers for g in o.param_groups for p in g["params"]], {})
        self._link_groups()

    def _link_groups(self) -> None:
        # the inner optimizers' own group dicts: LR changes made through this object reach them
        self.param_groups = [g for o in self.optimizers for g in o.param_groups]

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for optimizer in self.optimizers:
            optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:
        for optimizer, state in zip(self.optimizers, state_dict["optimizers"], strict=True):
            optimizer.load_state_dict(state)
        self._link_groups()


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, final_fraction: float,
                  start_fraction: float = 0.0) -> float:
    """LR multiplier: linear warm-up from `start_fraction`, then cosine decay to `final_fraction`."""
    if warmup_steps > 0 and step < warmup_steps:
        return start_fraction + (1 - start_fraction) * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


def lr_multiplier(step: int, total_steps: int, steps_per_epoch: int, cfg: OptimizerConfig) -> float:
    """The schedule of `cfg` at `step` of a segment of `total_steps`: linear warm-up, then cosine, linear
    decay (to lr * final_lr_fraction), steps (x gamma at each milestone epoch) or constant."""
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    if cfg.schedule == "cosine" or (warmup > 0 and step < warmup):
        return warmup_cosine(step, total_steps, warmup, cfg.final_lr_fraction, cfg.warmup_start_fraction)
    if cfg.schedule == "linear":
        progress = min(max((step - warmup) / max(1, total_steps - warmup), 0.0), 1.0)
        return 1.0 - (1.0 - cfg.final_lr_fraction) * progress
    if cfg.schedule == "step":
        epoch = step // max(1, steps_per_epoch)
        return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    return 1.0


@dataclass
class OnlineProbe:
    """Settings of the online linear probe (evaluation.online_linear) for a PretrainModule."""

    num_classes: int
    lr: float = 0.1
    weight_decay: float = 0.0


@dataclass
class MonitorData:
    """Labelled splits for the online kNN monitor."""

    train: ImageDataset
    test: ImageDataset
    num_classes: int
    every: int = 1


@dataclass(frozen=True)
class PretrainSettings:
    """How one pretraining (or one stage of a multi-stage method) runs, for a PretrainModule."""

    batch_size: int  # per device
    max_epochs: int
    seed: int  # the run's seed
    stage: int = 0  # the stage's index (method.stages)
    channels_last: bool = False  # the views in channels-last memory format (faster convolutions on GPU)
    divergence_check_every: int = 1  # steps between checks that the loss is finite (each check syncs the device)


class PretrainModule(pl.LightningModule):
    def __init__(self, method: SSLMethod, augment: BatchAugment, optimizer: OptimizerConfig, pretrain: ImageDataset,
                 settings: PretrainSettings, monitor: MonitorData | None = None,
                 online_probe: OnlineProbe | None = None):
        super().__init__()
        self.method, self.augment, self.optim_cfg, self.pretrain = method, augment, optimizer, pretrain
        self.batch_size, self.max_epochs, self.seed = settings.batch_size, settings.max_epochs, settings.seed
        # the seed of the sample orders and views: the run's for the first stage, a stage-specific one after,
        # so that two stages never draw the same views at the same step
        self.stage = settings.stage
        self.stream_seed = self.seed if self.stage == 0 else self.seed * 1_009 + 7_919 * self.stage
        # the online linear probe: a zero-initialised linear classifier on the stop-gradient features of the
        # backbone's first forward pass of each step (no extra forward, no global RNG drawn: the method
        # trains exactly as without it)
        self.probe_cfg = online_probe
        self.online_probe = (nn.Linear(method.backbone.feature_dim, online_probe.num_classes)
                             if online_probe is not None else None)
        if self.online_probe is not None:
            nn.init.zeros_(self.online_probe.weight)
            nn.init.zeros_(self.online_probe.bias)
            self._captured = None
            self._hook = method.backbone.register_forward_hook(self._capture_features)
        self.monitor, self.channels_last = monitor, settings.channels_last
        self.divergence_check_every = settings.divergence_check_every
        self.history: list[dict] = []
        self._epoch_loss = None
        self._epoch_steps = 0
        self._epoch_logs: dict[str, float] = {}
        self._epoch_started = 0.0
        self.images_seen = 0
        self.train_seconds = 0.0

    # -- data ----------------------------------------------------------------------
    def train_dataloader(self):
        sampler = EpochBatchSampler(len(self.pretrain), self.batch_size, self.stream_seed, self.method.epoch_order,
                                    rank=self.global_rank, world_size=self.trainer.world_size)
        workers = getattr(self, "num_workers", 0)
        if is_streamed(self.pretrain):  # workers read the encoded files; the batch is decoded on the device
            from benchmarks.streaming import EncodedBatches

            workers = max(1, workers)
            return DataLoader(EncodedBatches(self.pretrain), sampler=sampler, batch_size=None, num_workers=workers,
                              persistent_workers=True)
        return DataLoader(IndexedBatches(self.pretrain), sampler=sampler, batch_size=None, num_workers=workers,
                          pin_memory=self.device.type == "cuda" or torch.cuda.is_available(),
                          persistent_workers=workers > 0)

    def on_before_batch_transfer(self, batch, dataloader_idx):
        """A streamed batch arrives as encoded files: decode it in one call on the training device (nvJPEG on a
        GPU), then the usual batched views are drawn from the uint8 images."""
        if is_streamed(self.pretrain):
            encoded, labels, indices = batch
            return self.pretrain.decode(encoded, indices, self.device), labels, indices
        return batch

    @torch.no_grad()
    def _predict_pretrain(self, fn):
        """Run fn over the clean pretraining set in index order (for methods' epoch hooks)."""
        with eval_mode(self.method):
            return torch.cat([fn(self.augment.clean(images)).float()
                              for images in batches_of(self.pretrain, 1024, self.device)])

    def _capture_features(self, module, inputs, output):
        if self._captured is None and self.training and isinstance(output, torch.Tensor) and output.dim() == 2:
            self._captured = output.detach()

    def on_train_end(self):
        if self.online_probe is not None:  # evaluation forwards must not feed the probe
            self._hook.remove()
            self._captured = None

    def _online_probe_loss(self, labels: torch.Tensor) -> torch.Tensor | None:
        """Cross-entropy of the online probe on the captured features of this step's images (rows beyond the
        batch, e.g. SSL++'s other rotations, are not its images); None when nothing usable was captured."""
        captured, self._captured = self._captured, None
        if captured is None or captured.shape[0] < len(labels) or captured.shape[0] % len(labels) != 0:
            return None
        valid = labels >= 0  # STL-10's unlabelled images have label -1
        if not bool(valid.any()):
            return None
        logits = self.online_probe(captured[:len(labels)].float())
        return F.cross_entropy(logits[valid], labels[valid])

    # -- training ------------------------------------------------------------------
    def on_train_epoch_start(self):
        self._epoch_loss, self._epoch_steps, self._epoch_started = None, 0, time.perf_counter()
        ctx = EpochContext(self.current_epoch, self.max_epochs, self.seed, self._predict_pretrain, self.device,
                           labels=self.pretrain.labels, stage=self.stage)
        self._epoch_logs = {k: float(v) for k, v in (self.method.on_train_epoch_start(ctx) or {}).items()}

    def training_step(self, batch, batch_idx):
        images, labels, indices = batch
        generator = step_generator(self.stream_seed, self.global_step, images.device)
        views = self.augment(images, generator)
        if self.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        train_batch = TrainBatch(views, indices, labels if self.method.uses_labels else None,
                                 self.current_epoch, self.global_step, self.max_epochs, generator, self.stage)
        if self.online_probe is not None:
            self._captured = None
        loss, logs = self.method.training_loss(train_batch)
        probe_loss = self._online_probe_loss(labels) if self.online_probe is not None else None
        if self.global_step % self.divergence_check_every == 0 and not torch.isfinite(loss):
            raise DivergedError(f"the loss became {loss.item()} in epoch {self.current_epoch + 1} (optimizer step "
                                f"{self.global_step}); lower the learning rate or check the method's hyperparameters")
        detached = loss.detach()
        self._epoch_loss = detached if self._epoch_loss is None else self._epoch_loss + detached
        self._epoch_steps += 1
        self.images_seen += images.shape[0] * self.trainer.world_size
        if self._step_logs_written():
            self.log("train_loss", detached, prog_bar=True, on_step=True, on_epoch=False, batch_size=len(images))
            for key, value in logs.items():
                self.log(f"train_{key}", value, on_step=True, on_epoch=False, batch_size=len(images))
            if probe_loss is not None:
                self.log("train_online_linear_loss", probe_loss.detach(), on_step=True, on_epoch=False,
                         batch_size=len(images))
        # the probe's loss reaches only the probe (its input is detached); the method's loss is what is logged
        return loss if probe_loss is None else loss + probe_loss

    def _step_logs_written(self) -> bool:
        """Whether Lightning hands this step's metrics to the loggers (every log_every_n_steps steps).

        self.log costs ~0.2 ms of Python per call; skipping it on the other steps writes the same
        log rows (the progress bar shows the last logged value).
        """
        every = self.trainer.log_every_n_steps
        return every <= 1 or (self.global_step + 1) % every == 0 or bool(self.trainer.fast_dev_run)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        total = max(1, self.trainer.estimated_stepping_batches)
        self.method.after_optimizer_step(min(1.0, self.global_step / total))

    def on_train_epoch_end(self):
        self.train_seconds += time.perf_counter() - self._epoch_started
        mean_loss = (self._epoch_loss / max(1, self._epoch_steps)).item() if self._epoch_loss is not None else math.nan
        if not math.isfinite(mean_loss):
            raise DivergedError(f"the mean loss of epoch {self.current_epoch + 1} is {mean_loss}; lower the learning "
                                "rate or check the method's hyperparameters")
        entry = {"epoch": self.current_epoch + 1, "loss": mean_loss, **self._epoch_logs}
        monitor = self.monitor
        last_epoch = self.current_epoch + 1 == self.max_epochs
        if monitor is not None and monitor.every > 0 and ((self.current_epoch + 1) % monitor.every == 0 or last_epoch):
            entry["online_knn_top1"] = self.online_knn()
            self.log("online_knn_top1", entry["online_knn_top1"], prog_bar=True, rank_zero_only=True)
        for key, value in self._epoch_logs.items():
            self.log(f"epoch_{key}", value, rank_zero_only=True)
        # flat names ("epoch_loss", not "epoch/loss"): MLflow's file store makes a folder of every "/"
        self.log("epoch_loss", mean_loss, rank_zero_only=True)
        self.history.append(entry)

    @torch.no_grad()
    def online_knn(self) -> float:
        m = self.monitor
        kwargs = dict(preprocess=self.augment.clean, device=self.device, batch_size=1024)
        network = self.method.monitored_backbone()
        bank = backbone_features(network, m.train, **kwargs)
        queries = backbone_features(network, m.test, **kwargs)
        k = min(20, len(bank))
        scores = knn_classify(bank, m.train.labels, queries, m.num_classes, k=k, temperature=0.1)
        return topk_accuracy(scores, m.test.labels, ks=(1,))["top1"]

    def configure_optimizers(self):
        batch = self.batch_size * self.trainer.world_size
        # only this stage's parameters (SSLMethod.set_stage freezes the others)
        optimizer = build_optimizer([p for p in self.method.parameters() if p.requires_grad], self.optim_cfg, batch)
        if self.online_probe is not None:  # SGD + momentum 0.9, the pretraining LR schedule (solo-learn's probe)
            probe = torch.optim.SGD(self.online_probe.parameters(), lr=self.probe_cfg.lr, momentum=0.9,
                                    weight_decay=self.probe_cfg.weight_decay)
            optimizer = CombinedOptimizer([optimizer, probe])
        total = max(1, self.trainer.estimated_stepping_batches)
        steps_per_epoch = max(1, total // max(1, self.max_epochs))
        cfg = self.optim_cfg
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, total, steps_per_epoch,
                                                                                         cfg))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- checkpoint extras ---------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint):
        # plain data only (loaded back with weights_only=True); the global RNG states make a
        # resumed run draw what the uninterrupted one would have (dropout, any method that
        # draws without its own generator)
        checkpoint["ssl_bench"] = {"format": CHECKPOINT_FORMAT, "history": self.history,
                                   "images_seen": self.images_seen, "train_seconds": self.train_seconds,
                                   "fingerprint": self.fingerprint, "rng": global_rng_state()}

    def on_load_checkpoint(self, checkpoint):
        extra = check_resume_payload(checkpoint, self.fingerprint, "last.ckpt")
        self.history = [dict(entry) for entry in extra["history"]]
        self.images_seen = int(extra["images_seen"])
        self.train_seconds = float(extra["train_seconds"])
        set_global_rng_state(extra["rng"])

    fingerprint: str = ""


# -- RNG state as plain data --------------------------------------------------------------
def global_rng_state() -> dict:
    """torch (CPU, CUDA), numpy and python global RNG states as tensors/numbers (weights_only-safe)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "python": {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64),
                        "gauss_next": gauss_next}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_global_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["gauss"]))
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["internal"].tolist()), py["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- checkpoints ---------------------------------------------------------------------------
class SafeCheckpointIO(TorchCheckpointIO):
    """Epoch checkpoints written atomically and loaded without unpickling arbitrary objects.

    Lightning's own writer goes through fsspec, which stages the file in the system temp
    folder and moves it (a copy, not a rename, across file systems; no fsync). Here the temp
    file sits beside the target, is fsynced and renamed over it (benchmarks.records.atomic_write),
    so last.ckpt is always a complete checkpoint, the previous or the new one, whenever the
    process dies. Loading always uses weights_only=True.
    """

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        atomic_write(path, lambda handle: torch.save(checkpoint, handle))

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        return load_checkpoint_file(path, map_location=map_location)


def load_checkpoint_file(path, map_location=None, mmap: bool = False) -> dict:
    """torch.load with weights_only=True; unsafe or damaged files raise CheckpointError."""
    try:
        payload = torch.load(path, map_location=map_location or "cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # pickle errors for unsafe objects, truncated zip files, ...
        first = (str(exc).splitlines() or [""])[0]
        raise CheckpointError(f"{path}: cannot be loaded ({type(exc).__name__}: {first}); only complete "
                              "checkpoints holding tensors and plain data are accepted. Delete it or pass "
                              "--restart to train from scratch") from exc
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: not a training checkpoint; delete it or pass --restart")
    return payload


def check_resume_payload(checkpoint: dict, fingerprint: str, where) -> dict:
    """The ssl-bench part of a Lightning checkpoint, refused unless it belongs to this very run."""
    extra = checkpoint.get("ssl_bench")
    if not isinstance(extra, dict) or extra.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{where}: not a checkpoint of ssl-bench's trainer ({CHECKPOINT_FORMAT}); "
                              "delete it or pass --restart to train from scratch")
    if extra.get("fingerprint") != fingerprint:
        raise CheckpointError(f"{where}: this checkpoint belongs to a run with another config, method, suite or "
                              "seed, so resuming from it would mix two runs. Pass --restart to train from scratch "
                              "(it is deleted), or use another --work-dir")
    return extra


@dataclass
class FitResult:
    history: list[dict]
    images_seen: int
    train_seconds: float
    device: str
    peak_memory_mb: float | None
    extra: dict = field(default_factory=dict)


def resolve_precision(precision: str, accelerator: str) -> str:
    if str(precision) != "auto":
        return str(precision)
    if accelerator == "gpu" or (accelerator == "auto" and torch.cuda.is_available()):
        return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def ddp_strategy_for(method: SSLMethod, train_cfg: TrainConfig) -> str:
    """train.strategy, switched to DDP with find_unused_parameters for methods that train only part of
    their model in a step (SSL++'s stages); DDP otherwise fails on parameters without gradients."""
    strategy = train_cfg.strategy
    if not method.has_unused_parameters:
        return strategy
    if strategy == "auto":  # Lightning picks DDP when it uses more than one device
        devices = train_cfg.devices
        gpus = torch.cuda.device_count() if train_cfg.accelerator != "cpu" else 0
        try:
            count = max(1, gpus) if str(devices) in ("auto", "-1") else int(devices)
        except (TypeError, ValueError):
            return strategy
        if count * train_cfg.num_nodes <= 1:
            return strategy
        strategy = "ddp"
    if strategy in ("ddp", "ddp_spawn", "ddp_fork", "ddp_notebook"):
        return f"{strategy}_find_unused_parameters_true"
    return strategy


class _AppendingCSVWriter(ExperimentWriter):
    """Lightning's CSV writer deletes metrics.csv when its folder is not empty, so a resumed run would lose the
    step log of the epochs before the interruption. This one keeps the rows logged before the checkpoint it
    resumes from (steps below `keep_below`; later rows were logged after that checkpoint and are logged again)
    and appends. Hand-written: Lightning has no option for it."""

    keep_below: int | None = None

    def _check_log_dir_exists(self) -> None:
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as handle:
            reader = csv.DictReader(handle)
            fields, rows = list(reader.fieldnames or []), list(reader)
        if self.keep_below is not None:
            rows = [r for r in rows if r.get("step", "").isdigit() and int(r["step"]) < self.keep_below]
        with self._fs.open(self.metrics_file_path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        self.metrics_keys = sorted(fields)


class StepCSVLogger(CSVLogger):
    """CSVLogger whose step log survives a resume (see _AppendingCSVWriter); `resume_step`: the global step of
    the checkpoint the run resumes from (None: a fresh run, which starts a fresh log)."""

    def __init__(self, *args, resume_step: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            metrics = Path(self.log_dir) / _AppendingCSVWriter.NAME_METRICS_FILE
            if self._resume_step is None and metrics.is_file():
                metrics.unlink()  # a fresh run (or --restart): a fresh log
            writer = _AppendingCSVWriter.__new__(_AppendingCSVWriter)
            writer.keep_below = self._resume_step
            writer.__init__(log_dir=self.log_dir)
            self._experiment = writer
        return self._experiment


# the import names each tracker needs (Lightning's TensorBoardLogger takes either tensorboard package), and the
# install command that brings it (the project's optional extras: pyproject.toml)
TRACKER_MODULES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",)}
TRACKER_INSTALL = {"tensorboard": "pip install 'ssl-cluster-bench[tensorboard]' (or pip install tensorboard)",
                   "wandb": "pip install 'ssl-cluster-bench[wandb]' (or pip install wandb)",
                   "mlflow": "pip install mlflow-skinny"}


def check_tracker(kind: str) -> None:
    """The chosen tracker must be importable, checked before any training (not a traceback mid-run)."""
    import importlib.util

    modules = TRACKER_MODULES.get(kind, ())
    if modules and not any(importlib.util.find_spec(name) for name in modules):
        raise ConfigError(f"train.logger: {kind} is not installed (no module {' or '.join(modules)}); install it into "
                          f"the environment with `.venv/bin/{TRACKER_INSTALL[kind]}`, or choose another of csv, "
                          "tensorboard, wandb, mlflow")


_METRIC_NAME = __import__("re").compile(r"[^A-Za-z0-9_.\- /]")


class TimedProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, refreshed on time as well as on steps: after `refresh_rate` steps or `interval`
    seconds, whichever comes first, and by a ticker thread while a step runs, so a slow step (40 s for a
    ResNet-18 step on a CPU) shows within seconds that it runs, with its elapsed time and s/it."""

    def __init__(self, refresh_rate: int, interval: float = 2.0):
        super().__init__(refresh_rate=refresh_rate)
        self.interval = interval
        self._last_refresh = 0.0
        self._ticker_stop: threading.Event | None = None

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_ticker_stop": None}  # a thread's event cannot be pickled

    def _should_update(self, current: int, total: int) -> bool:
        now = time.monotonic()
        if super()._should_update(current, total) or (self.is_enabled and now - self._last_refresh >= self.interval):
            self._last_refresh = now
            return True
        return False

    def on_train_start(self, *args, **kwargs) -> None:
        super().on_train_start(*args, **kwargs)
        self._start_ticker()

    def on_train_end(self, *args, **kwargs) -> None:
        self._stop_ticker()
        super().on_train_end(*args, **kwargs)

    def on_exception(self, *args, **kwargs) -> None:
        self._stop_ticker()

    def teardown(self, *args, **kwargs) -> None:
        self._stop_ticker()
        super().teardown(*args, **kwargs)

    def _start_ticker(self) -> None:
        if self.is_disabled or self._ticker_stop is not None:
            return
        stop = self._ticker_stop = threading.Event()

        def tick() -> None:
            while not stop.wait(self.interval):
                bar = self._train_progress_bar
                if bar is not None and not bar.disable and time.monotonic() - self._last_refresh >= self.interval:
                    bar.refresh()  # redraws the elapsed time (and the rate) of the running step

        threading.Thread(target=tick, name="progress-ticker", daemon=True).start()

    def _stop_ticker(self) -> None:
        if self._ticker_stop is not None:
            self._ticker_stop.set()
            self._ticker_stop = None


def format_duration(seconds: float) -> str:
    """42 s, 6.5 min, 2.1 h."""
    if seconds < 90:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class EpochTimeEstimate(pl.Callback):
    """Says once, when training starts, the steps per epoch, and after the first `probe_steps` steps the time
    they took and the epoch (and whole-run) time they imply, so a many-hour run is known as such in seconds."""

    def __init__(self, probe_steps: int = 3, say=None):
        self.probe_steps = probe_steps
        self.say = say
        self._started: float | None = None
        self._done = False

    def _say(self, trainer: pl.Trainer, text: str) -> None:
        if not trainer.is_global_zero:
            return
        bar = trainer.progress_bar_callback
        if self.say is not None:
            self.say(text)
        elif bar is not None and bar.is_enabled:
            bar.print(text)  # above the bar, not through it
        else:
            print(text, flush=True)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._done or self._started is not None:
            return
        steps = trainer.num_training_batches
        epochs = trainer.max_epochs - trainer.current_epoch
        self._say(trainer, f"  {steps} steps per epoch x {epochs} epoch(s) to go (batch size "
                           f"{getattr(pl_module, 'batch_size', '?')}); timing the first steps ...")
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if self._done or self._started is None:
            return
        steps = trainer.num_training_batches
        if batch_idx + 1 < min(self.probe_steps, steps):
            return
        self._done = True
        per_step = (time.perf_counter() - self._started) / (batch_idx + 1)
        epochs = trainer.max_epochs - trainer.current_epoch
        self._say(trainer, f"  {per_step:.2f} s/step over the first {batch_idx + 1} step(s): about "
                           f"{format_duration(per_step * steps)} per epoch, {format_duration(per_step * steps * epochs)} "
                           "for the pretraining")


class Tracker:
    """The experiment tracker of one run (MLflow, Weights & Biases, TensorBoard), beside the CSV step log.

    One tracker run per training run, across its stages and its attempts (a resumed or requeued run logs into
    the run it started: the tracker's run id is kept in <run dir>/tracker.json): the resolved settings,
    flattened, as hyperparameters; the per-step and per-epoch training metrics (through Lightning, which
    gets `logger` in every stage's Trainer); then every evaluation metric (`eval/<protocol key>/<metric>`).
    Every tracker writes locally by default (nothing needs a network): TensorBoard event files, W&B in
    offline mode (`wandb sync` uploads later), MLflow into a file store under the run folder unless
    MLFLOW_TRACKING_URI names a server. `csv` has no tracker (logger None)."""

    def __init__(self, kind: str, run_dir: Path):
        import json
        import os

        check_tracker(kind)
        self.kind, self.run_dir = kind, Path(run_dir)
        self.state_file = self.run_dir / "tracker.json"
        try:
            saved = json.loads(self.state_file.read_text()) if self.state_file.is_file() else {}
        except (OSError, ValueError):
            saved = {}
        run_id = saved.get("run_id") if saved.get("kind") == kind else None
        self.logger = None
        if kind == "tensorboard":
            from pytorch_lightning.loggers import TensorBoardLogger

            self.logger = TensorBoardLogger(str(self.run_dir), name="tensorboard", version=0, default_hp_metric=False)
        elif kind == "wandb":
            from pytorch_lightning.loggers import WandbLogger

            self.logger = WandbLogger(save_dir=str(self.run_dir), name=self.run_dir.name, offline=True, id=run_id,
                                      resume="allow" if run_id else None,
                                      project=os.environ.get("WANDB_PROJECT", "ssl-cluster-bench"))
        elif kind == "mlflow":
            from pytorch_lightning.loggers import MLFlowLogger

            uri = os.environ.get("MLFLOW_TRACKING_URI") or (self.run_dir.resolve() / "mlruns").as_uri()
            if uri.startswith("file:"):  # a local folder: MLflow's file store (deprecated but server-free) must be allowed
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            self.logger = MLFlowLogger(experiment_name=os.environ.get("MLFLOW_EXPERIMENT_NAME", "ssl-cluster-bench"),
                                       run_name=self.run_dir.name, tracking_uri=uri, run_id=run_id)

    def _remember(self) -> None:
        import json

        run_id = getattr(self.logger, "run_id", None) or getattr(getattr(self.logger, "experiment", None), "id", None)
        if self.kind in ("mlflow", "wandb") and isinstance(run_id, str):
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.state_file, lambda h: h.write(json.dumps({"kind": self.kind, "run_id": run_id}).encode()))

    @rank_zero_only
    def log_settings(self, settings: dict) -> None:
        """The resolved settings as the tracker run's hyperparameters (dotted keys)."""
        if self.logger is None:
            return
        from benchmarks.config import flatten

        flat = {key: value if isinstance(value, (int, float, str, bool)) or value is None else str(value)
                for key, value in flatten(settings).items()}
        self.logger.log_hyperparams(flat)
        self._remember()

    @rank_zero_only
    def log_evaluation(self, metrics: dict, step: int) -> None:
        """Every evaluation metric of the run's record (percent), at `step` (the last training step)."""
        if self.logger is None or not metrics:
            return
        flat = {_METRIC_NAME.sub("_", f"eval/{key}/{metric}"): float(value)
                for key, values in sorted(metrics.items()) for metric, value in sorted(values.items())}
        self.logger.log_metrics(flat, step=step)
        self.logger.finalize("success")
        if self.kind == "tensorboard":  # flushes the event file (finalize saves the hyperparameters)
            self.logger.experiment.flush()


def build_loggers(kind: str, run_dir: Path, resume_step: int | None = None, tracker: Tracker | None = None) -> list:
    """The step CSV log (always) plus the run's tracker (`tracker`, or one made here for `kind`)."""
    loggers = [StepCSVLogger(str(run_dir), name="logs", version=0, resume_step=resume_step)]
    tracker = tracker if tracker is not None else Tracker(kind, run_dir)
    if tracker.logger is not None:
        loggers.append(tracker.logger)
    return loggers


def cluster_plugins() -> list:
    """Plugins that keep the job's signals with submitit: under SLURM, Lightning's SLURMEnvironment (needed for
    DDP over srun tasks) without its auto-requeue, whose USR1 handler and "SLURM auto-requeueing enabled" would
    be a second owner of the requeue (benchmarks.launcher.RequeueableJob is the one)."""
    from lightning_fabric.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


def _resume_point(last: Path, fingerprint: str, restart: bool, max_epochs: int) -> tuple[bool, int, int | None]:
    """Whether training resumes from the epoch checkpoint `last`, after how many epochs, and at which global step
    (None: from scratch). --restart deletes it; a foreign or damaged one is refused before any work."""
    if restart and last.exists():
        last.unlink()
    for stale in last.parent.glob(".*.tmp"):  # left by a process killed while writing (the caller holds the run lock)
        stale.unlink(missing_ok=True)
    if not last.exists():
        return False, 0, None
    payload = load_checkpoint_file(last, mmap=True)  # mmap: reads only what it checks
    epochs_done = len(check_resume_payload(payload, fingerprint, last)["history"])
    resume_step = int(payload.get("global_step", 0))
    log.warning("resuming from %s after epoch %d of %d (pass --restart to train from scratch)", last,
                epochs_done, max_epochs)
    return True, epochs_done, resume_step


def _build_trainer(module: PretrainModule, train_cfg: TrainConfig, run_dir: Path, last: Path,
                   resume_step: int | None, progress: bool, tracker: Tracker | None) -> pl.Trainer:
    """The Trainer of `fit`: the epoch checkpoint `last`, the loggers (from `resume_step`), the progress bar."""
    accelerator = train_cfg.accelerator
    precision = resolve_precision(train_cfg.precision, accelerator)
    # CPU runs are bitwise reproducible (and resume bitwise); on GPU deterministic kernels cost too much speed
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    loggers = build_loggers(train_cfg.logger, run_dir, resume_step, tracker)
    # one file, last.ckpt, rewritten after every epoch (save_last=True with save_top_k=0 would only write it
    # when training ends: nothing to resume from after a crash)
    checkpoint = ModelCheckpoint(dirpath=str(last.parent), filename=last.stem, save_top_k=1, save_last=False,
                                 every_n_epochs=1, save_on_train_epoch_end=True, enable_version_counter=False)
    callbacks = [checkpoint, EpochTimeEstimate()]
    if progress:
        callbacks.append(TimedProgressBar(refresh_rate=max(1, train_cfg.log_every_n_steps)))
    return pl.Trainer(
        max_epochs=module.max_epochs, accelerator=accelerator, devices=train_cfg.devices,
        strategy=ddp_strategy_for(module.method, train_cfg), num_nodes=train_cfg.num_nodes, precision=precision,
        deterministic=train_cfg.deterministic and on_cpu,
        callbacks=callbacks, logger=loggers, use_distributed_sampler=False, enable_model_summary=False,
        enable_progress_bar=progress, log_every_n_steps=train_cfg.log_every_n_steps, limit_val_batches=0,
        num_sanity_val_steps=0, default_root_dir=str(run_dir), plugins=[SafeCheckpointIO(), *cluster_plugins()],
    )


def _train(trainer: pl.Trainer, module: PretrainModule, checkpoint: Path | None) -> None:
    """trainer.fit, resuming from `checkpoint` if given; out of device memory and Ctrl+C come back as errors the
    command line explains (a ConfigError, a KeyboardInterrupt)."""
    previous_sigint = signal.getsignal(signal.SIGINT)
    was_deterministic = torch.are_deterministic_algorithms_enabled()  # Lightning turns it on for good
    try:
        trainer.fit(module, ckpt_path=str(checkpoint) if checkpoint is not None else None, weights_only=True)
    except torch.OutOfMemoryError as exc:
        raise ConfigError(f"train.batch_size: out of device memory at batch size {module.batch_size} "
                          f"({(str(exc).splitlines() or [''])[0]}); lower --batch-size or use --precision "
                          "bf16-mixed. Rerun the same command to resume from the last epoch checkpoint") from exc
    except SystemExit as exc:
        # Lightning turns Ctrl+C into sys.exit(1) (and ignores SIGINT from then on); give the
        # caller a KeyboardInterrupt back so the CLI can say how to resume. Any other exit (submitit's
        # sys.exit(-1) after it requeued a SLURM job, Lightning's SIGTERMException) goes on as it is
        if not trainer.interrupted or exc.code != 1 or type(exc) is not SystemExit:
            raise
        try:
            signal.signal(signal.SIGINT, previous_sigint or signal.default_int_handler)
        except ValueError:  # not the main thread
            pass
        raise KeyboardInterrupt from None
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def fit(module: PretrainModule, train_cfg: TrainConfig, run_dir: Path, fingerprint: str, restart: bool = False,
        progress: bool = True, tracker: Tracker | None = None) -> FitResult:
    """Train `module` for module.max_epochs epochs; resumes from run_dir/checkpoints/last.ckpt."""
    run_dir = Path(run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    resume, epochs_done, resume_step = _resume_point(last, fingerprint, restart, module.max_epochs)
    module.fingerprint = fingerprint
    module.num_workers = train_cfg.num_workers
    trainer = _build_trainer(module, train_cfg, run_dir, last, resume_step, progress, tracker)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    _train(trainer, module, last if resume else None)
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return FitResult(module.history, module.images_seen, module.train_seconds, str(trainer.strategy.root_device),
                     peak, extra={"resumed_after_epochs": epochs_done, "global_rank": trainer.global_rank,
                                  "world_size": trainer.world_size})
