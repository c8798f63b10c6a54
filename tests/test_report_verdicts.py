"""The report's significance marks, read back from report.md built from the committed digits records: every
"significantly worse" mark (a non-reference cell that is neither the bold best, nor † (not significantly
different), nor ‡ (not testable), in a column with a bold best) has a seed-level Welch p <= 0.2 computed
with scipy from the two cells' own mean, std and n as printed."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from scipy import stats as scipy_stats

from reports.build import build_report
from reports.render import md_escape

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "digits"
CELL = re.compile(r"^(\*\*)?(-?\d+\.\d+) ± (\d+\.\d+) \[[^\]]*\]§?([†‡]?)(?: \(n=(\d+)\))?([†‡]?)(\*\*)?$")
ONE = re.compile(r"^(\*\*)?(-?\d+\.\d+)(?: ⟨[^⟩]*⟩§?)?(?: \(n=(\d+)\))?([†‡]?)(\*\*)?$")


def parse_cell(text: str, row_n: int):
    """(bold, mean, std or None, n, mark) of one rendered cell, None for '–'."""
    text = text.replace("\\*", "*").strip()
    if text in ("–", ""):
        return None
    if m := CELL.match(text):
        return bool(m.group(1)), float(m.group(2)), float(m.group(3)), int(m.group(5) or row_n), \
            m.group(4) or m.group(6)
    m = ONE.match(text)
    assert m, f"unparsed cell {text!r}"
    n = int(m.group(3) or row_n)
    return bool(m.group(1)), float(m.group(2)), None, n if n == 1 else n, m.group(4)


def grid_tables(md: str):
    """Each grid table of the report (header starts '| Method | n |'): header, rows above the reference
    separator."""
    lines = md.splitlines()
    for i, line in enumerate(lines):
        if not line.startswith("| Method | n |"):
            continue
        header = [c.strip() for c in line.strip().strip("|").split("|")]
        rows = []
        for row in lines[i + 2:]:
            if not row.startswith("|") or row.startswith("| *reference*"):
                break
            rows.append([c.strip() for c in row.strip().strip("|").split("|")])
        yield header, rows


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    if not any(RESULTS.glob("*.json")):
        pytest.skip("no committed digits records")
    out = tmp_path_factory.mktemp("verdicts")
    with open(os.devnull, "w") as quiet:
        built = build_report(RESULTS, out, n_boot=100, figures=False, formats=["md"], stderr=quiet)
    return built["paths"]["md"].read_text(), built["cells"]


def test_no_significantly_worse_mark_has_a_seed_level_welch_p_above_0_2(report):
    report, _ = report
    checked, columns = 0, 0
    for header, rows in grid_tables(report):
        group_of = header.index("K") if "K" in header else None
        for j, name in enumerate(header):
            if j < 2 or name.endswith(" paper") or name.endswith(" Δ") or name in ("K", "source",
                                                                                  "non-empty clusters"):
                continue
            groups: dict[str, list] = {}
            for row in rows:
                cell = parse_cell(row[j], int(row[1]))
                if cell is not None:
                    groups.setdefault(row[group_of] if group_of is not None else "", []).append((row[0], cell))
            for cells in groups.values():
                best = [c for _, c in cells if c[0]]
                if not best:
                    continue
                columns += 1
                for label, (bold, mean, std, n, mark) in cells:
                    if bold or mark:
                        continue
                    assert std is not None and n >= 2, f"{label} {name}: marked worse without seeds to test"
                    for _, b_mean, b_std, b_n, _ in best:
                        assert b_std is not None and b_n >= 2, f"{name}: best untestable, {label} marked worse"
                        p = scipy_stats.ttest_ind_from_stats(mean, std, n, b_mean, b_std, b_n,
                                                             equal_var=False).pvalue
                        assert p <= 0.2, f"{label} in {name}: marked significantly worse, Welch p = {p:.3f}"
                    checked += 1
    assert columns > 10 and checked > 10  # the report has columns with a best and verdicts to check


def test_cell_parser_reads_the_marks():
    assert parse_cell("**96.76 ± 0.58 [95.3, 98.2]**", 3) == (True, 96.76, 0.58, 3, "")
    assert parse_cell("94.07 ± 3.10 [86.4, 100.00] (n=2)†", 3) == (False, 94.07, 3.10, 2, "†")
    assert parse_cell("75.00 ⟨71.20, 78.10⟩‡", 1) == (False, 75.0, None, 1, "‡")


def test_no_long_paragraph_before_the_first_table_and_the_summary_names_the_best(report):
    md, cells = report
    head = md.split("\n| ", 1)[0]
    for block in head.split("\n"):
        assert len(block.split()) <= 120, f"{len(block.split())} words before the first table: {block[:80]}"
    summary = md.split("## Summary\n", 1)[1].split("\n## ", 1)[0]
    knn = cells[(cells["key"] == "knn_k20") & (cells["metric"] == "top1") & ~cells["is_reference"]]
    best = knn.sort_values("mean", ascending=False).iloc[0]
    second = knn.sort_values("mean", ascending=False).iloc[1]
    line = next(x for x in summary.splitlines() if x.startswith("- kNN k=20"))
    assert f"best {md_escape(best['row'])} {best['mean']:.2f} ± {best['std']:.2f}" in line
    assert f"{best['mean'] - second['mean']:+.2f} over the runner-up {md_escape(second['row'])}" in line
    verdict = "do not support" if second["tied"] else "support"
    assert f"the seeds {verdict} the difference" in line


def test_paper_rows_about_other_datasets_are_a_count_listed_in_the_appendix(report):
    md, _ = report
    body, appendix = md.split("## Appendix: how the numbers are made", 1)
    m = re.search(r"(\d+) paper number\(s\) concern other datasets than this report's", body)
    assert m and int(m.group(1)) > 0
    assert "CIFAR-10" not in body.split("## Comparison with the papers", 1)[1]
    others = appendix.split("## Paper rows about other datasets\n", 1)[1]
    assert "| CIFAR-10 |" in others
    related = appendix.split("## Paper numbers without a matching run\n", 1)[1].split("\n## ", 1)[0]
    assert "| CIFAR-10 | CIFAR-10 |" not in related
