"""Shared fixtures of the speed benchmarks, and the ratios they are run for.

Skipped by `pytest tests` (pyproject: --benchmark-skip); `tox -e bench` runs them. A benchmark files
its time per unit of work (one training step, one k-means iteration, one evaluation) with
`record_speed`; at the end of the run `speed_ratios` turns pairs of those into the ratios the README
quotes (docs/performance.md), prints them, and writes them into the --benchmark-json file (keys
"ratios", "speed_per_unit", "same_work") beside the machine's load average, so every ratio comes from
one run on one machine.
"""

from __future__ import annotations

import importlib.util
import operator
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "scripts" / "gpu_simclr_benchmark.py"

# key -> {"unit", "units_per_round", "median_s", "min_s", "rounds", ...}: seconds per unit of work
SPEED: dict[str, dict] = {}
LOAD_AT_START = os.getloadavg()


@dataclass(frozen=True)
class Workload:
    """One SimCLR training set-up timed by the training and data-pipeline benchmarks."""

    name: str
    suite: str  # the suite config whose backbone, optimizer, views and SimCLR settings are used
    batch_size: int
    steps: int  # optimizer steps per timed round (one trainer.fit / one bare loop)
    rounds: int  # timed rounds per training benchmark (3 of them per path, alternating)
    image_size: int  # random uint8 images of this size (speed does not depend on their content)


# The workload the issue is about: CIFAR-sized SimCLR on ResNet-18 with the cifar10 suite's settings,
# at batch 32 so that 2 CPU cores give stable numbers in about a minute.
CIFAR_RESNET18 = Workload("cifar_resnet18", "cifar10", batch_size=32, steps=6, rounds=2, image_size=32)
# The quick main job's model and settings (digits suite: small_cnn, 8x8 grey, batch 128) on 8x8 random
# images, 40 steps a round: a small step, so per-step framework overhead shows most here.
DIGITS_SMALL_CNN = Workload("digits_small_cnn", "digits", batch_size=128, steps=40, rounds=4, image_size=8)
WORKLOADS = {w.name: w for w in (CIFAR_RESNET18, DIGITS_SMALL_CNN)}


@dataclass(frozen=True)
class RatioSpec:
    name: str
    numerator: str  # SPEED keys
    denominator: str
    meaning: str
    target: tuple[str, float] | None = None  # ("<", 0.10): the acceptance target, if there is one


def _training_ratios(workload: str) -> list[RatioSpec]:
    suite, bare = f"train_step[{workload}-suite_lightning]", f"train_step[{workload}-bare_pytorch]"
    return [
        RatioSpec(f"suite_speed_vs_bare[{workload}]", bare, suite,
                  "steps/s of the suite's Lightning path as a fraction of the bare PyTorch loop's", (">=", 0.95)),
        RatioSpec(f"data_pipeline_share_of_step[{workload}]", f"data_pipeline[{workload}]", suite,
                  "DataLoader + on-device views per batch, as a fraction of one suite training step", ("<", 0.10)),
    ]


RATIOS = [
    *_training_ratios(CIFAR_RESNET18.name),
    *_training_ratios(DIGITS_SMALL_CNN.name),
    *(RatioSpec(f"faiss_kmeans_speedup_vs_sklearn[k{k}]", f"kmeans_iteration[sklearn-k{k}]",
                f"kmeans_iteration[faiss-k{k}]",
                "time per Lloyd iteration of scikit-learn's KMeans / FAISS k-means (same data, k, iterations)")
      for k in (10, 100)),
]

_COMPARE = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}


def record_speed(benchmark, key: str, units_per_round: int, unit: str, **extra) -> None:
    """File the benchmark's per-unit time under `key` (and in its JSON extra_info).

    Several benchmarks may file under one key (the training comparison alternates its two paths over
    a few tests, so a slow spell of the machine hits both): their rounds are pooled.
    """
    if benchmark.stats is None:  # --benchmark-disable: the function ran once, untimed
        return
    rounds = [t / units_per_round for t in benchmark.stats.stats.data]
    pooled = SPEED.get(key, {}).get("round_s", []) + rounds
    entry = {"unit": unit, "units_per_round": units_per_round, "rounds": len(pooled),
             "median_s": statistics.median(pooled), "min_s": min(pooled), "round_s": pooled, **extra}
    SPEED[key] = entry
    benchmark.extra_info.update({"speed_key": key, "unit": unit, "units_per_round": units_per_round,
                                 "seconds_per_unit_min": min(rounds), **extra})


def speed_ratios(speed: dict[str, dict], specs=RATIOS) -> list[dict]:
    """The ratios whose two timings are both in `speed`.

    `value` divides the fastest rounds (min/min, the statistic pytest-benchmark sorts and compares by):
    on a shared machine other processes only ever add time, so each side's fastest round is its least
    disturbed one. The median ratio is kept beside it.
    """
    rows = []
    for spec in specs:
        num, den = speed.get(spec.numerator), speed.get(spec.denominator)
        if num is None or den is None:
            continue
        value = num["min_s"] / den["min_s"]
        row = {"name": spec.name, "value": value, "value_from_median": num["median_s"] / den["median_s"],
               "numerator": spec.numerator, "denominator": spec.denominator, "meaning": spec.meaning}
        if spec.target is not None:
            op, bound = spec.target
            row["target"] = f"{op} {bound}"
            row["met"] = bool(_COMPARE[op](value, bound))
        rows.append(row)
    return rows


def _same_work(speed: dict[str, dict]) -> dict[str, bool]:
    """Did the suite's path and the bare loop train to the same mean loss (same batches, views, steps)?"""
    out = {}
    for name in WORKLOADS:
        suite = speed.get(f"train_step[{name}-suite_lightning]")
        bare = speed.get(f"train_step[{name}-bare_pytorch]")
        if suite and bare:
            out[name] = abs(suite["mean_loss"] - bare["mean_loss"]) <= 1e-4 * max(1.0, abs(bare["mean_loss"]))
    return out


def pytest_terminal_summary(terminalreporter):
    rows = speed_ratios(SPEED)
    if not rows:
        return
    write = terminalreporter.write_line
    terminalreporter.write_sep("-", "speed ratios of this run (fastest rounds; medians in brackets)")
    for row in rows:
        verdict = "" if "target" not in row else f"  target {row['target']}: {'met' if row['met'] else 'NOT MET'}"
        write(f"{row['name']}: {row['value']:.3f} ({row['value_from_median']:.3f}){verdict}")
    for name, same in _same_work(SPEED).items():
        write(f"{name}: suite and bare loop reached the same mean loss: {same}")
    write(f"load average at start {LOAD_AT_START}, at end {os.getloadavg()} on {os.cpu_count()} CPUs")


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["ratios"] = speed_ratios(SPEED)
    output_json["speed_per_unit"] = SPEED
    output_json["same_work"] = _same_work(SPEED)
    output_json["load_average"] = {"start": list(LOAD_AT_START), "end": list(os.getloadavg()),
                                   "cpus": os.cpu_count()}
    import torch

    output_json["torch_threads"] = torch.get_num_threads()


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def speed_script():
    """scripts/gpu_simclr_benchmark.py as a module: the same training paths the GPU script times."""
    spec = importlib.util.spec_from_file_location("gpu_simclr_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def speed_record():
    """`record_speed` (a fixture, so that tests share this module's SPEED, not an imported copy)."""
    return record_speed


@pytest.fixture(scope="session")
def torch_threads():
    import torch

    return torch.get_num_threads()


def workload_setup(script, workload: Workload):
    """(suite config at the workload's batch size, random uint8 images for `steps` batches)."""
    config = script.simclr_config(workload.suite, workload.batch_size)
    data = script.random_images(workload.batch_size * workload.steps, config.in_channels, workload.image_size)
    return config, data


@pytest.fixture(scope="session", params=list(WORKLOADS))
def workload(request, speed_script):
    spec = WORKLOADS[request.param]
    config, data = workload_setup(speed_script, spec)
    return spec, config, data
