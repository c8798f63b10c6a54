"""Report generator: which records count, rows and columns that compare like with like, output (md/tex/html,
figures), errors, determinism and the HTML render. Records come from tests/record_factory.py (schema v3)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.errors import BenchmarkError
from benchmarks.records import predictions_path
from reports.__main__ import main
from reports.build import build_report
from tests.record_factory import make_labels, write_run

ROOT = Path(__file__).resolve().parents[1]
N_BOOT = 200  # enough for the tests; every interval is compared with reports.stats at the same n_boot
DISS = "carl-carp-dissertation"
SIMCLR = "SimCLR [optimizer.lr=0.03]"  # two settings of SimCLR in the fixture: both rows are labelled
CIFAR = "CIFAR-10 — suite cifar10, 200 epochs"
LINEAR = "linear probe (offline, views crop_flip) top-1"


def curve(seed: int) -> list[dict]:
    return [{"epoch": e, "loss": 5.0 - e - 0.1 * seed, "online_knn_top1": 30.0 + 10 * e + seed}
            for e in range(3)]


def make_results(root: Path) -> Path:
    """SimCLR linear top-1 70/72/74 (72.00 ± 2.00, n = 3), BYOL 76/77/78, CARL one seed; stale, edited and
    unreadable files beside them."""
    results = root / "results"
    for seed, top1 in enumerate((70.0, 72.0, 74.0)):
        write_run(results, method="simclr", seed=seed, paper_reference=DISS, history=curve(seed),
                  accuracy={"linear": top1, "knn_k20": 60.0 + seed, "knn_k200": 55.0},
                  params={"knn_k200": {"bank_images_per_class_min": 18}}, clusters={"clustering": (10, 0.3)})
    for seed, top1 in enumerate((76.0, 77.0, 78.0)):
        write_run(results, method="byol", seed=seed, paper_reference=DISS,
                  accuracy={"linear": top1, "knn_k20": 62.0})
    # one seed; its kNN measured with another temperature (a column of its own), its probe on clean views
    write_run(results, method="carl", seed=0, paper_reference=DISS,
              accuracy={"linear": 75.0, "knn_k20": 64.0},
              settings={"linear": {"views": "none", "epochs": 100, "lr": 0.1},
                        "knn_k20": {"k": 20, "temperature": 0.1}})
    # SimCLR with another learning rate: a row of its own, never pooled with the first
    write_run(results, method="simclr", seed=0, paper_reference=DISS, accuracy={"linear": 50.0},
              method_config={"optimizer": {"lr": 0.001, "name": "sgd"}, "hparams": {"temperature": 0.2}})
    write_run(results, method="supervised", seed=0, accuracy={"linear": 90.0, "knn_k20": 88.0})
    write_run(results, method="random_init", seed=0, accuracy={"linear": 30.0, "knn_k20": 20.0})
    write_run(results, method="swav", seed=0, status="diverged", message="loss became NaN at epoch 3")
    # a stale copy in another folder (older `created`, other numbers): never wins
    write_run(results, "backup/cifar10/simclr_s0_old.json", method="simclr", seed=0, paper_reference=DISS,
              accuracy={"linear": 10.0, "knn_k20": 60.0, "knn_k200": 55.0},
              created="2024-06-01T00:00:00+00:00",
              params={"knn_k200": {"bank_images_per_class_min": 18}}, clusters={"clustering": (10, 0.3)})
    # an exact copy (same `created`): the file at its canonical path wins the tie
    canonical = next((results / "cifar10").glob("byol_e200_s1_*.json"))
    (results / "backup" / "cifar10" / "byol_copy.json").write_bytes(canonical.read_bytes())
    beside = results / "backup" / "cifar10" / predictions_path(canonical).name
    shutil.copy(predictions_path(canonical), beside)
    # an edited copy: its checksum no longer matches
    edited = json.loads(canonical.read_text())
    next(e for e in edited["metrics"] if e["key"] == "linear" and e["metric"] == "top1")["value"] = 99.0
    (results / "backup" / "cifar10" / "byol_edited.json").write_text(json.dumps(edited))
    # unreadable files of every kind
    (results / "digits").mkdir()
    (results / "digits" / "x.json").write_bytes(b"\xff")
    (results / "digits" / "bad.json").write_text("{not json")
    (results / "digits" / "v1.json").write_text(json.dumps({"schema_version": 1, "suite": "digits"}))
    gone = write_run(results, "digits/no_predictions.json", suite="digits", dataset="digits", method="byol",
                     accuracy={"linear": 80.0})
    predictions_path(gone).unlink()
    # a record whose metric disagrees with its (hash-valid) predictions
    from benchmarks.records import write_record
    from tests.record_factory import make_run

    record, predictions = make_run(suite="digits", dataset="digits", method="simclr",
                                   accuracy={"linear": 80.0})
    next(e for e in record["metrics"] if e["key"] == "linear" and e["metric"] == "top1")["value"] = 85.0
    write_record(record, results / "digits" / "mismatch.json", predictions=predictions)
    write_run(results, suite="digits", dataset="digits", method="simclr", backbone="small_cnn", epochs=5,
              accuracy={"linear": 55.5})
    return results


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    results = make_results(root)
    out = build_report(results, root / "out", n_boot=N_BOOT, stderr=open(os.devnull, "w"))
    return {"root": root, "results": results, "out": root / "out", **out}


def cell(cells, row, key, metric="top1", table=("cifar10", "CIFAR-10", 200)):
    rows = cells[(cells["row"] == row) & (cells["key"] == key) & (cells["metric"] == metric)
                 & (cells["table"] == table)]
    assert len(rows) == 1, rows[["row", "key", "metric", "column"]]
    return rows.iloc[0]


def md_section(text: str, heading: str, kind: str) -> str:
    """The Markdown under `## heading` / `### kind`, up to the next heading."""
    after = text.split(f"\n## {heading}\n", 1)[1]
    return after.split(f"\n### {kind}\n", 1)[1].split("\n#", 1)[0]


def md_rows(section: str) -> dict[str, list[str]]:
    rows = {}
    for line in section.splitlines():
        if line.startswith("| ") and not line.startswith("|:"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells
    return rows


def md_escape(text: str) -> str:
    return re.sub(r"([\\|*_`])", r"\\\1", text)


# ----------------------------------------------------------------------------------- which records count


def test_stale_copy_never_wins_and_is_listed_with_the_winner(built):
    simclr = cell(built["cells"], SIMCLR, "linear")
    assert simclr["values"] == (70.0, 72.0, 74.0) and simclr["n"] == 3  # 10.0 of the stale copy is not there
    superseded = {s.path: s for s in built["superseded"]}
    stale = superseded["results/backup/cifar10/simclr_s0_old.json"]
    assert stale.winner.startswith("results/cifar10/simclr_e200_s0_")
    assert stale.created.startswith("2024-06-01")
    tie = superseded["results/backup/cifar10/byol_copy.json"]  # same created: the canonical path wins
    assert tie.winner.startswith("results/cifar10/byol_e200_s1_")
    listed = built["paths"]["md"].read_text().split("## Superseded records", 1)[1].split("\n## ", 1)[0]
    assert md_escape("results/backup/cifar10/simclr_s0_old.json") in listed
    assert md_escape(stale.winner) in listed


def test_edited_copy_is_skipped_for_its_checksum(built):
    skipped = {s.path: s.reason for s in built["skipped"]}
    assert "checksum does not match" in skipped["results/backup/cifar10/byol_edited.json"]
    assert cell(built["cells"], "BYOL", "linear")["values"] == (76.0, 77.0, 78.0)


def test_unreadable_files_are_skipped_by_name_and_the_build_goes_on(built):
    skipped = {s.path: s.reason for s in built["skipped"]}
    assert "not a UTF-8 text file" in skipped["results/digits/x.json"]
    assert "not valid JSON" in skipped["results/digits/bad.json"]
    assert "schema_version is 1" in skipped["results/digits/v1.json"]
    assert "predictions file" in skipped["results/digits/no_predictions.json"]
    assert "mismatched predictions file: linear top1" in skipped["results/digits/mismatch.json"]
    md = built["paths"]["md"].read_text()
    listed = md.split("## Skipped records", 1)[1]
    assert md_escape("results/digits/x.json: not a UTF-8 text file") in listed
    assert "## digits — suite digits, 5 epochs" in md  # the good digits record still made it


def test_non_utf8_file_via_cli_is_named_on_stderr(tmp_path, capsys):
    results = tmp_path / "results"
    write_run(results, suite="digits", dataset="digits", method="simclr", backbone="small_cnn", epochs=5,
              accuracy={"linear": 90.0})
    (results / "digits" / "x.json").write_bytes(b"\xff")  # printf '\xff' > results/digits/x.json
    code = main(["build", "--results", str(results), "--out", str(tmp_path / "out"), "--no-figures",
                 "--format", "md", "--n-boot", "100"])
    assert code == 0
    assert "results/digits/x.json: not a UTF-8 text file" in capsys.readouterr().err
    assert "90.00 ⟨" in (tmp_path / "out" / "report.md").read_text()


def test_results_given_as_the_current_folder_keep_the_dots_of_skip_reasons(tmp_path, monkeypatch, capsys):
    results = tmp_path / "results"
    record = write_run(results, suite="digits", dataset="digits", method="simclr", backbone="small_cnn",
                       epochs=5, accuracy={"linear": 90.0})
    predictions = predictions_path(record)
    predictions.unlink()
    monkeypatch.chdir(results)
    code = main(["build", "--results", ".", "--out", str(tmp_path / "out"), "--no-figures", "--format", "md",
                 "--n-boot", "100"])
    assert code == 0
    assert f"its predictions file {predictions.name} cannot be read" in capsys.readouterr().err


def test_diverged_run_is_listed_not_tabled(built):
    assert "swav" not in set(built["cells"]["method"])
    assert [r.record["method"] for r in built["excluded"]] == ["swav"]
    listed = built["paths"]["md"].read_text().split("## Runs not in the tables", 1)[1].split("\n## ", 1)[0]
    assert "diverged" in listed and "loss became NaN at epoch 3" in listed


# ------------------------------------------------------------------------------- rows and columns


def test_two_settings_fingerprints_give_two_labelled_rows(built):
    other = cell(built["cells"], "SimCLR [optimizer.lr=0.001]", "linear")
    assert other["values"] == (50.0,)
    assert cell(built["cells"], SIMCLR, "linear")["values"] == (70.0, 72.0, 74.0)
    rows = md_rows(md_section(built["paths"]["md"].read_text(), CIFAR, "Linear evaluation"))
    assert "SimCLR [optimizer.lr=0.001]" in rows and rows[SIMCLR][1] == "3" and "SimCLR" not in rows
    assert rows["SimCLR [optimizer.lr=0.001]"][1] == "1"


def test_a_column_with_two_protocol_settings_splits_and_names_the_key(built):
    cells = built["cells"]
    knn = cells[(cells["key"] == "knn_k20") & (cells["metric"] == "top1")]
    # the header names k and T itself: a column per temperature, no bracketed repeat
    assert set(knn["column"]) == {"kNN k=20, T=0.07 top-1", "kNN k=20, T=0.1 top-1"}
    assert set(knn.loc[knn["column"].str.contains("T=0.1 "), "row"]) == {"CARL"}
    linear = set(cells.loc[(cells["key"] == "linear") & (cells["metric"] == "top1"), "column"])
    assert linear == {LINEAR, "linear probe (offline, views none) top-1"}
    header = md_rows(md_section(built["paths"]["md"].read_text(), CIFAR, "kNN"))["Method"]
    assert "kNN k=20, T=0.07 top-1" in header and "kNN k=20, T=0.1 top-1" in header


def test_knn_header_says_when_k_exceeds_the_images_per_class(built):
    columns = set(built["cells"]["column"])
    assert "kNN k=200, T=0.07 (k > 18 bank images per class) top-1" in columns
    assert not any("k > " in c for c in columns if c.startswith("kNN k=20 "))


def test_reference_rows_below_the_separator_and_not_bold(built):
    section = md_section(built["paths"]["md"].read_text(), CIFAR, "Linear evaluation")
    names = [ln.split("|")[1].strip() for ln in section.splitlines() if ln.startswith("| ")]
    assert names[-3:] == ["*reference*", "Random init", "Supervised"]
    assert not cell(built["cells"], "Supervised", "linear")["best"]  # 90 is higher, but a reference row
    assert cell(built["cells"], "BYOL", "linear")["best"]
    assert md_rows(section)["BYOL"][2].startswith("**77.00 ± 1.00")


# ------------------------------------------------------------------------------------------ output


def test_output_folder_that_is_a_file_is_a_clean_error(built, tmp_path, capsys):
    target = tmp_path / "report.md"
    target.write_text("not a folder")
    with pytest.raises(BenchmarkError) as info:
        build_report(built["results"], target, figures=False, n_boot=100, stderr=open(os.devnull, "w"))
    message = str(info.value)
    assert "\n" not in message and str(target) in message and "is a file, not a folder" in message
    code = main(["build", "--results", str(built["results"]), "--out", str(target), "--no-figures"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and str(target) in err and err.count("\n") == 1
    assert target.read_text() == "not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_is_a_clean_error(built, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(BenchmarkError, match="cannot be written"):
            build_report(built["results"], folder, figures=False, n_boot=100, stderr=open(os.devnull, "w"))
    finally:
        folder.chmod(0o700)


def test_build_twice_is_byte_identical(built, tmp_path):
    again = build_report(built["results"], tmp_path / "again", n_boot=N_BOOT, stderr=open(os.devnull, "w"))
    for fmt in ("md", "tex", "html"):
        assert again["paths"][fmt].read_bytes() == built["paths"][fmt].read_bytes(), fmt
    first = sorted(p.name for p in built["figures"])
    assert first == sorted(p.name for p in again["figures"])
    assert any(n.startswith("forest_") for n in first) and any(n.startswith("curves_") for n in first)
    for a, b in zip(sorted(built["figures"]), sorted(again["figures"])):
        assert a.read_bytes() == b.read_bytes(), a.name
        assert a.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = built["paths"]["html"].read_text()
    assert html.count('src="data:image/png;base64,') == len(first)
    assert not re.search(r"(src|href)=\"(?!data:)", html) and "<link" not in html  # nothing external
    assert not list(built["out"].rglob("*.tmp"))


def test_formats_tex_booktabs_and_html_tooltips(built):
    tex = built["paths"]["tex"].read_text()
    assert r"\toprule" in tex and r"\midrule" in tex and r"\bottomrule" in tex
    assert r"\textbf{77.00 $\pm$ 1.00 [74.52, 79.48]}" in tex
    html = built["paths"]["html"].read_text()
    assert '<tbody class="reference">' in html and "<strong>77.00 ± 1.00 [74.52, 79.48]</strong>" in html
    assert "95% percentile bootstrap over 200 test images of the mean over seeds" in html  # n >= 2 tooltip


def test_conventions_paragraph_and_help_state_the_rules(built, capsys):
    md = built["paths"]["md"].read_text()
    for phrase in ("95% Student-t interval over seeds", "bootstrap interval over the run's test images",
                   "basic", "Holm", "newest by its own created timestamp", "paper\\_reference",
                   "Supervised (labelled subset only)", "ACC (many-to-one)"):
        assert phrase in md, phrase
    with pytest.raises(SystemExit) as exited:
        main(["build", "--help"])
    helped = capsys.readouterr().out
    assert exited.value.code == 0
    for phrase in ("--results", "--format", "--n-boot", "t-interval", "Holm", "basic/reflected",
                   "superseded"):
        assert phrase in helped, phrase


def test_filters(built, tmp_path):
    kw = {"formats": ["md"], "figures": False, "n_boot": 100, "stderr": open(os.devnull, "w")}
    only = build_report(built["results"], tmp_path / "m", methods=["byol", "Supervised"], **kw)
    assert set(only["cells"]["method"]) == {"byol", "supervised"}
    epochs = build_report(built["results"], tmp_path / "e", epochs=[5], **kw)
    assert set(epochs["cells"]["suite"]) == {"digits"} and not epochs["excluded"]
    suite = build_report(built["results"], tmp_path / "s", suites=["cifar10"], **kw)
    assert set(suite["cells"]["suite"]) == {"cifar10"}
    assert "Filters: suite = cifar10." in suite["paths"]["md"].read_text()


def test_cli_formats_and_missing_results(built, tmp_path, capsys):
    out = tmp_path / "cli"
    run = subprocess.run([sys.executable, "-m", "reports", "build", "--results", str(built["results"]),
                          "--out", str(out), "--format", "md,tex", "--epochs", "5", "--no-figures",
                          "--n-boot", "100"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr
    assert (out / "report.md").exists() and (out / "report.tex").exists()
    assert not (out / "report.html").exists()
    assert main(["build", "--results", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_record_factory_labels_are_balanced():
    labels = make_labels()
    assert len(labels) == 200 and set(labels.tolist()) == set(range(10))


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="chromium (or chromium-browser) is not on PATH: cannot take a "
                                                 "headless screenshot of report.html")
def test_html_renders_in_headless_chromium(built, tmp_path):
    from PIL import Image

    shot = tmp_path / "shot.png"
    html = built["paths"]["html"].resolve()
    subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,1600",
                    html.as_uri()], capture_output=True, timeout=60, check=False)
    assert shot.exists(), "chromium wrote no screenshot"
    image = Image.open(shot).convert("RGB")
    pixels = list(image.getdata())
    non_white = sum(1 for p in pixels if min(p) < 245) / len(pixels)
    assert len(set(pixels)) > 1 and non_white > 0.01, f"blank page: {non_white:.4f} non-white"


def test_build_on_an_empty_folder_warns_naming_it_and_exits_non_zero(tmp_path, capsys):
    empty = tmp_path / "no-records"
    empty.mkdir()
    code = main(["build", "--results", str(empty), "--out", str(tmp_path / "out"), "--no-figures"])
    err = capsys.readouterr().err
    assert code == 1 and f"warning: no run record under {empty}" in err


def test_curves_drop_one_point_series_and_scale_each_loss_by_its_first_epoch():
    import pandas as pd

    from reports.figures import curve_panels, curves_chart

    rows = [("a", 0, 1.0, "loss", 200.0), ("a", 0, 2.0, "loss", 100.0), ("a", 1, 1.0, "loss", 220.0),
            ("a", 1, 2.0, "loss", 110.0), ("b", 0, 1.0, "loss", 2.0), ("b", 0, 2.0, "loss", 1.0),
            ("c", 0, 1.0, "loss", 5.0), ("c", 0, 1.0, "online_knn_top1", 50.0)]
    history = pd.DataFrame(rows, columns=["method", "seed", "epoch", "series", "value"])
    drawn = curve_panels(history)
    assert set(drawn["method"]) == {"a", "b"}  # c has one epoch: no one-point line, no online-kNN panel
    a = drawn[(drawn["method"] == "a")].groupby("epoch")["value"].mean()
    assert a.tolist() == pytest.approx([1.0, 0.5])  # divided by its own mean first-epoch loss (210)
    b = drawn[(drawn["method"] == "b")].groupby("epoch")["value"].mean()
    assert b.tolist() == pytest.approx([1.0, 0.5])  # a loss near 200 no longer flattens b's
    assert curves_chart(history[history["method"] == "c"], ["c"], "t") is None


def test_rules_are_a_short_how_to_read_list_and_a_collapsed_appendix(built):
    md = built["paths"]["md"].read_text()
    head = md.split("\n| ", 1)[0]  # everything before the first table
    assert "## Summary" in head and "## How to read this" in head
    assert max(len(line.split()) for line in head.splitlines()) <= 120
    assert md.index("## Appendix: how the numbers are made") > md.index("## Comparison with the papers")
    html = built["paths"]["html"].read_text()
    appendix = html.split('<details>\n<summary><h2 class="inline">Appendix: how the numbers are made</h2>'
                          "</summary>", 1)
    assert len(appendix) == 2 and "Welch" in appendix[1].split("</details>", 1)[0]
