"""Build the benchmark report from the run records: ``build_report`` (Python) / ``python -m reports build``.

Records' cells (``reports.cells``), paired with the papers (``reports.papers``), laid out as sections and rendered by
``reports.render``'s templates into report.md/.tex/.html and figures/*.png; the rules behind every number are the
appendix (``templates/text.yaml``). Same records, same bytes: all sorted, fixed bootstrap seeds, no timestamps.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
import pandas as pd

from benchmarks.errors import BenchmarkError
from benchmarks.records import atomic_write, atomic_write_text, check_writable_folder
from reports import figures as figs
from reports import papers, render, stats
from reports.cells import KIND_TITLES, Model, build_model, headline_columns, leaderboard
from reports.data import LoadedRecords, device_of, history_frame, load_paper_results, load_records
from reports.render import DASH, Figure, Section, fmt, fmt_p, paper_text, plain_table, text, value_text

FORMATS = ("md", "tex", "html")
TITLE = "Self-supervised representation learning benchmark"
FIGURE_PATTERN = re.compile(r"(forest|bars|curves)_[a-z0-9_.-]+\.png")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", str(text)).strip("-").lower() or "x"


def heading_of(table: tuple) -> str:
    suite, dataset, epochs = table
    return f"{dataset} — suite {suite}, {epochs} epochs"


def _stem(table: tuple) -> str:
    suite, dataset, epochs = table
    return f"{_slug(suite)}_{_slug(dataset)}_e{epochs}"


def listing(name: str, rows: list[list[str]], numeric_from: int | None = None) -> Section:
    """`rows` under ``text.yaml``'s `listings.<name>` header (after its intro), or its sentence for none."""
    spec = text(f"listings.{name}")
    if not rows:
        return Section(spec["title"], 2, [spec["empty"]])
    return Section(spec["title"], 2, [*([spec["intro"]] if "intro" in spec else []),
                                      plain_table(spec["header"], rows, numeric_from)])


def _points(prepared: pd.DataFrame, kind: str) -> pd.DataFrame:
    """Per contender compared with its column's best: the difference and the test's interval, and its mark."""
    c = prepared[~prepared["is_reference"].astype(bool)]
    status = np.select([c["best"].astype(bool), c["untestable"].astype(bool), c["p_holm"].notna()],
                       ["best", "untestable", np.where(c["tied"].astype(bool), "tied", "worse")], "")
    rows = c["_row"] + (" (K=" + c["K"].astype(str) + ")" if kind == "heads" else "")
    points = pd.DataFrame({"column": c["_col"], "row": rows, "value": np.where(status == "best", 0.0, c["diff"]),
                           "low": c["diff_low"], "high": c["diff_high"], "status": status, "sort": c["_row_sort"]})
    return points[status != ""].reset_index(drop=True)


def _of_table(frame: pd.DataFrame, table: tuple) -> pd.DataFrame:
    return frame[frame[["suite", "dataset", "epochs"]].eq(list(table)).all(axis=1)]


def _runs_frame(runs: Sequence) -> pd.DataFrame:
    """One row per run: its table, method, settings, seed, device and recorded cost."""
    costs = ["wall_time_s", "throughput_images_per_s", "peak_memory_mb", "peak_memory_source"]
    frame = pd.DataFrame([(r["suite"], r["dataset"], r["epochs"], r["method"], r["fingerprints"]["settings"],
                           int(r["seed"]), device_of(r), *(r.get(key) for key in costs))
                          for r in (run.record for run in runs)],
                         columns=["suite", "dataset", "epochs", "method", "settings_fp", "seed", "device", *costs])
    return frame.assign(gpu=frame["device"].str.startswith("cuda"))


def _budget_text(runs: pd.DataFrame, table: tuple) -> str:
    """Seeds, epochs and the pretraining wall time of one table's runs (GPU-hours on a GPU)."""
    runs = _of_table(runs, table)
    seconds = runs["wall_time_s"].astype(float).sum()  # a required number of every record
    cost = f"{seconds / 3600:.2f} GPU-hours" if runs["gpu"].any() else f"{seconds / 60:.1f} CPU-minutes"
    return text("summary.budget", runs=len(runs), seeds=", ".join(map(str, sorted(set(runs["seed"])))),
                epochs=table[2], cost=cost)


def _verdict(column: pd.DataFrame) -> str:
    """The best row of a headline column, its margin to the runner-up, and whether the seeds support it."""
    order = column.sort_values(["mean", "row"], ascending=[False, True], kind="mergesort")
    best = order.iloc[0]
    name = f"k-means {best['column']}" if best["protocol"] == "clustering" else best["column"]
    line = f"{name}: best {best['row']} {value_text(best)} (n = {best['n']})"
    if len(order) < 2:
        return line + "; no other method measured."
    second = order.iloc[1]
    line += (f", {render.fmt_delta(best['mean'] - second['mean'])} over the runner-up {second['row']} "
             f"{fmt(second['mean'])} (n = {second['n']}); ")
    if second["untestable"]:
        line += f"the seeds cannot test the difference ({second['test_note'].removeprefix('not testable: ')})"
    else:
        line += (f"the seeds {'do not support' if second['tied'] else 'support'} the difference (Welch p = "
                 f"{fmt_p(second['p_raw'])}, Holm {fmt_p(second['p_holm'])})")
    tied = int(order["tied"].sum())
    return line + (f"; {tied} row(s) in all not significantly different from the best" if tied else "") + "."


def _leaderboard_section(board: tuple, n_boot: int) -> Section:
    ranks, columns, unranked = board  # reports.cells.leaderboard's
    section = Section("Leaderboard", 3)
    if ranks.empty:
        section.blocks.append(text("leaderboard.not_ranked", columns=", ".join(columns) or "none measured"))
    else:
        place = ranks["mean_rank"].round(9).rank(method="min").astype(int)  # ties share the better place
        rows = [[str(p), r.method, fmt(r.mean_rank), f"{fmt(r.rank_low)}–{fmt(r.rank_high)}",
                 str(r.n_seeds) + (render.UNTESTABLE if r.n_seeds < 2 else "")]
                for p, r in zip(place, ranks.itertuples(index=False))]
        t = plain_table(["Rank", "Method", "mean rank", "95% rank interval", "seeds"], rows, numeric_from=2)
        t.caption = text("captions.leaderboard", columns=", ".join(columns), n_boot=n_boot)
        section.blocks.append(t)
    if unranked:
        section.blocks.append(text("leaderboard.unranked", rows="; ".join(unranked)))
    return section


def _cost_row(label: str, runs: pd.DataFrame) -> list[str]:
    gpu = runs["gpu"].any()
    wall = runs["wall_time_s"].astype(float).mean()  # a required number; a row's cells come from its runs
    speed = runs["throughput_images_per_s"].dropna().astype(float).loc[lambda s: s != 0]
    peak = runs.dropna(subset=["peak_memory_mb"])
    sources = {s or ("cuda_max_allocated" if gpu else "not recorded") for s in peak["peak_memory_source"]}
    return [label, str(len(runs)), f"{wall / 3600:.3f} GPU-h" if gpu else f"{wall:.1f} s",
            DASH if speed.empty else f"{speed.mean():.0f}",
            DASH if peak.empty else f"{peak['peak_memory_mb'].astype(float).max():.0f}"
            + (" (RSS)" if sources == {"process_peak_rss"} else ""),
            ", ".join(sorted(set(runs["device"])))]


def _cost_section(mine: pd.DataFrame, runs: pd.DataFrame) -> Section:
    """Per row: means over its runs of recorded wall time (all attempts), throughput; the peak memory's maximum."""
    rows = mine[mine["role"] == ""].drop_duplicates(["row", "method", "settings_fp"])
    groups = [(r.row, runs[(runs["method"] == r.method) & (runs["settings_fp"] == r.settings_fp)])
              for r in rows.sort_values(["row", "method", "settings_fp"]).itertuples()]
    t = plain_table(["Method", "runs", "wall time per run", "images/s (training)", "peak memory (MB)", "device"],
                    [_cost_row(label, g) for label, g in groups], numeric_from=1)
    t.caption = text("captions.cost", gpu=", GPU-hours on a GPU" if any(g["gpu"].any() for _, g in groups) else "")
    return Section("Cost", 3, [t])


class _Figures:
    """The report's PNG figures: drawn only when wanted, under unique deterministic names, kept by name."""

    def __init__(self, wanted: bool, cells: pd.DataFrame, history: pd.DataFrame) -> None:
        self.wanted, self.images, self.history = wanted, {}, history
        self.palette = figs.palette_for(cells["row"]) if wanted else {}

    def add(self, stem: str, png: bytes | None, caption: str) -> list[Figure]:
        if png is None:
            return []
        name, i = f"{stem}.png", 2
        while name in self.images:
            name, i = f"{stem}-{i}.png", i + 1
        self.images[name] = png
        return [Figure(name, caption)]

    def forest(self, prepared: pd.DataFrame, kind: str, table: tuple) -> list[Figure]:
        """Each contender's difference to its column's best with the interval of the table's test."""
        if not self.wanted or (points := _points(prepared, kind)).empty:
            return []
        rows = render.in_order(points["row"], points["sort"])
        png = figs.difference_plot(points, render.in_order(prepared["_col"], prepared["_col_sort"]), rows,
                                   f"{KIND_TITLES[kind]}: {heading_of(table)}",
                                   {r: self.palette.get(r.split(" (K=")[0]) for r in rows})
        caption = text("captions.forest", kind=KIND_TITLES[kind], heading=heading_of(table))
        return self.add(f"forest_{_stem(table)}_{kind}", png, caption)

    def curves(self, mine: pd.DataFrame, table: tuple) -> list[Section]:
        """The training curves of one table's runs, labelled as their rows."""
        hist = _of_table(self.history, table)
        if not self.wanted or hist.empty:
            return []
        labels = {(m, fp): r for m, fp, r, role in zip(mine["method"], mine["settings_fp"], mine["row"], mine["role"])
                  if not role}
        hist = hist.assign(method=[labels.get((m, fp), m) for m, fp in zip(hist["method"], hist["settings_fp"])])
        order = sorted(set(hist["method"]), key=lambda r: (r.casefold(), r))
        png = figs.curves_chart(hist, order, f"Training curves: {heading_of(table)}", self.palette)
        figure = self.add(f"curves_{_stem(table)}", png, text("captions.curves", heading=heading_of(table)))
        return [Section("Training curves", 3, figure)] if figure else []


def _table_sections(model: Model, boards: dict, runs: pd.DataFrame, pairs: pd.DataFrame, figures: _Figures,
                    n_boot: int) -> list[Section]:
    """Per table (`boards`' keys, its leaderboard): heading and row notes, leaderboard, cost, a grid (and forest
    figure) per kind, training curves."""
    sections: list[Section] = []
    cells = model.cells
    for table, board in boards.items():
        mine = cells[cells["table"] == table]
        top = Section(heading_of(table), 2)
        if model.row_notes.get(table):
            top.blocks += ["Rows of one method with different settings:", model.row_notes[table]]
        sections += [top, _leaderboard_section(board, n_boot), _cost_section(mine, _of_table(runs, table))]
        for kind in KIND_TITLES:
            of_kind = mine[mine["kind"] == kind]
            if of_kind.empty:
                continue
            prepared = render.prepare(of_kind, kind)
            my_pairs = pairs[pairs["cell"].isin(of_kind.index)]
            info = ("K", "source", "nonempty") if kind in ("clustering", "heads") else ()
            t = render.grid_table(prepared, my_pairs, info)
            t.caption = render.table_caption(of_kind, my_pairs, [text(f"kind_notes.{kind}")])
            sections.append(Section(KIND_TITLES[kind], 3, [t, *figures.forest(prepared, kind, table)]))
        sections += figures.curves(mine, table)
    return sections


def _layout_rows(layout, grid: list, cells: pd.DataFrame) -> list[list[str]]:
    """A paper's table in its layout: per column ours (the paired cells) beside the paper's number."""
    rows = []
    for values, cols in zip(layout.rows, grid):
        row = [str(v) for v in values]
        for hit, idx in cols:
            ours = [value_text(cells.loc[i]) for i in idx]
            row.append(DASH if not idx else ours[0] if len(idx) == 1 else
                       "; ".join(f"{cells.at[i, 'row']}: {v}" for i, v in zip(idx, ours)))
            row.append(DASH if hit.empty else paper_text(hit["value"].iloc[0], hit["std"].iloc[0]))
        rows.append(row)
    return rows


def _layout_sections(paper_rows: pd.DataFrame, model: Model, pairs: pd.DataFrame) -> list[Section]:
    section = Section("Paper tables side by side", 2, [text("layouts.intro")])
    empty, out = [], [section]
    for layout in papers.LAYOUTS:
        grid = papers.layout_cells(layout, paper_rows, pairs)
        # shown when a run fills a cell, or (per-block layouts) when runs measured its protocols at all: then
        # the paper's numbers stand beside ours' "–" and the unmatched list says why they are not compared
        if not papers.layout_measured(layout, model.cells) and not any(c for row in grid for _, c in row):
            empty.append(f"{layout.paper} {layout.table}")
            continue
        header = [f.replace("eval_dataset", "Dataset").replace("method", "Method") for f in layout.row_fields]
        header += [f"{label} {side}" for label in layout.col_labels for side in ("ours", "paper")]
        t = plain_table(header, _layout_rows(layout, grid, model.cells), numeric_from=len(layout.row_fields))
        t.caption = layout.note
        out.append(Section(layout.title, 3, [t]))
    section.blocks.append(text("layouts.empty", layouts="; ".join(empty) if empty else "none"))
    return out


def _pairs_section(model: Model, pairs: pd.DataFrame, unrelated: int = 0) -> Section:
    rows = []
    for p in pairs.sort_values(["cell", "line"]).itertuples(index=False):
        c = model.cells.loc[p.cell]
        source = f"{p.source}, CSV line {p.line}" + (f", {p.paper_n} runs" if p.paper_n else "")
        rows.append([heading_of(c["table"]), c["row"], c["column"], value_text(c),
                     paper_text(p.paper_value, p.paper_std), source, render.delta_text(p), fmt_p(p.welch_p)])
    section = listing("pairs", rows, numeric_from=3)
    section.blocks[:0] = [text("unrelated_count", count=unrelated)] if unrelated else []
    return section


def _unmatched_rows(unmatched: pd.DataFrame) -> list[list[str]]:
    """One row per paper row group (paper, table, method, datasets, backbone, epochs, protocol, reason)."""
    keys = ["paper", "table", "method", "pretrain_dataset", "eval_dataset", "backbone", "epochs", "protocol", "reason"]
    frame = unmatched.assign(epochs=[DASH if pd.isna(e) else str(int(e)) for e in unmatched["epochs"]])
    return [[*fields, ", ".join(f"{m} {paper_text(v, s)}" for m, v, s in zip(g["metric"], g["value"], g["std"])),
             reason] for (*fields, reason), g in frame.groupby(keys, sort=False)]


def split_unrelated(unmatched: pd.DataFrame, datasets: set[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(paper rows about the report's datasets, rows about other datasets only)."""
    names = {d.casefold() for d in datasets}
    related = unmatched[["pretrain_dataset", "eval_dataset"]].apply(lambda d: d.str.casefold().isin(names)).any(axis=1)
    return unmatched[related], unmatched[~related]


def _mapping_section() -> Section:
    section = listing("mapping", [[p.paper, p.table, p.protocol, papers.describe(p.ours, dict(p.place)) if p.ours
                                   else "none", ", ".join(f"{k}={v}" for k, v in p.settings) or DASH, p.source]
                                  for p in papers.PROTOCOLS])
    section.blocks[-1].caption = text("captions.mapping")
    return section


def _details_rows(model: Model) -> list[list[str]]:
    """Per cell with n >= 2: its seeds, mean ± std, t-interval, image bootstrap and test against the best."""
    multi = model.cells[model.cells["n"] >= 2].sort_values(["table", "row", "key", "metric", "settings"])
    return [[heading_of(c["table"]), c["row"], c["column"], f"{c['n']} ({','.join(map(str, c['seeds']))})",
             f"{fmt(c['mean'])} ± {fmt(c['std'])}", render.interval(c["t_low"], c["t_high"]),
             c["img_note"] or DASH if math.isnan(c["img_low"])
             else f"{render.interval(c['img_low'], c['img_high'])} ({c['img_method']})", c["test_note"] or DASH]
            for _, c in multi.iterrows()]


def _record_sections(loaded: LoadedRecords, model: Model) -> list[Section]:
    runs = [[r.path, r.record["suite"], r.record["method"], str(r.record["epochs"]), str(r.record["seed"]),
             r.record["status"], r.record.get("message") or DASH] for r in loaded.excluded]
    superseded = [[s.path, s.created, s.winner, s.winner_created, s.what]
                  for s in sorted(loaded.superseded + model.superseded, key=lambda s: (s.path, s.what))]
    skipped = Section("Skipped records", 2, [[str(s) for s in loaded.skipped]] if loaded.skipped
                      else ["None: every record file could be read."])
    sections = [listing("runs", runs), listing("superseded", superseded), skipped]
    if model.dropped:
        sections.append(Section("Values not shown", 2, [sorted(model.dropped)]))
    return sections


def _listed(values: Iterable | None) -> list[str] | None:
    """Sorted distinct names; a comma also separates them ("simclr,byol" as on the command line)."""
    if values is None:
        return None
    return sorted({part.strip() for value in values for part in str(value).split(",") if part.strip()})


@dataclass
class BuildOptions:
    """What ``build_report`` builds: filters (None = all), formats, papers' CSV, figures, stderr, resamples."""

    suites: Sequence[str] | None = None
    methods: Sequence[str] | None = None
    epochs: Sequence[int] | None = None
    formats: Iterable[str] = FORMATS
    paper_csv: str | Path | None = None
    figures: bool = True
    stderr: TextIO | None = None
    n_boot: int = stats.N_BOOT

    def __post_init__(self) -> None:
        wanted = set(_listed([str(f).lower().lstrip(".") for f in self.formats]))
        unknown = ", ".join(sorted(wanted - set(FORMATS)))
        if unknown or not wanted:
            what = f"unknown report format(s) {unknown}" if unknown else "no report format selected"
            raise BenchmarkError(f"{what}; choose from {', '.join(FORMATS)}")
        self.formats = tuple(f for f in FORMATS if f in wanted)
        self.suites, self.methods = _listed(self.suites), _listed(self.methods)
        if self.epochs is not None:
            epochs = _listed(self.epochs)
            if not all(e.isdigit() for e in epochs):
                raise BenchmarkError(f"--epochs takes whole numbers, got {', '.join(epochs)}")
            self.epochs = sorted({int(e) for e in epochs})
        self.stderr = self.stderr or sys.stderr

    def filters_text(self) -> str:
        parts = [f"{name} = {', '.join(str(v) for v in values)}" for name, values in
                 (("suite", self.suites), ("methods", self.methods), ("epochs", self.epochs)) if values is not None]
        return "; ".join(parts) if parts else "none"


def _load(results_dir: Path, opts: BuildOptions) -> LoadedRecords:
    loaded = load_records(results_dir, opts.suites, opts.methods, opts.epochs)
    if loaded.skipped:
        many = len(loaded.skipped) != 1
        print(f"skipped {len(loaded.skipped)} record file{'s' if many else ''} (the build goes on without "
              f"{'them' if many else 'it'}):", *(f"  {skipped}" for skipped in loaded.skipped), sep="\n",
              file=opts.stderr)
    return loaded


def _summary_section(loaded: LoadedRecords, model: Model, runs: pd.DataFrame, opts: BuildOptions) -> Section:
    summary = Section("Summary", 2, [text("summary.counts", completed=len(loaded.completed),
                                          excluded=len(loaded.excluded), superseded=len(loaded.superseded),
                                          skipped=len(loaded.skipped), filters=opts.filters_text())])
    for table in sorted(set(model.cells["table"])):
        summary.blocks.append(f"{heading_of(table)} ({_budget_text(runs, table)}):")
        verdicts = [_verdict(column) for column in headline_columns(model, table)[1]]
        summary.blocks.append(verdicts or [text("summary.no_headline")])
    if loaded.skipped:
        summary.blocks.append([str(s) for s in loaded.skipped])
    if not loaded.completed:
        summary.blocks.append(text("summary.no_run"))
    return summary


def _write(out_dir: Path, sections: list[Section], images: dict[str, bytes], formats) -> tuple[dict, list]:
    """The figures (stale ones of earlier builds removed) and the report in each format, each written atomically
    (a reader never sees half a file) with the mode of the umask, as every file the suite writes."""
    figure_paths = [atomic_write(out_dir / "figures" / name, lambda handle, png=images[name]: handle.write(png))
                    for name in sorted(images)]
    for stale in sorted((out_dir / "figures").glob("*.png")):  # figures of earlier builds (other filters)
        if stale.name not in images and FIGURE_PATTERN.fullmatch(stale.name):
            stale.unlink()
    paths = {f: atomic_write_text(out_dir / f"report.{f}", render.render(f, TITLE, sections, images))
             for f in formats}
    return paths, figure_paths


def _sections(loaded: LoadedRecords, model: Model, opts: BuildOptions) -> tuple[list[Section], dict, dict]:
    """Every section of the report in order, the figures' PNG bytes, and the data behind the paper tables."""
    history = history_frame(loaded.completed)
    paper_rows = papers.relevant_papers(load_paper_results(opts.paper_csv), loaded.completed + loaded.excluded,
                                        opts.suites, opts.methods, opts.epochs)
    pairs, unmatched = papers.pair_with_papers(model.cells, paper_rows)
    figures = _Figures(opts.figures, model.cells, history)
    runs = _runs_frame(model.runs)
    boards = {table: leaderboard(model, table, opts.n_boot) for table in sorted(set(model.cells["table"]))}
    related, unrelated = split_unrelated(unmatched, set(model.cells["dataset"]))
    conventions = text("conventions", n_boot=opts.n_boot, seed=stats.SEED)
    appendix = [Section("Appendix: how the numbers are made", 2, [conventions]),
                listing("unmatched", _unmatched_rows(related)), _mapping_section(),
                listing("details", _details_rows(model)), *_record_sections(loaded, model),
                listing("unrelated", _unmatched_rows(unrelated))]
    for section in appendix:  # all closed in HTML
        section.collapsible = True
    sections = [_summary_section(loaded, model, runs, opts), Section("How to read this", 2, [text("how_to_read")]),
                *_table_sections(model, boards, runs, pairs, figures, opts.n_boot),
                *_layout_sections(paper_rows, model, pairs), _pairs_section(model, pairs, len(unrelated)), *appendix]
    return sections, figures.images, {"pairs": pairs, "unmatched_paper": unmatched, "history": history,
                                      "leaderboards": {table: board[0] for table, board in boards.items()}}


def build_report(results_dir: str | Path = "results", out_dir: str | Path = "reports/generated",
                 **options) -> dict:
    """Build the report (`options`: ``BuildOptions``' fields); return a dict of the written ``paths``
    ({format: Path}) and ``figures``, and the data behind the tables: ``cells`` (see ``reports.cells.build_model``),
    ``values``, ``pairs``, ``unmatched_paper`` (with ``reason``), ``excluded``, ``skipped``, ``superseded``,
    ``history`` and ``leaderboards`` ({table: ranks})."""
    opts = BuildOptions(**options)
    results_dir, out_dir = Path(results_dir), Path(out_dir)
    if not results_dir.is_dir():
        raise BenchmarkError(f"results folder {results_dir} does not exist or is not a folder; pass --results DIR "
                             "(the folder of run records that `python -m benchmarks run` writes)")
    for folder in (out_dir, out_dir / "figures") if opts.figures else (out_dir,):  # takes files, before any work
        check_writable_folder(folder, "--out")
    loaded = _load(results_dir, opts)
    model = build_model(loaded.completed, opts.n_boot)
    sections, images, data = _sections(loaded, model, opts)
    paths, figure_paths = _write(out_dir, sections, images, opts.formats)
    return {"paths": paths, "figures": figure_paths, "cells": model.cells, "values": model.values, **data,
            "excluded": loaded.excluded, "skipped": loaded.skipped, "superseded": loaded.superseded + model.superseded}
