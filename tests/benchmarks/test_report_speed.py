"""Building a CIFAR-100-size report: `reports.build.build_report` on synthetic records (tests/record_factory.py)
of 10 methods x 3 seeds plus the two reference rows, 10,000 test images, 100 classes, every protocol the
report lays out -- kNN k=20/200, offline and online linear, semi-supervised subsets and fine-tuning, transfer,
k-means clustering (K = 100) and the methods' own clustering heads (K = 100 and over-clustering K = 300) --
with the default bootstrap (stats.N_BOOT resamples), every figure and every format. Goal: 60 s or less on
2 cores (issue 23)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from reports.build import build_report
from tests.record_factory import make_labels, write_run

N_IMAGES, CLASSES, SEEDS = 10_000, 100, (0, 1, 2)
METHODS = ("simclr", "byol", "swav", "carl", "carp", "uic", "iic", "self_classifier", "sslpp", "rotation")
HEADS = ("self_classifier", "uic", "iic", "carl", "swav")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("report_speed") / "results"
    labels = make_labels(N_IMAGES, CLASSES)
    transfer = make_labels(N_IMAGES, 10)
    rng = np.random.default_rng(0)
    for i, method in enumerate((*METHODS, "random_init", "supervised")):
        for seed in SEEDS:
            base = 40.0 + 3 * i + rng.normal(0, 1.5)
            accuracy = {"knn_k20": base, "knn_k200": base - 1, "linear": base + 5, "online_linear": base + 2,
                        "semi_1pct": [base - 20], "semi_10pct": [base - 8], "finetune_100pct": base + 10,
                        "transfer_linear:CIFAR-10": base + 20}
            clusters = {"clustering": (CLASSES, 0.3 + 0.02 * i, seed)}
            if method in HEADS:
                # each method's own assignments (a shared one would be served from the report's replicate memo)
                clusters |= {f"clustering_head_k{CLASSES}": (CLASSES, 0.35, 100 * i + seed + 10),
                             f"clustering_head_k{3 * CLASSES}": (3 * CLASSES, 0.4, 100 * i + seed + 20)}
            write_run(root, suite="cifar100", dataset="CIFAR-100", method=method, seed=seed, labels=labels,
                      accuracy=accuracy, clusters=clusters, transfer_labels=transfer)
    return root


def test_build_a_cifar100_size_report(benchmark, speed_record, results, tmp_path):
    rounds = iter(range(10**6))

    def build():
        with open(os.devnull, "w") as quiet:
            return build_report(results, tmp_path / f"out{next(rounds)}", stderr=quiet)

    out = benchmark.pedantic(build, rounds=1, warmup_rounds=0, iterations=1)
    cells = out["cells"]
    assert set(cells["kind"]) >= {"knn", "linear", "semi", "transfer", "clustering", "heads"}
    assert len(set(cells["row"])) == len(METHODS) + 3  # + random init, supervised, labelled subset only
    assert out["paths"]["html"].stat().st_size > 0 and out["figures"]
    speed_record(benchmark, "report_build[cifar100]", 1, "report", methods=len(METHODS), seeds=len(SEEDS),
                 test_images=N_IMAGES, classes=CLASSES, cells=len(cells))
