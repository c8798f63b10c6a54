"""Variant rows in the report: the label names the settings that differ from the base method, and an ablation
is paired with a paper only where its own section names one. Records carry the settings the real config
machinery resolves for `--methods simclr simclr/t05 --set methods.simclr/t05.temperature=0.5` on digits."""

from __future__ import annotations

import os

from benchmarks.cli_common import parse_set
from benchmarks.config import load_suite
from benchmarks.records import record_path, write_record
from reports.build import build_report
from tests.record_factory import make_run


def digits_settings(name: str):
    config = load_suite("digits", parse_set(["methods.simclr/t05.temperature=0.5"]))
    return config, config.method(name)


def test_digits_ablation_row_names_temperature_0_5_and_is_not_paired(tmp_path):
    results = tmp_path / "results"
    for name in ("simclr", "simclr/t05"):
        config, settings = digits_settings(name)
        for seed in (0, 1):
            record, predictions = make_run(
                suite="digits", dataset="digits", method=name, seed=seed, epochs=20, backbone="small_cnn",
                display=settings.display_name, variant=settings.variant, paper_reference=settings.paper,
                method_config=settings.model_dump(mode="json"),
                accuracy={"knn_k20": 90.0 + seed + (name == "simclr")})
            record["config"] = config.canonical()  # as the runner records it: with the methods sections
            path = record_path(results, "digits", name, 20, seed, record["fingerprints"]["run"])
            path.parent.mkdir(parents=True, exist_ok=True)
            write_record(record, path, predictions=predictions)
    with open(os.devnull, "w") as quiet:
        out = build_report(results, tmp_path / "out", n_boot=100, figures=False, formats=["md"], stderr=quiet)
    cells = out["cells"]
    assert set(cells["row"]) == {"SimCLR", "SimCLR (t05: temperature 0.5)"}
    assert cells.loc[cells["method"] == "simclr", "paper_reference"].notna().all()  # the base keeps its paper
    assert cells.loc[cells["method"] == "simclr/t05", "paper_reference"].isna().all()  # the ablation names none
    assert "| SimCLR (t05: temperature 0.5) | 2 |" in out["paths"]["md"].read_text()
