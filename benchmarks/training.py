"""Pretraining with PyTorch Lightning: devices, precision, DDP, checkpoints, resume.

The loop itself is Lightning's. What this module adds:
- batches of uint8 images fetched by index (in-memory data: one tensor slice per
  batch) and turned into views on the training device (benchmarks.augment);
- per-step random generators seeded by (seed, step) and per-epoch sample orders
  seeded by (seed, epoch), so an interrupted run resumes to bitwise the same result
  on CPU from its last epoch checkpoint;
- a per-epoch history (mean loss, online kNN top-1, method schedules) kept in the
  checkpoint and copied into the run record.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.loggers import CSVLogger
from torch.utils.data import DataLoader, Dataset, Sampler

from benchmarks.augment import BatchAugment, step_generator
from benchmarks.data import ImageDataset
from benchmarks.distributed import gather_cat_nograd
from benchmarks.errors import CheckpointError, DivergedError
from benchmarks.evaluation.features import backbone_features
from benchmarks.evaluation.knn import knn_classify, topk_accuracy
from methods.base import EpochContext, SSLMethod, TrainBatch


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
            raise ValueError(f"the pretraining set has {num_samples} images, fewer than one global batch "
                             f"({batch_size} x {world_size} ranks); lower train.batch_size")

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


@dataclass
class OptimConfig:
    name: str
    lr: float
    momentum: float
    weight_decay: float
    warmup_epochs: int
    final_lr_fraction: float
    lr_scale_batch: int = 0


def build_optimizer(params, cfg: dict, batch_size: int):
    lr = cfg["lr"] * (batch_size / cfg["lr_scale_batch"] if cfg.get("lr_scale_batch") else 1.0)
    if cfg["name"] == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
    if cfg["name"] == "lars":
        from lightly.utils.lars import LARS

        return LARS(params, lr=lr, momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
    return torch.optim.AdamW(params, lr=lr, weight_decay=cfg["weight_decay"])


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, final_fraction: float) -> float:
    """LR multiplier: linear warm-up, then cosine decay to `final_fraction`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class MonitorData:
    """Labelled splits for the online kNN monitor."""

    train: ImageDataset
    test: ImageDataset
    num_classes: int
    every: int = 1


class PretrainModule(pl.LightningModule):
    def __init__(self, method: SSLMethod, augment: BatchAugment, optimizer: dict, pretrain: ImageDataset,
                 batch_size: int, max_epochs: int, seed: int, monitor: MonitorData | None = None,
                 channels_last: bool = False, divergence_check_every: int = 1):
        super().__init__()
        self.method, self.augment, self.optim_cfg = method, augment, optimizer
        self.pretrain, self.batch_size, self.max_epochs, self.seed = pretrain, batch_size, max_epochs, seed
        self.monitor, self.channels_last = monitor, channels_last
        self.divergence_check_every = divergence_check_every
        self.history: list[dict] = []
        self._epoch_loss = None
        self._epoch_steps = 0
        self._epoch_logs: dict[str, float] = {}
        self._epoch_started = 0.0
        self.images_seen = 0
        self.train_seconds = 0.0

    # -- data ----------------------------------------------------------------------
    def train_dataloader(self):
        sampler = EpochBatchSampler(len(self.pretrain), self.batch_size, self.seed, self.method.epoch_order,
                                    rank=self.global_rank, world_size=self.trainer.world_size)
        workers = getattr(self, "num_workers", 0)
        return DataLoader(IndexedBatches(self.pretrain), sampler=sampler, batch_size=None, num_workers=workers,
                          pin_memory=self.device.type == "cuda" or torch.cuda.is_available(),
                          persistent_workers=workers > 0)

    @torch.no_grad()
    def _predict_pretrain(self, fn):
        """Run fn over the clean pretraining set in index order (for methods' epoch hooks)."""
        was_training = self.method.training
        self.method.eval()
        try:
            n, out = len(self.pretrain), []
            for start in range(0, n, 1024):
                idx = torch.arange(start, min(start + 1024, n))
                images = self.pretrain.get_batch(idx).to(self.device, non_blocking=True)
                out.append(fn(self.augment.clean(images)).float())
            return torch.cat(out)
        finally:
            self.method.train(was_training)

    # -- training ------------------------------------------------------------------
    def on_train_epoch_start(self):
        self._epoch_loss, self._epoch_steps, self._epoch_started = None, 0, time.perf_counter()
        ctx = EpochContext(self.current_epoch, self.max_epochs, self.seed, self._predict_pretrain, self.device)
        self._epoch_logs = {k: float(v) for k, v in (self.method.on_train_epoch_start(ctx) or {}).items()}

    def training_step(self, batch, batch_idx):
        images, labels, indices = batch
        generator = step_generator(self.seed, self.global_step, images.device)
        views = self.augment(images, generator)
        if self.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        train_batch = TrainBatch(views, indices, labels if self.method.uses_labels else None,
                                 self.current_epoch, self.global_step, self.max_epochs, generator)
        loss, logs = self.method.training_loss(train_batch)
        if self.global_step % self.divergence_check_every == 0 and not torch.isfinite(loss):
            raise DivergedError(f"the loss became {loss.item()} at epoch {self.current_epoch}, "
                                f"step {self.global_step}")
        detached = loss.detach()
        self._epoch_loss = detached if self._epoch_loss is None else self._epoch_loss + detached
        self._epoch_steps += 1
        self.images_seen += images.shape[0] * self.trainer.world_size
        self.log("train_loss", detached, prog_bar=True, on_step=True, on_epoch=False, batch_size=len(images))
        for key, value in logs.items():
            self.log(f"train/{key}", value, on_step=True, on_epoch=False, batch_size=len(images))
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        total = max(1, self.trainer.estimated_stepping_batches)
        self.method.after_optimizer_step(min(1.0, self.global_step / total))

    def on_train_epoch_end(self):
        self.train_seconds += time.perf_counter() - self._epoch_started
        mean_loss = (self._epoch_loss / max(1, self._epoch_steps)).item() if self._epoch_loss is not None else math.nan
        if not math.isfinite(mean_loss):
            raise DivergedError(f"the mean loss of epoch {self.current_epoch} is {mean_loss}")
        entry = {"epoch": self.current_epoch + 1, "loss": mean_loss, **self._epoch_logs}
        monitor = self.monitor
        last_epoch = self.current_epoch + 1 == self.max_epochs
        if monitor is not None and monitor.every > 0 and ((self.current_epoch + 1) % monitor.every == 0 or last_epoch):
            entry["online_knn_top1"] = self.online_knn()
            self.log("online_knn_top1", entry["online_knn_top1"], prog_bar=True, rank_zero_only=True)
        for key, value in self._epoch_logs.items():
            self.log(f"epoch/{key}", value, rank_zero_only=True)
        self.log("epoch/loss", mean_loss, rank_zero_only=True)
        self.history.append(entry)

    @torch.no_grad()
    def online_knn(self) -> float:
        m = self.monitor
        kwargs = dict(preprocess=self.augment.clean, device=self.device, batch_size=1024)
        bank = backbone_features(self.method.backbone, m.train, **kwargs)
        queries = backbone_features(self.method.backbone, m.test, **kwargs)
        k = min(20, len(bank))
        scores = knn_classify(bank, m.train.labels, queries, m.num_classes, k=k, temperature=0.1)
        return topk_accuracy(scores, m.test.labels, ks=(1,))["top1"]

    def configure_optimizers(self):
        params = [p for p in self.method.parameters() if p.requires_grad]
        optimizer = build_optimizer(params, self.optim_cfg, self.batch_size * self.trainer.world_size)
        total = max(1, self.trainer.estimated_stepping_batches)
        steps_per_epoch = max(1, total // max(1, self.max_epochs))
        warmup = int(self.optim_cfg["warmup_epochs"] * steps_per_epoch)
        final = self.optim_cfg["final_lr_fraction"]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, total, warmup, final))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- checkpoint extras ---------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint):
        checkpoint["ssl_bench"] = {"history": self.history, "images_seen": self.images_seen,
                                   "train_seconds": self.train_seconds, "fingerprint": self.fingerprint}

    def on_load_checkpoint(self, checkpoint):
        extra = checkpoint.get("ssl_bench")
        if extra is None:
            raise CheckpointError("this checkpoint was not written by ssl-bench's trainer")
        if extra["fingerprint"] != self.fingerprint:
            raise CheckpointError("the checkpoint belongs to a run with another config/method/suite; "
                                  "pass --restart to train from scratch")
        self.history = list(extra["history"])
        self.images_seen = int(extra["images_seen"])
        self.train_seconds = float(extra["train_seconds"])

    fingerprint: str = ""


def config_fingerprint(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


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


def fit(module: PretrainModule, train_cfg: dict, run_dir: Path, fingerprint: str, restart: bool = False,
        progress: bool = True) -> FitResult:
    """Train `module` for train_cfg['epochs'] epochs; resumes from run_dir/checkpoints/last.ckpt."""
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    if restart and last.exists():
        last.unlink()
    module.fingerprint = fingerprint
    module.num_workers = train_cfg["num_workers"]
    accelerator = train_cfg["accelerator"]
    precision = resolve_precision(train_cfg["precision"], accelerator)
    loggers = [CSVLogger(str(run_dir), name="logs", version=0)]
    if train_cfg.get("tensorboard"):
        from pytorch_lightning.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(str(run_dir), name="tensorboard", version=0))
    checkpoint = ModelCheckpoint(dirpath=str(ckpt_dir), save_last=True, save_top_k=0, every_n_epochs=1,
                                 save_on_train_epoch_end=True, enable_version_counter=False)
    callbacks = [checkpoint]
    if progress:
        callbacks.append(TQDMProgressBar(refresh_rate=max(1, train_cfg["log_every_n_steps"])))
    trainer = pl.Trainer(
        max_epochs=train_cfg["epochs"], accelerator=accelerator, devices=train_cfg["devices"],
        strategy=train_cfg["strategy"], num_nodes=train_cfg["num_nodes"], precision=precision,
        deterministic=bool(train_cfg["deterministic"]) and accelerator != "gpu" and not torch.cuda.is_available(),
        callbacks=callbacks, logger=loggers, use_distributed_sampler=False, enable_model_summary=False,
        enable_progress_bar=progress, log_every_n_steps=train_cfg["log_every_n_steps"], limit_val_batches=0,
        num_sanity_val_steps=0, default_root_dir=str(run_dir),
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, ckpt_path=str(last) if last.exists() else None)
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return FitResult(module.history, module.images_seen, module.train_seconds, str(trainer.strategy.root_device),
                     peak)
