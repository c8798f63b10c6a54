"""The report's uncertainty and significance: every interval and marker is the one reports.stats gives on the
records' own predictions (records from tests/record_factory.py)."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from benchmarks.records import read_predictions, read_record
from reports import stats
from reports.build import build_report
from reports.cells import reflect
from tests.record_factory import correct_mask, make_labels, write_run

N_BOOT = 200
TABLE = ("cifar10", "CIFAR-10", 200)


def quiet():
    return open(os.devnull, "w")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("stats")
    results = root / "results"
    labels = make_labels(1000)
    best = correct_mask(1000, 80.0, seed=3)
    worse = best.copy()
    worse[np.flatnonzero(best)[:30]] = False  # 3 points fewer, all of them images the best gets right
    files = {
        "simclr": write_run(results, method="simclr", labels=labels, correct={"knn_k20": best},
                            clusters={"clustering": (10, 0.3)}),
        "byol": write_run(results, method="byol", labels=labels, correct={"knn_k20": worse},
                          accuracy={"linear": 75.0}),
        "swav": write_run(results, method="swav", labels=labels, correct={"knn_k20": best.copy()}),
    }
    write_run(results, method="supervised", labels=labels, accuracy={"knn_k20": 95.0})
    write_run(results, method="random_init", labels=labels, clusters={"clustering": (10, 1.0, 1)},
              accuracy={"knn_k20": 10.0})
    for seed, top1 in enumerate((70.0, 72.0, 74.0)):
        write_run(results, method="carl", seed=seed, labels=labels, accuracy={"linear": top1})
    files["semi"] = write_run(results, method="carp", labels=labels,
                              accuracy={"semi_5perclass": [40.0, 50.0, 60.0]})
    heads = {"self_classifier": ((10, 0.05, 5), (30, 0.5, 6)), "uic": ((10, 0.5, 7), (30, 0.3, 8))}
    for method, specs in heads.items():
        write_run(results, method=method, labels=labels,
                  clusters={f"clustering_head_k{k}": (k, noise, s) for k, noise, s in specs})
    out = build_report(results, root / "out", n_boot=N_BOOT, figures=False, formats=["md"], stderr=quiet())
    return {"files": files, "labels": labels, **out}


def cell(cells, row, key, metric="top1"):
    rows = cells[(cells["row"] == row) & (cells["key"] == key) & (cells["metric"] == metric)
                 & cells["table"].map(lambda t: t == TABLE)]
    assert len(rows) == 1, rows
    return rows.iloc[0]


def arrays(path):
    return read_predictions(path, read_record(path))


def test_one_seed_interval_is_the_bootstrap_over_its_test_images(built):
    byol = cell(built["cells"], "BYOL", "linear")
    pred = arrays(built["files"]["byol"])
    correct = pred["linear"][:, 0] == pred["labels"]
    expected = stats.accuracy_interval(correct, n_boot=N_BOOT)
    assert (byol["img_low"], byol["img_high"]) == (expected.ci_low, expected.ci_high)
    assert byol["n"] == 1 and byol["img_method"] == "percentile"
    md = built["paths"]["md"].read_text()
    # best linear; one seed: the image-bootstrap interval in angle brackets (n >= 2: [t over seeds])
    assert f"| BYOL | 1 | **75.00 ⟨{expected.ci_low:.2f}, {expected.ci_high:.2f}⟩** |" in md


def test_three_seed_interval_is_the_closed_form_t_interval(built):
    carl = cell(built["cells"], "CARL", "linear")
    half = scipy_stats.t.ppf(0.975, 2) * 2.0 / np.sqrt(3)
    assert carl["mean"] == pytest.approx(72.0) and carl["std"] == pytest.approx(2.0)
    assert carl["t_low"] == pytest.approx(72.0 - half) and carl["t_high"] == pytest.approx(72.0 + half)
    assert f"72.00 ± 2.00 [{72 - half:.2f}, {72 + half:.2f}]" in built["paths"]["md"].read_text()


def test_clustering_interval_is_the_reflected_bootstrap(built):
    nmi = cell(built["cells"], "SimCLR", "clustering", "NMI")
    pred = arrays(built["files"]["simclr"])
    percentile = stats.clustering_interval(pred["labels"], pred["clustering"], "nmi", n_boot=N_BOOT)
    assert nmi["img_method"] == "basic"
    assert (nmi["img_low"], nmi["img_high"]) == reflect(percentile, 0.0, 100.0)
    assert nmi["img_low"] == pytest.approx(2 * percentile.value - percentile.ci_high)


def test_negative_ami_and_ari_are_shown_as_computed(built):
    ami = cell(built["cells"], "Random init", "clustering", "AMI")
    ari = cell(built["cells"], "Random init", "clustering", "ARI")
    assert ami["mean"] < 0 and ari["mean"] < 0
    assert f"| {ami['mean']:.2f} ⟨" in built["paths"]["md"].read_text()


def test_one_seed_rows_are_not_testable_and_a_reference_row_is_no_contender(built):
    cells = built["cells"]
    simclr, byol, swav = (cell(cells, name, "knn_k20") for name in ("SimCLR", "BYOL", "SwAV"))
    assert simclr["best"] and swav["best"] and not byol["best"]  # SimCLR and SwAV tie on the mean
    for one_seed in (swav, byol):  # the seed-level test needs two seeds a side: neither verdict is given
        assert one_seed["untestable"] and not one_seed["tied"] and np.isnan(one_seed["p_holm"])
        assert one_seed["test_note"].startswith("not testable: fewer than 2 seeds")
    supervised = cell(cells, "Supervised", "knn_k20")
    assert not supervised["best"] and not supervised["tied"] and not supervised["untestable"]
    md = built["paths"]["md"].read_text()
    byol_row = md.split("### kNN", 1)[1].split("| BYOL | 1 |", 1)[1].split("\n", 1)[0]
    knn_cell = next(c.strip() for c in byol_row.split("|") if c.strip().startswith("77.00 ⟨"))
    assert knn_cell.endswith("⟩‡")
    assert "| **100.00 ⟨100.00, 100.00⟩§** |" in byol_row  # top-5: a zero-width interval is flagged
    assert "‡ Not testable against the best: BYOL (kNN k=20, T=0.07 top-1: fewer than 2 seeds" in md


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    root = tmp_path_factory.mktemp("seeded")
    results = root / "results"
    per_seed = {"simclr": (90.0, 91.0, 92.0), "byol": (80.0, 81.5, 82.0), "swav": (88.0, 92.5, 90.0),
                "carl": (85.0,), "carp": (70.0, 70.0)}
    for method, values in per_seed.items():
        for seed, value in enumerate(values):
            write_run(results, method=method, seed=seed, accuracy={"knn_k20": value})
    out = build_report(results, root / "out", n_boot=N_BOOT, figures=False, formats=["md"], stderr=quiet())
    return {"per_seed": per_seed, **out}


def test_marks_are_welch_over_seeds_with_holm_over_the_column(seeded):
    cells, per_seed = seeded["cells"], seeded["per_seed"]
    best = per_seed["simclr"]
    raw = {m: scipy_stats.ttest_ind(per_seed[m], best, equal_var=False).pvalue for m in ("byol", "swav", "carp")}
    order = sorted(raw, key=raw.get)  # Holm step-down by hand: p_(i) (m - i), running maximum, capped at 1
    holm, running = {}, 0.0
    for i, m in enumerate(order):
        running = max(running, min(1.0, raw[m] * (len(order) - i)))
        holm[m] = running
    for method, label in (("byol", "BYOL"), ("swav", "SwAV"), ("carp", "CARP")):
        c = cell(cells, label, "knn_k20")
        assert c["p_raw"] == pytest.approx(raw[method]) and c["p_holm"] == pytest.approx(holm[method])
        assert c["tied"] == (holm[method] >= 0.05)
        # the drawn interval of (row - best) excludes 0 exactly when the mark says "significantly worse"
        assert (c["diff_high"] < 0) == (not c["tied"])
        assert c["diff"] == pytest.approx(np.mean(per_seed[method]) - np.mean(best))
    assert not cell(cells, "BYOL", "knn_k20")["tied"] and cell(cells, "SwAV", "knn_k20")["tied"]
    carl = cell(cells, "CARL", "knn_k20")
    assert carl["untestable"] and "fewer than 2 seeds" in carl["test_note"]
    md = seeded["paths"]["md"].read_text()
    assert "| CARP | 2 | 70.00 ± 0.00 [70.00, 70.00]§ |" in md  # zero spread flagged, tested (p > 0)


def simclr_correct(built):
    pred = arrays(built["files"]["simclr"])
    return pred["knn_k20"][:, 0] == pred["labels"]


def byol_correct(built):
    pred = arrays(built["files"]["byol"])
    return pred["knn_k20"][:, 0] == pred["labels"]


def test_semi_predictions_with_several_subsets_use_the_mean_over_subsets(built):
    semi = cell(built["cells"], "CARP", "semi_5perclass")
    pred = arrays(built["files"]["semi"])
    assert pred["semi_5perclass"].shape == (3, 1000, 5)
    per_image = (pred["semi_5perclass"][..., 0] == pred["labels"]).mean(axis=0)
    expected = stats.accuracy_interval(per_image, n_boot=N_BOOT)
    assert semi["mean"] == pytest.approx(50.0) and (semi["img_low"], semi["img_high"]) == expected[1:]
    assert semi["column"] == "5 per class top-1"


def test_over_clustering_heads_get_many_to_one_acc_only(built):
    cells = built["cells"]
    heads = cells[cells["kind"] == "heads"]
    k30 = heads[heads["key"] == "clustering_head_k30"]
    k10 = heads[heads["key"] == "clustering_head_k10"]
    assert set(k30["metric"]) == {"NMI", "AMI", "ARI", "ACC_M2O"}
    assert set(k10["metric"]) == {"NMI", "AMI", "ARI", "ACC"}
    assert set(k30["column"]) >= {"ACC (many-to-one)"} and "ACC (one-to-one)" not in set(k30["column"])
    md = built["paths"]["md"].read_text()
    section = md.split("### Clustering with the methods' own heads\n", 1)[1].split("\n#", 1)[0]
    header = next(line for line in section.splitlines() if line.startswith("| Method"))
    assert "ACC (one-to-one)" in header and "ACC (many-to-one)" in header
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines()
            if line.startswith("| Self-Classifier") or line.startswith("| UIC")]
    names = [c.strip() for c in header.strip("|").split("|")]
    by_k = {(r[0], r[names.index("K")]): r for r in rows}
    assert by_k[("Self-Classifier", "30")][names.index("ACC (one-to-one)")] == "–"
    assert by_k[("Self-Classifier", "30")][names.index("ACC (many-to-one)")] != "–"
    assert by_k[("Self-Classifier", "10")][names.index("ACC (many-to-one)")] == "–"


def test_bold_only_among_cells_of_the_same_k(built):
    heads = built["cells"][built["cells"]["kind"] == "heads"]
    nmi = heads[heads["metric"] == "NMI"].set_index(["row", "key"])
    sc10 = nmi.loc[("Self-Classifier", "clustering_head_k10")]
    sc30 = nmi.loc[("Self-Classifier", "clustering_head_k30")]
    uic10, uic30 = nmi.loc[("UIC", "clustering_head_k10")], nmi.loc[("UIC", "clustering_head_k30")]
    assert sc10["best"] and not uic10["best"]  # best of K = 10
    assert uic30["best"] and not sc30["best"]  # best of K = 30 ...
    assert uic30["mean"] < sc10["mean"]  # ... although the K = 10 head scores higher: no bold across K


@pytest.fixture(scope="module")
def ranked(tmp_path_factory):
    root = tmp_path_factory.mktemp("ranks")
    results = root / "results"
    scores = {"simclr": (70, 60, 0.2), "byol": (75, 62, 0.3), "swav": (65, 58, 0.1)}
    for method, (linear, knn, noise) in scores.items():
        for seed in (0, 1):
            write_run(results, method=method, seed=seed,
                      accuracy={"linear": linear + seed, "knn_k20": knn + seed},
                      clusters={"clustering": (10, noise, 10 * seed + len(method))})
    write_run(results, method="carl", seed=0, accuracy={"linear": 99.0})  # no kNN, no clustering: not ranked
    return build_report(results, root / "out", n_boot=100, figures=False, formats=["md"], stderr=quiet())


def test_leaderboard_ranks_seed_means_over_knn_linear_and_nmi(ranked):
    ranks = ranked["leaderboards"][TABLE]
    cells = ranked["cells"]
    used = cells[((cells["key"] == "knn_k20") & (cells["metric"] == "top1"))
                 | ((cells["key"] == "linear") & (cells["metric"] == "top1"))
                 | ((cells["key"] == "clustering") & (cells["metric"] == "NMI"))]  # one clustering metric
    used = used[~used["is_reference"] & (used["row"] != "CARL")]
    means = used.pivot(index="column", columns="row", values="mean")
    by_hand = pd.Series(scipy_stats.rankdata(-means.to_numpy(), axis=1).mean(axis=0), index=means.columns)
    for r in ranks.itertuples():
        assert r.mean_rank == pytest.approx(by_hand[r.method])
        assert r.rank_low <= r.mean_rank + 1e-9 and r.mean_rank - 1e-9 <= r.rank_high and r.n_seeds == 2
    scores = pd.DataFrame([(r.row, s, r.column, v) for r in used.itertuples()
                           for s, v in zip(r.seeds, r.values)], columns=["method", "seed", "metric", "value"])
    pd.testing.assert_frame_equal(ranks.reset_index(drop=True), stats.rank_of_means(scores, n_boot=100))
    md = ranked["paths"]["md"].read_text()
    board = md.split("### Leaderboard\n", 1)[1].split("\n#", 1)[0]
    assert "CARL (missing: kNN k=20, T=0.07 top-1, NMI)" in board and "| Rank | Method | mean rank | 95% rank interval |" \
        in board
    first = next(line for line in board.splitlines() if line.startswith("| 1 |"))
    assert ranks.iloc[0]["method"] in first


def test_a_contender_with_one_seed_is_not_testable_and_a_one_seed_cell_has_no_t_interval(tmp_path):
    results = tmp_path / "results"
    labels = make_labels(1000)
    for seed in (0, 1, 2):
        write_run(results, method="simclr", seed=seed, labels=labels, accuracy={"knn_k20": 90.0 + seed})
        write_run(results, method="byol", seed=seed, labels=labels, accuracy={"knn_k20": 60.0 + seed})
    write_run(results, method="swav", seed=0, labels=labels, accuracy={"knn_k20": 80.0})
    out = build_report(results, tmp_path / "out", n_boot=N_BOOT, figures=False, formats=["md"], stderr=quiet())
    cells = out["cells"]
    swav, byol = cell(cells, "SwAV", "knn_k20"), cell(cells, "BYOL", "knn_k20")
    assert swav["test_note"] == "not testable: fewer than 2 seeds (n = 1 vs 3 for the best, SimCLR)"
    assert byol["test_note"].startswith("vs best SimCLR: Δ = -30.00 (means over seeds, n = 3 vs 3)")
    assert not byol["tied"] and byol["p_holm"] == pytest.approx(
        scipy_stats.ttest_ind([60, 61, 62], [90, 91, 92], equal_var=False).pvalue)  # one testable comparison
    assert swav["n"] == 1 and np.isnan(swav["t_low"]) and np.isnan(swav["t_high"])


def test_figure_points_are_the_tested_differences_and_colours_do_not_depend_on_the_other_rows(seeded):
    from reports.build import _points
    from reports.figures import palette_for
    from reports.render import prepare

    cells = seeded["cells"]
    points = _points(prepare(cells[cells["kind"] == "knn"], "knn"), "knn")
    top1 = points[points["column"] == "kNN k=20, T=0.07 top-1"].set_index("row")
    assert top1.loc["SimCLR", "status"] == "best" and top1.loc["SimCLR", "value"] == 0.0
    assert top1.loc["BYOL", "status"] == "worse" and top1.loc["BYOL", "high"] < 0  # left of 0: the mark
    assert top1.loc["SwAV", "status"] == "tied" and top1.loc["SwAV", "low"] <= 0 <= top1.loc["SwAV", "high"]
    assert top1.loc["CARL", "status"] == "untestable" and np.isnan(top1.loc["CARL", "low"])
    byol = cell(cells, "BYOL", "knn_k20")
    assert top1.loc["BYOL", "value"] == pytest.approx(byol["diff"])
    assert palette_for(["SimCLR", "BYOL"])["SimCLR"] == palette_for(["SimCLR", "CARL", "SwAV", "x"])["SimCLR"]
