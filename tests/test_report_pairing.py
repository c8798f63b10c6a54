"""Pairing with the papers: only like for like (method + paper, datasets, backbone, epochs, protocol with
its settings, metric), Δ and Welch's p from reports.stats, the reason for each unpaired row, paper layouts."""

from __future__ import annotations

import os

import numpy as np
import pytest
from scipy import stats as sps

from reports import stats
from reports.build import build_report
from tests.record_factory import write_run

DISS = "carl-carp-dissertation"
REIMPL = "self-classifier-reimplementation"


def quiet():
    return open(os.devnull, "w")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairing")
    results = root / "results"
    transfer_labels = (np.arange(200) % 100).astype(np.int64)
    for seed, top1 in enumerate((70.0, 72.0, 74.0)):
        write_run(results, method="simclr", seed=seed, paper_reference=DISS, accuracy={
            "linear": top1, "transfer_linear:CIFAR-100": 40.0 + seed}, transfer_labels=transfer_labels)
    write_run(results, method="carl", paper_reference=DISS, accuracy={"linear": 75.0},
              settings={"linear": {"views": "none", "epochs": 100, "lr": 0.1}})
    write_run(results, method="byol", epochs=150, paper_reference=DISS, accuracy={"linear": 70.0})
    write_run(results, suite="cifar10_small", method="swav", backbone="small_cnn", paper_reference=DISS,
              accuracy={"linear": 60.0})
    for seed in range(3):
        write_run(results, suite="stl10", dataset="STL-10", method="random_init", seed=seed,
                  accuracy={"semi_1pct": 50.0 + seed})
    write_run(results, suite="stl10", dataset="STL-10", method="supervised", accuracy={"semi_1pct": 70.0,
                                                                                       "linear": 74.0})
    write_run(results, method="self_classifier", epochs=800, paper_reference="self-classifier",
              clusters={"clustering_head_k30": (30, 0.4, 1)})
    write_run(results, method="self_classifier/reimpl", variant="reimpl", epochs=800, paper_reference=REIMPL,
              clusters={"clustering_head_k10": (10, 0.3, 2), "clustering_head_k30": (30, 0.3, 3)})
    blocks = {"block_classifier_B1": 60.0, "block_classifier_B2": 90.0, "block_classifier_B3": 86.0,
              "block_classifier_B4": 76.0}
    write_run(results, method="sslpp", backbone="nin", paper_reference="sslpp", accuracy=blocks,
              extra_metrics={"block_classifier_avg": {"top1": 84.0}})  # SSL++'s average over B2-B4
    out = build_report(results, root / "out", n_boot=100, figures=False, formats=["md"], stderr=quiet())
    return {"results": results, "root": root, **out}


def paired(built, row, key, metric="top1"):
    cells, pairs = built["cells"], built["pairs"]
    idx = cells.index[(cells["row"] == row) & (cells["key"] == key) & (cells["metric"] == metric)]
    assert len(idx) == 1, (row, key, metric)
    hit = pairs[pairs["cell"] == idx[0]]
    return cells.loc[idx[0]], (hit.iloc[0] if len(hit) else None)


def unmatched(built, method, pretrain, protocol, epochs=200):
    u = built["unmatched_paper"]
    rows = u[(u["method"] == method) & (u["pretrain_dataset"] == pretrain) & (u["protocol"] == protocol)
             & (u["epochs"] == epochs)]
    assert len(rows) >= 1, (method, pretrain, protocol, epochs)
    return set(rows["reason"])


def test_resnet18_record_with_the_right_settings_is_paired_with_delta_and_welch(built):
    cell, pair = paired(built, "SimCLR", "linear")
    assert pair is not None and pair["paper_value"] == 75.41
    assert pair["paper_std"] == 0.47 and pair["paper_n"] == 3
    delta = stats.delta_interval([70.0, 72.0, 74.0], 75.41, 0.47, 3)
    assert (pair["delta"], pair["delta_low"], pair["delta_high"]) == pytest.approx(tuple(delta[:3]))
    welch = sps.ttest_ind_from_stats(72.0, 2.0, 3, 75.41, 0.47, 3, equal_var=False)
    assert pair["welch_p"] == pytest.approx(welch.pvalue) == delta.p_value
    assert pair["source"] == f"{DISS} Table 5.2"
    md = built["paths"]["md"].read_text()
    assert f"{delta.delta:+.2f} [{delta.ci_low:.2f}, {delta.ci_high:.2f}]" in md
    assert f"| {pair['welch_p']:.3f} |" in md


def test_transfer_pairs_on_the_evaluation_dataset(built):
    _, pair = paired(built, "SimCLR", "transfer_linear:CIFAR-100")
    assert pair is not None and pair["paper_value"] == 40.39


def test_small_cnn_record_is_not_paired_and_the_reason_is_the_backbone(built):
    _, pair = paired(built, "SwAV", "linear")
    assert pair is None
    assert unmatched(built, "SwAV", "CIFAR-10", "linear") == {"backbone small_cnn, paper ResNet-18"}


def test_probe_views_must_agree(built):
    _, pair = paired(built, "CARL", "linear")
    assert pair is None
    reasons = unmatched(built, "CARL", "CIFAR-10", "linear")
    assert reasons == {"protocol: ours linear (views none), paper crop_flip"}


def test_epochs_must_agree(built):
    assert unmatched(built, "BYOL", "CIFAR-10", "linear", 100) == {"our runs have 150 epochs, the paper 100"}
    assert unmatched(built, "BYOL", "CIFAR-10", "linear", 200) == {"our runs have 150 epochs, the paper 200"}


def test_random_init_semi_cell_pairs_with_the_supervised_subset_only_row(built):
    cell, pair = paired(built, "Supervised (labelled subset only)", "semi_1pct")
    assert cell["method"] == "random_init" and pair is not None
    assert pair["paper_value"] == 52.97 and pair["welch_p"] == pytest.approx(
        sps.ttest_ind_from_stats(51.0, 1.0, 3, 52.97, 0.07, 3, equal_var=False).pvalue)
    cells = built["cells"]
    assert not ((cells["method"] == "supervised") & (cells["key"] == "semi_1pct")).any()  # not in semi
    _, linear = paired(built, "Supervised", "linear")  # ... but its linear probe pairs with Supervised
    assert linear is not None and linear["paper_value"] == 74.76


def test_each_variant_pairs_with_its_own_paper(built):
    _, base = paired(built, "Self-Classifier", "clustering_head_k30", "NMI")
    assert base is not None and base["source"] == "self-classifier Table 2" and base["paper_value"] == 60.7
    _, reimpl = paired(built, "Self-Classifier (reimpl)", "clustering_head_k10", "ACC")
    assert reimpl is not None and reimpl["source"] == f"{REIMPL} Table 1" and reimpl["paper_value"] == 60.7
    _, other = paired(built, "Self-Classifier (reimpl)", "clustering_head_k30", "NMI")
    assert other is None  # the 3x head of the reimplementation is not the original paper's
    reasons = unmatched(built, "Self-Classifier", "MNIST", "clustering", 800)
    assert reasons == {"no run of Self-Classifier (reimpl) on MNIST (ours: CIFAR-10)"}


def test_block_average_gets_its_per_image_data_from_the_blocks_and_pairs(built):
    cell, pair = paired(built, "SSL++ (Rotation)", "block_classifier_avg")
    assert pair is not None and pair["paper_value"] == 84.2 and pair["source"] == "sslpp Table III"
    assert cell["img_method"] == "percentile" and cell["img_low"] < 84.0 < cell["img_high"]
    _, b2 = paired(built, "SSL++ (Rotation)", "block_classifier_B2")
    assert b2 is not None and b2["paper_value"] == 90.1
    no_runs = built["paths"]["md"].read_text().split("No runs yet:", 1)[1].split("\n", 1)[0]
    assert "sslpp Table III" not in no_runs


def test_paper_layouts_appear_only_when_a_run_fills_a_cell(built):
    md = built["paths"]["md"].read_text()
    layouts = md.split("## Paper tables side by side", 1)[1].split("\n## ", 1)[0]
    for title in ("Dissertation Table 5.2", "Dissertation Table 5.3",
                  "Self-Classifier reimplementation Table 1", "Self-Classifier Table 2"):
        assert f"### {title}" in layouts, title
    assert "No runs yet: sslpp Table V." in layouts and "### SSL++ Table III" in layouts
    table52 = layouts.split("### Dissertation Table 5.2", 1)[1].split("\n### ", 1)[0]
    simclr = next(line for line in table52.splitlines() if line.startswith("| SimCLR |"))
    assert "| 72.00 ± 2.00 [" in simclr and "| 75.41 ± 0.47 |" in simclr
    table53 = layouts.split("### Dissertation Table 5.3", 1)[1].split("\n### ", 1)[0]
    supervised = next(line for line in table53.splitlines() if line.startswith("| Supervised |"))
    assert "| 51.00 ± 1.00 [" in supervised and "| 52.97 ± 0.07 |" in supervised


def test_digits_only_report_lists_every_layout_as_no_runs_yet(tmp_path):
    results = tmp_path / "results"
    write_run(results, suite="digits", dataset="digits", method="simclr", backbone="small_cnn", epochs=40,
              accuracy={"linear": 90.0})
    out = build_report(results, tmp_path / "out", n_boot=100, figures=False, formats=["md"], stderr=quiet())
    md = out["paths"]["md"].read_text()
    layouts = md.split("## Paper tables side by side", 1)[1].split("\n## ", 1)[0]
    assert "\n### " not in layouts and "No runs yet: carl-carp-dissertation Table 5.2;" in layouts
    assert out["pairs"].empty and "no run of SimCLR" not in set(out["unmatched_paper"]["reason"])


def test_pairing_requires_the_knn_temperature_and_the_method_settings_a_paper_row_names(tmp_path):
    results = tmp_path / "results"
    sc = {"hparams": {"row_tau": 0.1, "col_tau": 0.05}, "optimizer": {"lr": 0.1}}
    for seed in (0, 1):
        # Self-Classifier kNN at T = 0.1: sec. 4.3 follows InstDisc's T = 0.07, so no pairing
        write_run(results, suite="imagenet", method="self_classifier", seed=seed, paper_reference="self-classifier",
                  dataset="ImageNet", backbone="resnet50", epochs=800, accuracy={"knn_k20": 80.0 + seed},
                  settings={"knn_k20": {"k": 20, "temperature": 0.1}})
        # the reimplementation's STL-10 row is its tau = (0.07, 0.05) ablation: row_tau 0.1 does not pair
        write_run(results, suite="stl10", dataset="STL-10", method="self_classifier/reimpl", variant="reimpl",
                  seed=seed, epochs=300, paper_reference="self-classifier-reimplementation", method_config=sc,
                  clusters={"clustering_head_k10": (10, 0.3, seed)})
    out = build_report(results, tmp_path / "out", n_boot=100, figures=False, formats=["md"], stderr=quiet())
    u = out["unmatched_paper"]
    knn = u[(u["paper"] == "self-classifier") & (u["protocol"] == "knn_k20") & (u["pretrain_dataset"] == "ImageNet")]
    assert not knn.empty
    assert all("temperature 0.1" in r and "paper 0.07" in r for r in knn["reason"]), set(knn["reason"])
    stl = u[(u["paper"] == "self-classifier-reimplementation") & (u["pretrain_dataset"] == "STL-10")]
    assert set(stl["reason"]) == {"method settings: ours row_tau 0.1, paper 0.07"}
    assert out["pairs"].empty
