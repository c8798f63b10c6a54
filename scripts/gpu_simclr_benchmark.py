#!/usr/bin/env python
"""SimCLR training speed: the suite's Lightning path against a bare PyTorch loop, in one run.

Three paths train the same SimCLR model (the cifar10 suite's settings: projection head, NT-Xent,
SGD + warm-up/cosine schedule, SimCLR views) on the same random uint8 images:

  suite_lightning             the suite as `benchmarks run` trains: PretrainModule + a pl.Trainer set
                              up like benchmarks.training.fit, views drawn per batch on the device
                              (BatchAugment), in-memory uint8 data on the CPU (as the runner loads it)
  suite_lightning_cpu_augment the same module and Trainer, but every view made per image on the CPU
                              by torchvision.transforms.v2 in DataLoader workers (the usual PyTorch
                              recipe, shown for contrast)
  bare_pytorch                a plain loop: uint8 images already on the device, BatchAugment, bf16
                              autocast + channels_last on a GPU (fp32 on the CPU), no Lightning

Each path runs `--warmup-steps` untimed steps, then `--steps` timed steps. Reported per path: seconds
per step, seconds per epoch-equivalent (num_images images x 2 views, i.e. 100k view-images for 50k
images), view-images/s and peak memory (CUDA: max allocated by the path; CPU: the process's max RSS,
cumulative over the paths). The JSON summary goes to stdout and to --out.

    python scripts/gpu_simclr_benchmark.py --out results/benchmarks/gpu-simclr-h200.json
    python scripts/gpu_simclr_benchmark.py --device cpu --steps 3 --batch-size 16   # smoke test

The functions are importable: tests/benchmarks time the same paths on the CPU with pytest-benchmark.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO_ROOT))

import pytorch_lightning as pl  # noqa: E402
from pytorch_lightning.callbacks import TQDMProgressBar  # noqa: E402
from pytorch_lightning.loggers import CSVLogger  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Dataset, RandomSampler  # noqa: E402

from benchmarks.augment import BatchAugment, ViewSpec, step_generator  # noqa: E402
from benchmarks.config import load_suite  # noqa: E402
from benchmarks.data import ImageDataset  # noqa: E402
from benchmarks.runner import SuiteData, build_augment, build_method  # noqa: E402
from benchmarks.training import (  # noqa: E402
    EpochBatchSampler,
    PretrainModule,
    PretrainSettings,
    build_optimizer,
    resolve_precision,
    warmup_cosine,
)

PATHS = ("suite_lightning", "suite_lightning_cpu_augment", "bare_pytorch")
SEED = 0


# ----------------------------------------------------------------------------- set-up

def random_images(num_images: int, channels: int, image_size: int, seed: int = SEED,
                  device: torch.device | str = "cpu") -> ImageDataset:
    """Random uint8 images with 10 balanced labels (speed does not depend on the content)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (num_images, channels, image_size, image_size), dtype=torch.uint8,
                           generator=generator)
    labels = torch.arange(num_images) % 10
    return ImageDataset("random", "train", labels, [str(c) for c in range(10)], images=images.to(device))


def simclr_config(suite: str = "cifar10", batch_size: int | None = None, backbone: str | None = None):
    """The suite's config (optimizer, views, SimCLR hyperparameters), optionally at another batch size."""
    overrides: dict = {}
    if batch_size is not None:
        overrides["train"] = {"batch_size": batch_size}
    if backbone is not None:
        overrides["backbone"] = backbone
    return load_suite(suite, overrides)


def build_simclr(config, data: ImageDataset, seed: int = SEED):
    """(SimCLR on the suite's backbone, its resolved settings); the same seed gives every path the same
    initial weights."""
    torch.manual_seed(seed)
    suite_data = SuiteData(data, data, data, config.num_classes, "random")
    return build_method(config, "simclr", suite_data)


def device_kind(device: torch.device) -> str:
    return "gpu" if device.type == "cuda" else "cpu"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_max_rss"


class StepTimer(pl.Callback):
    """Wall time of the steps after the first `warmup` ones (synchronising only at the two ends)."""

    def __init__(self, warmup: int):
        self.warmup, self.steps, self.start, self.end = warmup, 0, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.steps == 0 and self.warmup == 0:
            synchronize(pl_module.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps += 1
        if self.steps == self.warmup or self.steps == trainer.num_training_batches:
            synchronize(pl_module.device)
            now = time.perf_counter()
            if self.steps == self.warmup:
                self.start = now
            if self.steps == trainer.num_training_batches:
                self.end = now

    @property
    def seconds_per_step(self) -> float:
        return (self.end - self.start) / (self.steps - self.warmup)


# ----------------------------------------------------------------------------- the suite's path

def suite_trainer(train_cfg, run_dir: str | Path, steps: int, progress: bool = True,
                  callbacks: list | None = None) -> pl.Trainer:
    """A Trainer set up as benchmarks.training.fit sets it up, for one epoch of `steps` batches.

    Differences, on purpose: no ModelCheckpoint (its per-epoch save is not a per-step cost) and one
    device (the comparison is single-device).
    """
    accelerator = train_cfg.accelerator
    precision = resolve_precision(train_cfg.precision, accelerator)
    log_every = train_cfg.log_every_n_steps
    bar = [TQDMProgressBar(refresh_rate=max(1, log_every))] if progress else []
    return pl.Trainer(
        max_epochs=1, limit_train_batches=steps, accelerator=accelerator, devices=1, precision=precision,
        deterministic=train_cfg.deterministic and accelerator == "cpu",
        callbacks=bar + list(callbacks or []), logger=[CSVLogger(str(run_dir), name="logs", version=0)],
        use_distributed_sampler=False, enable_model_summary=False, enable_progress_bar=progress,
        enable_checkpointing=False, log_every_n_steps=log_every, limit_val_batches=0, num_sanity_val_steps=0,
        default_root_dir=str(run_dir),
    )


def suite_module(config, data: ImageDataset, device: torch.device, seed: int = SEED) -> PretrainModule:
    """PretrainModule with the settings benchmarks.runner.run_one gives it on `device`."""
    method, settings = build_simclr(config, data, seed)
    train_cfg = config.train
    on_gpu = device.type == "cuda"
    channels_last = on_gpu if train_cfg.channels_last == "auto" else bool(train_cfg.channels_last)
    module = PretrainModule(method, build_augment(settings.augment), settings.optimizer, data,
                            PretrainSettings(settings.batch_size, 1, seed, channels_last=channels_last,
                                             divergence_check_every=20 if on_gpu else 1),
                            monitor=None)
    if train_cfg.compile:
        method.backbone = torch.compile(method.backbone)
    module.num_workers = train_cfg.num_workers
    module.fingerprint = "speed-benchmark"
    return module


def prepare_suite_run(config, data: ImageDataset, steps: int, device: torch.device, run_dir: str | Path,
                      progress: bool = True, callbacks: list | None = None, seed: int = SEED):
    """(trainer, module) ready for `trainer.fit(module)`: `steps` optimizer steps of the suite."""
    train_cfg = config.train.model_copy(update={"accelerator": device_kind(device)})
    module = suite_module(config, data, device, seed)
    return suite_trainer(train_cfg, run_dir, steps, progress, callbacks), module


def run_suite(trainer: pl.Trainer, module: PretrainModule) -> float:
    """Train; returns the mean loss of the steps (from the module's history)."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()  # Lightning turns it on for good
    try:
        trainer.fit(module)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)  # as benchmarks.training.fit does
    return module.history[-1]["loss"]


class PerImageViews(Dataset):
    """Two views of image i made on the CPU with torchvision.transforms.v2 (one call per image)."""

    def __init__(self, data: ImageDataset, spec: ViewSpec, mean, std):
        from torchvision.transforms import v2

        self.data = data
        rgb = data.images.shape[1] == 3
        jitter = v2.ColorJitter(spec.brightness, spec.contrast, spec.saturation if rgb else 0,
                                spec.hue if rgb else 0)
        radius = max(1, int(0.05 * spec.size))  # the same kernel size as BatchAugment's blur
        steps = [v2.RandomResizedCrop(spec.size, scale=spec.scale, ratio=spec.ratio, antialias=True),
                 v2.RandomHorizontalFlip(spec.hflip_p), v2.RandomApply([jitter], p=spec.jitter_p)]
        if rgb:
            steps.append(v2.RandomGrayscale(spec.grayscale_p))
        if spec.blur_p > 0:
            steps.append(v2.RandomApply([v2.GaussianBlur(2 * radius + 1, spec.blur_sigma)], p=spec.blur_p))
        if spec.solarize_p > 0:
            steps.append(v2.RandomSolarize(128, p=spec.solarize_p))
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
        self.transform = v2.Compose(steps)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        image = self.data.images[i]
        return torch.stack([self.transform(image), self.transform(image)]), self.data.labels[i], i


class PrecomputedViews(nn.Module):
    """Stands in for BatchAugment when the DataLoader already made the views: [B, V, C, H, W] -> V views."""

    def forward(self, views: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        return list(views.unbind(1))


class CpuAugmentModule(PretrainModule):
    """The suite's module, fed views made per image on the CPU in `workers` DataLoader processes."""

    def __init__(self, *args, workers: int, view_dataset: PerImageViews, **kwargs):
        super().__init__(*args, **kwargs)
        self.workers, self.view_dataset = workers, view_dataset

    def train_dataloader(self):
        sampler = RandomSampler(self.view_dataset, generator=torch.Generator().manual_seed(self.seed))
        return DataLoader(self.view_dataset, batch_size=self.batch_size, sampler=sampler, drop_last=True,
                          num_workers=self.workers, pin_memory=self.device.type == "cuda",
                          persistent_workers=self.workers > 0)


def prepare_cpu_augment_run(config, data: ImageDataset, steps: int, device: torch.device,
                            run_dir: str | Path, workers: int, progress: bool = True, callbacks: list | None = None,
                            seed: int = SEED):
    template = suite_module(config, data, device, seed)
    norm = config.augment.normalization
    views = PerImageViews(data, config.augment.views[0], norm.mean, norm.std)
    module = CpuAugmentModule(template.method, PrecomputedViews(), template.optim_cfg, data,
                              PretrainSettings(template.batch_size, 1, seed, channels_last=template.channels_last,
                                               divergence_check_every=template.divergence_check_every),
                              monitor=None, workers=workers, view_dataset=views)
    module.fingerprint = template.fingerprint
    train_cfg = config.train.model_copy(update={"accelerator": device_kind(device)})
    return suite_trainer(train_cfg, run_dir, steps, progress, callbacks), module


# ----------------------------------------------------------------------------- the bare loop

@dataclass
class BareLoop:
    """SimCLR in plain PyTorch: the same model, batches, views, loss, optimizer and schedule as the suite."""

    method: nn.Module
    augment: BatchAugment
    optim_cfg: object  # OptimizerConfig
    images: torch.Tensor  # uint8 [N, C, H, W] on the device
    batches: torch.Tensor  # [steps, batch_size] indices on the device (the suite's epoch order)
    device: torch.device
    seed: int
    autocast_dtype: torch.dtype | None
    channels_last: bool
    deterministic: bool
    warmup: int = 0
    seconds_per_step: float = math.nan

    def run(self) -> float:
        """Train len(batches) steps; returns the mean loss (one host sync, at the end)."""
        was_deterministic = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(self.deterministic)  # as the suite's Trainer sets it
        try:
            return self._train()
        finally:
            torch.use_deterministic_algorithms(was_deterministic)

    def _train(self) -> float:
        method, augment, steps = self.method, self.augment, len(self.batches)
        params = [p for p in method.parameters() if p.requires_grad]
        optimizer = build_optimizer(params, self.optim_cfg, self.batches.shape[1])
        warmup_steps = int(self.optim_cfg.warmup_epochs * steps)
        final = self.optim_cfg.final_lr_fraction
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: warmup_cosine(s, steps, warmup_steps, final))
        method.train()
        total = torch.zeros((), device=self.device)
        start = time.perf_counter()
        for step in range(steps):
            if step == self.warmup and step > 0:
                synchronize(self.device)
                start = time.perf_counter()
            with (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype is not None
                  else contextlib.nullcontext()):
                views = augment(self.images[self.batches[step]], step_generator(self.seed, step, self.device))
                if self.channels_last:
                    views = [v.contiguous(memory_format=torch.channels_last) for v in views]
                z_a, z_b = (method.projection_head(method.backbone(v)) for v in views[:2])
                loss = method.criterion(z_a, z_b)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.detach()
        synchronize(self.device)
        self.seconds_per_step = (time.perf_counter() - start) / (steps - self.warmup)
        return (total / steps).item()


def prepare_bare_run(config, data: ImageDataset, steps: int, device: torch.device, warmup: int = 0,
                     seed: int = SEED) -> BareLoop:
    method, settings = build_simclr(config, data, seed)
    optimizer = settings.optimizer
    train_cfg = config.train
    on_gpu = device.type == "cuda"
    precision = resolve_precision(train_cfg.precision, device_kind(device))
    autocast = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    channels_last = on_gpu if train_cfg.channels_last == "auto" else bool(train_cfg.channels_last)
    method.to(device)  # channels_last: the views only, as PretrainModule does
    if train_cfg.compile:
        method.backbone = torch.compile(method.backbone)
    batch_size = settings.batch_size
    # the suite's epoch order (EpochBatchSampler, epoch 0), so both paths see the same batches
    order = list(EpochBatchSampler(len(data), batch_size, seed, method.epoch_order))[:steps]
    if len(order) < steps:
        raise ValueError(f"{len(data)} images give {len(order)} batches of {batch_size}; asked for {steps}")
    deterministic = train_cfg.deterministic and not on_gpu
    return BareLoop(method, build_augment(settings.augment).to(device), optimizer, data.images.to(device),
                    torch.tensor(order, device=device), device, seed, autocast, channels_last, deterministic,
                    warmup)


# ----------------------------------------------------------------------------- the script

def measure(path: str, config, data: ImageDataset, steps: int, warmup: int, device: torch.device,
            workers: int, run_dir: Path) -> dict:
    total = steps + warmup
    reset_peak_memory(device)
    if path == "bare_pytorch":
        loop = prepare_bare_run(config, data, total, device, warmup=warmup)
        mean_loss, seconds = loop.run(), loop.seconds_per_step
    else:
        timer = StepTimer(warmup)
        if path == "suite_lightning":
            trainer, module = prepare_suite_run(config, data, total, device, run_dir / path, callbacks=[timer])
        else:
            trainer, module = prepare_cpu_augment_run(config, data, total, device, run_dir / path, workers,
                                                      callbacks=[timer])
        mean_loss, seconds = run_suite(trainer, module), timer.seconds_per_step
    peak, memory_kind = peak_memory_mb(device)
    batch_size, num_images = config.train.batch_size, len(data)
    return {"seconds_per_step": seconds,
            "seconds_per_epoch_equivalent": seconds * num_images / batch_size,
            "view_images_per_s": 2 * batch_size / seconds,
            "peak_memory_mb": peak, "memory_measure": memory_kind,
            "timed_steps": steps, "warmup_steps": warmup, "mean_loss": mean_loss}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda (default where available) or cpu")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=80, help="timed steps per path")
    parser.add_argument("--warmup-steps", type=int, default=None, help="untimed steps first (default 10 on "
                        "cuda, 1 on cpu)")
    parser.add_argument("--num-images", type=int, default=50_000, help="images in the random dataset "
                        "(an epoch-equivalent is this many images x 2 views); at least (steps + warmup) x batch")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--backbone", default="resnet18_cifar")
    parser.add_argument("--cpu-workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="DataLoader workers of the per-image CPU augmentation path")
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument("--compile", action="store_true", help="torch.compile the backbone (train.compile)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON summary here")
    args = parser.parse_args(argv)
    if args.warmup_steps is None:
        args.warmup_steps = 10 if args.device.startswith("cuda") else 1
    if args.steps < 1 or args.warmup_steps < 0 or args.batch_size < 2:
        parser.error("--steps must be >= 1, --warmup-steps >= 0 and --batch-size >= 2")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU here; use --device cpu for the smoke test")
    config = simclr_config("cifar10", args.batch_size, args.backbone)
    if args.compile:
        config.train.compile = True
    needed = (args.steps + args.warmup_steps) * args.batch_size
    if args.num_images < needed:
        raise SystemExit(f"--num-images {args.num_images}: need at least (steps + warmup) x batch = {needed}")
    data = random_images(args.num_images, config.in_channels, args.image_size)
    results = {}
    # Lightning's progress bar writes to stdout: keep stdout for the JSON summary
    with tempfile.TemporaryDirectory(prefix="simclr-speed-") as tmp, contextlib.redirect_stdout(sys.stderr):
        for path in args.paths:
            results[path] = measure(path, config, data, args.steps, args.warmup_steps, device, args.cpu_workers,
                                    Path(tmp))
    step = {p: r["seconds_per_step"] for p, r in results.items()}
    ratios = {}
    if "suite_lightning" in step and "bare_pytorch" in step:
        ratios["suite_speed_vs_bare"] = step["bare_pytorch"] / step["suite_lightning"]
    if "suite_lightning" in step and "suite_lightning_cpu_augment" in step:
        ratios["cpu_augment_speed_vs_suite"] = step["suite_lightning"] / step["suite_lightning_cpu_augment"]
    summary = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "versions": {"torch": torch.__version__, "pytorch_lightning": pl.__version__, "python": platform.python_version()},
        "settings": {"method": "simclr", "backbone": args.backbone, "batch_size": args.batch_size,
                     "image_size": args.image_size, "num_images": args.num_images, "views": 2,
                     "timed_steps": args.steps, "warmup_steps": args.warmup_steps, "cpu_workers": args.cpu_workers,
                     "precision": resolve_precision(config.train.precision, device_kind(device)),
                     "compile": bool(config.train.compile),
                     "cpu_threads": torch.get_num_threads()},
        "paths": results,
        "ratios": ratios,
    }
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return summary


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
