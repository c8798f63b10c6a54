"""Records in, tidy DataFrames out: loading, filtering, mean ± std over seeds, pairing with the papers.

Everything here is pure data handling (no rendering) so the numbers can be checked on their own:

* ``load_records`` reads every run record under a results folder with
  ``benchmarks.records.read_record``; a malformed record is kept aside as ``Skipped`` (file + what is
  wrong), a record whose status is not ``completed`` is kept aside as ``excluded``.
* ``values_frame`` flattens the completed records into one row per (record, protocol, metric).
* ``aggregate`` groups the values over seeds: ``mean``, ``std`` (sample std, ddof=1; NaN for one seed),
  ``n`` (number of seeds) and ``seeds``, and marks ``best`` per column among non-reference methods.
* ``pair_with_papers`` adds the papers' number for like-for-like cells only and returns the paper rows
  that found no run, with the reason.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from benchmarks.errors import BenchmarkError, RecordError
from benchmarks.records import iter_record_files, read_record

PAPER_CSV = Path(__file__).resolve().parent / "paper_results.csv"
PAPER_COLUMNS = (
    "paper", "table", "method", "pretrain_dataset", "eval_dataset", "backbone",
    "epochs", "protocol", "metric", "value", "std", "note",
)  # fmt: skip

#: one row of ``values_frame`` per (record, protocol, metric)
VALUE_COLUMNS = (
    "suite", "dataset", "epochs", "method", "method_display", "is_reference", "protocol_key",
    "protocol", "eval_dataset", "metric", "seed", "value", "paper_reference", "file",
)  # fmt: skip
#: a cell of the report = one group of values over seeds
CELL_KEYS = [
    "suite", "dataset", "epochs", "method", "method_display", "is_reference",
    "protocol_key", "protocol", "eval_dataset", "metric",
]  # fmt: skip
#: the columns a table compares methods over (one table per suite, dataset and epochs)
COLUMN_KEYS = ["suite", "dataset", "epochs", "protocol_key", "metric"]
AGG_COLUMNS = (
    *CELL_KEYS, "mean", "std", "n", "seeds", "paper_refs", "best",
    "paper_value", "paper_std", "paper_source", "delta",
)  # fmt: skip
HISTORY_COLUMNS = ("suite", "dataset", "epochs", "method", "method_display", "is_reference", "seed",
                   "epoch", "series", "value")  # fmt: skip
HISTORY_SERIES = ("loss", "online_knn_top1")
DECIMALS = 2


@dataclass(frozen=True)
class Skipped:
    """A record file the build could not use: its path (as shown in the report) and what is wrong."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass
class LoadedRecords:
    completed: list[tuple[str, dict]] = field(default_factory=list)  # (shown path, record)
    excluded: list[tuple[str, dict]] = field(default_factory=list)  # status != completed
    skipped: list[Skipped] = field(default_factory=list)  # malformed / duplicate


def _casefold_set(values: Iterable[str] | None) -> set[str] | None:
    return None if values is None else {str(v).strip().casefold() for v in values}


def shown_path(path: Path, results_dir: Path) -> str:
    """`results/<relative path>`: no absolute path enters the report, so it does not depend on the checkout."""
    name = results_dir.name or results_dir.resolve().name
    try:
        rel = path.relative_to(results_dir)
    except ValueError:
        return path.as_posix()
    return (Path(name) / rel).as_posix() if name else rel.as_posix()


def selected(record: dict, suites=None, methods=None, epochs=None) -> bool:
    """Whether a record passes the --suite / --methods / --epochs filters (methods: registry or display name)."""
    suites, methods = _casefold_set(suites), _casefold_set(methods)
    if suites is not None and record["suite"].casefold() not in suites:
        return False
    if methods is not None and not {record["method"].casefold(), record["method_display"].casefold()} & methods:
        return False
    return epochs is None or record["epochs"] in {int(e) for e in epochs}


def load_records(results_dir: str | Path, suites=None, methods=None, epochs=None) -> LoadedRecords:
    """Read every record file under `results_dir` (sorted by path); never raises for one bad file."""
    root = Path(results_dir)
    out = LoadedRecords()
    first_of: dict[tuple, str] = {}
    for path in iter_record_files(root):
        shown = shown_path(path, root)
        try:
            record = read_record(path)
        except RecordError as exc:
            message = str(exc)
            prefix = f"{path}: "
            out.skipped.append(Skipped(shown, message[len(prefix):] if message.startswith(prefix) else message))
            continue
        if not selected(record, suites, methods, epochs):
            continue
        if record["status"] != "completed":
            out.excluded.append((shown, record))
            continue
        key = (record["suite"], record["method"], record["epochs"], record["seed"])
        if key in first_of:
            out.skipped.append(Skipped(shown, f"duplicate of {first_of[key]} (same suite, method, epochs and "
                                              f"seed {record['seed']}); only the first file is used"))
            continue
        first_of[key] = shown
        out.completed.append((shown, record))
    return out


def split_protocol(protocol_key: str, dataset: str) -> tuple[str, str]:
    """`transfer_linear:CIFAR-100` -> (`transfer_linear`, `CIFAR-100`); `linear` -> (`linear`, dataset)."""
    base, sep, target = protocol_key.partition(":")
    return base, (target.strip() if sep and target.strip() else dataset)


def values_frame(completed: Sequence[tuple[str, dict]]) -> pd.DataFrame:
    rows = []
    for shown, rec in completed:
        for protocol_key in sorted(rec["metrics"]):
            protocol, eval_dataset = split_protocol(protocol_key, rec["dataset"])
            for metric in sorted(rec["metrics"][protocol_key]):
                rows.append((rec["suite"], rec["dataset"], rec["epochs"], rec["method"], rec["method_display"],
                             rec["is_reference"], protocol_key, protocol, eval_dataset, metric, rec["seed"],
                             float(rec["metrics"][protocol_key][metric]), rec["paper_reference"], shown))
    return pd.DataFrame(rows, columns=list(VALUE_COLUMNS))


def history_frame(completed: Sequence[tuple[str, dict]]) -> pd.DataFrame:
    """Per-epoch training curves (loss, online kNN top-1); entries that are not numbers are ignored."""
    rows = []
    for _, rec in completed:
        for entry in rec["history"]:
            if not isinstance(entry, dict):
                continue
            epoch = entry.get("epoch")
            if isinstance(epoch, bool) or not isinstance(epoch, (int, float)):
                continue
            for series in HISTORY_SERIES:
                value = entry.get(series)
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                    continue
                if abs(value) == float("inf"):
                    continue
                rows.append((rec["suite"], rec["dataset"], rec["epochs"], rec["method"], rec["method_display"],
                             rec["is_reference"], rec["seed"], float(epoch), series, float(value)))
    return pd.DataFrame(rows, columns=list(HISTORY_COLUMNS))


def aggregate(values: pd.DataFrame) -> pd.DataFrame:
    """Mean, sample std (ddof=1, NaN for a single seed) and number of seeds per cell; `best` per column."""
    if values.empty:
        return pd.DataFrame(columns=list(AGG_COLUMNS))
    grouped = values.groupby(CELL_KEYS, sort=True, dropna=False)
    agg = grouped.agg(
        mean=("value", "mean"),
        std=("value", "std"),  # pandas' default ddof=1: the sample std over seeds
        n=("value", "size"),
        seeds=("seed", lambda s: ",".join(str(v) for v in sorted(s))),
        paper_refs=("paper_reference", lambda s: tuple(sorted({v for v in s if isinstance(v, str)}))),
    ).reset_index()
    agg = agg.sort_values(CELL_KEYS, kind="mergesort", ignore_index=True)
    agg["best"] = False
    contenders = agg[~agg["is_reference"].astype(bool)]
    for _, group in contenders.groupby(COLUMN_KEYS, sort=True):
        if len(group) < 2:  # bold only when there is something to beat
            continue
        rounded = group["mean"].round(DECIMALS)
        agg.loc[group.index[rounded == rounded.max()], "best"] = True
    for column in ("paper_value", "paper_std", "delta"):
        agg[column] = float("nan")
    agg["paper_source"] = ""
    return agg[list(AGG_COLUMNS)]


def load_paper_results(path: str | Path | None = None) -> pd.DataFrame:
    path = Path(path) if path is not None else PAPER_CSV
    try:
        papers = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise BenchmarkError(f"{path}: cannot read the papers' numbers ({exc})") from exc
    missing = [c for c in PAPER_COLUMNS if c not in papers.columns]
    if missing:
        raise BenchmarkError(f"{path}: missing column(s) {', '.join(missing)}; expected {','.join(PAPER_COLUMNS)}")
    papers = papers[list(PAPER_COLUMNS)].copy()
    for column in ("paper", "table", "method", "pretrain_dataset", "eval_dataset", "backbone", "protocol",
                   "metric", "note"):
        papers[column] = papers[column].str.strip()
    try:
        papers["epochs"] = pd.array([int(v) if v.strip() else None for v in papers["epochs"]], dtype="Int64")
        papers["value"] = [float(v) for v in papers["value"]]
        papers["std"] = [float(v) if v.strip() else float("nan") for v in papers["std"]]
    except ValueError as exc:
        raise BenchmarkError(f"{path}: a value, std or epochs entry is not a number ({exc})") from exc
    papers.insert(0, "row", range(2, len(papers) + 2))  # line number in the CSV (header is line 1)
    return papers.reset_index(drop=True)


def _paper_key(method, pretrain, eval_dataset, protocol, metric, epochs) -> tuple:
    return (str(method).casefold(), str(pretrain).casefold(), str(eval_dataset).casefold(), protocol, metric,
            int(epochs))


def relevant_papers(papers: pd.DataFrame, loaded: LoadedRecords, suites=None, methods=None, epochs=None):
    """Paper rows that concern the selected runs (filters applied the same way as to the records)."""
    keep = pd.Series(True, index=papers.index)
    records = [rec for _, rec in loaded.completed + loaded.excluded]
    if methods is not None:
        names = _casefold_set(methods) | {rec["method_display"].casefold() for rec in records}
        keep &= papers["method"].str.casefold().isin(names)
    if epochs is not None:
        keep &= papers["epochs"].isin([int(e) for e in epochs]).fillna(False).astype(bool)
    if suites is not None:
        keep &= papers["pretrain_dataset"].str.casefold().isin({rec["dataset"].casefold() for rec in records})
    return papers[keep]


def pair_with_papers(agg: pd.DataFrame, papers: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Add the paper's number to like-for-like cells; return (agg, unmatched paper rows with a reason).

    A cell and a paper row pair only when the method (record `method_display` vs CSV `method`, case-insensitive),
    the pretraining dataset, the evaluation dataset, the protocol, the metric and the number of pretraining
    epochs are all equal. Where several paper rows fit one cell, the one from the runs' `paper_reference`
    wins, then the first in the CSV; the others are listed as unmatched with the reason.
    """
    agg = agg.copy()
    index: dict[tuple, list[int]] = {}
    for i, row in papers.iterrows():
        if pd.isna(row["epochs"]):
            continue
        key = _paper_key(row["method"], row["pretrain_dataset"], row["eval_dataset"], row["protocol"],
                         row["metric"], row["epochs"])
        index.setdefault(key, []).append(i)
    used: set[int] = set()
    passed_over: dict[int, int] = {}
    for j, cell in agg.iterrows():
        key = _paper_key(cell["method_display"], cell["dataset"], cell["eval_dataset"], cell["protocol"],
                         cell["metric"], cell["epochs"])
        candidates = index.get(key, [])
        if not candidates:
            continue
        preferred = [i for i in candidates if papers.at[i, "paper"] in cell["paper_refs"]] or candidates
        chosen = preferred[0]
        used.add(chosen)
        for other in candidates:
            if other != chosen:
                passed_over.setdefault(other, chosen)
        paper = papers.loc[chosen]
        agg.at[j, "paper_value"] = paper["value"]
        agg.at[j, "paper_std"] = paper["std"]
        agg.at[j, "paper_source"] = f"{paper['paper']} {paper['table']}"
        agg.at[j, "delta"] = cell["mean"] - paper["value"]
    unmatched = papers[~papers.index.isin(sorted(used))].copy()
    unmatched["reason"] = [
        _unmatched_reason(papers, i, agg, passed_over) for i in unmatched.index
    ]
    return agg, unmatched.reset_index(drop=True)


def _unmatched_reason(papers: pd.DataFrame, i: int, agg: pd.DataFrame, passed_over: dict[int, int]) -> str:
    row = papers.loc[i]
    if i in passed_over:
        winner = papers.loc[passed_over[i]]
        return f"the same cell is paired with {winner['paper']} {winner['table']} (CSV line {winner['row']})"
    if pd.isna(row["epochs"]):
        return "the paper row gives no number of epochs, so no run can be paired with it"
    if agg.empty:
        return "no completed run"
    same_method = agg["method_display"].str.casefold() == row["method"].casefold()
    same_data = same_method & (agg["dataset"].str.casefold() == row["pretrain_dataset"].casefold())
    if not same_data.any():
        return f"no completed run of {row['method']} pretrained on {row['pretrain_dataset']}"
    same_cell = same_data & (agg["eval_dataset"].str.casefold() == row["eval_dataset"].casefold()) \
        & (agg["protocol"] == row["protocol"]) & (agg["metric"] == row["metric"])
    if same_cell.any():
        ours = ", ".join(str(e) for e in sorted(set(agg.loc[same_cell, "epochs"].astype(int))))
        return f"our runs have {ours} epochs, the paper {int(row['epochs'])}: not compared"
    target = "" if row["eval_dataset"] == row["pretrain_dataset"] else f" on {row['eval_dataset']}"
    return f"{row['protocol']} {row['metric']}{target} not measured in our runs"
