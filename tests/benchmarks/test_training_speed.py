"""SimCLR training speed: the suite's Lightning path against a bare PyTorch loop on the same work.

Per round (pytest-benchmark pedantic; the model, the module and the Trainer are built in `setup`,
outside the timing, from the same seed so every round starts from the same weights):
  suite_lightning  `trainer.fit(module)` over `steps` batches (one epoch): PretrainModule with its
                   DataLoader over IndexedBatches + EpochBatchSampler, on-device BatchAugment, the
                   method's loss, the divergence check, step logging, the progress bar and the epoch
                   history, under a Trainer set up as benchmarks.training.fit sets it up minus the
                   per-epoch checkpoint save (scripts/gpu_simclr_benchmark.py: suite_trainer).
                   configure_optimizers and Lightning's start and stop of the fit are inside the
                   timing: the ratio slightly understates the steady-state speed.
  bare_pytorch     a plain loop over the same batches (the suite's epoch order), images, views (same
                   seeded generators), model, loss and SGD + warm-up/cosine schedule (built inside the
                   timing), without Lightning or a DataLoader.
Both must reach the same mean loss (the conftest reports it as `same_work`), so the ratio measures
framework overhead only. Timed on the CPU, with torch's default threads (2 on the reference machine).
"""

from __future__ import annotations

import math

import pytest
import torch

# The two paths alternate (suite, bare, suite, ...) and each test times a few rounds, so a slow spell
# of a shared machine hits both paths; the conftest pools the rounds of each path.
ALTERNATING = [(repeat, path) for repeat in range(3) for path in ("suite_lightning", "bare_pytorch")]


@pytest.mark.parametrize("repeat,path", ALTERNATING)
def test_simclr_training_step(benchmark, speed_script, speed_record, workload, repeat, path, tmp_path,
                              torch_threads):
    spec, config, data = workload
    device = torch.device("cpu")
    rounds = iter(range(10**6))

    def setup():
        if path == "suite_lightning":
            run_dir = tmp_path / f"round{next(rounds)}"
            trainer, module = speed_script.prepare_suite_run(config, data, spec.steps, device, run_dir)
            return (speed_script.run_suite, trainer, module), {}
        loop = speed_script.prepare_bare_run(config, data, spec.steps, device)
        return (lambda: loop.run(),), {}

    def call(fn, *args):
        return fn(*args)

    mean_loss = benchmark.pedantic(call, setup=setup, rounds=spec.rounds, warmup_rounds=int(repeat == 0),
                                   iterations=1)
    assert math.isfinite(mean_loss)
    speed_record(benchmark, f"train_step[{spec.name}-{path}]", spec.steps, "optimizer step", mean_loss=mean_loss,
                 batch_size=spec.batch_size, backbone=config.backbone, suite=spec.suite, threads=torch_threads)
