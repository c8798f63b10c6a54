"""Records in, tidy data out: reading (schema v2 of ``benchmarks.records``), one record per run identity,
per-image predictions, and the papers' CSV.

Everything here is data handling without rendering, so each rule can be tested on its own:

* ``load_records`` reads every record file with ``benchmarks.records.read_record`` (schema, checksum and
  predictions hash), then checks the fields the report reads beyond the schema (``evaluation[key]
  ["settings"]``, ``clusters[key]``, the predictions' arrays against the recorded metrics). A file that
  fails any check is ``Skipped`` by name with the reason; the build never stops for one file.
* One record per run identity (suite, method, epochs, seed, training and evaluation fingerprints): the
  newest by its own ``created`` wins, ties go to the file at its canonical path
  (``benchmarks.records.record_path``), then to the first path in sorted order; the others are
  ``Superseded``.
* ``per_image`` turns a record's predictions into per-image correctness (classification keys) or cluster
  assignments (clustering keys), after checking that they reproduce the recorded metrics.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.errors import BenchmarkError, RecordError
from benchmarks.records import iter_record_files, read_predictions, read_record, record_path
from reports import stats

PAPER_CSV = Path(__file__).resolve().parent / "paper_results.csv"
PAPER_COLUMNS = (
    "paper", "table", "method", "pretrain_dataset", "eval_dataset", "backbone",
    "epochs", "protocol", "metric", "value", "std", "note",
)  # fmt: skip
HISTORY_SERIES = ("loss", "online_knn_top1")
#: tolerance (percentage points) between a metric recomputed from the predictions and the recorded one
METRIC_TOLERANCE = 0.01
CLUSTER_SOURCES = ("kmeans", "head")
#: record metric name -> ``ssl_common.clustering_metrics.SCALAR`` name (ACC_MANY_TO_ONE: the producer's
#: ``as_percent_metrics`` spelling of ACC_M2O)
CLUSTER_METRICS = {"NMI": "nmi", "AMI": "ami", "ARI": "ari", "ACC": "acc", "ACC_M2O": "acc_many_to_one",
                   "ACC_MANY_TO_ONE": "acc_many_to_one"}
TOPK = {"top1": 1, "top5": 5}
_HEAD = re.compile(r"clustering_head_k(\d+)(?:_h(\d+))?")  # _h<i>: a second head with the same K
_BLOCK = re.compile(r"(.+)_B(\d+)")


def is_clustering_key(key: str) -> bool:
    return key == "clustering" or _HEAD.fullmatch(key) is not None


def head_k(key: str) -> int | None:
    match = _HEAD.fullmatch(key)
    return int(match.group(1)) if match else None


def head_index(key: str) -> int | None:
    """`clustering_head_k30_h2` -> 2 (several heads of one K); None for the first head of a K."""
    match = _HEAD.fullmatch(key)
    return int(match.group(2)) if match and match.group(2) else None


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
    """Per-test-image data of one (key, metric): correctness in [0, 1] (classification; the mean over
    labelled subsets for semi-supervised keys) or cluster assignments (clustering), with the labels."""

    kind: str  # "accuracy" | "clustering"
    labels: np.ndarray  # [n] test labels of this key
    data: np.ndarray  # accuracy: float [n]; clustering: int [n]
    labels_id: str  # digest of the labels: runs are paired over images only when these agree


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


def _casefold_set(values: Iterable[str] | None) -> set[str] | None:
    return None if values is None else {str(v).strip().casefold() for v in values}


def shown_path(path: Path, results_dir: Path) -> str:
    """`results/<relative path>`: no absolute path enters the report (it must not depend on the checkout)."""
    name = results_dir.name or results_dir.resolve().name
    try:
        rel = path.relative_to(results_dir)
    except ValueError:
        return path.as_posix()
    return (Path(name) / rel).as_posix() if name else rel.as_posix()


def selected(record: dict, suites=None, methods=None, epochs=None) -> bool:
    """Whether a record passes --suite / --methods / --epochs (methods: registry, variant or display name)."""
    suites, methods = _casefold_set(suites), _casefold_set(methods)
    if suites is not None and record["suite"].casefold() not in suites:
        return False
    names = {record[k].casefold() for k in ("method", "method_display", "method_base")}
    if methods is not None and not names & methods:
        return False
    return epochs is None or record["epochs"] in {int(e) for e in epochs}


def parse_created(text: str) -> datetime:
    """ISO-8601 (``Z`` or an offset; a naive time is taken as UTC, as the schema says the field is UTC)."""
    try:
        when = datetime.fromisoformat(text)
    except (TypeError, ValueError) as exc:
        raise RecordError(f"'created' is not an ISO-8601 timestamp: {text!r}") from exc
    return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_fields(record: dict) -> None:
    """The fields the report reads beyond ``validate_record``: raise RecordError naming each problem."""
    problems = []
    parse_created(record["created"])
    for key in sorted(record["metrics"]):
        entry = record["evaluation"].get(key)
        if not isinstance(entry, dict):
            problems.append(f"evaluation['{key}'] is missing (each metric key needs its protocol parameters)")
        elif not isinstance(entry.get("settings"), dict):
            problems.append(f"evaluation['{key}']['settings'] must be an object (the protocol's settings)")
        if not is_clustering_key(key):
            continue
        info = record["clusters"].get(key)
        if not isinstance(info, dict):
            problems.append(f"clusters['{key}'] is missing")
            continue
        for name in ("num_clusters", "num_nonempty", "num_classes"):
            if not _int(info.get(name)) or info[name] < 1:
                problems.append(f"clusters['{key}']['{name}'] must be a positive integer, got "
                                f"{info.get(name)!r}")
        if info.get("source") not in CLUSTER_SOURCES:
            problems.append(f"clusters['{key}']['source'] must be kmeans or head, got {info.get('source')!r}")
        k = head_k(key)
        if k is not None and info.get("num_clusters") != k:
            problems.append(f"clusters['{key}']['num_clusters'] is {info.get('num_clusters')!r}, the key "
                            f"says {k}")
        for metric in record["metrics"][key]:
            if metric not in CLUSTER_METRICS:
                problems.append(f"metrics['{key}'] has an unknown clustering metric '{metric}'")
    if problems:
        raise RecordError("; ".join(problems))


def _digest(labels: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(labels, dtype=np.int64).tobytes()).hexdigest()[:16]


def _labels_array(arrays: dict, name: str) -> np.ndarray:
    labels = np.asarray(arrays[name])
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or labels.size == 0 or labels.min() < 0:
        raise RecordError(f"predictions '{name}' must be non-negative integer labels [n], got "
                          f"{labels.dtype} {list(labels.shape)}")
    return labels.astype(np.int64)


def _correctness(pred: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """[n] per-image correctness (float, mean over labelled subsets for [subsets, n, 5])."""
    if pred.ndim == 1:
        pred = pred[:, None]
    top = pred[..., :k]
    hit = ((top == labels[:, None]) & (top >= 0)).any(axis=-1)
    return hit.astype(np.float64).reshape(-1, len(labels)).mean(axis=0)


def _check_value(key: str, metric: str, recomputed: float, recorded: float) -> None:
    if not abs(recomputed - recorded) <= METRIC_TOLERANCE:
        raise RecordError(f"mismatched predictions file: {key} {metric} from the predictions is "
                          f"{recomputed:.4f}, the record says {recorded:.4f}; rerun the evaluation to "
                          f"regenerate both")


def per_image(record: dict, arrays: dict) -> dict[tuple[str, str], PerImage]:
    """Per-image data of every (key, metric) the predictions cover, each checked against the metric."""
    if not arrays:
        return {}
    if "labels" not in arrays:
        raise RecordError("predictions file has no 'labels' array")
    out: dict[tuple[str, str], PerImage] = {}
    for key in sorted(record["metrics"]):
        if key not in arrays:
            continue
        labels = _labels_array(arrays, f"{key}:labels" if f"{key}:labels" in arrays else "labels")
        pred = np.asarray(arrays[key])
        if pred.dtype.kind not in "iu":
            raise RecordError(f"predictions '{key}' must be integers, got {pred.dtype}")
        metrics = record["metrics"][key]
        if is_clustering_key(key):
            if pred.shape != labels.shape or pred.min() < 0:
                raise RecordError(f"predictions '{key}' must be non-negative cluster indices "
                                  f"[{len(labels)}], got {list(pred.shape)}")
            nonempty = len(np.unique(pred))
            if nonempty != record["clusters"][key]["num_nonempty"]:
                raise RecordError(f"mismatched predictions file: {key} has {nonempty} non-empty clusters, "
                                  f"clusters['{key}'] says {record['clusters'][key]['num_nonempty']}")
            for metric in sorted(metrics):
                name = CLUSTER_METRICS[metric]
                _check_value(key, metric, stats.clustering_score(labels, pred, name), metrics[metric])
                out[(key, metric)] = PerImage("clustering", labels, pred.astype(np.int64), _digest(labels))
            continue
        if pred.ndim not in (1, 2, 3) or pred.shape[-1 if pred.ndim == 1 else -2] != len(labels):
            raise RecordError(f"predictions '{key}' must be [n], [n, 5] or [subsets, n, 5] with n = "
                              f"{len(labels)}, got {list(pred.shape)}")
        for metric in sorted(metrics):
            k = TOPK.get(metric)
            if k is None or (pred.ndim == 1 and k > 1):
                continue  # no per-image form of this metric (e.g. top-5 from top-1 predictions only)
            correct = _correctness(pred, labels, k)
            _check_value(key, metric, 100.0 * float(correct.mean()), metrics[metric])
            out[(key, metric)] = PerImage("accuracy", labels, correct, _digest(labels))
    _derive_block_averages(record, out)
    return out


def _derive_block_averages(record: dict, out: dict) -> None:
    """`<probe>_avg` (SSL++: mean over blocks) has no predictions of its own: its per-image correctness is
    the mean over the blocks' when the blocks' mean reproduces the recorded average (all blocks, or blocks
    2 and up as in SSL++'s tables); otherwise it has none."""
    for key in sorted(record["metrics"]):
        if not key.endswith("_avg"):
            continue
        prefix = key[: -len("_avg")]
        for metric, value in sorted(record["metrics"][key].items()):
            if (key, metric) in out:
                continue
            blocks = sorted((int(m.group(2)), k) for (k, mt) in out if mt == metric
                            and (m := _BLOCK.fullmatch(k)) and m.group(1) == prefix)
            for chosen in (blocks, [b for b in blocks if b[0] >= 2]):
                parts = [out[(k, metric)] for _, k in chosen]
                if len(parts) < 2 or len({p.labels_id for p in parts}) != 1:
                    continue
                mean = np.mean([p.data for p in parts], axis=0)
                if abs(100.0 * float(mean.mean()) - value) <= METRIC_TOLERANCE:
                    out[(key, metric)] = PerImage("accuracy", parts[0].labels, mean, parts[0].labels_id)
                    break


def _read_one(path: Path, root: Path) -> Run:
    record = read_record(path)
    check_fields(record)
    run = Run(shown_path(path, root), record, parse_created(record["created"]))
    if record["status"] == "completed":
        run.per_image = per_image(record, read_predictions(path, record))
    return run


def _reason(exc: Exception, path: Path) -> str:
    message = str(exc)
    prefix = f"{path}: "
    message = message[len(prefix):] if message.startswith(prefix) else message
    if not isinstance(exc, RecordError):  # a check of ours that did not expect this content
        message = f"cannot be used ({type(exc).__name__}: {message})"
    return message


def _shown_reason(reason: str, root: Path) -> str:
    """A skip reason with the results folder as the report shows it (no absolute path, as shown_path)."""
    name = root.name or root.resolve().name
    reason = reason.replace(str(root.resolve()), name)
    # `--results .`: str(root) is "." -- replacing it would strip every dot of the message
    return reason.replace(str(root), name) if root.name else reason


def identity(record: dict) -> tuple:
    fp = record["fingerprints"]
    return (record["suite"], record["method"], record["epochs"], record["seed"], fp["training"],
            fp["evaluation"])


def _is_canonical(run: Run, root: Path) -> bool:
    r = run.record
    canonical = record_path(root, r["suite"], r["method"], r["epochs"], r["seed"], r["fingerprints"]["run"])
    return run.path == shown_path(canonical, root)


def newest_first(runs: list[Run], root: Path) -> list[Run]:
    """Newest `created` first; ties: the file at its canonical path, then sorted path order."""
    by_path = sorted(runs, key=lambda r: r.path)
    by_canonical = sorted(by_path, key=lambda r: not _is_canonical(r, root))
    return sorted(by_canonical, key=lambda r: r.created, reverse=True)


def load_records(results_dir: str | Path, suites=None, methods=None, epochs=None) -> LoadedRecords:
    """Read every record file under `results_dir` (sorted by path); never raises for one bad file."""
    root = Path(results_dir)
    out = LoadedRecords()
    groups: dict[tuple, list[Run]] = {}
    for path in iter_record_files(root):
        try:
            run = _read_one(path, root)
        except Exception as exc:  # noqa: BLE001 -- one unreadable file of any kind must not stop the build
            reason = _shown_reason(_reason(exc, path), root)
            out.skipped.append(Skipped(shown_path(path, root), reason))
            continue
        if selected(run.record, suites, methods, epochs):
            groups.setdefault(identity(run.record), []).append(run)
    for key in sorted(groups, key=repr):
        winner, *others = newest_first(groups[key], root)
        for other in others:
            out.superseded.append(Superseded(other.path, other.record["created"], winner.path,
                                             winner.record["created"]))
        (out.completed if winner.record["status"] == "completed" else out.excluded).append(winner)
    out.completed.sort(key=lambda r: r.path)
    out.excluded.sort(key=lambda r: r.path)
    out.superseded.sort(key=lambda s: (s.path, s.what))
    return out


def flatten(obj, prefix: str = "") -> dict[str, str]:
    """Nested dicts as dotted keys -> canonical JSON of the leaf (lists are leaves)."""
    if isinstance(obj, dict) and obj:
        out: dict[str, str] = {}
        for key in sorted(obj):
            out.update(flatten(obj[key], f"{prefix}{key}."))
        return out
    return {prefix[:-1]: obj if isinstance(obj, str) else json.dumps(obj, sort_keys=True)}


def differing(dicts: list[dict]) -> list[str]:
    """Dotted keys whose values are not the same in every one of `dicts` (missing counts as different)."""
    flat = [flatten(d) for d in dicts]
    keys = sorted(set().union(*flat)) if flat else []
    return [k for k in keys if len({f.get(k, "\0missing") for f in flat}) > 1]


def history_frame(runs: list[Run]) -> pd.DataFrame:
    """Per-epoch training curves (loss, online kNN top-1); entries that are not finite numbers are ignored."""
    rows = []
    for run in runs:
        rec = run.record
        for entry in rec["history"]:
            epoch = entry.get("epoch")
            for series in HISTORY_SERIES:
                value = entry.get(series)
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    continue
                rows.append((rec["suite"], rec["dataset"], rec["epochs"], rec["method"],
                             rec["fingerprints"]["settings"], rec["seed"], float(epoch), series,
                             float(value)))
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
    papers = papers[list(PAPER_COLUMNS)].copy()
    for column in PAPER_COLUMNS:
        papers[column] = papers[column].str.strip()
    try:
        papers["epochs"] = pd.array([int(v) if v else None for v in papers["epochs"]], dtype="Int64")
        papers["value"] = [float(v) for v in papers["value"]]
        papers["std"] = [float(v) if v else float("nan") for v in papers["std"]]
    except ValueError as exc:
        raise BenchmarkError(f"{path}: a value, std or epochs entry is not a number ({exc})") from exc
    papers.insert(0, "line", range(2, len(papers) + 2))  # line number in the CSV (header is line 1)
    return papers.reset_index(drop=True)
