"""The report as data (sections of tables, text, figures), its tables from the cells (``reports.cells``) and their
papers, and its Markdown, LaTeX (booktabs) and self-contained HTML renderings (``templates/*.j2``)."""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import reduce
from pathlib import Path
from typing import NamedTuple

import jinja2
import pandas as pd
import yaml

from reports.cells import ALPHA, DECIMALS, METRIC_ORDER, SUBSET_LABEL, column_order, fmt_delta, metric_label

DASH = "–"  # nothing measured
TIED = "†"  # not significantly different from the best of its column
UNTESTABLE = "‡"  # not testable against the best (fewer than 2 seeds on a side, or no spread over seeds)
ZERO_SPREAD = "§"  # n >= 2 seeds with identical values: a zero-width interval is no certainty
TEMPLATES = Path(__file__).resolve().parent / "templates"
_TEXT = yaml.safe_load((TEMPLATES / "text.yaml").read_text(encoding="utf-8"))
_SYMBOLS = {"tied": TIED, "untestable": UNTESTABLE, "zero_spread": ZERO_SPREAD, "alpha": ALPHA,
            "subset_label": SUBSET_LABEL, "dash": DASH}
INFO_HEADERS = {"K": "K", "source": "source", "nonempty": "non-empty clusters"}  # grid_table's info columns


class Cell(NamedTuple):
    text: str
    bold: bool = False
    title: str = ""  # HTML tooltip: the cell's full statistics


@dataclass
class Table:
    columns: list[str]
    rows: list[list[Cell]]
    reference_from: int | None = None  # index of the first reference row (a separator goes above it)
    numeric_from: int = 1  # columns from this index are right-aligned
    caption: str = ""


class Figure(NamedTuple):
    name: str  # file name under <out>/figures/
    caption: str


@dataclass
class Section:
    title: str
    level: int = 2
    blocks: list = field(default_factory=list)  # str (paragraph) | list[str] (bullets) | Table | Figure
    collapsible: bool = False  # HTML: a <details> element, closed (appendix material)


def fmt(value: float) -> str:
    if pd.isna(value):  # None or NaN
        return DASH
    text = f"{value:.{DECIMALS}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def fmt_p(p: float) -> str:
    return DASH if pd.isna(p) else "< 0.001" if p < 0.001 else f"{p:.3f}"


def interval(low: float, high: float, brackets: str = "[]") -> str:
    return f"{brackets[0]}{fmt(low)}, {fmt(high)}{brackets[1]}"


def _image_interval(cell) -> str:
    """The bootstrap interval over test images; for one seed's run in angle brackets, never the seeds' square ones."""
    return interval(cell['img_low'], cell['img_high'], "[]" if cell['n'] >= 2 else "⟨⟩")


def value_text(cell) -> str:
    """n >= 2: mean ± std [t-interval over seeds] (§ when the seeds agree exactly: zero width);
    n = 1: value ⟨bootstrap interval over test images⟩ (a different quantity, so different brackets)."""
    if cell['n'] >= 2:
        text = f"{fmt(cell['mean'])} ± {fmt(cell['std'])} {interval(cell['t_low'], cell['t_high'])}"
        return text + ZERO_SPREAD if cell['std'] == 0 else text
    if not math.isnan(cell['img_low']):
        text = f"{fmt(cell['mean'])} {_image_interval(cell)}"
        return text + ZERO_SPREAD if fmt(cell['img_low']) == fmt(cell['img_high']) else text
    return fmt(cell['mean'])


def cell_title(cell) -> str:
    parts = [f"{cell['row']}, {cell['column']}: n = {cell['n']} seed(s) ({','.join(map(str, cell['seeds']))})"]
    if cell['n'] >= 2:
        zero = " (zero spread: the seeds agree exactly, which is no certainty)" if cell['std'] == 0 else ""
        parts.append(f"mean {fmt(cell['mean'])}, std {fmt(cell['std'])} (ddof=1), 95% t-interval over seeds "
                     f"{interval(cell['t_low'], cell['t_high'])}{zero}")
    else:
        parts.append(f"value {fmt(cell['mean'])}")
    if not math.isnan(cell['img_low']):
        what = "the mean over seeds" if cell['n'] >= 2 else "the run"
        parts.append(f"95% {cell['img_method']} bootstrap over {cell['n_images']} test images of {what} "
                     f"{_image_interval(cell)}")
    elif cell['img_note']:
        parts.append(f"no image bootstrap: {cell['img_note']}")
    if cell['test_note']:
        parts.append(cell['test_note'])
    elif cell['best']:
        parts.append("best of the column")
    return "; ".join(parts)


def render_cell(cell, row_n: int) -> Cell:
    n = f" (n={cell['n']})" if cell['n'] != row_n else ""
    mark = TIED if cell['tied'] else UNTESTABLE if cell['untestable'] else ""
    return Cell(value_text(cell) + n + mark, bold=bool(cell['best']), title=cell_title(cell))


def plain_table(columns: list[str], rows: list[list[str]], numeric_from: int | None = None) -> Table:
    return Table(columns, [[Cell(v) for v in row] for row in rows],
                 numeric_from=len(columns) if numeric_from is None else numeric_from)


def delta_text(pair) -> str:
    spread = "" if math.isnan(pair.delta_low) else f" {interval(pair.delta_low, pair.delta_high)}"
    return fmt_delta(pair.delta) + spread


def paper_text(value: float, std: float) -> str:
    """A paper's number: its value, ± its std where the paper gives one."""
    return fmt(value) + ("" if math.isnan(std) else f" ± {fmt(std)}")


def _paper_cells(pair) -> list[Cell]:
    """The paper's number and Δ = ours − paper beside a paired cell (dashes if none), both titled with the pair."""
    if pair is None:
        return [Cell(DASH), Cell(DASH)]
    runs = f" over {pair.paper_n} runs" if pair.paper_n else ""
    welch = "" if math.isnan(pair.welch_p) else f"; Welch p = {fmt_p(pair.welch_p)}"
    title = f"{pair.source} (CSV line {pair.line}){runs}; Δ = ours − paper {delta_text(pair)}{welch}"
    return [Cell(paper_text(pair.paper_value, pair.paper_std), title=title), Cell(delta_text(pair), title=title)]


def in_order(labels, sort_keys) -> list:
    """The distinct labels by their sort key (a label's last), then by the label itself."""
    key = dict(zip(labels, sort_keys))
    return sorted(key, key=lambda label: (key[label], label))


def grid_table(cells: pd.DataFrame, pairs: pd.DataFrame, info: tuple[str, ...] = ()) -> Table:
    """Rows x columns of cells prepared with `_rid` (row identity), `_row`, `_row_sort`, `_col`, `_col_sort`,
    reference rows below a separator; a paper and a Δ column follow every column with a paired cell."""
    paired = {int(p.cell): p for p in pairs.itertuples(index=False)}
    columns = in_order(cells["_col"], cells["_col_sort"])
    with_paper = set(cells.loc[cells.index.isin(list(paired)), "_col"])
    header = ["Method", "n", *[INFO_HEADERS[i] for i in info]]
    for c in columns:
        header += [c, f"{c} paper", f"{c} Δ"] if c in with_paper else [c]
    rows, reference_from = [], None
    for rid in in_order(cells["_rid"], cells["_row_sort"]):
        mine = cells[cells["_rid"] == rid]
        n = len({s for seeds in mine["seeds"] for s in seeds})
        first = mine.iloc[0]
        row = [Cell(first["_row"]), Cell(str(n)), *[Cell(str(first[i]) or DASH) for i in info]]
        for c in columns:
            hit = mine[mine["_col"] == c]
            row.append(render_cell(hit.iloc[0], n) if len(hit) else Cell(DASH))
            if c in with_paper:
                row += _paper_cells(paired.get(int(hit.index[0])) if len(hit) else None)
        if bool(first["is_reference"]) and reference_from is None:
            reference_from = len(rows)
        rows.append(row)
    return Table(header, rows, reference_from=reference_from)


def table_caption(cells: pd.DataFrame, pairs: pd.DataFrame, extra: list[str] | None = None) -> str:
    notes = list(extra or [])
    if cells["best"].any():
        notes.append(text("captions.marks"))
    untested = sorted({f"{r} ({c}: {n.removeprefix('not testable: ')})" for r, c, n in
                       zip(cells["row"], cells["column"], cells["test_note"]) if n.startswith("not testable")})
    if untested:
        notes.append(text("captions.untested", cells="; ".join(untested)))
    if any(ZERO_SPREAD in value_text(c) for _, c in cells.iterrows()):
        notes.append(text("captions.zero_spread"))
    if not pairs.empty:
        notes.append(text("captions.papers", sources="; ".join(sorted(set(pairs["source"])))))
    return " ".join(notes)


def prepare(cells: pd.DataFrame, kind: str) -> pd.DataFrame:
    """Row and column labels and sort keys of one kind's cells (heads: one row per method and K, grouped by K:
    only rows of one K are compared)."""
    by_row = [(bool(ref), r.casefold(), r) for r, ref in zip(cells["row"], cells["is_reference"])]  # references last
    if kind == "heads":  # the column is the metric; the rest of its header goes to the row
        metric = [metric_label(p, m) for p, m in zip(cells["protocol"], cells["metric"])]
        suffix = [c[len(m):] + (f" [head {e['head']}]" if e.get("head") else "")
                  for c, m, e in zip(cells["column"], metric, cells["entry"])]
        return cells.assign(
            _rid=[f"{r}|{k}|{s}" for r, k, s in zip(cells["row"], cells["key"], suffix)],
            _row=[r + s for r, s in zip(cells["row"], suffix)],
            _row_sort=[(key[0], int(k) if str(k).isdigit() else 0, key, s)
                       for key, k, s in zip(by_row, cells["K"], suffix)],
            _col=metric, _col_sort=[(METRIC_ORDER.get(m, 9), m) for m in cells["metric"]])
    return cells.assign(
        _rid=cells["row"], _row=cells["row"], _row_sort=by_row, _col=cells["column"],
        _col_sort=[(column_order(p, e), METRIC_ORDER.get(m, 9), m, s) for p, e, m, s in
                   zip(cells["protocol"], cells["entry"], cells["metric"], cells["settings"])])


def text(name: str, **values):
    """The report's prose at `name` ("captions.cost": a text, or a list or dict of texts) in
    ``templates/text.yaml``, its fields filled in with the report's symbols and `values`."""
    def fill(entry):
        if isinstance(entry, dict):
            return {k: fill(v) for k, v in entry.items()}
        return [fill(v) for v in entry] if isinstance(entry, list) else entry.format(**_SYMBOLS, **values)

    return fill(reduce(dict.__getitem__, name.split("."), _TEXT))


# ------------------------------------------------------------------------------------------ rendering


def md_escape(text: str) -> str:
    return re.sub(r"([\\|*_`])", r"\\\1", text).replace("\n", " ")


# every key is one character and no replacement holds a key, so one pass escapes both
_TEX = str.maketrans({**_TEXT["tex"]["special"], **_TEXT["tex"]["symbols"]})


def tex_escape(text: str) -> str:
    return text.translate(_TEX)


def _td_attrs(cell: Cell, numeric: bool) -> str:
    classes = (["num"] if numeric else []) + (["missing"] if cell.text == DASH else [])
    attrs = f' class="{" ".join(classes)}"' if classes else ""
    return attrs + (f' title="{html.escape(cell.title)}"' if cell.title else "")


def _cell_filter(escape, wrap: str):
    return lambda cell: wrap.format(escape(cell.text)) if cell.bold and cell.text else escape(cell.text)


_ENV = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES),
                          trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                          undefined=jinja2.StrictUndefined)
_ENV.filters.update(
    md=md_escape, tex=tex_escape, h=html.escape, td_attrs=_td_attrs,
    b64=lambda data: base64.b64encode(data).decode("ascii"),
    md_cell=_cell_filter(md_escape, "**{}**"), tex_cell=_cell_filter(tex_escape, r"\textbf{{{}}}"),
    html_cell=_cell_filter(html.escape, "<strong>{}</strong>"),
    md_rule=lambda t: "|" + "|".join(":--" if i < t.numeric_from else "--:" for i in range(len(t.columns))) + "|")
_ENV.tests.update(table=lambda b: isinstance(b, Table), figure=lambda b: isinstance(b, Figure),
                  bullets=lambda b: isinstance(b, list))


def render(fmt_: str, title: str, sections: Sequence[Section], images: Mapping[str, bytes] | None = None) -> str:
    """The report in one format ("md", "tex" or "html"; HTML embeds `images` by figure name)."""
    return _ENV.get_template(f"report.{fmt_}.j2").render(title=title, sections=sections, images=images or {})
