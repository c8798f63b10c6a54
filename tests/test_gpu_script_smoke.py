"""scripts/gpu_simclr_benchmark.py in its CPU smoke mode: the plumbing of the GPU speed benchmark.

The script is run as users run it (a subprocess, tiny setting). Besides the JSON's shape, this
checks that its numbers hang together and that the suite's Lightning path and the bare loop really
do the same work: from the same initial weights, on the same batches and views, they must reach the
same mean loss (fp32 on the CPU), which is what makes their speed ratio a measure of overhead alone.
No speed is asserted.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_simclr_benchmark.py"
PATHS = {"suite_lightning", "suite_lightning_cpu_augment", "bare_pytorch"}
PER_PATH = {"seconds_per_step", "seconds_per_epoch_equivalent", "view_images_per_s", "peak_memory_mb",
            "memory_measure", "timed_steps", "warmup_steps", "mean_loss"}


@pytest.mark.slow
def test_cpu_smoke_mode(tmp_path):
    out = tmp_path / "nested" / "speed.json"
    steps, batch, images = 3, 16, 96
    command = [sys.executable, str(SCRIPT), "--device", "cpu", "--steps", str(steps), "--batch-size", str(batch),
               "--num-images", str(images), "--cpu-workers", "1", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert json.loads(out.read_text()) == summary

    assert set(summary) == {"device", "versions", "settings", "paths", "ratios"}
    settings = summary["settings"]
    assert (settings["batch_size"], settings["timed_steps"], settings["num_images"]) == (batch, steps, images)
    assert settings["backbone"] == "resnet18_cifar" and settings["precision"] == "32-true"
    assert set(summary["paths"]) == PATHS
    for name, result in summary["paths"].items():
        assert set(result) == PER_PATH, name
        seconds = result["seconds_per_step"]
        assert seconds > 0 and result["peak_memory_mb"] > 0 and result["timed_steps"] == steps
        assert result["seconds_per_epoch_equivalent"] == pytest.approx(seconds * images / batch)
        assert result["view_images_per_s"] == pytest.approx(2 * batch / seconds)
        assert math.isfinite(result["mean_loss"]) and result["mean_loss"] > 0  # NT-Xent is positive

    paths = summary["paths"]
    assert paths["suite_lightning"]["mean_loss"] == pytest.approx(paths["bare_pytorch"]["mean_loss"], rel=1e-5)
    # per-image CPU views are other views: a different loss (so the equality above is no accident)
    assert paths["suite_lightning_cpu_augment"]["mean_loss"] != pytest.approx(paths["bare_pytorch"]["mean_loss"],
                                                                              rel=1e-5)
    step = {name: result["seconds_per_step"] for name, result in paths.items()}
    assert summary["ratios"]["suite_speed_vs_bare"] == pytest.approx(step["bare_pytorch"] / step["suite_lightning"])
    assert summary["ratios"]["cpu_augment_speed_vs_suite"] == pytest.approx(
        step["suite_lightning"] / step["suite_lightning_cpu_augment"])


def test_refuses_too_few_images():
    spec = importlib.util.spec_from_file_location("gpu_simclr_benchmark_smoke", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script  # its dataclasses look their module up there
    spec.loader.exec_module(script)
    with pytest.raises(SystemExit, match=r"need at least \(steps \+ warmup\) x batch = 64"):
        script.main(["--device", "cpu", "--steps", "3", "--batch-size", "16", "--num-images", "40"])
