"""`python -m benchmarks reproduce`: plans that pair with every table of paper_results.csv, the CARL Table 5.2
plan, the rows no suite can reproduce, a missing dataset named before anything runs, and plan -> run ->
paper table end to end on a fixture table that pairs with digits-size runs."""

from __future__ import annotations

import csv
import re

import pytest

from benchmarks.cli import main
from reports import papers as pairing
from reports.data import PAPER_COLUMNS, load_paper_results

TABLES = sorted({(p, t) for p, t in zip(*(load_paper_results()[c] for c in ("paper", "table")))})


def write_csv(path, rows: list[dict]):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=PAPER_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in PAPER_COLUMNS})
    return path


def fixture_row(**fields) -> dict:
    # the protocol mapping of the CARL dissertation holds for any of its tables ("*"): linear = crop + flip
    # probe; CARL's records name this paper (paper_reference), so a CARL run pairs with the row
    row = {"paper": "carl-carp-dissertation", "table": "Table 9.9", "method": "CARL", "pretrain_dataset": "digits",
           "eval_dataset": "digits", "backbone": "SmallCNN", "epochs": "1", "protocol": "linear",
           "metric": "top1", "value": "50.0", "std": "", "note": "fixture"}
    row.update(fields)
    return row


@pytest.mark.parametrize(("paper", "table"), TABLES, ids=[f"{p}-{t}" for p, t in TABLES])
def test_every_table_of_the_papers_plans(paper, table, capsys, tmp_path):
    assert main(["reproduce", paper, "--table", table, "--dry-run", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = load_paper_results()
    rows = rows[(rows["paper"] == paper) & (rows["table"] == table)]
    lines = [line for line in out.splitlines() if line.startswith(table + "  ")]
    assert len(lines) >= len(rows)  # every CSV row is in the plan, planned or with its reason
    for line in lines:
        assert "cannot reproduce" in line or re.search(r"\d+ of \d+", line), line
    if any("cannot reproduce" in line for line in lines):
        assert "cannot reproduce (" in out and "needs " in out


def test_carl_table_5_2_plans_cifar10_runs_of_every_method_with_three_seeds(capsys, tmp_path):
    assert main(["reproduce", "carl-carp-dissertation", "--table", "Table 5.2", "--dry-run",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    commands = [line.strip() for line in out.splitlines() if line.strip().startswith("python -m benchmarks run")]
    cifar10 = [c for c in commands if "--suite cifar10 " in c]
    # every method of the table: BYOL, CARL, SimCLR, SwAV and the supervised reference row
    for method in ("byol", "carl", "simclr", "swav", "supervised"):
        mine = [c for c in cifar10 if f"--methods {method} " in c]
        assert {re.search(r"--epochs (\d+)", c).group(1) for c in mine} == ({"100", "200"}), method
        assert all("--seeds 0 1 2 " in c for c in mine), mine
    assert "cost of the missing runs" in out
    assert re.search(r"\d+\.\d+ h CPU", out)  # the measured CPU figure of SimCLR on ResNet-18
    assert "unknown" in out  # methods with no measured figure and no record are not guessed
    # the short table name plans the same
    assert main(["reproduce", "carl-carp-dissertation", "--table", "5.2", "--dry-run",
                 "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out == out


def test_unknown_table_and_paper_are_named(capsys):
    assert main(["reproduce", "carl-carp-dissertation", "--table", "9.9", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --table '9.9'") and "'Table 5.2'" in err
    assert main(["reproduce", "no-such-paper", "--dry-run"]) == 2
    assert "known papers" in capsys.readouterr().err


def test_rows_no_suite_can_reproduce_say_why_and_what_a_suite_needs(capsys, tmp_path):
    csv_path = write_csv(tmp_path / "papers.csv", [
        fixture_row(pretrain_dataset="ImageNet", eval_dataset="ImageNet", backbone="ResNet-50", epochs="800"),
        fixture_row(pretrain_dataset="STL-10", eval_dataset="STL-10", backbone="ResNet-50"),
        fixture_row(method="UIC", protocol="linear_conv5", pretrain_dataset="CIFAR-10", eval_dataset="CIFAR-10",
                    backbone="ResNet-18", paper="uic", table="Table 3"),
    ])
    assert main(["reproduce", "carl-carp-dissertation", "--paper-csv", str(csv_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "no suite pretrains on ImageNet; needs a suite file with ImageNet data and a ResNet-50 backbone" in out
    assert "no suite trains a ResNet-50 on STL-10" in out
    assert main(["reproduce", "uic", "--paper-csv", str(csv_path), "--dry-run"]) == 0
    assert "protocol linear_conv5 has no counterpart in this suite" in capsys.readouterr().out


def test_a_missing_dataset_is_named_before_anything_runs(capsys, tmp_path):
    csv_path = write_csv(tmp_path / "papers.csv", [fixture_row(pretrain_dataset="CIFAR-10", eval_dataset="CIFAR-10",
                                                               backbone="ResNet-18")])
    rc = main(["reproduce", "carl-carp-dissertation", "--paper-csv", str(csv_path), "--out", str(tmp_path / "r"),
               "--work-dir", str(tmp_path / "w"), "--data-root", str(tmp_path / "no-data")])
    captured = capsys.readouterr()
    assert rc == 2
    assert "error: CIFAR-10 not found" in captured.err and str(tmp_path / "no-data") in captured.err
    assert not (tmp_path / "r").exists() and not (tmp_path / "w").exists()  # nothing ran


def test_plan_run_and_paper_table_end_to_end_on_digits(capsys, tmp_path, monkeypatch):
    # digits' small_cnn has no paper counterpart; the fixture names it, for the planner and the report alike
    # (both read this one mapping)
    monkeypatch.setitem(pairing.BACKBONES, "small_cnn", "SmallCNN")
    csv_path = write_csv(tmp_path / "papers.csv", [fixture_row(value="61.5", std="1.5")])
    out_dir, table_dir = tmp_path / "results", tmp_path / "tables"
    common = ["reproduce", "carl-carp-dissertation", "--table", "9.9", "--paper-csv", str(csv_path),
              "--out", str(out_dir), "--work-dir", str(tmp_path / "runs")]
    assert main([*common, "--dry-run"]) == 0
    plan = capsys.readouterr().out
    # the paper's linear protocol trains the probe on crop + flip views: digits' probe does not, so the plan sets it
    assert "--set evaluation.linear.views=crop_flip" in plan
    assert "0 of 1" in plan and "1 missing" in plan and not out_dir.exists()

    assert main([*common, "--table-dir", str(table_dir), "--no-progress"]) == 0
    capsys.readouterr()
    records = list((out_dir / "digits").glob("carl_e1_s0_*.json"))
    assert len(records) == 1
    md = (table_dir / "carl-carp-dissertation-table-9-9.md").read_text(encoding="utf-8")
    header = next(line for line in md.splitlines() if line.startswith("| Method"))
    assert "ours" in header and "paper" in header and "Δ" in header
    carl = next(line for line in md.splitlines() if line.startswith("| CARL"))
    cells = [c.strip() for c in carl.strip("|").split("|")]
    assert cells[2] == "61.50 ± 1.50"
    ours = float(cells[1].split()[0])
    delta = float(cells[3].split()[0].replace("−", "-"))
    assert delta == pytest.approx(ours - 61.5, abs=0.011)
    tex = (table_dir / "carl-carp-dissertation-table-9-9.tex").read_text(encoding="utf-8")
    assert r"top1 $\Delta$" in tex and cells[3] in tex and r"61.50 $\pm$ 1.50" in tex
    html = (table_dir / "carl-carp-dissertation-table-9-9.html").read_text(encoding="utf-8")
    assert "top1 Δ" in html and cells[3] in html and "61.50 ± 1.50" in html

    # the run now has its record: the plan says so and runs nothing
    assert main([*common, "--dry-run"]) == 0
    again = capsys.readouterr().out
    assert "1 of 1" in again and "0 missing" in again and "python -m benchmarks run" not in again

    # a second seed is missing: its cost comes from the first seed's record, on the device it ran on
    assert main([*common, "--seeds", "0", "1", "--dry-run"]) == 0
    more = capsys.readouterr().out
    assert "1 of 2" in more and "1 missing" in more and "--seeds 1 " in more
    assert re.search(r"1 run\(s\): \d[^\n]*\[cpu \(.*\): median wall time per epoch of 1 record\(s\)\]", more), more


def test_throughput_figures_are_read_from_their_measurements():
    import yaml

    from benchmarks.reproduce import THROUGHPUT_FILE, load_throughput

    listed = yaml.safe_load(THROUGHPUT_FILE.read_text(encoding="utf-8"))["throughput"]
    measured, sizes = load_throughput()
    # every entry that names a measurement is read from it (none silently dropped in the repository)
    assert len(measured) == sum(1 for e in listed if e.get("source"))
    assert all(e["images_per_s"] > 0 and e["device"] == "cpu" for e in measured)
    # no GPU figure is measured yet: the GPU rows stay empty rather than guessed
    assert all(not e.get("source") for e in listed if e["device"] == "gpu")
    assert all("source" in v for v in sizes.values())


def test_help_explains_the_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["reproduce", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--dry-run" in text and "paper_results.csv" in text and "Table 5.2" in text
