"""Report generator: aggregation over seeds, paper pairing, layout, robustness, determinism, HTML render."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from reports.build import build_report

ROOT = Path(__file__).resolve().parents[1]


def record(suite="cifar10", dataset="CIFAR-10", method="simclr", display="SimCLR", seed=0, epochs=200,
           metrics=None, status="completed", reference=False, history=None, message=None, paper=None) -> dict:
    """A schema-valid run record (benchmarks.records, schema version 1)."""
    return {
        "schema_version": 1, "status": status, "suite": suite, "dataset": dataset, "method": method,
        "method_display": display, "is_reference": reference, "seed": seed, "epochs": epochs,
        "backbone": "resnet18_cifar", "batch_size": 256, "config": {"lr": 0.1}, "metrics": metrics or {},
        "evaluation": {}, "clusters": None, "history": history or [], "paper_reference": paper,
        "versions": {"torch": "2.5"}, "git_commit": None, "device": "cpu", "wall_time_s": 1.0,
        "throughput_images_per_s": None, "peak_memory_mb": None, "checkpoint": None,
        "created": f"2024-01-0{seed + 1}T00:00:00Z", "message": message,
    }


def curve(seed: int, knn: bool = True) -> list[dict]:
    return [{"epoch": e, "loss": 5.0 - e - 0.1 * seed, **({"online_knn_top1": 30.0 + 10 * e + seed} if knn else {})}
            for e in range(3)]


def write(results: Path, name: str, rec: dict | str) -> Path:
    path = results / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(rec if isinstance(rec, str) else json.dumps(rec, indent=2), encoding="utf-8")
    return path


def make_results(root: Path) -> Path:
    """Known values: SimCLR linear top-1 70/72/74 (mean 72.00 ± 2.00, n=3), BYOL 76/78 (77.00 ± 1.41, best)..."""
    results = root / "results"
    for seed, (top1, top5, nmi) in enumerate([(70.0, 90.0, 40.0), (72.0, 91.0, 42.0), (74.0, 92.0, 44.0)]):
        metrics = {"linear": {"top1": top1, "top5": top5}, "knn_k20": {"top1": top1 - 10},
                   "clustering": {"NMI": nmi, "AMI": nmi - 1, "ARI": nmi - 10, "ACC": nmi + 10},
                   "knn_k20_B2": {"top1": 33.0}}  # a per-layer probe: "other protocols"
        metrics["semi_10pct"] = {"top1": 80.0 + seed}
        if seed < 2:  # transfer measured on two of the three seeds -> "(n=2)"
            metrics["transfer_linear:CIFAR-100"] = {"top1": 40.0 + seed}
        write(results, f"cifar10/simclr_e200_s{seed}.json", record(seed=seed, metrics=metrics, history=curve(seed)))
    for seed, top1 in enumerate([76.0, 78.0]):
        write(results, f"cifar10/byol_e200_s{seed}.json",
              record(method="byol", display="BYOL", seed=seed, metrics={"linear": {"top1": top1, "top5": 89.0}},
                     history=curve(seed, knn=False)))
    write(results, "cifar10/carl_e200_s0.json",
          record(method="carl", display="CARL", metrics={"linear": {"top1": 75.0}}))  # one seed, no top-5
    write(results, "cifar10/supervised_e200_s0.json",
          record(method="supervised", display="Supervised", reference=True,
                 metrics={"linear": {"top1": 90.0, "top5": 99.0}}))
    write(results, "cifar10/random_init_e200_s0.json",
          record(method="random_init", display="Random init", reference=True, metrics={"linear": {"top1": 30.0}}))
    write(results, "cifar10/swav_e200_s0.json",
          record(method="swav", display="SwAV", status="diverged", message="loss became NaN at epoch 3",
                 metrics={"linear": {"top1": 10.0}}))
    # STL-10 at 100 epochs: the paper has SimCLR STL-10 linear top-1 at 200 epochs only -> not compared
    write(results, "stl10/simclr_e100_s0.json",
          record(suite="stl10", dataset="STL-10", epochs=100, metrics={"linear": {"top1": 66.0}}))
    write(results, "digits/simclr_e5_s0.json",
          record(suite="digits", dataset="digits", epochs=5, metrics={"semi_1pct": {"top1": 55.5}}))
    write(results, "digits/bad.json", "{not json")
    partial = record(suite="digits", dataset="digits", method="byol", display="BYOL", epochs=5)
    del partial["metrics"]
    write(results, "digits/partial.json", partial)
    return results


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    results = make_results(root)
    out = build_report(results, root / "out")
    return {"root": root, "results": results, "out": root / "out", **out}


def cell(agg, method, protocol_key, metric, suite="cifar10"):
    rows = agg[(agg["method"] == method) & (agg["protocol_key"] == protocol_key) & (agg["metric"] == metric)
               & (agg["suite"] == suite)]
    assert len(rows) == 1, rows
    return rows.iloc[0]


def md_section(text: str, kind: str, heading: str) -> str:
    """The Markdown under `## kind` / `### heading`, up to the next heading."""
    after_kind = text.split(f"\n## {kind}\n", 1)[1]
    return after_kind.split(f"\n### {heading}\n", 1)[1].split("\n#", 1)[0]


def md_row(section: str, method: str) -> list[str]:
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == method:
            return cells
    raise AssertionError(f"no row {method!r} in\n{section}")


LINEAR = "CIFAR-10 — suite cifar10, 200 epochs"


def test_mean_std_and_seed_counts(built):
    agg = built["aggregated"]
    simclr = cell(agg, "simclr", "linear", "top1")
    assert simclr["mean"] == pytest.approx(72.0) and simclr["std"] == pytest.approx(2.0) and simclr["n"] == 3
    byol = cell(agg, "byol", "linear", "top1")
    assert byol["mean"] == pytest.approx(77.0) and byol["std"] == pytest.approx(1.41421356) and byol["n"] == 2
    carl = cell(agg, "carl", "linear", "top1")
    assert carl["n"] == 1 and carl["std"] != carl["std"]  # NaN: one seed has no sample std
    section = md_section(built["paths"]["md"].read_text(), "Linear evaluation", LINEAR)
    row = md_row(section, "SimCLR")
    assert row[1] == "3" and row[2] == "72.00 ± 2.00" and row[5] == "**91.00 ± 1.00**"
    assert md_row(section, "CARL")[1:3] == ["1", "75.00"]  # one seed: the mean alone, n = 1
    transfer = md_row(md_section(built["paths"]["md"].read_text(), "Semi-supervised and transfer", LINEAR),
                      "SimCLR")
    assert "40.50 ± 0.71 (n=2)" in transfer  # measured on 2 of the row's 3 seeds


def test_best_per_column_bold_among_non_reference(built):
    agg = built["aggregated"]
    assert bool(cell(agg, "byol", "linear", "top1")["best"])
    assert not bool(cell(agg, "simclr", "linear", "top1")["best"])
    assert not bool(cell(agg, "supervised", "linear", "top1")["best"])  # 90 is higher, but a reference row
    md = built["paths"]["md"].read_text()
    section = md_section(md, "Linear evaluation", LINEAR)
    assert md_row(section, "BYOL")[2] == "**77.00 ± 1.41**"
    assert md_row(section, "Supervised")[2] == "90.00"
    assert md_row(section, "SimCLR")[5] == "**91.00 ± 1.00**"  # top-5: SimCLR 91 beats BYOL 89
    assert r"\textbf{77.00 $\pm$ 1.41}" in built["paths"]["tex"].read_text()
    assert "<strong>77.00 ± 1.41</strong>" in built["paths"]["html"].read_text()


def test_paper_delta_for_like_for_like_cell(built):
    simclr = cell(built["aggregated"], "simclr", "linear", "top1")
    assert simclr["paper_value"] == pytest.approx(75.41) and simclr["delta"] == pytest.approx(72.0 - 75.41)
    assert simclr["paper_source"] == "carl-carp-dissertation Table 5.2"
    section = md_section(built["paths"]["md"].read_text(), "Linear evaluation", LINEAR)
    header = md_row(section, "Method")
    row = md_row(section, "SimCLR")
    assert row[header.index("top-1 paper")] == "75.41 ± 0.47" and row[header.index("top-1 Δ")] == "-3.41"
    assert md_row(section, "BYOL")[header.index("top-1 Δ")] == "+0.54"  # 77.00 - 76.46
    transfer = cell(built["aggregated"], "simclr", "transfer_linear:CIFAR-100", "top1")
    assert transfer["paper_value"] == pytest.approx(40.39) and transfer["delta"] == pytest.approx(0.11)


def test_unlike_cells_are_not_paired(built):
    stl = cell(built["aggregated"], "simclr", "linear", "top1", suite="stl10")
    assert stl["paper_value"] != stl["paper_value"] and stl["delta"] != stl["delta"]  # 100 vs 200 epochs
    md = built["paths"]["md"].read_text()
    section = md_section(md, "Linear evaluation", "STL-10 — suite stl10, 100 epochs")
    assert "paper" not in section and "Δ" not in section
    unmatched = built["unmatched_paper"]
    row = unmatched[(unmatched["method"] == "SimCLR") & (unmatched["pretrain_dataset"] == "STL-10")
                    & (unmatched["protocol"] == "linear")]
    assert len(row) == 1 and "our runs have 100 epochs, the paper 200" in row.iloc[0]["reason"]
    listed = md.split("## Paper numbers without a matching run", 1)[1].split("\n## ", 1)[0]
    assert "| carl-carp-dissertation | Table 5.2 | SimCLR | STL-10 | STL-10 |" in listed
    # a paired paper row is not listed as unmatched
    assert not ((unmatched["method"] == "SimCLR") & (unmatched["pretrain_dataset"] == "CIFAR-10")
                & (unmatched["protocol"] == "linear") & (unmatched["epochs"] == 200)).any()


def test_reference_rows_below_separator_and_dash_for_unmeasured(built):
    md = built["paths"]["md"].read_text()
    section = md_section(md, "Linear evaluation", LINEAR)
    lines = [ln.split("|")[1].strip() for ln in section.splitlines() if ln.startswith("| ")]
    assert lines == ["Method", "BYOL", "CARL", "SimCLR", "*reference*", "Random init", "Supervised"]
    assert md_row(section, "CARL")[5] == "–" and md_row(section, "Random init")[5] == "–"
    tex = built["paths"]["tex"].read_text()
    block = tex[tex.index(r"\subsection*{Linear evaluation}"):]
    block = block[:block.index(r"\end{tabular}")]
    assert block.index(r"\toprule") < block.index("SimCLR") < block.rindex(r"\midrule") < block.index("Supervised")
    assert r"\bottomrule" in tex and "BYOL & 2 &" in block
    assert r"CARL & 1 & 75.00 & 78.94 $\pm$ 0.52 & -3.94 & -- \\" in block
    html = built["paths"]["html"].read_text()
    assert '<tbody class="reference">' in html and '<td class="num missing">–</td>' in html


def test_diverged_excluded_but_listed(built):
    assert "swav" not in set(built["aggregated"]["method"])
    excluded = built["excluded"]
    assert list(excluded["method"]) == ["swav"] and excluded.iloc[0]["status"] == "diverged"
    md = built["paths"]["md"].read_text()
    listed = md.split("## Runs not in the tables", 1)[1].split("\n## ", 1)[0]
    assert "results/cifar10/swav\\_e200\\_s0.json" in listed and "diverged" in listed
    assert "loss became NaN at epoch 3" in listed
    assert "SwAV" not in md.split("## Paper numbers without", 1)[0].split("## Linear evaluation", 1)[1]


def test_malformed_records_reported_by_file_and_build_goes_on(built, tmp_path, capsys):
    skipped = {s.path: s.reason for s in built["skipped"]}
    assert set(skipped) == {"results/digits/bad.json", "results/digits/partial.json"}
    assert "not valid JSON" in skipped["results/digits/bad.json"]
    assert skipped["results/digits/partial.json"] == "missing key 'metrics'"
    md = built["paths"]["md"].read_text()
    listed = md.split("## Skipped records", 1)[1]
    assert "results/digits/partial.json: missing key 'metrics'" in listed and "results/digits/bad.json" in listed
    assert "digits — suite digits, 5 epochs" in md  # the good digits record still made it
    result = build_report(built["results"], tmp_path / "o", suites=["digits"], formats=["md"], figures=False)
    err = capsys.readouterr().err
    assert "skipped 2 records" in err and "results/digits/partial.json: missing key 'metrics'" in err
    assert result["paths"]["md"].exists() and not (tmp_path / "o" / "report.html").exists()


def test_other_protocols_do_not_crash(built):
    md = built["paths"]["md"].read_text()
    other = md_section(md, "Other protocols", LINEAR)
    assert "knn\\_k20\\_B2 top1" in other and md_row(other, "SimCLR")[2] == "33.00 ± 0.00"


def test_build_twice_is_byte_identical(built, tmp_path):
    again = build_report(built["results"], tmp_path / "again")
    for fmt in ("md", "tex", "html"):
        assert again["paths"][fmt].read_bytes() == built["paths"][fmt].read_bytes(), fmt
    first = sorted(p.name for p in built["figures"])
    assert first == sorted(p.name for p in again["figures"]) and any(n.startswith("curves_") for n in first)
    for a, b in zip(sorted(built["figures"]), sorted(again["figures"])):
        assert a.read_bytes() == b.read_bytes(), a.name
        assert a.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = built["paths"]["html"].read_text()
    assert html.count('src="data:image/png;base64,') == len(first)
    assert not re.search(r"(src|href)=\"(?!data:)", html) and "<link" not in html  # nothing external
    assert not list(built["out"].rglob("*.tmp"))


def test_filters(built, tmp_path):
    kw = {"formats": ["md"], "figures": False}
    only = build_report(built["results"], tmp_path / "m", methods=["byol", "Supervised"], **kw)
    assert set(only["aggregated"]["method"]) == {"byol", "supervised"}
    assert set(only["unmatched_paper"]["method"].str.casefold()) <= {"byol", "supervised"}
    epochs = build_report(built["results"], tmp_path / "e", epochs=[100], **kw)
    assert set(epochs["aggregated"]["suite"]) == {"stl10"} and epochs["excluded"].empty
    suite = build_report(built["results"], tmp_path / "s", suites=["cifar10"], **kw)
    assert set(suite["aggregated"]["suite"]) == {"cifar10"} and list(suite["excluded"]["method"]) == ["swav"]
    assert set(suite["unmatched_paper"]["pretrain_dataset"]) == {"CIFAR-10"}
    md = suite["paths"]["md"].read_text()
    assert "Filters: suite = cifar10." in md and "STL-10 — suite" not in md


def test_cli(built, tmp_path):
    out = tmp_path / "cli"
    run = subprocess.run([sys.executable, "-m", "reports", "build", "--results", str(built["results"]), "--out",
                          str(out), "--format", "md,tex", "--epochs", "200", "--no-figures"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr
    assert (out / "report.md").exists() and (out / "report.tex").exists() and not (out / "report.html").exists()
    assert "results/digits/bad.json: not valid JSON" in run.stderr
    helped = subprocess.run([sys.executable, "-m", "reports", "build", "--help"], capture_output=True, text=True,
                            cwd=ROOT, timeout=60)
    assert helped.returncode == 0 and "--results" in helped.stdout and "--format" in helped.stdout
    missing = subprocess.run([sys.executable, "-m", "reports", "build", "--results", str(tmp_path / "nope"),
                              "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert missing.returncode == 2 and "does not exist" in missing.stderr


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
