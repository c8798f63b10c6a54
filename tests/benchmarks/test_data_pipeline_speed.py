"""The data pipeline alone: what feeds one training step, without the model.

Per round: the suite module's own DataLoader (IndexedBatches + EpochBatchSampler, as
PretrainModule.train_dataloader builds it) yields `steps` uint8 batches, each moved to the device and
turned into the method's views by BatchAugment from the step's seeded generator (channels_last where
the suite uses it), exactly the work `training_step` does before the backbone. The conftest divides
its time per batch by the suite's training step of the same workload (`data_pipeline_share_of_step`).
"""

from __future__ import annotations

import torch

from benchmarks.augment import step_generator


def run_pipeline(module, steps: int, device: torch.device) -> int:
    """Iterate `steps` batches and make their views; returns the number of view-images made."""
    made = 0
    for step, (images, _labels, _indices) in zip(range(steps), module.train_dataloader()):
        images = images.to(device, non_blocking=True)
        views = module.augment(images, step_generator(module.seed, step, device))
        if module.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        made += sum(len(v) for v in views)
    return made


def test_data_pipeline(benchmark, speed_script, speed_record, workload, tmp_path, torch_threads):
    spec, config, data = workload
    device = torch.device("cpu")
    trainer, module = speed_script.prepare_suite_run(config, data, spec.steps, device, tmp_path, progress=False)
    module.trainer = trainer  # train_dataloader asks the trainer for the world size, as under fit
    module.augment.to(device)
    views = benchmark.pedantic(run_pipeline, args=(module, spec.steps, device), rounds=spec.rounds * 3,
                               warmup_rounds=1, iterations=1)
    assert views == spec.steps * spec.batch_size * module.augment.num_views
    speed_record(benchmark, f"data_pipeline[{spec.name}]", spec.steps, "batch",
                 view_images_per_s=views / benchmark.stats.stats.median if benchmark.stats else None,
                 batch_size=spec.batch_size, suite=spec.suite, threads=torch_threads)
