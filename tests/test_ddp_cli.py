"""DDP from the command line: `run --accelerator cpu --devices 2` trains on 2 processes (gloo), rank 0 alone
writes the record, and the loss of the first step is the global batch's: the same as one process computing
the loss on the two ranks' batches concatenated."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from benchmarks.augment import step_generator
from benchmarks.config import load_suite
from benchmarks.records import iter_record_files, read_record
from benchmarks.runner import build_augment, build_method, load_suite_data
from benchmarks.training import EpochBatchSampler
from methods.carl import carl_loss

REPO = Path(__file__).resolve().parent.parent
BATCH = 16
# deterministic views (whole image, no flip, no jitter): both processes and the reference see the same pixels
SETS = ["dataset.options.test_fraction=0.75", "evaluation.protocols=[knn]", "train.online_knn_every=0",
        "train.log_every_n_steps=1", "train.strategy=ddp",
        "augment.views=[{size: 8, count: 2, scale: [1.0, 1.0], ratio: [1.0, 1.0], hflip_p: 0.0, jitter_p: 0.0, "
        "grayscale_p: 0.0}]"]


@pytest.mark.slow
def test_ddp_run_from_the_cli_writes_one_record_with_the_global_batch_loss(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    command = [sys.executable, "-m", "benchmarks", "run", "--suite", "digits", "--methods", "carl", "--epochs", "1",
               "--seeds", "0", "--batch-size", str(BATCH), "--accelerator", "cpu", "--devices", "2", "--no-references",
               "--no-progress", "--out", str(out), "--work-dir", str(work), "--set", *SETS]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    # exactly one record (rank 1 trained along and wrote nothing), and one report
    files = iter_record_files(out)
    assert len(files) == 1, files
    record = read_record(files[0])
    assert record["status"] == "completed" and record["batch_size"] == BATCH
    # the record states the devices and the global batch (per-device batch x ranks)
    assert record["devices"] == 2 and record["global_batch_size"] == 2 * BATCH
    # CARL trains every parameter in every step: DDP is not told to look for unused ones (PyTorch would warn)
    assert "find_unused_parameters=True" not in done.stderr
    (log_file,) = work.rglob("metrics.csv")
    rows = [r for r in csv.DictReader(log_file.open()) if r.get("train_loss")]
    first = float(min(rows, key=lambda r: int(r["step"]))["train_loss"])

    # one process, the same initial weights (seed_everything(0) then the build, as run_one does), the two
    # ranks' first batches side by side: each rank's forward (its own batch-norm statistics), the scores of
    # both concatenated, CARL's loss on the concatenation (what gather_cat gives every rank)
    config = load_suite("digits", {"dataset": {"options": {"test_fraction": 0.75}},
                                   "augment": {"views": [{"size": 8, "count": 2, "scale": [1.0, 1.0],
                                                          "ratio": [1.0, 1.0], "hflip_p": 0.0, "jitter_p": 0.0,
                                                          "grayscale_p": 0.0}]},
                                   "train": {"batch_size": BATCH, "epochs": 1}})
    data = load_suite_data(config)
    pl.seed_everything(0, workers=True, verbose=False)
    method, settings = build_method(config, "carl", data)
    augment = build_augment(settings.augment)
    method.train()
    scores = [[], []]
    for rank in (0, 1):
        sampler = EpochBatchSampler(len(data.pretrain), BATCH, 0, method.epoch_order, rank=rank, world_size=2)
        indices = torch.as_tensor(next(iter(sampler)))
        views = augment(data.pretrain.get_batch(indices), step_generator(0, 0))
        for v, view in enumerate(views[:2]):
            scores[v].append(method._scores(view))
    with torch.no_grad():
        expected = carl_loss(torch.cat(scores[0]), torch.cat(scores[1]), method.kl_weight(0)).item()
    assert first == pytest.approx(expected, rel=1e-4, abs=1e-5)
