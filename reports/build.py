"""Build the benchmark report from the run records: ``build_report`` (Python) / ``python -m reports build``.

Reads every run record under ``results_dir`` (``benchmarks.records`` schema) and writes, under ``out_dir``:

* ``report.md``   -- Markdown tables
* ``report.tex``  -- a LaTeX document, booktabs tables (``\\toprule``/``\\midrule``/``\\bottomrule``)
* ``report.html`` -- one self-contained page: tables + figures as base64 PNG, inline CSS, nothing external
* ``figures/*.png`` -- seaborn bar charts (``bars_<suite>_<dataset>_e<epochs>_<kind>.png``) and
  training curves (``curves_<suite>_<dataset>_e<epochs>.png``)

Conventions (stated in the report too):

* Tables: clustering (NMI/AMI/ARI/ACC), linear (top-1/top-5), kNN (k=20/200, top-1/top-5),
  semi-supervised (1%/10% labels) + transfer (``transfer_linear:<Dataset>``), and other protocols, one
  table per suite, dataset and pretraining epochs; rows = methods, reference rows (random init,
  supervised: ``is_reference``) below a separator.
* A cell is ``mean ± std`` over seeds: the sample std (ddof=1); with a single seed the std is undefined and
  the cell shows the mean alone. ``n`` = number of seeds of the row; a cell measured on fewer seeds says
  ``(n=k)``. ``–`` = not measured.
* Bold = the best mean of a column among the non-reference methods (ties all bold), when at least two
  non-reference methods have a value in that column.
* ``paper`` / ``Δ`` (ours − paper) columns appear for a metric where at least one cell of the table has a
  like-for-like paper number (same method, pretraining dataset, evaluation dataset, protocol, metric and
  epochs; see ``reports.data.pair_with_papers``). Paper rows without such a run are listed apart, with
  the reason, and never compared.
* Only ``completed`` records enter the tables; diverged/failed ones are listed with their message.
  Malformed records are skipped, reported by file (stderr and the report), and the build goes on.
* Determinism: everything is sorted, no timestamps or absolute paths, fixed float formatting, PNGs
  rendered under fixed settings without time-dependent metadata: the same records give the same bytes.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd

from benchmarks.errors import BenchmarkError
from benchmarks.records import atomic_write_text
from reports import figures as figs
from reports.data import (
    LoadedRecords,
    aggregate,
    history_frame,
    load_paper_results,
    load_records,
    pair_with_papers,
    relevant_papers,
    values_frame,
)
from reports.render import to_html, to_latex, to_markdown
from reports.tables import (
    KINDS,
    Figure,
    Section,
    columns_for,
    fmt,
    method_table,
    plain_table,
    row_order,
)

FORMATS = ("md", "tex", "html")
TITLE = "Self-supervised representation learning benchmark"
OUTPUT_MODE = 0o644
FILE_NAMES = {"md": "report.md", "tex": "report.tex", "html": "report.html"}
CONVENTIONS = (
    "Cells are mean ± sample std (ddof=1) over seeds; with one seed the cell shows the mean alone. "
    "n = number of seeds of the row; a cell measured on fewer seeds says (n=k). – = not measured. "
    "Bold = best mean of the column among non-reference methods (when at least two have a value). "
    "Reference rows (random init, supervised) are below the separator. "
    "paper / Δ columns (Δ = ours − paper) appear where a like-for-like paper number exists: same method, "
    "pretraining dataset, evaluation dataset, protocol, metric and epochs. Values are in percent."
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


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Temp file in the same folder + fsync + os.replace: a reader never sees a half-written PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, OUTPUT_MODE)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def _labels(cells: pd.DataFrame) -> dict[tuple[str, str, bool], str]:
    """Row label per (method, display, reference): the display name, plus the registry name if ambiguous."""
    rows = row_order(cells)
    counts: dict[str, int] = {}
    for _, display, _ in rows:
        counts[display] = counts.get(display, 0) + 1
    return {r: r[1] if counts[r[1]] == 1 else f"{r[1]} ({r[0]})" for r in rows}


def _filters_text(suites, methods, epochs) -> str:
    parts = [f"{name} = {', '.join(str(v) for v in values)}"
             for name, values in (("suite", suites), ("methods", methods), ("epochs", epochs)) if values is not None]
    return "Filters: " + ("; ".join(parts) if parts else "none") + "."


class _Names:
    """Unique, deterministic figure file names."""

    def __init__(self) -> None:
        self.taken: set[str] = set()

    def __call__(self, stem: str) -> str:
        name, i = f"{stem}.png", 2
        while name in self.taken:
            name, i = f"{stem}-{i}.png", i + 1
        self.taken.add(name)
        return name


def _result_sections(agg: pd.DataFrame, values: pd.DataFrame, history: pd.DataFrame, want_figures: bool,
                     images: dict[str, bytes]) -> list[Section]:
    sections: list[Section] = []
    names = _Names()
    used_labels = {label for frame in (agg, history) for _, group in frame.groupby(["suite", "dataset", "epochs"])
                   for label in _labels(group).values()}
    palette = figs.palette_for(sorted(used_labels))
    groups = sorted({(s, d, int(e)) for s, d, e in zip(agg["suite"], agg["dataset"], agg["epochs"])})
    for kind in KINDS:
        kind_sections = []
        for suite, dataset, epochs in groups:
            in_group = (agg["suite"] == suite) & (agg["dataset"] == dataset) & (agg["epochs"] == epochs)
            cells = agg[in_group]
            labels = _labels(cells)
            cells = cells.assign(method_display=[labels[(m, d, bool(r))] for m, d, r in
                                                 zip(cells["method"], cells["method_display"],
                                                     cells["is_reference"])])
            table = method_table(kind, cells)
            if table is None:
                continue
            heading = f"{dataset} — suite {suite}, {epochs} epochs"
            blocks: list = [table]
            if want_figures:
                name = names(f"bars_{_slug(suite)}_{_slug(dataset)}_e{epochs}_{kind.key}")
                columns = columns_for(kind, cells)
                label_of = {(c.protocol_key, c.metric): c.label for c in columns}
                mine = values[(values["suite"] == suite) & (values["dataset"] == dataset)
                              & (values["epochs"] == epochs)]
                mine = mine[[(p, m) in label_of for p, m in zip(mine["protocol_key"], mine["metric"])]]
                data = pd.DataFrame({
                    "column": [label_of[(p, m)] for p, m in zip(mine["protocol_key"], mine["metric"])],
                    "method": [labels[(m, d, bool(r))] for m, d, r in
                               zip(mine["method"], mine["method_display"], mine["is_reference"])],
                    "value": mine["value"].to_numpy(),
                })
                present = set(data["column"])
                order = [c.label for c in columns if c.label in present]
                images[name] = figs.bar_chart(data, order, [labels[r] for r in row_order(cells)],
                                              f"{kind.title}: {heading}", palette)
                blocks.append(Figure(name, f"{kind.title}, {heading}: mean over seeds, error bars = std "
                                           "over seeds."))
            kind_sections.append(Section(heading, 3, blocks))
        if kind_sections:
            sections.append(Section(kind.title, 2))
            sections += kind_sections
    if want_figures and not history.empty:
        curves = []
        for suite, dataset, epochs in sorted({(s, d, int(e)) for s, d, e in
                                              zip(history["suite"], history["dataset"], history["epochs"])}):
            mine = history[(history["suite"] == suite) & (history["dataset"] == dataset)
                           & (history["epochs"] == epochs)]
            labels = _labels(mine)
            order = [labels[r] for r in row_order(mine)]
            mine = mine.assign(method=[labels[(m, d, bool(r))] for m, d, r in
                                       zip(mine["method"], mine["method_display"], mine["is_reference"])])
            heading = f"{dataset} — suite {suite}, {epochs} epochs"
            name = names(f"curves_{_slug(suite)}_{_slug(dataset)}_e{epochs}")
            images[name] = figs.curves_chart(mine, order, f"Training curves: {heading}", palette)
            curves.append(Section(heading, 3, [Figure(name, f"Training curves, {heading}: mean over seeds per "
                                                            "epoch, band = std over seeds.")]))
        sections.append(Section("Training curves", 2))
        sections += curves
    return sections


def _unmatched_section(unmatched: pd.DataFrame) -> Section:
    section = Section("Paper numbers without a matching run", 2)
    if unmatched.empty:
        section.blocks.append("Every paper number that concerns the selected runs is paired with one of them.")
        return section
    section.blocks.append("Listed for reference only: these are not compared with any run.")
    rows = []
    for r in unmatched.itertuples(index=False):
        value = fmt(r.value) + ("" if pd.isna(r.std) else f" ± {fmt(r.std)}")
        rows.append([r.paper, r.table, r.method, r.pretrain_dataset, r.eval_dataset, r.backbone,
                     "–" if pd.isna(r.epochs) else str(int(r.epochs)), r.protocol, r.metric, value, r.reason])
    section.blocks.append(plain_table(["Paper", "Table", "Method", "Pretrain", "Eval", "Backbone", "Epochs",
                                       "Protocol", "Metric", "Value", "Why not compared"], rows))
    return section


def _excluded_frame(loaded: LoadedRecords) -> pd.DataFrame:
    rows = [(shown, r["suite"], r["method"], r["epochs"], r["seed"], r["status"], r.get("message") or "")
            for shown, r in loaded.excluded]
    return pd.DataFrame(rows, columns=["file", "suite", "method", "epochs", "seed", "status", "message"])


def build_report(
    results_dir: str | Path = "results",
    out_dir: str | Path = "reports/generated",
    suites: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    epochs: Sequence[int] | None = None,
    formats: Iterable[str] = FORMATS,
    *,
    paper_csv: str | Path | None = None,
    figures: bool = True,
    stderr=None,
) -> dict:
    """Build the report; return written paths and the data behind the tables.

    Returns a dict with ``paths`` ({format: Path}), ``figures`` (list of PNG Paths), ``aggregated``
    (one row per cell: suite, dataset, epochs, method, method_display, is_reference, protocol_key,
    protocol, eval_dataset, metric, mean, std, n, seeds, best, paper_value, paper_std, paper_source,
    delta), ``values`` (one row per seed), ``history``, ``unmatched_paper`` (paper rows not compared, with
    ``reason``), ``excluded`` (records not completed) and ``skipped`` (list of ``Skipped``: path, reason).
    """
    stderr = sys.stderr if stderr is None else stderr
    formats = _normalize_formats(formats)
    results_dir, out_dir = Path(results_dir), Path(out_dir)
    if not results_dir.is_dir():
        raise BenchmarkError(f"results folder {results_dir} does not exist; pass --results DIR (the folder of "
                             "run records written by `python -m benchmarks run`)")
    suites = None if suites is None else sorted({str(s) for s in suites})
    methods = None if methods is None else sorted({str(m) for m in methods})
    epochs = None if epochs is None else sorted({int(e) for e in epochs})

    loaded = load_records(results_dir, suites, methods, epochs)
    if loaded.skipped:
        count = len(loaded.skipped)
        print(f"skipped {count} record{'s' if count != 1 else ''} (the build goes on without "
              f"{'them' if count != 1 else 'it'}):", file=stderr)
        for skipped in loaded.skipped:
            print(f"  {skipped}", file=stderr)
    values = values_frame(loaded.completed)
    history = history_frame(loaded.completed)
    papers = relevant_papers(load_paper_results(paper_csv), loaded, suites, methods, epochs)
    agg, unmatched = pair_with_papers(aggregate(values), papers)
    excluded = _excluded_frame(loaded)

    images: dict[str, bytes] = {}
    summary = Section("Summary", 2, [
        f"{len(loaded.completed)} completed run(s) in the tables; {len(loaded.excluded)} run(s) not completed "
        f"(listed below, not in the tables); {len(loaded.skipped)} record file(s) skipped as malformed. "
        + _filters_text(suites, methods, epochs),
        CONVENTIONS,
    ])
    if loaded.skipped:
        summary.blocks.append([str(s) for s in loaded.skipped])
    if not loaded.completed:
        summary.blocks.append("No completed run matches: there is no result table.")
    sections = [summary, *_result_sections(agg, values, history, figures, images), _unmatched_section(unmatched)]

    runs = Section("Runs not in the tables", 2)
    if excluded.empty:
        runs.blocks.append("None: every selected run completed.")
    else:
        rows = [[r.file, r.suite, r.method, str(r.epochs), str(r.seed), r.status, r.message or "–"]
                for r in excluded.itertuples(index=False)]
        runs.blocks.append(plain_table(["File", "Suite", "Method", "Epochs", "Seed", "Status", "Message"], rows))
    skipped = Section("Skipped records", 2, [[str(s) for s in loaded.skipped]] if loaded.skipped
                      else ["None: every record file could be read."])
    sections += [runs, skipped]

    out_dir.mkdir(parents=True, exist_ok=True)
    figure_paths = [atomic_write_bytes(out_dir / "figures" / name, images[name]) for name in sorted(images)]
    for stale in sorted((out_dir / "figures").glob("*.png")):  # figures of earlier builds (other filters)
        if stale.name not in images and re.fullmatch(r"(bars|curves)_[a-z0-9_.-]+\.png", stale.name):
            stale.unlink()
    paths: dict[str, Path] = {}
    for fmt_ in formats:
        if fmt_ == "md":
            text = to_markdown(TITLE, sections)
        elif fmt_ == "tex":
            text = to_latex(TITLE, sections)
        else:
            text = to_html(TITLE, sections, images)
        paths[fmt_] = atomic_write_text(out_dir / FILE_NAMES[fmt_], text)
        os.chmod(paths[fmt_], OUTPUT_MODE)  # mkstemp creates 0600; a report is meant to be read by others
    return {
        "paths": paths,
        "figures": figure_paths,
        "aggregated": agg,
        "values": values,
        "history": history,
        "unmatched_paper": unmatched,
        "excluded": excluded,
        "skipped": list(loaded.skipped),
    }
