"""`python -m benchmarks reproduce PAPER`: plan, run and tabulate the runs that pair with a paper's table.

For every row of the table (paper_results.csv) the planner tries each suite and each method or variant
the suite can run, with the table's epochs and the protocol settings the paper requires
(``reports.papers.PROTOCOLS``), and keeps what ``reports.papers.pairing_candidates`` -- the predicate the
report pairs its cells with -- accepts: the prospective record of such a run goes through the report's own
``reports.cells.values_frame``, so a planned run is exactly one whose record the report would pair with
that row. A row no suite can pair with is listed with the first criterion that fails and what a suite
would need.

Then, per planned run: the record path its resolved config gives (``run_fingerprints``, ``record_path``)
and whether a valid completed record is there (``read_record``); the cost of each missing one (pretraining
hours: a measured figure of ``benchmarks/throughput.yaml`` on a GPU, else the wall time of existing
records of the same suite and method on their device, else that file's CPU figure, else unknown). With
``--dry-run`` it prints the plan and the `run` commands; otherwise it checks the datasets, runs the
missing runs through `run`'s own code path and builds the table in the paper's layout, ours beside theirs
with Δ (Markdown, LaTeX, HTML).

The planner predicts which protocol keys a run records from its suite's ``evaluation`` section
(``expected_entries``); of the methods' own clustering heads it knows the heads a method lists in its
``heads`` hyperparameter (Self-Classifier), the only heads a paper row pairs with.
"""

from __future__ import annotations

import argparse
import math
import re
import shlex
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.errors import BenchmarkError, ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
THROUGHPUT_FILE = REPO_ROOT / "benchmarks" / "throughput.yaml"
CLUSTER_METRICS = ("NMI", "AMI", "ARI")
TOP = ("top1", "top5")

HELP = """\
Plan (and run) the runs whose records the report pairs with the rows of a paper's table
(reports/paper_results.csv), then build that table in the paper's layout with ours beside theirs and Δ.

For each row: the suite, method or variant, epochs, protocol settings (--set overrides) and seeds (as many
as the paper's runs: 3 where it reports mean ± std over three runs), decided by the report's own pairing
code (reports/papers.py); which of those runs already have a valid record under --out and which are
missing; the cost of each missing run (pretraining hours from benchmarks/throughput.yaml's measured
figures, else from existing records of the same suite and method on their device, else unknown). Rows no
suite can reproduce are listed with the reason and what a suite would need.

--dry-run prints the plan and the exact `python -m benchmarks run ...` commands and exits 0 (no data
needed). Without it, the datasets of the missing runs are checked first (a missing one is named, exit 2),
the missing runs go through `run` (--launcher none/local/slurm, as for run) and the table is written
under --table-dir as Markdown, LaTeX and HTML.

Exit status: 0 on success, 1 if a run failed, 2 on a usage or input error.
"""

EXAMPLES = """examples:
  python -m benchmarks reproduce carl-carp-dissertation --table "Table 5.2" --dry-run
  python -m benchmarks reproduce carl-carp-dissertation --table 5.2 --launcher slurm --data-root ~/data
  python -m benchmarks reproduce sslpp --dry-run                      # every table of the paper
"""


def add_reproduce_parser(sub) -> argparse.ArgumentParser:
    """The `reproduce` subcommand's options (benchmarks.cli registers it; nothing heavy is imported here)."""
    rep = sub.add_parser("reproduce", help="plan and run the runs that pair with a paper's table, then build "
                         "that table with ours beside the paper's", description=HELP, epilog=EXAMPLES,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    rep.add_argument("paper", metavar="PAPER", help="the paper as in paper_results.csv's first column, e.g. "
                     "carl-carp-dissertation, self-classifier, sslpp")
    rep.add_argument("--table", help="one table: its name as in the CSV (\"Table 5.2\") or short (5.2); default: "
                     "every table of the paper")
    rep.add_argument("--dry-run", action="store_true", help="print the plan and the run commands, run nothing")
    rep.add_argument("--paper-csv", metavar="CSV", default=None,
                     help="papers' numbers (default: reports/paper_results.csv)")
    rep.add_argument("--seeds", nargs="+", type=int, metavar="SEED",
                     help="seeds of every planned run (default: 0 .. the paper's runs - 1)")
    rep.add_argument("--out", default="results", help="folder of run records (default: results)")
    rep.add_argument("--work-dir", default="runs", help="folder for checkpoints and logs (default: runs)")
    rep.add_argument("--data-root", help="folder holding the datasets (default: $SSL_BENCH_DATA or ./data)")
    rep.add_argument("--download", action="store_true", help="download missing datasets into --data-root")
    rep.add_argument("--launcher", choices=["none", "local", "slurm"], help="how the missing runs go (as for "
                     "run: none = one after another here, local = --jobs worker processes, slurm = job array)")
    rep.add_argument("--jobs", type=int, help="runs at a time (local launcher; SLURM: array parallelism)")
    rep.add_argument("--accelerator", choices=["auto", "cpu", "gpu"], help="device for the runs (as for run)")
    rep.add_argument("--table-dir", default=None, help="where the table goes (default: <out>/reproduce)")
    rep.add_argument("--no-progress", action="store_true", help="no progress bars")
    return rep


# ------------------------------------------------------------------------------------------------ plan


@dataclass
class PlannedRun:
    suite: str
    method: str
    epochs: int
    seed: int
    sets: tuple[str, ...]  # --set overrides (protocol settings the paper requires)
    record: Path
    have: bool  # a valid completed record of this exact run is there
    hours: float | None = None  # pretraining hours of a missing run (None: unknown)
    device: str = ""  # on what the hours would be spent: GPU, CPU, or the records' device
    basis: str = "unknown"  # where the cost figure comes from (device named)

    @property
    def key(self) -> tuple:
        return (self.suite, self.method, self.epochs, self.seed, self.sets)


@dataclass
class RowPlan:
    row: object  # the CSV row (pd.Series)
    runs: list[PlannedRun] = field(default_factory=list)
    reason: str = ""  # why no suite can reproduce it
    need: str = ""  # what a suite would need
    protocol: str = ""  # our protocol key and the settings the paper requires, e.g. "linear views=crop_flip"


def normalize_table(paper: str, table: str | None, papers) -> list[str]:
    """--table as in the CSV ("Table 5.2"), short ("5.2") or None (every table of the paper)."""
    tables = list(dict.fromkeys(papers.loc[papers["paper"] == paper, "table"]))
    if not tables:
        known = ", ".join(sorted(set(papers["paper"])))
        raise ConfigError(f"paper {paper!r}: not in the papers' CSV; known papers: {known}")
    if table is None:
        return tables
    wanted = table.strip().casefold()
    for name in tables:
        if wanted in (name.casefold(), name.casefold().removeprefix("table").strip()):
            return [name]
    raise ConfigError(f"--table {table!r}: {paper} has no such table in the papers' CSV; its tables: "
                      f"{', '.join(repr(t) for t in tables)} (the short form works too, e.g. "
                      f"{tables[0].split()[-1]!r})")


def expected_entries(config, method) -> list[tuple[str, str, dict, tuple[str, ...], dict | None]]:
    """(key, protocol, settings, metrics, cluster info) of every evaluation a run of `method` under `config`
    records, from the suite's evaluation section (the settings as benchmarks.evaluation.protocols stores them,
    with the entry's place: block, head, transfer dataset)."""
    from benchmarks.data import dataset_display_name
    from benchmarks.evaluation.semi import metric_key as semi_key

    ev, classes, out = config.evaluation, config.num_classes, []
    for p in ev.protocols:
        if p == "knn":
            out += [(f"knn_k{k}", p, {"k": k, "temperature": ev.knn.temperature}, TOP, None) for k in ev.knn.ks]
        elif p in ("linear", "online_linear", "finetune"):
            out.append(({"finetune": "finetune_100pct"}.get(p, p), p, getattr(ev, p).model_dump(mode="json"), TOP,
                        None))
        elif p == "semi":
            base = ev.semi.model_dump(mode="json", exclude={"fractions", "per_class"})
            out += [(semi_key(f), p, {**base, "fraction": f}, TOP, None) for f in ev.semi.fractions]
            out += [(f"semi_{n}perclass", p, {**base, "per_class": n}, TOP, None) for n in ev.semi.per_class]
        elif p == "transfer":
            budget = ev.transfer.model_dump(mode="json", exclude={"targets"})
            out += [(f"transfer_linear:{dataset_display_name(t)}", p, {**budget, "dataset": dataset_display_name(t)},
                     TOP, None) for t in ev.transfer.targets]
        elif p == "clustering":
            out.append(("clustering", p, {**ev.clustering.model_dump(mode="json"), "k": "num_classes"},
                        (*CLUSTER_METRICS, "ACC"), {"num_clusters": classes, "num_classes": classes}))
            out += _head_entries(getattr(method.hparams, "heads", None), classes)
        elif p in ("knn_k10", "block_classifier"):
            cfg = getattr(ev, p)
            prefix = f"knn_k{cfg.k}" if p == "knn_k10" else "block_classifier"
            metrics = ("top1",) if p == "knn_k10" else TOP
            settings = cfg.model_dump(mode="json", exclude={"blocks"})
            out += [(f"{prefix}_B{b}", p, {**settings, "block": b}, metrics, None) for b in cfg.blocks]
            out.append((f"{prefix}_avg", p, {**cfg.model_dump(mode="json"), "block": "avg"}, metrics, None))
    return out


def _head_entries(heads, classes: int) -> list[tuple]:
    """The clustering heads a method lists (Self-Classifier's `heads`; none listed: one 3x over-clustering
    head)."""
    if heads is None:
        return []
    out, seen = [], {}
    for index, k in enumerate(list(heads) or [3 * classes]):
        seen[k] = seen.get(k, 0) + 1
        head = {} if seen[k] == 1 else {"head": index + 1}
        metrics = (*CLUSTER_METRICS, "ACC" if k == classes else "ACC_MANY_TO_ONE")
        out.append((f"clustering_head_k{k}" + (f"_h{index + 1}" if head else ""), "clustering_head",
                    {"source": "head", "k": k, **head}, metrics, {"num_clusters": k, "num_classes": classes}))
    return out


def prospective_cells(config, names: list[str]):
    """The cells the report would build from records of these methods under `config`: prospective records
    (no values yet) through the report's own values_frame, with the columns pairing_candidates reads."""
    import pandas as pd

    from benchmarks.config import settings_fingerprint
    from benchmarks.data import dataset_display_name
    from methods import get_method
    from reports.cells import SUBSET_LABEL, SUBSET_ROLE, values_frame
    from reports.data import Run

    runs = []
    dataset = config.dataset.display_name or dataset_display_name(config.dataset.name)
    for name in names:
        method = config.method(name)
        entries = expected_entries(config, method)
        record = {"suite": config.name, "dataset": dataset, "epochs": method.epochs, "method": name,
                  "method_base": method.method, "method_display": method.display_name,
                  "is_reference": bool(get_method(method.method).is_reference),
                  "fingerprints": {"settings": settings_fingerprint(config, method)}, "seed": 0,
                  "paper_reference": method.paper, "backbone": config.backbone, "variant": method.variant,
                  # what the report's pairing reads: the method hyperparameters, the variant's own section
                  "method_config": method.model_dump(mode="json"), "config": {"methods": dict(config.methods)},
                  "metrics": [{"protocol": p, "settings": s, "metric": m, "value": math.nan, "key": k}
                              for k, p, s, metrics, _ in entries for m in metrics],
                  "clusters": {k: info for k, _, _, _, info in entries if info is not None}}
        runs.append(Run(f"<planned {config.name}/{name}>", record, datetime.fromtimestamp(0, timezone.utc)))
    values, _, _ = values_frame(runs)
    if values.empty:
        return values.assign(row=[], num_classes=[])
    values = values.drop_duplicates(["method", "role", "key", "metric", "settings"]).reset_index(drop=True)
    values["row"] = [SUBSET_LABEL if role == SUBSET_ROLE else display
                     for role, display in zip(values["role"], values["display"])]
    values["num_classes"] = config.num_classes
    return pd.DataFrame(values)


def _setting_text(value) -> str:
    import json

    return json.dumps(value, separators=(",", ":")) if not isinstance(value, str) else value


#: our protocol -> the suite's evaluation section that runs it
SECTIONS = {"clustering_head": "clustering"}


def protocol_sets(config, proto, place: dict) -> list[str]:
    """--set overrides that make `config` record `proto`'s protocol at `place` with the paper's required
    settings."""
    from benchmarks.data import DISPLAY_NAMES

    section = SECTIONS.get(proto.ours, proto.ours)
    ev = config.evaluation
    sets = []
    if section not in ev.protocols:
        sets.append(f"evaluation.protocols={_setting_text([*ev.protocols, section])}")
    if proto.ours == "knn" and place["k"] not in ev.knn.ks:
        sets.append(f"evaluation.knn.ks={_setting_text([*ev.knn.ks, place['k']])}")
    elif proto.ours == "semi" and not any(math.isclose(f, place["fraction"]) for f in ev.semi.fractions):
        sets.append(f"evaluation.semi.fractions={_setting_text([*ev.semi.fractions, place['fraction']])}")
    elif proto.ours == "transfer":
        loader = next((n for n, d in DISPLAY_NAMES.items() if d == place["dataset"]), None)
        if loader is not None and loader not in ev.transfer.targets:
            sets.append(f"evaluation.transfer.targets={_setting_text([*ev.transfer.targets, loader])}")
    for name, value in proto.settings:
        if getattr(getattr(ev, section), name, None) != value:
            sets.append(f"evaluation.{section}.{name}={_setting_text(value)}")
    return sets


def _suites():
    from benchmarks.config import available_suites, load_suite

    return [load_suite(name) for name in available_suites()]


class _Configs:
    """Suites resolved with the plan's overrides, and their prospective cells, each computed once."""

    def __init__(self) -> None:
        self.configs: dict[tuple, object] = {}
        self.cells: dict[tuple, object] = {}

    def config(self, base, sets: tuple[str, ...], epochs: int):
        from benchmarks.cli_common import parse_set
        from benchmarks.config import load_suite

        key = (base.source, sets, epochs)
        if key not in self.configs:
            overrides = parse_set(list(sets))
            overrides.setdefault("train", {})["epochs"] = epochs
            config = load_suite(base.source, overrides)
            self.configs[key] = config
        return self.configs[key]

    def prospective(self, base, sets: tuple[str, ...], epochs: int):
        """(config, its cells for every method it can run, --set of the methods whose own train.epochs
        differs from `epochs`: a method section's train.epochs wins over the suite's)."""
        from methods import available_methods

        key = (base.source, sets, epochs)
        if key not in self.cells:
            config = self.config(base, sets, epochs)
            names = sorted(set(config.method_names()) | set(config.references) | set(available_methods()))
            own = {n: f"methods.{n}.train.epochs={epochs}" for n in names
                   if config.method(n).epochs != epochs and "." not in n}
            if own:
                config = self.config(base, sets + tuple(own.values()), epochs)
            self.cells[key] = (config, prospective_cells(config, names), own)
        return self.cells[key]


def plan_row(row, suites, seeds: list[int], out: str, cache: _Configs) -> RowPlan:
    """The runs that pair with one CSV row (under the first suite that can pair), or why none can."""
    import pandas as pd

    from benchmarks.data import dataset_display_name
    from reports.papers import BACKBONES, describe, pairing_candidates, place_of, protocol_for

    plan = RowPlan(row)
    proto = protocol_for(row["paper"], row["table"], row["protocol"])
    if proto is None or proto.ours is None:
        plan.reason = f"protocol {row['protocol']} has no counterpart in this suite"
        plan.need = f"an evaluation protocol measuring the paper's {row['protocol']} (reports/papers.py PROTOCOLS)"
        return plan
    if pd.isna(row["epochs"]):
        plan.reason, plan.need = "the paper gives no epochs", "the paper's pretraining budget in the CSV"
        return plan
    run_epochs = int(row["epochs"])
    on_dataset = [c for c in suites if (c.dataset.display_name or dataset_display_name(c.dataset.name)).casefold()
                  == row["pretrain_dataset"].casefold()]
    if not on_dataset:
        plan.reason = f"no suite pretrains on {row['pretrain_dataset']}"
        plan.need = f"a suite file with {row['pretrain_dataset']} data and a {row['backbone']} backbone"
        return plan
    fitting = [c for c in on_dataset if BACKBONES.get(c.backbone) == row["backbone"]]
    if not fitting:
        plan.reason = (f"no suite trains a {row['backbone']} on {row['pretrain_dataset']} (suites: "
                       + ", ".join(f"{c.name} {c.backbone}" for c in on_dataset) + ")")
        plan.need = f"a {row['pretrain_dataset']} suite with a {row['backbone']} backbone"
        return plan
    reasons = []
    for base in fitting:
        _, base_cells, _ = cache.prospective(base, (), run_epochs)
        sets = tuple(protocol_sets(base, proto, place_of(proto, row, base_cells)))
        config, cells, own = cache.prospective(base, sets, run_epochs)
        plan.protocol = " ".join([describe(proto.ours, place_of(proto, row, cells)),
                                  *(f"{k}={_setting_text(v)}" for k, v in proto.settings)])
        cand, reason = pairing_candidates(row, cells)
        if reason:
            reasons.append(f"{base.name}: {reason}")
            continue
        methods = sorted(set(cand["method"]))
        # the suite's own runs (methods_to_run, references) first; another method or variant only when
        # it alone pairs
        methods = [m for m in methods if m in config.methods_to_run or m in config.references] or methods
        for name in methods:
            mine = sets + ((own[name],) if name in own else ())
            plan.runs += [planned_run(config, name, seed, mine, out) for seed in seeds]
        return plan
    plan.reason = "; ".join(reasons)
    plan.need = "a run that meets the criterion named (method, protocol key, settings or metric)"
    return plan


def planned_run(config, name: str, seed: int, sets: tuple[str, ...], out: str) -> PlannedRun:
    """The run and whether a completed record of it exists. CPU thread counts are part of a record's fingerprint
    (bitwise results need the same count), but any count measures the same experiment: an existing record counts
    when its fingerprint is the plan's settings at the record's own thread count."""
    from benchmarks.config import resolve_threads, run_fingerprints
    from benchmarks.records import read_record, record_path, same_run_records

    method = config.method(name)
    resolved = resolve_threads(config)  # the count `run` without a launcher would use here
    path = record_path(out, config.name, name, method.epochs, seed, run_fingerprints(resolved, method, seed)["run"])
    have = False
    for candidate in same_run_records(out, config.name, name, method.epochs, seed):
        try:
            record = read_record(candidate, verify_predictions=False)
        except (BenchmarkError, OSError, ValueError):
            continue
        threads = record.get("config", {}).get("train", {}).get("threads")
        if record.get("status") != "completed" or not isinstance(threads, int):
            continue
        theirs = config.model_copy(update={"train": config.train.model_copy(update={"threads": threads})})
        if run_fingerprints(theirs, method, seed)["run"] == record["fingerprints"]["run"]:
            path, have = candidate, True
            break
    return PlannedRun(config.name, name, method.epochs, seed, sets, path, have)


def plan_paper(paper: str, table: str | None, papers, seeds: list[int] | None = None,
               out: str = "results") -> tuple[list[str], list[RowPlan]]:
    """(tables, one RowPlan per CSV row of those tables)."""
    from reports.papers import PAPER_RUNS

    tables = normalize_table(paper, table, papers)
    suites, cache = _suites(), _Configs()
    plans = []
    for name in tables:
        rows = papers[(papers["paper"] == paper) & (papers["table"] == name)]
        runs = seeds if seeds else list(range(PAPER_RUNS.get((paper, name), 1)))
        plans += [plan_row(row, suites, runs, out, cache) for _, row in rows.iterrows()]
    estimate_costs([r for p in plans for r in p.runs if not r.have], out)
    return tables, plans


# ------------------------------------------------------------------------------------------------ cost


def load_throughput(path: Path = THROUGHPUT_FILE) -> tuple[list[dict], dict]:
    """(measured entries with images_per_s read from their benchmark file, images per epoch per dataset)."""
    import json

    import yaml

    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read the throughput table ({exc})") from exc
    entries = []
    for entry in raw.get("throughput", []):
        if not entry.get("source"):
            continue  # not measured yet
        source = REPO_ROOT / entry["source"]
        if not source.is_file():
            continue  # an installed copy without the repository's results/: no figure, cost "unknown"
        try:
            bench = json.loads(source.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: entry {entry['backbone']}/{entry['method']}: cannot read {source} "
                              f"({exc}); fix `source` or remove the entry") from exc
        rounds = [b["extra_info"] for b in bench.get("benchmarks", [])
                  if b.get("extra_info", {}).get("speed_key") == entry["speed_key"]]
        if not rounds:
            raise ConfigError(f"{path}: {source} has no benchmark with speed_key {entry['speed_key']!r}")
        seconds = min(r["seconds_per_unit_min"] for r in rounds)
        entries.append({**entry, "images_per_s": rounds[0]["batch_size"] / seconds})
    return entries, raw.get("pretrain_images", {})


def _records_by_run(out: str) -> dict[tuple[str, str], list[dict]]:
    from benchmarks.records import iter_record_files, read_record

    found: dict[tuple[str, str], list[dict]] = {}
    for path in iter_record_files(out):
        try:
            rec = read_record(path, verify_predictions=False)
        except (BenchmarkError, OSError, ValueError):
            continue
        if rec.get("status") == "completed" and rec.get("wall_time_s") and rec.get("epochs"):
            found.setdefault((rec["suite"], rec["method"]), []).append(rec)
    return found


def estimate_costs(runs: list[PlannedRun], out: str) -> None:
    """Fill each missing run's hours and basis: a GPU figure of the throughput table, else the wall time of
    existing records of the same suite and method (scaled by epochs, on their device), else the table's CPU
    figure, else unknown."""
    from benchmarks.config import load_suite
    from benchmarks.records import provenance_of

    entries, sizes = load_throughput()
    records = _records_by_run(out)
    configs: dict[str, object] = {}
    for run in runs:
        config = configs.setdefault(run.suite, load_suite(run.suite))
        images = sizes.get(config.dataset.name, {}).get(config.dataset.pretrain_split)
        figures = [e for e in entries if e["backbone"] == config.backbone and e["method"] == run.method.split("/")[0]]
        gpu = [e for e in figures if e["device"] == "gpu"]
        cpu = [e for e in figures if e["device"] == "cpu"]
        recs = records.get((run.suite, run.method), [])
        if gpu and images:
            run.hours = images * run.epochs / gpu[0]["images_per_s"] / 3600
            run.device, run.basis = "GPU", f"GPU: {gpu[0]['device_name']} ({gpu[0]['source']})"
        elif recs:
            per_epoch = sorted(r["wall_time_s"] / r["epochs"] for r in recs)[len(recs) // 2]
            where = [provenance_of(r) for r in recs]
            devices = sorted({w.get("device", "?") + (f" ({w['cpu']})" if w.get("cpu") and w.get("device") == "cpu"
                                                      else "") for w in where})
            run.hours = per_epoch * run.epochs / 3600
            run.device = "/".join(sorted({w.get("device", "?").upper() for w in where}))
            run.basis = f"{', '.join(devices)}: median wall time per epoch of {len(recs)} record(s)"
        elif cpu and images:
            run.hours = images * run.epochs / cpu[0]["images_per_s"] / 3600
            run.device = "CPU"
            run.basis = f"CPU: {cpu[0]['device_name']} ({cpu[0]['source']}), pretraining only"
        else:
            run.basis = "unknown (no measured figure for this backbone and method, no record of it)"


# ------------------------------------------------------------------------------------------------ print


def run_argv(runs: list[PlannedRun], opts) -> list[str]:
    """The `run` arguments of one (suite, method, sets) group of missing runs."""
    first = runs[0]
    argv = ["run", "--suite", first.suite, "--methods", first.method, "--seeds", *[str(r.seed) for r in runs],
            "--epochs", str(first.epochs), "--no-references", "--no-report", "--out", opts.out,
            "--work-dir", opts.work_dir]
    if first.sets:
        argv += ["--set", *first.sets]
    for flag, value in (("--data-root", opts.data_root), ("--launcher", opts.launcher), ("--jobs", opts.jobs),
                        ("--accelerator", opts.accelerator)):
        if value is not None:
            argv += [flag, str(value)]
    if opts.download:
        argv.append("--download")
    if opts.no_progress:
        argv.append("--no-progress")
    return argv


def command_groups(plans: list[RowPlan]) -> list[list[PlannedRun]]:
    groups: dict[tuple, dict[tuple, PlannedRun]] = {}
    for plan in plans:
        for run in plan.runs:
            if not run.have:
                groups.setdefault((run.suite, run.method, run.epochs, run.sets), {})[run.key] = run
    return [sorted(g.values(), key=lambda r: r.seed) for _, g in sorted(groups.items())]


def _hours(value: float | None) -> str:
    if value is None:
        return "unknown"
    return f"{value:.2f} h" if value >= 0.01 else f"{value * 3600:.0f} s"


def _plan_rows(plans: list[RowPlan]) -> list[list[str]]:
    """One line per CSV row and method planned for it (or the row alone, when no suite can reproduce it)."""
    from reports.render import DASH, paper_text

    rows = []
    for p in plans:
        r = p.row
        value = paper_text(r["value"], r["std"])
        head = [r["table"], r["method"], r["pretrain_dataset"], r["eval_dataset"], r["backbone"],
                DASH if r["epochs"] is None or str(r["epochs"]) == "<NA>" else str(r["epochs"]), r["protocol"],
                r["metric"], value]
        if not p.runs:
            rows.append(head + ["cannot reproduce", DASH, DASH, DASH, DASH, DASH, DASH])
            continue
        for name in dict.fromkeys(run.method for run in p.runs):
            mine = [run for run in p.runs if run.method == name]
            missing = [run for run in mine if not run.have]
            known = [run.hours for run in missing if run.hours is not None]
            devices = "/".join(sorted({run.device for run in missing if run.hours is not None}))
            parts = [f"{_hours(sum(known))} {devices}"] if known else []
            if len(known) < len(missing):
                parts.append(f"{len(missing) - len(known)} unknown")
            cost = " + ".join(parts) if missing else DASH
            rows.append(head + [mine[0].suite, f"{name} e{mine[0].epochs}", p.protocol,
                                " ".join(mine[0].sets) or DASH,
                                ",".join(str(run.seed) for run in mine),
                                f"{len(mine) - len(missing)} of {len(mine)}", cost])
    return rows


def plan_text(paper: str, tables: list[str], plans: list[RowPlan], opts) -> str:
    lines = [f"# reproduce {paper}: {', '.join(tables)}", ""]
    header = ["table", "method", "pretrain", "eval", "backbone", "epochs", "protocol", "metric", "paper",
              "suite", "run", "ours: protocol and required settings", "--set", "seeds", "records",
              "cost of the missing"]
    rows = _plan_rows(plans)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for line in [header, ["-" * w for w in widths], *rows]:
        lines.append("  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip())
    unrepro = [p for p in plans if not p.runs]
    if unrepro:
        lines += ["", f"cannot reproduce ({len(unrepro)} row(s)):"]
        seen = set()
        for p in unrepro:
            r = p.row
            what = (f"  {r['table']} {r['method']} {r['pretrain_dataset']}->{r['eval_dataset']} {r['backbone']} "
                    f"{r['protocol']}: {p.reason}; needs {p.need}")
            if what not in seen:
                seen.add(what)
                lines.append(what)
    unique = {run.key: run for p in plans for run in p.runs}
    missing = [run for run in unique.values() if not run.have]
    lines += ["", f"runs: {len(unique)} planned, {len(unique) - len(missing)} with a valid record under "
              f"{opts.out}/, {len(missing)} missing"]
    by_basis: dict[str, list[PlannedRun]] = {}
    for run in missing:
        by_basis.setdefault(run.basis, []).append(run)
    if missing:
        lines.append("cost of the missing runs (no GPU figure is measured yet: benchmarks/throughput.yaml):"
                     if not any(b.startswith("GPU") for b in by_basis) else "cost of the missing runs:")
        for basis, runs in sorted(by_basis.items()):
            known = [r.hours for r in runs if r.hours is not None]
            total = _hours(sum(known)) if known else "unknown"
            lines.append(f"  {len(runs)} run(s): {total}  [{basis}]")
        lines += ["", "commands:"]
        for group in command_groups(plans):
            lines.append("  python -m benchmarks " + shlex.join(run_argv(group, opts)))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ table


def _generic_layout(paper: str, table: str, rows):
    from reports.papers import Layout

    fields = ("pretrain_dataset", "eval_dataset", "epochs", "protocol", "metric")
    cols = tuple(dict.fromkeys(tuple(None if f == "epochs" and str(r[f]) == "<NA>" else r[f] for f in fields)
                               for _, r in rows.iterrows()))
    labels = tuple(f"{c[0]}" + (f"→{c[1]}" if c[1] != c[0] else "") + f" {c[2]} ep. {c[3]} {c[4]}" for c in cols)
    return Layout(paper, table, f"{paper} {table}", ("method",),
                  tuple(dict.fromkeys((m,) for m in rows["method"])), fields, cols, labels)


def table_sections(paper: str, tables: list[str], papers, cells, pairs) -> list:
    """The paper's tables in their layout (reports.papers.LAYOUTS, else one row per method and one column
    per CSV protocol): ours, the paper's, Δ [95%]."""
    from reports.papers import LAYOUTS, layout_cells
    from reports.render import DASH, Section, delta_text, paper_text, plain_table, value_text

    sections = []
    for name in tables:
        layout = next((lay for lay in LAYOUTS if lay.paper == paper and lay.table == name), None)
        if layout is None:
            layout = _generic_layout(paper, name, papers[(papers["paper"] == paper) & (papers["table"] == name)])
        grid = layout_cells(layout, papers, pairs)
        header = [f.replace("eval_dataset", "Dataset").replace("method", "Method") for f in layout.row_fields]
        for label in layout.col_labels:
            header += [f"{label} ours", f"{label} paper", f"{label} Δ"]
        rows = []
        for values, cols in zip(layout.rows, grid):
            row = [str(v) for v in values]
            for hit, idx in cols:
                row.append(DASH if not idx else "; ".join(value_text(cells.loc[i]) for i in idx))
                if hit.empty:
                    row += [DASH, DASH]
                    continue
                p = hit.iloc[0]
                row.append(paper_text(p["value"], p["std"]))
                mine = pairs[pairs["line"].isin(set(hit["line"]))]
                row.append("; ".join(delta_text(d) for d in mine.itertuples(index=False)) or DASH)
            rows.append(row)
        t = plain_table(header, rows, numeric_from=len(layout.row_fields))
        t.caption = layout.note
        sections.append(Section(layout.title, 2, [t]))
    return sections


def build_tables(paper: str, tables: list[str], suites: list[str], opts) -> dict[str, Path]:
    """Build the report of --out's records of these suites (reports.build: cells and pairs) and write the
    paper's tables under --table-dir."""
    from benchmarks.records import atomic_write_text
    from reports.build import build_report
    from reports.data import load_paper_results
    from reports.render import render

    table_dir = Path(opts.table_dir) if opts.table_dir else Path(opts.out) / "reproduce"
    result = build_report(opts.out, table_dir / "report", suites=suites, paper_csv=opts.paper_csv, figures=False)
    papers = load_paper_results(opts.paper_csv)
    sections = table_sections(paper, tables, papers, result["cells"], result["pairs"])
    title = f"{paper}: {', '.join(tables)}, ours beside the paper's"
    stem = re.sub(r"[^A-Za-z0-9]+", "-", f"{paper}-{'-'.join(tables)}").strip("-").lower()
    texts = {fmt_: render(fmt_, title, sections) for fmt_ in ("md", "tex", "html")}
    return {fmt_: atomic_write_text(table_dir / f"{stem}.{fmt_}", text) for fmt_, text in texts.items()}


# ------------------------------------------------------------------------------------------------ command


def check_datasets(groups: list[list[PlannedRun]], opts) -> None:
    """Before anything runs: every suite's data loads (a missing dataset raises DatasetNotFoundError with
    where it looked)."""
    from benchmarks.cli_common import default_data_root
    from benchmarks.config import load_suite
    from benchmarks.suite_data import load_suite_data

    for suite in sorted({g[0].suite for g in groups}):
        load_suite_data(load_suite(suite), default_data_root(opts.data_root), opts.download)


def reproduce(opts, run_command) -> int:
    """The `reproduce` command; `run_command(argv)` runs `python -m benchmarks <argv>` in this process (the
    CLI passes its own `run` handler, so the runs take exactly `run`'s code path)."""
    from reports.data import load_paper_results

    papers = load_paper_results(opts.paper_csv)
    tables, plans = plan_paper(opts.paper, opts.table, papers, opts.seeds, opts.out)
    print(plan_text(opts.paper, tables, plans, opts), flush=True)
    if opts.dry_run:
        return 0
    from benchmarks.records import check_writable_folder

    groups = command_groups(plans)
    check_writable_folder(opts.table_dir or Path(opts.out) / "reproduce", "--table-dir")
    check_datasets(groups, opts)
    failed = 0
    for group in groups:
        argv = run_argv(group, opts)
        print("python -m benchmarks " + shlex.join(argv), flush=True)
        failed += run_command(argv) != 0
    suites = sorted({run.suite for plan in plans for run in plan.runs})
    if suites:
        for path in build_tables(opts.paper, tables, suites, opts).values():
            print(f"wrote {path}")
    else:
        print("no row of the table can be reproduced by a suite: no table to build", file=sys.stderr)
    if failed:
        print(f"{failed} run command(s) failed; rerun the same command to resume them", file=sys.stderr)
    return 1 if failed else 0
