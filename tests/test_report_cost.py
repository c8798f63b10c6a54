"""The report's cost table: wall time, throughput and peak memory as the records hold them; the runner's CPU
peak memory (the process's peak RSS)."""

from __future__ import annotations

import os
import re
import resource

import pytest

from benchmarks.records import record_path, write_record
from benchmarks.runner import process_peak_rss_mb
from reports.build import build_report
from tests.record_factory import make_run


def test_cpu_peak_memory_is_the_process_peak_rss():
    peak = process_peak_rss_mb()
    assert peak == pytest.approx(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, rel=0.05)
    status = open("/proc/self/status").read()
    current_kib = int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))
    assert peak >= current_kib / 1024 * 0.99  # a peak is never below the current resident size


def test_cost_table_shows_wall_time_throughput_and_peak_memory_per_row(tmp_path):
    results = tmp_path / "results"
    costs = {("simclr", 0): (30.0, 1000.0, 500.0, "cpu"), ("simclr", 1): (50.0, 3000.0, 700.0, "cpu"),
             ("byol", 0): (7200.0, 900.0, 2048.0, "cuda:0")}
    for (method, seed), (wall, speed, peak, device) in costs.items():
        record, predictions = make_run(method=method, seed=seed, accuracy={"knn_k20": 80.0 + seed})
        record.update(wall_time_s=wall, throughput_images_per_s=speed, peak_memory_mb=peak,
                      peak_memory_source="process_peak_rss" if device == "cpu" else "cuda_max_allocated")
        record["provenance"]["pretraining"]["device"] = device
        path = record_path(results, "cifar10", method, 200, seed, record["fingerprints"]["run"])
        path.parent.mkdir(parents=True, exist_ok=True)
        write_record(record, path, predictions=predictions)
    with open(os.devnull, "w") as quiet:
        out = build_report(results, tmp_path / "out", n_boot=100, figures=False, formats=["md"], stderr=quiet)
    md = out["paths"]["md"].read_text()
    table = md.split("### Cost\n", 1)[1].split("\n#", 1)[0]
    assert "| Method | runs | wall time per run | images/s (training) | peak memory (MB) | device |" in table
    assert "| SimCLR | 2 | 40.0 s | 2000 | 700 (RSS) | cpu |" in table  # means; peak = the maximum
    assert "| BYOL | 1 | 2.000 GPU-h | 900 | 2048 | cuda:0 |" in table
