"""Pairing our cells with the papers' numbers (paper_results.csv), only like for like.

A cell and a CSV row pair when, checked in this order (the first that fails is the reason a row stays unpaired):
1. the CSV protocol has a counterpart (``PROTOCOLS``); 2. method: ``BASE_DISPLAY`` of the record's
``method_base`` is the CSV method and its ``paper_reference`` the CSV paper ("Random" = random init;
"Supervised" = the supervised backbone, in label-subset protocols our "Supervised (labelled subset only)" row);
3. pretraining dataset; 4. backbone (``BACKBONES``); 5. epochs; 6. protocol key and place; 7. required protocol
settings; 7b. the hyperparameters the paper row names (``PAPER_HPARAMS``); 8. the metric. Δ = ours − paper
(``stats.delta_interval``), Welch's p where the paper gives its std over n runs (``PAPER_RUNS``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import yaml

from reports import stats
from reports.cells import SUBSET_PROTOCOLS, SUBSET_ROLE
from reports.data import at_place


class Protocol(NamedTuple):
    """A CSV protocol of one paper -> our protocol, its entry's place and required settings (paper_protocols.yaml)."""

    paper: str
    table: str
    protocol: str
    ours: str | None  # our protocol (a metric entry's), None: no counterpart
    place: tuple[tuple[str, object], ...]
    settings: tuple[tuple[str, object], ...]
    source: str  # where the paper says so


def _tuples(value):
    """YAML lists as tuples (the layouts' rows and columns are hashable field values)."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


_DATA = yaml.safe_load((Path(__file__).resolve().parent / "paper_protocols.yaml").read_text(encoding="utf-8"))
#: The one mapping from the papers' protocols to ours (paper_protocols.yaml, checked against the papers in seeds/)
PROTOCOLS = tuple(Protocol(p["paper"], p["table"], p["protocol"], p["ours"], tuple(p.get("place", {}).items()),
                           tuple(p.get("settings", {}).items()), p["source"]) for p in _DATA["protocols"])
BACKBONES: dict[str, str] = _DATA["backbones"]  # registry backbone -> the CSV's name
BASE_DISPLAY: dict[str, str] = _DATA["base_display"]  # registry method -> its base's display name in the CSV
PAPER_RUNS = {(r["paper"], r["table"]): r["runs"] for r in _DATA["paper_runs"]}  # runs behind a mean ± std
DATASET_CLASSES: dict[str, int] = _DATA["dataset_classes"]
#: (paper, table, pretraining dataset) -> the method hyperparameters that define the paper's row (step 7b)
PAPER_HPARAMS = {(r["paper"], r["table"], r["pretrain_dataset"]): tuple(r["hparams"].items())
                 for r in _DATA["paper_hparams"]}


def protocol_for(paper: str, table: str, protocol: str) -> Protocol | None:
    """The table's own mapping of a CSV protocol, else the paper's "*" one."""
    mine = [p for p in PROTOCOLS if p.paper == paper and p.protocol == protocol and p.table in ("*", table)]
    return min(mine, key=lambda p: p.table == "*", default=None)  # min keeps the first of equals


def place_of(proto: Protocol, row: pd.Series, cells: pd.DataFrame) -> dict:
    """The place (k, block, head K, transfer dataset) of our entry that the CSV row's protocol names."""
    classes = DATASET_CLASSES.get(row["eval_dataset"])
    if classes is None:  # a dataset the table above does not know: as the records say
        same = cells["dataset"].str.casefold() == row["eval_dataset"].casefold()
        known = cells.loc[same, "num_classes"].dropna()
        classes = int(known.iloc[0]) if len(known) else 0
    given = {"{eval}": row["eval_dataset"], "{C}": classes, "{3C}": 3 * classes}
    return {k: given.get(v, v) if isinstance(v, str) else v for k, v in proto.place}


def describe(protocol: str, place: dict) -> str:
    """Our evaluation in words: its protocol and place, e.g. "knn k=20"."""
    return " ".join([protocol, *(f"{k}={_fmt_setting(v)}" for k, v in place.items())])


def _fmt_setting(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _listed(values) -> str:
    """The distinct values, sorted, for a reason: "CIFAR-10, STL-10"."""
    return ", ".join(str(v) for v in sorted(set(values)))


def _method_filter(row: pd.Series, cells: pd.DataFrame, subset: bool) -> tuple[pd.Series, str]:
    """Cells of the CSV row's method (see the module docstring), and the reason when there are none."""
    name = row["method"].casefold()
    if name in ("random", "random init", "supervised"):
        # "Supervised" in label-subset protocols: the network trained on the labelled images only
        base = "supervised" if name == "supervised" and not subset else "random_init"
        role = SUBSET_ROLE if name == "supervised" and subset else ""
        mask = (cells["method_base"] == base) & (cells["role"] == role)
        return mask, "" if mask.any() else f"no run of {row['method']} (reference row)"
    bases = {b for b, d in BASE_DISPLAY.items() if d.casefold() == name}
    bases |= set(cells.loc[cells["display"].str.casefold() == name, "method_base"])
    same = cells["method_base"].isin(bases)
    mask = same & (cells["paper_reference"] == row["paper"])
    if mask.any():
        return mask, ""
    if not same.any():
        return mask, f"no run of {row['method']} (following {row['paper']})"
    refs = _listed(cells.loc[same, "paper_reference"].dropna())
    ours = f"follow {refs}" if refs else "name no paper"
    if refs and cells.loc[same, "paper_reference"].isna().any():
        ours += " or none"
    return mask, f"our {row['method']} runs {ours} (paper_reference), this row is from {row['paper']}"


def _run_filters(row: pd.Series, cand: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """Steps 3-5: pretraining dataset, backbone, epochs."""
    on_dataset = cand[cand["dataset"].str.casefold() == row["pretrain_dataset"].casefold()]
    if on_dataset.empty:
        return on_dataset, (f"no run of {_listed(cand['row'])} on {row['pretrain_dataset']} "
                            f"(ours: {_listed(cand['dataset'])})")
    backbone = on_dataset[on_dataset["backbone"].map(BACKBONES) == row["backbone"]]
    if backbone.empty:
        return backbone, f"backbone {_listed(on_dataset['backbone'])}, paper {row['backbone']}"
    same = backbone[backbone["epochs"] == int(row["epochs"])] if not pd.isna(row["epochs"]) else backbone.iloc[:0]
    if same.empty:
        return same, f"our runs have {_listed(backbone['epochs'])} epochs, the paper {row['epochs']}"
    return same, ""


def _agreeing(cand: pd.DataFrame, column: str, required: tuple, what) -> tuple[pd.DataFrame, str]:
    """The candidates whose `column` (canonical JSON of a dict) has every required (name, value); else the
    mismatches, each worded by `what(cell, name, ours)`."""
    keep, mismatches = [], set()
    for _, cell in cand.iterrows():
        mine = json.loads(cell[column])
        wrong = [(k, v) for k, v in required if mine.get(k, "\0") != v]
        keep.append(not wrong)
        mismatches |= {f"{what(cell, k, _fmt_setting(mine[k]) if k in mine else 'unset')}, paper {_fmt_setting(v)}"
                       for k, v in wrong}
    return cand[keep], "; ".join(sorted(mismatches))


def _evaluation_filters(row: pd.Series, proto: Protocol, cand: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """Steps 6-8: our protocol at the place the paper names, its required settings, the method settings the
    paper row names, the metric."""
    place = place_of(proto, row, cand)
    same = cand[at_place(cand, proto.ours, place)]
    if same.empty:
        kind = _listed(cand.loc[cand["protocol"] == proto.ours, "key"])
        return same, f"{describe(proto.ours, place)} not measured in our runs" + (f" (ours: {kind})" if kind else "")
    same, why = _agreeing(same, "settings", proto.settings, lambda c, k, v: f"ours {c['key']} ({k} {v})")
    if same.empty:
        return same, f"protocol: {why}"
    required = PAPER_HPARAMS.get((row["paper"], row["table"], row["pretrain_dataset"]), ())  # none: all agree
    same, why = _agreeing(same, "hparams", required, lambda c, k, v: f"ours {k} {v}")
    if same.empty:
        return same, f"method settings: {why}"
    cand, same = same, same[same["metric"] == row["metric"]]
    if same.empty:
        return same, f"metric {row['metric']} not in our {cand['key'].iloc[0]} (ours: {_listed(cand['metric'])})"
    return same, ""


def pairing_candidates(row: pd.Series, cells: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The one pairing predicate: the cells (suite, method, epochs, protocol, settings, metric) that fit a CSV row
    on every criterion of the module docstring, or none and the first criterion that fails. It reads the cell
    columns row, method_base, display, role, paper_reference, dataset, backbone, epochs, protocol, entry, key,
    settings, hparams, metric, num_classes: a report cell has them, and so has a planned run's prospective cell.
    The report pairs its cells with it (``pair_with_papers``) and ``python -m benchmarks reproduce`` plans its
    runs with it, so a plan and its report cannot disagree."""
    proto = protocol_for(row["paper"], row["table"], row["protocol"])
    if proto is None or proto.ours is None:
        return cells.iloc[:0], f"protocol {row['protocol']} has no counterpart in this suite"
    if proto.ours != "transfer" and row["eval_dataset"].casefold() != row["pretrain_dataset"].casefold():
        return cells.iloc[:0], f"evaluated on {row['eval_dataset']} after pretraining on {row['pretrain_dataset']}"
    mask, reason = _method_filter(row, cells, proto.ours in SUBSET_PROTOCOLS)
    if reason:
        return cells.iloc[:0], reason
    cand, reason = _run_filters(row, cells[mask])
    return (cand, reason) if reason else _evaluation_filters(row, proto, cand)


def relevant_papers(papers: pd.DataFrame, runs, suites=None, methods=None, epochs=None) -> pd.DataFrame:
    """Paper rows that concern the selected runs (the filters as ``build.BuildOptions`` lists them, applied the
    same way as to the records: ``data.selected``)."""
    keep = pd.Series(True, index=papers.index)
    records = [run.record for run in runs]
    if methods is not None:
        names = {m.casefold() for m in methods} | {name.casefold() for rec in records for name in
                                                   (rec["method_display"], BASE_DISPLAY.get(rec["method_base"], ""))}
        keep &= papers["method"].str.casefold().isin(names)
    if epochs is not None:
        keep &= papers["epochs"].isin(epochs)  # Int64: a missing epochs is in no list
    if suites is not None:
        keep &= papers["pretrain_dataset"].str.casefold().isin({rec["dataset"].casefold() for rec in records})
    return papers[keep]


PAIR_COLUMNS = ["cell", "line", "paper", "table", "paper_value", "paper_std", "paper_n", "delta", "delta_low",
                "delta_high", "welch_p", "source"]


def pair_with_papers(cells: pd.DataFrame, papers: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(pairs: one row per paired cell, unmatched paper rows with ``reason``)."""
    pairs, reasons, taken = [], {}, {}
    for i, row in papers.iterrows():
        cand, reason = pairing_candidates(row, cells) if not cells.empty else (cells, "no completed run")
        if reason:
            reasons[i] = reason
            continue
        free = [j for j in cand.index if j not in taken]
        if not free:
            other = papers.loc[taken[cand.index[0]]]
            reasons[i] = f"the same cell is paired with {other['paper']} {other['table']} (CSV line {other['line']})"
            continue
        paper_n = PAPER_RUNS.get((row["paper"], row["table"]))
        for j in free:
            taken[j] = i
            delta = stats.delta_interval(cells.at[j, "values"], row["value"], float(row["std"]), paper_n)
            pairs.append((j, int(row["line"]), row["paper"], row["table"], float(row["value"]), float(row["std"]),
                          paper_n, delta.delta, delta.ci_low, delta.ci_high, delta.p_value,
                          f"{row['paper']} {row['table']}"))
    unmatched = papers.loc[sorted(reasons)].assign(reason=pd.Series(reasons, dtype=object))
    return pd.DataFrame(pairs, columns=PAIR_COLUMNS), unmatched.reset_index(drop=True)


class Layout(NamedTuple):
    """A paper's table shape: rows and columns are tuples of CSV field values; ours beside the paper's."""

    paper: str
    table: str
    title: str
    row_fields: tuple[str, ...]
    rows: tuple[tuple, ...]
    col_fields: tuple[str, ...]
    cols: tuple[tuple, ...]
    col_labels: tuple[str, ...]
    note: str = ""


LAYOUTS = tuple(Layout(**{k: _tuples(v) for k, v in spec.items()}) for spec in _DATA["layouts"])


def _matches(papers: pd.DataFrame, fields: tuple[str, ...], values: tuple) -> pd.Series:
    return (papers[list(fields)].astype(object) == list(values)).all(axis=1)  # a missing value (pd.NA) equals nothing


def layout_measured(layout: Layout, cells: pd.DataFrame) -> bool:
    """Whether our runs measured a per-protocol layout's protocols on its datasets at all."""
    if layout.col_fields != ("protocol",) or cells.empty:
        return False
    places = [(p.ours, dict(p.place)) for col in layout.cols
              if (p := protocol_for(layout.paper, layout.table, col[0])) is not None]
    on_dataset = cells["dataset"].isin({r[0] for r in layout.rows})
    return any((on_dataset & at_place(cells, ours, place)).any() for ours, place in places)


def layout_cells(layout: Layout, papers: pd.DataFrame, pairs: pd.DataFrame) -> list[list[tuple]]:
    """Per layout row, per column: (paper CSV rows, paired cell indices)."""
    mine = papers[(papers["paper"] == layout.paper) & (papers["table"] == layout.table)]
    out = []
    for row in layout.rows:
        in_row = mine[_matches(mine, layout.row_fields, row)]
        hits = [in_row[_matches(in_row, layout.col_fields, col)] for col in layout.cols]
        out.append([(hit, pairs.loc[pairs["line"].isin(hit["line"]), "cell"].astype(int).tolist()) for hit in hits])
    return out

