"""Build the benchmark report from the run records: ``build_report`` (Python) / ``python -m reports build``.

Reads every run record under ``results_dir`` (``benchmarks.records`` schema version 2, with per-image
predictions) and writes, under ``out_dir``:

* ``report.md``   -- Markdown tables
* ``report.tex``  -- a LaTeX document, booktabs tables (``\\toprule``/``\\midrule``/``\\bottomrule``)
* ``report.html`` -- one self-contained page: tables (cell tooltips with the full statistics) + figures as
  base64 PNG, inline CSS, nothing external
* ``figures/*.png`` -- forest plots (``forest_<suite>_<dataset>_e<epochs>_<kind>.png``: each row's value
  and 95% interval on an axis zoomed to the data) and training curves (``curves_<...>.png``)

The rules behind every number are in ``CONVENTIONS`` (printed in the report), ``reports.data`` (which
records count), ``reports.cells`` (rows, columns, intervals, significance, ranks) and ``reports.papers``
(pairing with the papers). The same records always give the same bytes: everything is sorted, every
bootstrap uses a fixed seed, no timestamps or absolute paths, PNGs without time-dependent metadata.
"""

from __future__ import annotations

import math
import os
import re
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import pandas as pd

from benchmarks.errors import BenchmarkError
from benchmarks.records import atomic_write_text
from reports import figures as figs
from reports import stats
from reports.cells import (
    ALPHA,
    HEADLINE,
    KINDS,
    SUBSET_LABEL,
    Model,
    build_model,
    headline_columns,
    leaderboard,
)
from reports.data import LoadedRecords, device_of, history_frame, load_paper_results, load_records
from reports.papers import (
    LAYOUTS,
    PROTOCOLS,
    describe,
    layout_cells,
    layout_measured,
    pair_with_papers,
    relevant_papers,
)
from reports.render import (
    DASH,
    TIED,
    UNTESTABLE,
    ZERO_SPREAD,
    Figure,
    Section,
    delta_text,
    fmt,
    fmt_delta,
    fmt_p,
    grid_table,
    interval,
    kind_title,
    paper_text,
    plain_table,
    prepare,
    render,
    table_caption,
    value_text,
)

FORMATS = ("md", "tex", "html")
TITLE = "Self-supervised representation learning benchmark"
OUTPUT_MODE = 0o644
FILE_NAMES = {"md": "report.md", "tex": "report.tex", "html": "report.html"}
FIGURE_PATTERN = re.compile(r"(forest|bars|curves)_[a-z0-9_.-]+\.png")
HOW_TO_READ = (
    "Values are percent. A table is one suite, dataset and pretraining budget; a row is one method or "
    "variant over its seeds; a column is one protocol and metric under one set of protocol settings.",
    "mean ± std [low, high] = n ≥ 2 seeds: sample std and the 95% t-interval over the seeds. value ⟨low, "
    "high⟩ = one seed: the 95% bootstrap interval over that run's test images, a narrower quantity (no "
    "seed-to-seed noise), never comparable with [ ].",
    f"Bold = best mean of its column (non-reference rows); {TIED} = not significantly different from it; "
    f"no mark = significantly worse (Welch's t-test over seeds, Holm over the column, α = {ALPHA}); "
    f"{UNTESTABLE} = not testable (fewer than two seeds on a side, or no spread over the seeds).",
    f"{ZERO_SPREAD} = a zero-width interval: no variation was observed, which is no certainty. (n=k) = "
    "measured on k of the row's seeds; – = not measured; rows below the line (random init, supervised) "
    "are references, not contenders.",
    "Paper and Δ columns appear only where a paper row matches the run like for like. The details of every "
    "rule are in the appendix at the end.",
)
CONVENTIONS = (
    "Rows and columns. A row is one method or variant with one settings fingerprint (the same experiment "
    "over seeds); when one method has several, each is its own row, labelled with the settings that differ "
    "(from the records' method_config, else their config), never pooled. A column is one protocol key and "
    "metric under identical protocol settings (evaluation[key].settings); values measured under other "
    "settings get their own column, whose header names the differing settings.",
    "Which records count. Only completed records, one per run identity (suite, method, epochs, seed, "
    "training and evaluation fingerprints): the newest by its own created timestamp wins (ties: the file at "
    "its canonical path, then the first path); the others are listed as superseded; files that cannot be "
    "read, fail the schema (version 2), their checksum or their predictions are skipped by name.",
    "Cells. With n >= 2 seeds: mean ± sample std (ddof=1) and the 95% Student-t interval over seeds in "
    "square brackets (clipped to the metric's range). With one seed: the value and, in angle brackets, the "
    "95% bootstrap interval over the run's test images ({n_boot} resamples of the stored per-image "
    "predictions, fixed seed {seed}): percentile intervals for accuracies, basic (reflected, 2v − q97.5 to "
    "2v − q2.5) intervals for NMI, AMI, ARI and ACC, whose percentile intervals are biased upward because "
    "resampling duplicates images. For n >= 2 the image bootstrap of the mean over seeds is in the HTML "
    "tooltip and under Interval details. AMI and ARI can be negative (worse than chance).",
    f"Significance (the unit is the run). Bold = the best mean of its column among non-reference rows (same "
    f"protocol, settings and, for heads, the same K), when two such rows have a value. Every other row is "
    f"compared with it by Welch's unequal-variance t-test on the two cells' per-seed values "
    f"(scipy.stats.ttest_ind, equal_var=False); the p-values are Holm-adjusted over the column's testable "
    f"comparisons, α = {ALPHA}. {TIED} = p_Holm >= α; no mark = significantly worse; {UNTESTABLE} = not "
    "testable (a side with fewer than two seeds, or both sides without spread). Test-image sampling is not "
    "part of the test: seed-to-seed variation (initialisation, augmentation, k-means seed) is the larger "
    "noise. The forest figures draw each row's difference to the best with the interval of this test, at "
    "the level whose exclusion of 0 is the Holm verdict (1 − α·p/p_Holm).",
    "Leaderboard. Methods ranked by their average rank over the headline metrics present (kNN k=20 top-1, "
    "offline linear probe top-1, k-means clustering NMI), each method's mean over its own seeds; the rank "
    "interval resamples each method's seeds independently (bootstrap, {n_boot} replicates, fixed seed).",
    "Clustering. The headline is FAISS k-means on backbone features with K = classes (ACC = one-to-one, "
    "Hungarian); a method's own head is scored in its own table, one row per head K, with ACC (one-to-one) "
    "only for K = classes and ACC (many-to-one) for other K.",
    f"Semi-supervised columns. The random-init row becomes {SUBSET_LABEL} (trained from random weights on "
    "the labelled images only) and the supervised reference (trained on all labels) is left out; with "
    "several labelled subsets per run, per-image correctness is the mean over subsets.",
    "Papers. A cell is paired with a paper number only when method (the record's method_base, and its "
    "paper_reference equal to the paper), pretraining dataset, evaluation dataset, backbone, pretraining "
    "epochs, protocol key with its required settings (Protocol mapping) and metric all agree. Δ = ours − "
    "paper with a 95% interval (stats.delta_interval): Welch–Satterthwaite where the paper gives its std "
    "over n runs (with Welch's p); without a paper std, the prediction interval of one new run of ours "
    "(the paper's number is one run, not an exact value). Paper rows without a like-for-like run are "
    "listed with the first criterion that fails.",
)


def _normalize_formats(formats: Iterable[str]) -> tuple[str, ...]:
    wanted = {str(f).strip().lower().lstrip(".") for f in formats}
    unknown = sorted(wanted - set(FORMATS))
    if unknown:
        raise BenchmarkError(f"unknown report format(s) {', '.join(unknown)}; choose from {', '.join(FORMATS)}")
    if not wanted:
        raise BenchmarkError(f"no report format selected; choose from {', '.join(FORMATS)}")
    return tuple(f for f in FORMATS if f in wanted)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", str(text)).strip("-").lower() or "x"


def _cannot_write(path: Path, exc: OSError) -> BenchmarkError:
    reason = exc.strerror or str(exc)
    return BenchmarkError(f"cannot write the report to {path} ({reason}); choose another --out folder or fix "
                          "its permissions, then rerun")


def check_out_dir(out_dir: Path, figures: bool) -> None:
    """Before any work: the output folder exists or can be created, is a folder, and takes files."""
    for folder in (out_dir, out_dir / "figures") if figures else (out_dir,):
        if folder.exists() and not folder.is_dir():
            raise BenchmarkError(f"--out {out_dir}: {folder} is an existing file, not a folder; pass --out a "
                                 "folder (it is created if missing) or move the file away")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".write-test.", suffix=".tmp", dir=folder)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise _cannot_write(folder, exc) from exc


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Temp file in the same folder + fsync + os.replace: a reader never sees a half-written PNG."""
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _cannot_write(path, exc) from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, OUTPUT_MODE)
        os.replace(tmp_name, path)
    except BaseException as exc:
        Path(tmp_name).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise _cannot_write(path, exc) from exc
        raise
    return path


def _filters_text(suites, methods, epochs) -> str:
    parts = [f"{name} = {', '.join(str(v) for v in values)}"
             for name, values in (("suite", suites), ("methods", methods), ("epochs", epochs)) if values is not None]
    return "Filters: " + ("; ".join(parts) if parts else "none") + "."


def heading_of(table: tuple) -> str:
    suite, dataset, epochs = table
    return f"{dataset} — suite {suite}, {epochs} epochs"


KIND_NOTES = {
    "clustering": "FAISS k-means on l2-normalised backbone features with K = number of classes, for every "
                  "method and the reference rows; ACC = best one-to-one (Hungarian) matching; non-empty "
                  "clusters from the records' clusters[key] (a range over seeds where they differ).",
    "heads": "Each method's own clustering head, one row per head K (clustering_head_k<K>); ACC (one-to-one) "
             "only for K = classes, ACC (many-to-one: each cluster labelled with its majority class) for "
             "other K (over-clustering), whose one-to-one ACC is not shown; bold and † compare rows of the "
             "same K only.",
    "linear": "Offline probe: a linear classifier on frozen backbone features extracted once (views: the "
              "training views of the probe; none = clean images); online linear: the classifier trained "
              "beside pretraining. Different protocols, different columns.",
    "knn": "Weighted kNN on l2-normalised backbone features (bank: train split); a header says when k "
           "exceeds the fewest bank images of a class (evaluation[key].bank_images_per_class_min).",
    "semi": f"{SUBSET_LABEL}: the network trained from random weights on the labelled images only (the "
            "random-init row of these columns); the supervised reference, trained on all labels, is not "
            "shown. Several labelled subsets per run: per-image correctness is the mean over subsets.",
    "transfer": "Linear probe on the target dataset of the backbone pretrained on this table's dataset.",
    "blocks": "Probes on the feature maps of each backbone block (B<i>); avg = mean over blocks as recorded.",
    "other": "Protocol keys this report has no layout for, as recorded.",
}


def _points(prepared: pd.DataFrame, kind: str) -> pd.DataFrame:
    """What the marks test, per contender: its difference to the column's best and the test's interval."""
    rows = []
    contenders = prepared[~prepared["is_reference"].astype(bool)]
    for _, c in contenders.iterrows():
        if c["best"]:
            status, value = "best", 0.0
        elif c["untestable"]:
            status, value = "untestable", c["diff"]
        elif not math.isnan(c["p_holm"]):
            status, value = ("tied" if c["tied"] else "worse"), c["diff"]
        else:
            continue  # alone in its column: nothing compared
        label = f"{c['_row']} (K={c['K']})" if kind == "heads" else c["_row"]
        rows.append((c["_col"], label, value, c["diff_low"], c["diff_high"], status, c["_row_sort"]))
    return pd.DataFrame(rows, columns=["column", "row", "value", "low", "high", "status", "sort"])


def _budget_text(model: Model, table: tuple) -> str:
    """Seeds, epochs and the pretraining wall time of one table's runs (GPU-hours on a GPU)."""
    suite, dataset, epochs = table
    runs = [r.record for r in model.runs if (r.record["suite"], r.record["dataset"], r.record["epochs"])
            == (suite, dataset, epochs)]
    seeds = sorted({int(r["seed"]) for r in runs})
    seconds = sum(float(r.get("wall_time_s") or 0.0) for r in runs)
    on_gpu = any(device_of(r).startswith("cuda") for r in runs)
    cost = f"{seconds / 3600:.2f} GPU-hours" if on_gpu else f"{seconds / 60:.1f} CPU-minutes"
    return (f"{len(runs)} runs, seeds {', '.join(map(str, seeds))}, {epochs} pretraining epochs, "
            f"{cost} of pretraining and evaluation wall time in all")


def _verdicts(model: Model, table: tuple) -> list[str]:
    """Per headline metric: the best row, its margin to the runner-up, and whether the seeds support it."""
    lines = []
    for group in headline_columns(model, table)[1]:
        protocol = group["protocol"].iloc[0]
        order = group.sort_values(["mean", "row"], ascending=[False, True], kind="mergesort")
        best = order.iloc[0]
        name = f"k-means {best['column']}" if protocol == "clustering" else best["column"]
        text = f"{name}: best {best['row']} {value_text(best)} (n = {best['n']})"
        if len(order) < 2:
            lines.append(text + "; no other method measured.")
            continue
        second = order.iloc[1]
        text += (f", {fmt_delta(best['mean'] - second['mean'])} over the runner-up {second['row']} "
                 f"{fmt(second['mean'])} (n = {second['n']}); ")
        if second["untestable"]:
            text += f"the seeds cannot test the difference ({second['test_note'].removeprefix('not testable: ')})"
        elif second["tied"]:
            text += (f"the seeds do not support the difference (Welch p = {fmt_p(second['p_raw'])}, Holm "
                     f"{fmt_p(second['p_holm'])})")
        else:
            text += (f"the seeds support the difference (Welch p = {fmt_p(second['p_raw'])}, Holm "
                     f"{fmt_p(second['p_holm'])})")
        tied = int(order["tied"].sum())
        if tied:
            text += f"; {tied} row(s) in all not significantly different from the best"
        lines.append(text + ".")
    return lines


def _leaderboard_section(model: Model, table: tuple, n_boot: int) -> Section:
    ranks, columns, unranked = leaderboard(model, table, n_boot)
    section = Section("Leaderboard", 3)
    if ranks.empty:
        section.blocks.append("Not ranked: fewer than two methods have every headline metric present in this "
                              f"table ({', '.join(columns) or 'none measured'}).")
    else:
        rows, place, previous = [], 0, None
        for i, r in enumerate(ranks.itertuples(index=False), start=1):
            if previous is None or round(r.mean_rank, 9) != previous:  # ties share the better place
                place, previous = i, round(r.mean_rank, 9)
            rows.append([str(place), r.method, fmt(r.mean_rank), f"{fmt(r.rank_low)}–{fmt(r.rank_high)}",
                         str(r.n_seeds) + (UNTESTABLE if r.n_seeds < 2 else "")])
        t = plain_table(["Rank", "Method", "mean rank", "95% rank interval", "seeds"], rows, numeric_from=2)
        t.caption = (f"Average rank of each method's mean over its seeds, over {', '.join(columns)} (rank 1 "
                     "= best, ties share their average rank); the interval resamples each method's seeds "
                     f"independently ({n_boot} bootstrap replicates, fixed seed), never pairing seed s of "
                     "one method with seed s of another. Overlapping intervals: the order is not settled. "
                     f"{UNTESTABLE} = one seed: its value is fixed in the resampling. Reference rows are not "
                     "ranked.")
        section.blocks.append(t)
    if unranked:
        section.blocks.append("Not ranked (a headline metric not measured): " + "; ".join(unranked) + ".")
    return section


def _cost_section(model: Model, table: tuple) -> Section:
    """Per row: the run's recorded wall time (pretraining + evaluation, every attempt), training throughput
    and peak memory, as means over the row's runs (peak memory: the maximum)."""
    cells = model.cells
    mine = cells[(cells["table"] == table) & (cells["role"] == "")]
    values = model.values
    rows = []
    on_gpu = False
    for (label, method, fp), _ in mine.groupby(["row", "method", "settings_fp"], sort=True):
        idx = sorted({int(i) for i in values.loc[(values["method"] == method) & (values["settings_fp"] == fp)
                                                  & (values["suite"] == table[0])
                                                  & (values["dataset"] == table[1])
                                                  & (values["epochs"] == table[2]), "run"]})
        recs = [model.runs[i].record for i in idx]
        gpu = any(device_of(r).startswith("cuda") for r in recs)
        on_gpu |= gpu
        wall = [float(r["wall_time_s"]) for r in recs if r.get("wall_time_s") is not None]
        speed = [float(r["throughput_images_per_s"]) for r in recs if r.get("throughput_images_per_s")]
        peak = [float(r["peak_memory_mb"]) for r in recs if r.get("peak_memory_mb") is not None]
        sources = sorted({r.get("peak_memory_source") or ("cuda_max_allocated" if gpu else "not recorded")
                          for r in recs if r.get("peak_memory_mb") is not None})
        time_text = DASH if not wall else (f"{sum(wall) / len(wall) / 3600:.3f} GPU-h" if gpu
                                           else f"{sum(wall) / len(wall):.1f} s")
        rows.append([label, str(len(recs)), time_text,
                     DASH if not speed else f"{sum(speed) / len(speed):.0f}",
                     DASH if not peak else f"{max(peak):.0f}" + (" (RSS)" if sources == ["process_peak_rss"]
                                                                 else ""),
                     ", ".join(sorted({device_of(r) for r in recs}))])
    t = plain_table(["Method", "runs", "wall time per run", "images/s (training)", "peak memory (MB)",
                     "device"], rows, numeric_from=1)
    t.caption = ("Cost as recorded: wall time of one run (pretraining and evaluation, every attempt), mean "
                 "over the row's runs" + (", GPU-hours on a GPU" if on_gpu else "") + "; training throughput "
                 "(images per second, mean); peak memory = the maximum over the runs of the accelerator's peak "
                 "allocation, or on CPU the process's peak resident set size (RSS; an upper bound when one "
                 "process ran several runs); – = not recorded (records written before it was).")
    return Section("Cost", 3, [t])


class _Figures:
    """The report's PNG figures: drawn only when wanted, under unique deterministic names, kept by name."""

    def __init__(self, wanted: bool, cells: pd.DataFrame) -> None:
        self.wanted, self.images, self.taken = wanted, {}, set()
        self.palette = figs.palette_for(sorted(set(cells["row"]))) if wanted else {}

    def add(self, stem: str, png: bytes | None, caption: str) -> list[Figure]:
        if png is None:
            return []
        name, i = f"{stem}.png", 2
        while name in self.taken:
            name, i = f"{stem}-{i}.png", i + 1
        self.taken.add(name)
        self.images[name] = png
        return [Figure(name, caption)]

    def forest(self, prepared: pd.DataFrame, kind: str, table: tuple) -> list[Figure]:
        """Each contender's difference to its column's best with the interval of the table's test."""
        points = _points(prepared, kind) if self.wanted else None
        if points is None or points.empty:
            return []
        col_sort = dict(zip(prepared["_col"], prepared["_col_sort"]))
        columns = sorted(col_sort, key=lambda c: (col_sort[c], c))
        row_sort = points.drop_duplicates("row").set_index("row")["sort"].to_dict()
        rows = sorted(row_sort, key=lambda r: (row_sort[r], r))
        title = f"{kind_title(kind)}: {heading_of(table)}"
        png = figs.difference_plot(points, columns, rows, title, {r: self.palette.get(r.split(" (K=")[0]) for r in rows})
        caption = (f"{kind_title(kind)}, {heading_of(table)}: each method's difference to the best of the column "
                   "(diamond at 0) with the interval of the table's test (Welch's t over seeds, at the "
                   f"Holm-consistent level): an interval left of 0 = significantly worse (filled dot), "
                   f"one that reaches 0 = {TIED} (open dot); x = {UNTESTABLE} not testable (no "
                   "interval). Reference rows are not contenders and not drawn.")
        return self.add(f"forest_{_stem(table)}_{kind}", png, caption)

    def curves(self, history: pd.DataFrame, mine: pd.DataFrame, table: tuple) -> list[Section]:
        """The training curves of one table's runs, labelled as their rows."""
        hist = history[(history["suite"] == table[0]) & (history["dataset"] == table[1])
                       & (history["epochs"] == table[2])]
        if not self.wanted or hist.empty:
            return []
        labels = {(m, fp): r for m, fp, r, role in zip(mine["method"], mine["settings_fp"], mine["row"], mine["role"])
                  if not role}
        hist = hist.assign(method=[labels.get((m, fp), m) for m, fp in zip(hist["method"], hist["settings_fp"])])
        order = sorted(set(hist["method"]), key=lambda r: (r.casefold(), r))
        heading = heading_of(table)
        png = figs.curves_chart(hist, order, f"Training curves: {heading}", self.palette)
        figure = self.add(f"curves_{_stem(table)}", png,
                          f"Training curves, {heading}: mean over seeds per epoch, band = std over seeds; each "
                          "method's loss divided by its own first-epoch loss (losses of different methods have "
                          "different scales); methods with one recorded epoch are not drawn.")
        return [Section("Training curves", 3, figure)] if figure else []


def _stem(table: tuple) -> str:
    suite, dataset, epochs = table
    return f"{_slug(suite)}_{_slug(dataset)}_e{epochs}"


def _table_sections(model: Model, pairs: pd.DataFrame, history: pd.DataFrame, figures: _Figures,
                    n_boot: int = stats.N_BOOT) -> list[Section]:
    """Per table: its heading and row notes, leaderboard, cost, one grid per kind of protocol (with its forest
    figure) and the training curves."""
    sections: list[Section] = []
    cells = model.cells
    for table in sorted(set(cells["table"])):
        mine = cells[cells["table"] == table]
        top = Section(heading_of(table), 2)
        if model.row_notes.get(table):
            top.blocks += ["Rows of one method with different settings:", model.row_notes[table]]
        sections += [top, _leaderboard_section(model, table, n_boot), _cost_section(model, table)]
        for kind in KINDS:
            of_kind = mine[mine["kind"] == kind]
            if of_kind.empty:
                continue
            prepared = prepare(of_kind, kind)
            info = ("K", "source", "nonempty") if kind in ("clustering", "heads") else ()
            my_pairs = pairs[pairs["cell"].isin(of_kind.index)]
            t = grid_table(prepared, my_pairs, info)
            t.caption = table_caption(of_kind, my_pairs, [KIND_NOTES[kind]])
            sections.append(Section(kind_title(kind), 3, [t, *figures.forest(prepared, kind, table)]))
        sections += figures.curves(history, mine, table)
    return sections


def _layout_sections(papers: pd.DataFrame, model: Model, pairs: pd.DataFrame) -> list[Section]:
    section = Section("Paper tables side by side", 2, [
        "The papers' tables in their own layout, ours beside the paper's number (ours = the cell paired with "
        "that paper row under the pairing rules; – = no like-for-like run)."])
    empty, out = [], [section]
    cells = model.cells
    for layout in LAYOUTS:
        grid = layout_cells(layout, papers, pairs)
        # shown when a run fills a cell, or (per-block layouts) when runs measured its protocols at all: then
        # the paper's numbers stand beside ours' "–" and the unmatched list says why they are not compared
        measured = layout_measured(layout, cells)
        if not measured and not any(c for row in grid for _, c in row):
            empty.append(f"{layout.paper} {layout.table}")
            continue
        header = [f.replace("eval_dataset", "Dataset").replace("method", "Method") for f in layout.row_fields]
        for label in layout.col_labels:
            header += [f"{label} ours", f"{label} paper"]
        rows = []
        for values, cols in zip(layout.rows, grid):
            row = [str(v) for v in values]
            for hit, idx in cols:
                if not idx:
                    row.append(DASH)
                elif len(idx) == 1:
                    row.append(value_text(cells.loc[idx[0]]))
                else:
                    row.append("; ".join(f"{cells.at[i, 'row']}: {value_text(cells.loc[i])}" for i in idx))
                if hit.empty:
                    row.append(DASH)
                else:
                    p = hit.iloc[0]
                    row.append(fmt(p["value"]) + ("" if math.isnan(p["std"]) else f" ± {fmt(p['std'])}"))
            rows.append(row)
        t = plain_table(header, rows, numeric_from=len(layout.row_fields))
        t.caption = layout.note
        out.append(Section(layout.title, 3, [t]))
    section.blocks.append("No runs yet: " + ("; ".join(empty) if empty else "none") + ".")
    return out


def _pairs_section(model: Model, pairs: pd.DataFrame, unrelated: int = 0) -> Section:
    section = Section("Comparison with the papers", 2)
    if unrelated:
        section.blocks.append(f"{unrelated} paper number(s) concern other datasets than this report's: not "
                              "compared, listed in the appendix (Paper rows about other datasets).")
    if pairs.empty:
        section.blocks.append("No cell has a like-for-like paper number.")
        return section
    cells = model.cells
    rows = []
    for p in pairs.sort_values(["cell", "line"]).itertuples(index=False):
        c = cells.loc[p.cell]
        rows.append([heading_of(c["table"]), c["row"], c["column"], value_text(c), paper_text(p),
                     f"{p.source}, CSV line {p.line}" + (f", {p.paper_n} runs" if p.paper_n else ""),
                     delta_text(p), fmt_p(p.welch_p)])
    section.blocks.append(plain_table(["Table", "Row", "Column", "Ours", "Paper", "Source", "Δ [95%]",
                                       "Welch p"], rows, numeric_from=3))
    return section


def _unmatched_rows(unmatched: pd.DataFrame) -> list[list[str]]:
    keys = ["paper", "table", "method", "pretrain_dataset", "eval_dataset", "backbone", "epochs", "protocol",
            "reason"]
    frame = unmatched.assign(epochs=[DASH if pd.isna(e) else str(int(e)) for e in unmatched["epochs"]])
    rows = []
    for group_key, group in frame.groupby(keys, sort=False):
        values = ", ".join(f"{m} {fmt(v)}" + ("" if math.isnan(s) else f" ± {fmt(s)}")
                           for m, v, s in zip(group["metric"], group["value"], group["std"]))
        *fields, reason = group_key
        rows.append([*fields, values, reason])
    return rows


UNMATCHED_HEADER = ["Paper", "Table", "Method", "Pretrain", "Eval", "Backbone", "Epochs", "Protocol", "Values",
                    "Why not compared"]


def split_unrelated(unmatched: pd.DataFrame, datasets: set[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(paper rows about the report's datasets, rows about other datasets only)."""
    names = {d.casefold() for d in datasets}
    related = unmatched["pretrain_dataset"].str.casefold().isin(names) | \
        unmatched["eval_dataset"].str.casefold().isin(names)
    return unmatched[related], unmatched[~related]


def _unmatched_section(unmatched: pd.DataFrame) -> Section:
    section = Section("Paper numbers without a matching run", 2)
    if unmatched.empty:
        section.blocks.append("Every paper number about this report's datasets is paired with a run.")
        return section
    section.blocks.append("Listed for reference only, never compared; one line per paper row group, with the "
                          "first pairing criterion that fails.")
    section.blocks.append(plain_table(UNMATCHED_HEADER, _unmatched_rows(unmatched)))
    return section


def _unrelated_section(unrelated: pd.DataFrame) -> Section:
    section = Section("Paper rows about other datasets", 2)
    if unrelated.empty:
        section.blocks.append("None.")
    else:
        section.blocks.append(plain_table(UNMATCHED_HEADER, _unmatched_rows(unrelated)))
    return section


def _mapping_section() -> Section:
    rows = [[p.paper, p.table, p.protocol, describe(p.ours, dict(p.place)) if p.ours else "none",
             ", ".join(f"{k}={v}" for k, v in p.settings) or "–", p.source] for p in PROTOCOLS]
    t = plain_table(["Paper", "Table", "CSV protocol", "Ours", "Required settings", "Where the paper says "
                                                                                       "so"],
                    rows)
    t.caption = ("{eval} = the evaluation dataset, {C} = its number of classes, {3C} = three times that. "
                 "Backbones: resnet18_cifar/resnet18 = ResNet-18, resnet50 = ResNet-50, nin = NIN; small_cnn "
                 "has no paper counterpart.")
    return Section("Protocol mapping", 2, [t])


def _details_section(model: Model) -> Section:
    cells = model.cells
    multi = cells[cells["n"] >= 2]
    section = Section("Interval details (n ≥ 2)", 2)
    if multi.empty:
        section.blocks.append("No cell has two seeds or more.")
        return section
    rows = []
    for _, c in multi.sort_values(["table", "row", "key", "metric", "settings"]).iterrows():
        boot = DASH if math.isnan(c["img_low"]) else \
            f"{interval(c['img_low'], c['img_high'])} ({c['img_method']})"
        seeds = ",".join(map(str, c["seeds"]))
        rows.append([heading_of(c["table"]), c["row"], c["column"], f"{c['n']} ({seeds})",
                     f"{fmt(c['mean'])} ± {fmt(c['std'])}", interval(c["t_low"], c["t_high"]),
                     boot if boot != DASH else c["img_note"] or DASH, c["test_note"] or DASH])
    section.blocks.append(plain_table(["Table", "Row", "Column", "n (seeds)", "mean ± std",
                                       "95% t over seeds", "95% bootstrap over images (mean over seeds)",
                                       "vs best"], rows))
    return section


def _record_sections(loaded: LoadedRecords, model: Model) -> list[Section]:
    runs = Section("Runs not in the tables", 2)
    if not loaded.excluded:
        runs.blocks.append("None: every selected run completed.")
    else:
        rows = [[r.path, r.record["suite"], r.record["method"], str(r.record["epochs"]),
                 str(r.record["seed"]), r.record["status"], r.record.get("message") or DASH]
                for r in loaded.excluded]
        runs.blocks.append(plain_table(["File", "Suite", "Method", "Epochs", "Seed", "Status", "Message"],
                                       rows))
    superseded = Section("Superseded records", 2)
    items = sorted(loaded.superseded + model.superseded, key=lambda s: (s.path, s.what))
    if not items:
        superseded.blocks.append("None: one record per run identity.")
    else:
        superseded.blocks.append("A newer valid record of the same run identity (suite, method, epochs, "
                                 "seed, training and evaluation fingerprints; or, for one protocol's values, "
                                 "the same row, seed and protocol settings) replaced these; they are not in "
                                 "the tables.")
        superseded.blocks.append(plain_table(["File", "Created", "Replaced by", "Its created", "What"],
                                             [[s.path, s.created, s.winner, s.winner_created, s.what]
                                              for s in items]))
    skipped = Section("Skipped records", 2, [[str(s) for s in loaded.skipped]] if loaded.skipped
                      else ["None: every record file could be read."])
    sections = [runs, superseded, skipped]
    if model.dropped:
        sections.append(Section("Values not shown", 2, [sorted(model.dropped)]))
    return sections


@dataclass
class BuildOptions:
    """What ``build_report`` builds: filters (None = all), formats, the papers' CSV, figures, where progress
    goes and the bootstrap resamples."""

    suites: Sequence[str] | None = None
    methods: Sequence[str] | None = None
    epochs: Sequence[int] | None = None
    formats: Iterable[str] = FORMATS
    paper_csv: str | Path | None = None
    figures: bool = True
    stderr: TextIO | None = None
    n_boot: int = stats.N_BOOT

    def __post_init__(self) -> None:
        self.formats = _normalize_formats(self.formats)
        self.suites = None if self.suites is None else sorted({str(s) for s in self.suites})
        self.methods = None if self.methods is None else sorted({str(m) for m in self.methods})
        self.epochs = None if self.epochs is None else sorted({int(e) for e in self.epochs})
        self.stderr = sys.stderr if self.stderr is None else self.stderr


def _load(results_dir: Path, opts: BuildOptions) -> LoadedRecords:
    loaded = load_records(results_dir, opts.suites, opts.methods, opts.epochs)
    if loaded.skipped:
        count = len(loaded.skipped)
        print(f"skipped {count} record file{'s' if count != 1 else ''} (the build goes on without "
              f"{'them' if count != 1 else 'it'}):", file=opts.stderr)
        for skipped in loaded.skipped:
            print(f"  {skipped}", file=opts.stderr)
    return loaded


def _summary_section(loaded: LoadedRecords, model: Model, opts: BuildOptions) -> Section:
    summary = Section("Summary", 2, [
        f"{len(loaded.completed)} completed run(s) in the tables; {len(loaded.excluded)} run(s) not "
        f"completed; {len(loaded.superseded)} record(s) superseded; {len(loaded.skipped)} record file(s) "
        "skipped (all listed in the appendix). " + _filters_text(opts.suites, opts.methods, opts.epochs)])
    for table in sorted(set(model.cells["table"])) if not model.cells.empty else []:
        summary.blocks.append(f"{heading_of(table)} ({_budget_text(model, table)}):")
        summary.blocks.append(_verdicts(model, table) or ["no headline metric (kNN k=20, linear, k-means "
                                                          "NMI) measured"])
    if loaded.skipped:
        summary.blocks.append([str(s) for s in loaded.skipped])
    if not loaded.completed:
        summary.blocks.append("No completed run matches: there is no result table.")
    return summary


def _write(out_dir: Path, sections: list[Section], images: dict[str, bytes], formats) -> tuple[dict, list]:
    """The figures (stale ones of earlier builds removed) and the report in each format."""
    figure_paths = [atomic_write_bytes(out_dir / "figures" / name, images[name]) for name in sorted(images)]
    if (out_dir / "figures").is_dir():
        for stale in sorted((out_dir / "figures").glob("*.png")):  # figures of earlier builds (other filters)
            if stale.name not in images and FIGURE_PATTERN.fullmatch(stale.name):
                stale.unlink()
    paths: dict[str, Path] = {}
    for fmt_ in formats:
        paths[fmt_] = atomic_write_text(out_dir / FILE_NAMES[fmt_], render(fmt_, TITLE, sections, images))
        os.chmod(paths[fmt_], OUTPUT_MODE)  # mkstemp creates 0600; a report is meant to be read by others
    return paths, figure_paths


def _sections(loaded: LoadedRecords, model: Model, opts: BuildOptions) -> tuple[list[Section], dict, dict]:
    """Every section of the report in order, the figures' PNG bytes, and the data behind the paper tables."""
    history = history_frame(loaded.completed)
    papers = relevant_papers(load_paper_results(opts.paper_csv), loaded.completed + loaded.excluded, opts.suites,
                             opts.methods, opts.epochs)
    pairs, unmatched = pair_with_papers(model.cells, papers)
    figures = _Figures(opts.figures, model.cells)
    appendix = Section("Appendix: how the numbers are made", 2,
                       [[c.format(n_boot=opts.n_boot, seed=stats.SEED) for c in CONVENTIONS]], collapsible=True)
    datasets = set(model.cells["dataset"]) if not model.cells.empty else set()
    related, unrelated = split_unrelated(unmatched, datasets)
    details = [_unmatched_section(related), _mapping_section(), _details_section(model),
               *_record_sections(loaded, model), _unrelated_section(unrelated)]
    for section in details:
        section.collapsible = True
    sections = [_summary_section(loaded, model, opts), Section("How to read this", 2, [list(HOW_TO_READ)]),
                *_table_sections(model, pairs, history, figures, opts.n_boot),
                *_layout_sections(papers, model, pairs), _pairs_section(model, pairs, len(unrelated)), appendix,
                *details]
    return sections, figures.images, {"pairs": pairs, "unmatched_paper": unmatched, "history": history}


def build_report(results_dir: str | Path = "results", out_dir: str | Path = "reports/generated",
                 **options) -> dict:
    """Build the report; return written paths and the data behind the tables. `options`: the fields of
    ``BuildOptions`` (suites, methods, epochs, formats, paper_csv, figures, stderr, n_boot).

    Returns a dict with ``paths`` ({format: Path}), ``figures`` (PNG Paths), ``cells`` (one row per cell,
    see ``reports.cells.build_model``; also under ``aggregated``), ``values`` (one row per seed), ``pairs``
    (paired cells with Δ and Welch p), ``unmatched_paper`` (paper rows not compared, with ``reason``),
    ``excluded`` (runs not completed), ``skipped`` (``Skipped``), ``superseded`` (``Superseded``),
    ``history`` and ``leaderboards`` ({table: ranks}).
    """
    opts = BuildOptions(**options)
    results_dir, out_dir = Path(results_dir), Path(out_dir)
    if not results_dir.is_dir():
        raise BenchmarkError(f"results folder {results_dir} does not exist or is not a folder; pass "
                             "--results DIR (the folder of run records that `python -m benchmarks run` "
                             "writes)")
    check_out_dir(out_dir, opts.figures)
    loaded = _load(results_dir, opts)
    model = build_model(loaded.completed, opts.n_boot)
    sections, images, data = _sections(loaded, model, opts)
    paths, figure_paths = _write(out_dir, sections, images, opts.formats)
    tables = sorted(set(model.cells["table"])) if not model.cells.empty else []
    return {"paths": paths, "figures": figure_paths, "cells": model.cells, "aggregated": model.cells,
            "values": model.values, **data, "excluded": loaded.excluded, "skipped": list(loaded.skipped),
            "superseded": list(loaded.superseded) + list(model.superseded),
            "leaderboards": {t: leaderboard(model, t, opts.n_boot)[0] for t in tables}, "headline": HEADLINE}
