"""The code's shape, as issue 22 measures it (ast over the non-test code): short functions with few
parameters in benchmarks/ and reports/, a short report generator, one clustering-metrics module, and no
string-key decoding outside the schema-2 converter."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAYERS = ("benchmarks", "reports")
MAX_FUNCTION_LINES = 60
MAX_PARAMETERS = 8
MAX_REPORT_LINES = 1600


def _functions(package: str):
    for path in sorted((REPO / package).rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path.relative_to(REPO), node


def _parameters(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    args = node.args
    names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
    count = len(names) + (args.vararg is not None) + (args.kwarg is not None)
    return count - (names[:1] in (["self"], ["cls"]))


@pytest.mark.parametrize("package", LAYERS)
def test_functions_are_short_and_take_few_parameters(package):
    too_long = [f"{path}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
                for path, node in _functions(package) if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    too_many = [f"{path}:{node.lineno} {node.name} ({_parameters(node)} parameters)"
                for path, node in _functions(package) if _parameters(node) > MAX_PARAMETERS]
    assert not too_long and not too_many, "\n".join(too_long + too_many)


@pytest.mark.xfail(strict=True, reason="issue 22's target (1,600 lines) is not reached: reports/ holds ~2,130 "
                   "lines after the pipeline restructuring (see the issue's closing note); strict, so reaching it "
                   "turns this into a failure that asks to drop the mark")
def test_the_report_generator_stays_short():
    lines = sum(len(p.read_text().splitlines()) for p in (REPO / "reports").rglob("*.py"))
    assert lines <= MAX_REPORT_LINES


def test_one_module_computes_the_clustering_metrics():
    pattern = re.compile(r"mutual_info_score|adjusted_rand_score|def (nmi|ami|ari)\b")
    users = sorted(str(p.relative_to(REPO)) for package in ("benchmarks", "reports", "methods", "ssl_common")
                   for p in (REPO / package).rglob("*.py") if pattern.search(p.read_text()))
    assert users == ["ssl_common/clustering_metrics.py"]


def test_no_metric_key_is_decoded_outside_the_schema2_converter():
    """Tables read an entry's protocol, settings and metric; the key suffixes (_B<i>, _avg, _h<i>, k<K>) are
    read by benchmarks.records.metric_entries only."""
    suffix = re.compile(r"re\.compile\(r?[\"'][^\"']*(_B|_h|_avg|knn_k|pct|perclass|clustering_head)")
    found = sorted(str(p.relative_to(REPO)) for package in LAYERS for p in (REPO / package).rglob("*.py")
                   if suffix.search(p.read_text()))
    assert found == ["benchmarks/records.py"]
