"""Evaluating one checkpoint end to end: `python -m benchmarks evaluate --checkpoint model.pt`.

A digits SimCLR model file (small_cnn, written by runner.save_model as `benchmarks run` writes it) is
loaded safely, the method rebuilt, and every protocol of the digits suite run (kNN, linear probe,
semi-supervised fine-tuning, clustering — whatever digits.yaml lists) through evaluate_model, then the
run record written. The weights are the seeded initial ones: the time does not depend on them.
"""

from __future__ import annotations

import json

import torch

from benchmarks.cli import main as cli_main
from benchmarks.config import load_suite
from benchmarks.evaluation.protocols import protocol_family
from benchmarks.records import same_run_records
from benchmarks.runner import build_method, load_suite_data, save_model


def test_evaluate_digits_checkpoint(benchmark, speed_record, tmp_path, torch_threads):
    config = load_suite("digits")
    data = load_suite_data(config)
    torch.manual_seed(0)
    method, _ = build_method(config, "simclr", data)
    checkpoint = tmp_path / "model.pt"
    save_model(checkpoint, method, {"suite": "digits", "method": "simclr", "seed": 0, "epochs": 1,
                                    "backbone": config.backbone, "in_channels": config.in_channels})
    protocols = config.evaluation.protocols
    rounds = iter(range(10**6))

    def setup():
        return (["evaluate", "--checkpoint", str(checkpoint), "--out", str(tmp_path / f"out{next(rounds)}"),
                 "--no-progress"],), {}

    code = benchmark.pedantic(cli_main, setup=setup, rounds=3, warmup_rounds=1, iterations=1)
    assert code == 0
    (path,) = same_run_records(tmp_path / "out1", "digits", "simclr", 1, 0)
    metrics = json.loads(path.read_text())["metrics"]
    # every protocol of the suite ran, but online_linear: its classifier is trained beside pretraining, so a
    # model file saved without one (as here) has nothing to score
    assert {protocol_family(entry["protocol"]) for entry in metrics} == set(protocols) - {"online_linear"}
    speed_record(benchmark, "evaluate_checkpoint[digits]", 1, "checkpoint", protocols=protocols,
                 train_images=len(data.train), test_images=len(data.test), threads=torch_threads)
