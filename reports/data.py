"""Records in, one tidy frame out: reading and checking the records, one record per run identity, per-image
predictions, the tidy frame of metric entries, training curves and the papers' CSV.

``load_records`` reads each record with ``benchmarks.records.read_record`` and checks what the report reads beyond
the schema (the predictions against the recorded metrics and ``clusters[key]``); a file that fails is ``Skipped`` with
the reason, and the build goes on. Per run identity the newest record wins (``newest_first``); the others are
``Superseded``. ``entries_frame`` is the report's one source of numbers. An entry's ``key`` only names its
predictions' arrays and ``clusters[key]``; nothing reads meaning out of it.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks import records
from benchmarks.data import dataset_display_name
from benchmarks.errors import BenchmarkError, RecordError
from benchmarks.records import CLUSTERING_PROTOCOLS, canonical_json, provenance_of
from reports import stats

PAPER_CSV = Path(__file__).resolve().parent / "paper_results.csv"
PAPER_COLUMNS = ("paper", "table", "method", "pretrain_dataset", "eval_dataset", "backbone", "epochs", "protocol",
                 "metric", "value", "std", "note")
HISTORY_SERIES = ("loss", "online_knn_top1")
#: tolerance (percentage points) between a metric recomputed from the predictions and the recorded one
METRIC_TOLERANCE = 0.01
#: record metric name -> ``ssl_common.clustering_metrics.SCALAR`` name (ACC_MANY_TO_ONE: the producer's
#: ``as_percent_metrics`` spelling of ACC_M2O)
CLUSTER_METRICS = {"NMI": "nmi", "AMI": "ami", "ARI": "ari", "ACC": "acc", "ACC_M2O": "acc_many_to_one",
                   "ACC_MANY_TO_ONE": "acc_many_to_one"}
TOPK = {"top1": 1, "top5": 5}


@dataclass(frozen=True)
class Skipped:
    """A record file the build could not use: its path (as shown in the report) and what is wrong."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass(frozen=True)
class Superseded:
    """A valid record of a run identity that a newer record of the same identity replaced."""

    path: str
    created: str
    winner: str
    winner_created: str
    what: str = "record"  # "record", or "<key> values" when only one protocol's values were replaced


@dataclass(frozen=True)
class PerImage:
    """Per-test-image data of one (key, metric): correctness in [0, 1] or cluster assignments, with the labels."""

    kind: str  # "accuracy" | "clustering"
    labels: np.ndarray  # [n] test labels of this key
    data: np.ndarray  # accuracy: float [n]; clustering: int [n]
    labels_id: str  # digest of the labels: runs are paired over images only when these agree
    metrics: tuple[str, ...] = ()  # clustering: the record's metrics of these assignments (scored together)


@dataclass
class Run:
    """One record that passed every check: its path as shown, the record, and its per-image data."""

    path: str
    record: dict
    created: datetime
    per_image: dict[tuple[str, str], PerImage] = field(default_factory=dict)


@dataclass
class LoadedRecords:
    completed: list[Run] = field(default_factory=list)
    excluded: list[Run] = field(default_factory=list)  # status != completed
    skipped: list[Skipped] = field(default_factory=list)
    superseded: list[Superseded] = field(default_factory=list)


def device_of(record: dict) -> str:
    return str(provenance_of(record).get("device", "?"))


def shown_path(path: Path, results_dir: Path) -> str:
    """`results/<relative path>`: no absolute path enters the report (it must not depend on the checkout)."""
    name = results_dir.name or results_dir.resolve().name
    try:
        rel = path.relative_to(results_dir)
    except ValueError:
        return path.as_posix()
    return (Path(name) / rel).as_posix()  # Path("") / rel is rel (a results folder at "/")


def selected(record: dict, suites=None, methods=None, epochs=None) -> bool:
    """Whether a record passes --suite / --methods / --epochs, as ``build.BuildOptions`` lists them (stripped
    names, whole epochs); names are compared without case, methods by registry, variant or display name."""
    names = {record[k].casefold() for k in ("method", "method_display", "method_base")}
    return ((suites is None or record["suite"].casefold() in {s.casefold() for s in suites})
            and (methods is None or bool(names & {m.casefold() for m in methods}))
            and (epochs is None or record["epochs"] in epochs))


def _checked_arrays(record: dict, arrays: dict, key: str, clustering: bool) -> tuple[np.ndarray, np.ndarray]:
    """`key`'s test labels (int64) and predictions, of the types and shapes ``records.read_predictions`` names."""
    name = f"{key}:labels" if f"{key}:labels" in arrays else "labels"
    labels, pred = np.asarray(arrays[name]), np.asarray(arrays[key])
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or labels.size == 0 or labels.min() < 0:
        raise RecordError(f"predictions '{name}' must be non-negative integer labels [n], got "
                          f"{labels.dtype} {list(labels.shape)}")
    if pred.dtype.kind not in "iu":
        raise RecordError(f"predictions '{key}' must be integers, got {pred.dtype}")
    if clustering:
        if pred.shape != labels.shape or pred.min() < 0:
            raise RecordError(f"predictions '{key}' must be non-negative cluster indices [{len(labels)}], got "
                              f"{list(pred.shape)}")
        nonempty, said = len(np.unique(pred)), record["clusters"][key]["num_nonempty"]  # RunRecord: it exists
        if nonempty != said:
            raise RecordError(f"mismatched predictions file: {key} has {nonempty} non-empty clusters, "
                              f"clusters['{key}'] says {said}")
    elif pred.ndim not in (1, 2, 3) or pred.shape[-1 if pred.ndim == 1 else -2] != len(labels):
        raise RecordError(f"predictions '{key}' must be [n], [n, 5] or [subsets, n, 5] with n = "
                          f"{len(labels)}, got {list(pred.shape)}")
    return labels.astype(np.int64), pred


def _correctness(pred: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """[n] per-image correctness (float, mean over labelled subsets for [subsets, n, 5]); labels are non-negative
    (``_checked_arrays``), so a -1 (no prediction) is never a hit."""
    top = (pred[:, None] if pred.ndim == 1 else pred)[..., :k]
    return (top == labels[:, None]).any(axis=-1).reshape(-1, len(labels)).mean(axis=0)


def per_image(record: dict, arrays: dict) -> dict[tuple[str, str], PerImage]:
    """Per-image data of every (key, metric) the predictions cover -- a clustering key's cluster of each image,
    a classification key's top-k correctness of each -- each recomputed metric checked against the record."""
    if not arrays:
        return {}
    if "labels" not in arrays:
        raise RecordError("predictions file has no 'labels' array")
    values: dict[str, dict[str, float]] = {}
    protocols: dict[str, str] = {}
    for e in record["metrics"]:
        values.setdefault(e["key"], {})[e["metric"]] = e["value"]
        protocols[e["key"]] = e["protocol"]
    out: dict[tuple[str, str], PerImage] = {}
    for key in sorted(protocols.keys() & arrays.keys()):
        clustering = protocols[key] in CLUSTERING_PROTOCOLS
        labels, pred = _checked_arrays(record, arrays, key, clustering)
        labels_id = hashlib.sha256(labels.tobytes()).hexdigest()[:16]  # labels: int64 [n]
        assignments = pred.astype(np.int64) if clustering else None  # one array for all metrics of the key
        scored_together = tuple(sorted(values[key])) if clustering else ()
        for metric, recorded in sorted(values[key].items()):
            if clustering:
                data, recomputed = assignments, stats.clustering_score(labels, pred, CLUSTER_METRICS[metric])
            elif metric in TOPK and (pred.ndim > 1 or TOPK[metric] == 1):
                data = _correctness(pred, labels, TOPK[metric])
                recomputed = 100.0 * float(data.mean())
            else:
                continue  # no per-image form of this metric (e.g. top-5 from top-1 predictions only)
            if not abs(recomputed - recorded) <= METRIC_TOLERANCE:
                raise RecordError(f"mismatched predictions file: {key} {metric} from the predictions is "
                                  f"{recomputed:.4f}, the record says {recorded:.4f}; rerun the evaluation to "
                                  f"regenerate both")
            out[(key, metric)] = PerImage("clustering" if clustering else "accuracy", labels, data, labels_id,
                                          scored_together)
    _derive_block_averages(record, out)
    return out


def _unplaced(settings: dict) -> dict:
    return {k: v for k, v in settings.items() if k not in ("block", "blocks")}


def _derive_block_averages(record: dict, out: dict) -> None:
    """An entry with block "avg" (SSL++: mean over blocks) has no predictions of its own: its per-image
    correctness is the mean over the blocks' (same protocol and settings) when that mean reproduces the
    recorded average (all blocks, or blocks 2 and up as in SSL++'s tables); otherwise it has none."""
    for avg in sorted(record["metrics"], key=lambda e: (e["key"], e["metric"])):
        if avg["settings"].get("block") != "avg" or (avg["key"], avg["metric"]) in out:
            continue
        blocks = sorted((e["settings"]["block"], e["key"]) for e in record["metrics"]
                        if e["protocol"] == avg["protocol"] and e["metric"] == avg["metric"]
                        and isinstance(e["settings"].get("block"), int) and (e["key"], e["metric"]) in out
                        and _unplaced(e["settings"]) == _unplaced(avg["settings"]))
        for chosen in (blocks, [b for b in blocks if b[0] >= 2]):
            parts = [out[(k, avg["metric"])] for _, k in chosen]
            if len(parts) < 2 or len({p.labels_id for p in parts}) != 1:
                continue
            mean = np.mean([p.data for p in parts], axis=0)
            if abs(100.0 * float(mean.mean()) - avg["value"]) <= METRIC_TOLERANCE:
                out[(avg["key"], avg["metric"])] = PerImage("accuracy", parts[0].labels, mean, parts[0].labels_id)
                break


def _read_one(path: Path, root: Path) -> Run:
    record = records.read_record(path)  # validated (RunRecord: 'created' ISO-8601, clusters[key] of every entry)
    created = datetime.fromisoformat(record["created"])  # a naive time is UTC, as the schema says
    return Run(shown_path(path, root), record, created if created.tzinfo else created.replace(tzinfo=timezone.utc),
               per_image(record, records.read_predictions(path, record)) if record["status"] == "completed" else {})


def _reason(exc: Exception, path: Path, root: Path) -> str:
    """A skip reason without the file's own path, with the results folder as the report shows it."""
    message = str(exc).removeprefix(f"{path}: ")
    if not isinstance(exc, RecordError):  # a check of ours that did not expect this content
        message = f"cannot be used ({type(exc).__name__}: {message})"
    name = root.name or root.resolve().name
    message = message.replace(str(root.resolve()), name)
    # `--results .`: str(root) is "." -- replacing it would strip every dot of the message
    return message.replace(str(root), name) if root.name else message


def newest_first(runs: list[Run], root: Path) -> list[Run]:
    """Newest `created` first; ties: the file at its canonical path, then sorted path order."""
    def canonical(run: Run) -> bool:
        r = run.record
        path = records.record_path(root, r["suite"], r["method"], r["epochs"], r["seed"], r["fingerprints"]["run"])
        return run.path == shown_path(path, root)

    return sorted(runs, key=lambda r: (-r.created.timestamp(), not canonical(r), r.path))


def load_records(results_dir: str | Path, suites=None, methods=None, epochs=None) -> LoadedRecords:
    """Read every record file under `results_dir` (sorted by path); never raises for one bad file."""
    root = Path(results_dir)
    out = LoadedRecords()
    groups: dict[tuple, list[Run]] = {}
    for path in records.iter_record_files(root):
        try:
            run = _read_one(path, root)
        except Exception as exc:  # noqa: BLE001 -- one unreadable file of any kind must not stop the build
            out.skipped.append(Skipped(shown_path(path, root), _reason(exc, path, root)))
            continue
        r, fp = run.record, run.record["fingerprints"]
        if selected(r, suites, methods, epochs):
            identity = (r["suite"], r["method"], r["epochs"], r["seed"], fp["training"], fp["evaluation"])
            groups.setdefault(identity, []).append(run)
    for group in groups.values():  # in any order: the lists are sorted by path below
        winner, *others = newest_first(group, root)
        out.superseded += [Superseded(o.path, o.record["created"], winner.path, winner.record["created"])
                           for o in others]
        (out.completed if winner.record["status"] == "completed" else out.excluded).append(winner)
    out.completed.sort(key=lambda r: r.path)
    out.excluded.sort(key=lambda r: r.path)
    out.superseded.sort(key=lambda s: (s.path, s.what))
    return out


def paper_of(rec: dict) -> str | None:
    """The paper a row may be paired with; a variant (an ablation) only when its own suite section names one
    (`methods.<variant>.paper`), not its base method's paper measured under other settings."""
    sections = rec.get("config", {}).get("methods")
    section = sections.get(rec["method"]) if isinstance(sections, dict) else None
    if rec.get("variant") and not (isinstance(section, dict) and "paper" in section):
        return None
    return rec["paper_reference"]


ENTRY_COLUMNS = ("suite", "dataset", "epochs", "method", "method_base", "display", "is_reference", "settings_fp",
                 "seed", "paper_reference", "backbone", "hparams", "run", "path", "created", "protocol", "key",
                 "metric", "value", "settings", "entry", "num_clusters", "num_classes")


def entries_frame(runs: list[Run]) -> pd.DataFrame:
    """The tidy frame (``ENTRY_COLUMNS``): one row per (run, metric entry), with its run's columns, ``run`` = its
    index in `runs`, ``settings`` canonical JSON of the dict ``entry``; clusters and classes of clustering entries."""
    rows = []
    for i, run in enumerate(runs):
        rec = run.record
        common = {"suite": rec["suite"], "dataset": rec["dataset"], "epochs": rec["epochs"], "method": rec["method"],
                  "method_base": rec["method_base"], "display": rec["method_display"],
                  "is_reference": rec["is_reference"], "settings_fp": rec["fingerprints"]["settings"],
                  "seed": rec["seed"], "paper_reference": paper_of(rec), "backbone": rec["backbone"],
                  "hparams": canonical_json((rec.get("method_config") or {}).get("hparams") or {}),
                  "run": i, "path": run.path, "created": run.created}
        for e in rec["metrics"]:
            info = rec["clusters"].get(e["key"], {}) if e["protocol"] in CLUSTERING_PROTOCOLS else {}
            settings = e["settings"]
            if "dataset" in settings:  # a transfer target by its loader name (schema-2 conversion): as displayed
                settings = {**settings, "dataset": dataset_display_name(settings["dataset"])}
            rows.append({**common, "protocol": e["protocol"], "key": e["key"], "metric": e["metric"],
                         "value": float(e["value"]), "settings": canonical_json(settings), "entry": settings,
                         "num_clusters": info.get("num_clusters"), "num_classes": info.get("num_classes")})
    return pd.DataFrame(rows, columns=list(ENTRY_COLUMNS))


def at_place(frame: pd.DataFrame, protocol: str, place: dict) -> pd.Series:
    """Rows of `frame` of `protocol` at exactly `place` (``benchmarks.records.at_place``)."""
    return (frame["protocol"] == protocol) & frame["entry"].map(lambda e: records.at_place(e, place)).astype(bool)


def dotted_json(obj, prefix: str = "") -> dict[str, str]:
    """Nested dicts as dotted keys -> canonical JSON of the leaf (lists are leaves)."""
    if isinstance(obj, dict) and obj:
        return {k: v for key in sorted(obj) for k, v in dotted_json(obj[key], f"{prefix}{key}.").items()}
    return {prefix[:-1]: obj if isinstance(obj, str) else json.dumps(obj, sort_keys=True)}


def differing(dicts: list[dict]) -> list[str]:
    """Dotted keys whose values are not the same in every one of `dicts` (missing counts as different)."""
    flat = [dotted_json(d) for d in dicts]
    return [k for k in sorted(set().union(*flat)) if len({f.get(k, "\0missing") for f in flat}) > 1]


def history_frame(runs: list[Run]) -> pd.DataFrame:
    """Per-epoch training curves (loss, online kNN top-1); entries that are not finite numbers are ignored."""
    rows = [(rec["suite"], rec["dataset"], rec["epochs"], rec["method"], rec["fingerprints"]["settings"],
             rec["seed"], float(entry["epoch"]), series, float(entry[series]))
            for rec in (run.record for run in runs) for entry in rec["history"] for series in HISTORY_SERIES
            if type(entry.get(series)) in (int, float) and math.isfinite(entry[series])]  # JSON numbers, not bool
    return pd.DataFrame(rows, columns=["suite", "dataset", "epochs", "method", "settings_fp", "seed", "epoch",
                                       "series", "value"])


def load_paper_results(path: str | Path | None = None) -> pd.DataFrame:
    path = Path(path) if path is not None else PAPER_CSV
    try:
        papers = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise BenchmarkError(f"{path}: cannot read the papers' numbers ({exc}); pass --paper-csv FILE "
                             "(default: reports/paper_results.csv)") from exc
    missing = [c for c in PAPER_COLUMNS if c not in papers.columns]
    if missing:
        raise BenchmarkError(f"{path}: missing column(s) {', '.join(missing)}; expected "
                             f"{','.join(PAPER_COLUMNS)}")
    papers = papers[list(PAPER_COLUMNS)].apply(lambda column: column.str.strip())
    try:
        papers["epochs"] = pd.array([int(v) if v else None for v in papers["epochs"]], dtype="Int64")
        papers["value"] = [float(v) for v in papers["value"]]
        papers["std"] = [float(v) if v else float("nan") for v in papers["std"]]
    except ValueError as exc:
        raise BenchmarkError(f"{path}: a value, std or epochs entry is not a number ({exc})") from exc
    papers.insert(0, "line", range(2, len(papers) + 2))  # line number in the CSV (header is line 1)
    return papers
