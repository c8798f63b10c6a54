"""The report as plain data (sections of tables, text and figures), independent of the output format.

Table layout follows the papers' tables: one table per (suite, dataset, pretraining epochs) and kind
(clustering, linear, kNN, semi-supervised + transfer, other protocols); rows are methods, reference rows
(random init / supervised) below a separator; a cell is ``mean ± std`` over seeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from reports.data import DECIMALS

DASH = "–"  # nothing measured


@dataclass(frozen=True)
class Cell:
    text: str
    bold: bool = False


@dataclass
class Table:
    columns: list[str]
    rows: list[list[Cell]]
    reference_from: int | None = None  # index of the first reference row (a separator goes above it)
    numeric_from: int = 1  # columns from this index are right-aligned
    caption: str = ""


@dataclass(frozen=True)
class Figure:
    name: str  # file name under <out>/figures/
    caption: str


@dataclass
class Section:
    title: str
    level: int = 2
    blocks: list = field(default_factory=list)  # str (paragraph) | list[str] (bullets) | Table | Figure


@dataclass(frozen=True)
class Column:
    protocol_key: str
    metric: str
    label: str


@dataclass(frozen=True)
class Kind:
    key: str
    title: str
    columns: tuple[Column, ...]  # fixed columns, always shown when the kind has a table


_SEMI = tuple(Column(p, m, f"{pct} {label}") for p, pct in (("semi_1pct", "1%"), ("semi_10pct", "10%"))
              for m, label in (("top1", "top-1"), ("top5", "top-5")))
KINDS = (
    Kind("clustering", "Clustering", tuple(Column("clustering", m, m) for m in ("NMI", "AMI", "ARI", "ACC"))),
    Kind("linear", "Linear evaluation", (Column("linear", "top1", "top-1"), Column("linear", "top5", "top-5"))),
    Kind("knn", "kNN", tuple(Column(f"knn_k{k}", m, f"k={k} {label}") for k in (20, 200)
                             for m, label in (("top1", "top-1"), ("top5", "top-5")))),
    Kind("semi_transfer", "Semi-supervised and transfer", _SEMI),
    Kind("other", "Other protocols", ()),
)
_FIXED = {(c.protocol_key, c.metric): kind.key for kind in KINDS for c in kind.columns}
_TOP = {"top1": "top-1", "top5": "top-5"}


def kind_of(protocol_key: str, metric: str) -> str:
    if (protocol_key, metric) in _FIXED:
        return _FIXED[(protocol_key, metric)]
    if protocol_key.startswith("transfer_linear:") and metric in _TOP:
        return "semi_transfer"
    return "other"


def dynamic_column(protocol_key: str, metric: str) -> Column:
    if protocol_key.startswith("transfer_linear:") and metric in _TOP:
        return Column(protocol_key, metric, f"→ {protocol_key.partition(':')[2]} {_TOP[metric]}")
    return Column(protocol_key, metric, f"{protocol_key} {metric}")


def fmt(value: float) -> str:
    text = f"{value:.{DECIMALS}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def fmt_delta(value: float) -> str:
    text = f"{value:+.{DECIMALS}f}"
    return "+" + text[1:] if float(text) == 0 else text


def fmt_mean_std(mean: float, std: float, n: int) -> str:
    """`72.00 ± 2.00` for two seeds or more; the mean alone for a single seed (its std is undefined)."""
    if n >= 2 and not math.isnan(std):
        return f"{fmt(mean)} ± {fmt(std)}"
    return fmt(mean)


def columns_for(kind: Kind, cells: pd.DataFrame) -> list[Column]:
    present = sorted({(p, m) for p, m in zip(cells["protocol_key"], cells["metric"])})
    extra = [dynamic_column(p, m) for p, m in present if kind_of(p, m) == kind.key and (p, m) not in _FIXED]
    return list(kind.columns) + extra


def row_order(cells: pd.DataFrame) -> list[tuple[str, str, bool]]:
    rows = {(m, d, bool(r)) for m, d, r in zip(cells["method"], cells["method_display"], cells["is_reference"])}
    return sorted(rows, key=lambda r: (r[2], r[1].casefold(), r[1], r[0]))


def method_table(kind: Kind, cells: pd.DataFrame) -> Table | None:
    """Rows = methods, columns = `kind`'s metrics (+ paper and Δ where a paper number is paired)."""
    columns = columns_for(kind, cells)
    wanted = {(c.protocol_key, c.metric) for c in columns}
    cells = cells[[(p, m) in wanted for p, m in zip(cells["protocol_key"], cells["metric"])]]
    if cells.empty:
        return None
    by_key = {(r.method, r.method_display, bool(r.is_reference), r.protocol_key, r.metric): r
              for r in cells.itertuples(index=False)}
    with_paper = {(c.protocol_key, c.metric) for c in columns
                  if cells[(cells["protocol_key"] == c.protocol_key) & (cells["metric"] == c.metric)]
                  ["paper_value"].notna().any()}
    header = ["Method", "n"]
    for c in columns:
        header.append(c.label)
        if (c.protocol_key, c.metric) in with_paper:
            header += [f"{c.label} paper", f"{c.label} Δ"]
    rows, reference_from = [], None
    for method, display, is_reference in row_order(cells):
        mine = cells[(cells["method"] == method) & (cells["method_display"] == display)
                     & (cells["is_reference"].astype(bool) == is_reference)]
        seeds = sorted({int(s) for joined in mine["seeds"] for s in joined.split(",")})
        row = [Cell(display), Cell(str(len(seeds)))]
        for c in columns:
            cell = by_key.get((method, display, is_reference, c.protocol_key, c.metric))
            if cell is None:
                row.append(Cell(DASH))
            else:
                text = fmt_mean_std(cell.mean, cell.std, int(cell.n))
                if int(cell.n) != len(seeds):
                    text += f" (n={int(cell.n)})"
                row.append(Cell(text, bold=bool(cell.best)))
            if (c.protocol_key, c.metric) in with_paper:
                if cell is None or pd.isna(cell.paper_value):
                    row += [Cell(DASH), Cell(DASH)]
                else:
                    paper = fmt(cell.paper_value)
                    if not pd.isna(cell.paper_std):
                        paper += f" ± {fmt(cell.paper_std)}"
                    row += [Cell(paper), Cell(fmt_delta(cell.delta))]
        if is_reference and reference_from is None:
            reference_from = len(rows)
        rows.append(row)
    sources = sorted({s for s in cells["paper_source"] if s})
    caption = f"Paper numbers: {'; '.join(sources)}." if sources else ""
    return Table(header, rows, reference_from=reference_from, numeric_from=1, caption=caption)


def plain_table(columns: list[str], rows: list[list[str]], numeric_from: int | None = None) -> Table:
    return Table(columns, [[Cell(v) for v in row] for row in rows],
                 numeric_from=len(columns) if numeric_from is None else numeric_from)
