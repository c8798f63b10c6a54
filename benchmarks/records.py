"""Run records: one JSON file per (suite, method, epochs, seed), written atomically.

Schema (version 1) -- every key is required unless marked optional:

    schema_version: 1
    status: "completed" | "diverged" | "failed"
    suite: str                # suite name, e.g. "digits", "cifar10"
    dataset: str              # display name, e.g. "CIFAR-10" (matches paper_results.csv)
    method: str               # registry name, e.g. "simclr"; reference rows: "random_init", "supervised"
    method_display: str       # name used in tables, e.g. "SimCLR" (matches paper_results.csv)
    is_reference: bool        # random-init / supervised rows, kept apart in tables
    seed: int
    epochs: int
    backbone: str
    batch_size: int
    config: dict              # the full resolved config the run used
    metrics: {protocol: {metric: float}}
        # values in percent (0-100), as in the papers' tables. Protocol and metric
        # names match paper_results.csv: knn_k20/knn_k200/linear/semi_1pct/semi_10pct
        # -> top1/top5; clustering -> NMI/AMI/ARI/ACC; transfer_linear:<Dataset>
        # -> top1/top5; per-layer probes knn_k20_B<i>/linear_B<i>.
    evaluation: dict          # protocol parameters (k, temperature, epochs, ...) per protocol
    clusters: {num_clusters: int, num_nonempty: int, source: "head" | "kmeans"} | null
    history: [{epoch: int, loss: float, online_knn_top1?: float, ...}]  # per-epoch curve
    paper_reference: str | null  # seed paper id (first column of paper_results.csv)
    versions: {package: version}
    git_commit: str | null
    device: str
    wall_time_s: float
    throughput_images_per_s: float | null
    peak_memory_mb: float | null
    checkpoint: str | null    # path of the final model checkpoint
    created: str              # ISO-8601 UTC
    message: str | null       # optional; required (non-empty) when status is diverged/failed
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from benchmarks.errors import BenchmarkError, RecordError, RecordExistsError, StorageError

SCHEMA_VERSION = 1
STATUSES = ("completed", "diverged", "failed")

# key -> accepted python types (None allowed where listed)
_REQUIRED: dict[str, tuple[type, ...]] = {
    "schema_version": (int,),
    "status": (str,),
    "suite": (str,),
    "dataset": (str,),
    "method": (str,),
    "method_display": (str,),
    "is_reference": (bool,),
    "seed": (int,),
    "epochs": (int,),
    "backbone": (str,),
    "batch_size": (int,),
    "config": (dict,),
    "metrics": (dict,),
    "evaluation": (dict,),
    "clusters": (dict, type(None)),
    "history": (list,),
    "paper_reference": (str, type(None)),
    "versions": (dict,),
    "git_commit": (str, type(None)),
    "device": (str,),
    "wall_time_s": (int, float),
    "throughput_images_per_s": (int, float, type(None)),
    "peak_memory_mb": (int, float, type(None)),
    "checkpoint": (str, type(None)),
    "created": (str,),
}


def method_slug(method: str) -> str:
    """A method or named variant as a file name part: `self_classifier/reimpl` -> `self_classifier+reimpl`."""
    return method.replace("/", "+")


def record_filename(suite: str, method: str, epochs: int, seed: int) -> str:
    return f"{suite}/{method_slug(method)}_e{epochs}_s{seed}.json"


def record_path(results_dir: str | Path, suite: str, method: str, epochs: int, seed: int) -> Path:
    return Path(results_dir) / record_filename(suite, method, epochs, seed)


def validate_record(record: Any) -> None:
    """Raise RecordError naming every problem found in `record`."""
    problems: list[str] = []
    if not isinstance(record, dict):
        raise RecordError(f"a record must be a JSON object, got {type(record).__name__}")
    version = record.get("schema_version")
    if version != SCHEMA_VERSION:
        problems.append(f"schema_version is {version!r}, this suite reads version {SCHEMA_VERSION}")
    for key, types in _REQUIRED.items():
        if key not in record:
            problems.append(f"missing key '{key}'")
        elif not isinstance(record[key], types) or (isinstance(record[key], bool) and bool not in types):
            names = "/".join("null" if t is type(None) else t.__name__ for t in types)
            problems.append(f"'{key}' must be {names}, got {type(record[key]).__name__}")
    if record.get("status") not in STATUSES:
        problems.append(f"'status' must be one of {', '.join(STATUSES)}, got {record.get('status')!r}")
    metrics = record.get("metrics")
    if isinstance(metrics, dict):
        for protocol, values in metrics.items():
            if not isinstance(values, dict):
                problems.append(f"metrics['{protocol}'] must map metric names to numbers")
                continue
            for metric, value in values.items():
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    problems.append(f"metrics['{protocol}']['{metric}'] must be a finite number, got {value!r}")
                elif not 0.0 <= value <= 100.0:
                    problems.append(f"metrics['{protocol}']['{metric}'] = {value} is outside 0-100 (percent)")
    history = record.get("history")
    if isinstance(history, list):
        for i, entry in enumerate(history):
            if not isinstance(entry, dict) or isinstance(entry.get("epoch"), bool) \
                    or not isinstance(entry.get("epoch"), int) or not _is_number(entry.get("loss")):
                problems.append(f"history[{i}] must be an object with an integer 'epoch' and a numeric 'loss'")
                break
    if "message" in record and not isinstance(record["message"], (str, type(None))):
        problems.append(f"'message' must be str/null, got {type(record['message']).__name__}")
    if record.get("status") in ("diverged", "failed") and not record.get("message"):
        problems.append(f"a {record.get('status')} record needs a 'message' saying why")
    if problems:
        raise RecordError("; ".join(problems))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_record(path: str | Path) -> dict:
    """Read and validate one record; errors name the file and what is wrong."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RecordError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecordError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from exc
    try:
        validate_record(record)
    except RecordError as exc:
        raise RecordError(f"{path}: {exc}") from exc
    return record


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None], overwrite: bool = True) -> Path:
    """Write a file through a temp file in the same folder + fsync + rename.

    `write(handle)` fills the temp file. A reader never sees a half-written file; on
    any error (disk full included) the temp file is removed, the previous file, if
    any, is left untouched, and an OSError is raised as StorageError naming the file.
    With overwrite=False the final step is a hard link, which fails atomically if
    another writer got there first (RecordExistsError).
    """
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        tmp = Path(tmp_name)
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise RecordExistsError(
                    f"{path} already exists; pass --force to overwrite it or choose another --out"
                ) from None
            tmp.unlink()
        _fsync_dir(path.parent)
    except BaseException as exc:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, (BenchmarkError, FileExistsError)):
            reason = exc.strerror or str(exc)
            raise StorageError(f"{path}: cannot be written ({reason}); nothing was written and any previous "
                               "file there is unchanged. Free disk space or fix the folder's permissions "
                               "(or choose another folder), then rerun the same command.") from exc
        raise
    return path


def atomic_write_text(path: str | Path, text: str, overwrite: bool = True) -> Path:
    """`atomic_write` for UTF-8 text."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda handle: handle.write(data), overwrite=overwrite)


def write_record(record: dict, path: str | Path, force: bool = False) -> Path:
    """Validate `record` and write it atomically to `path`.

    An existing record is never overwritten unless force=True.
    """
    validate_record(record)
    path = Path(path)
    if path.exists() and not force:
        raise RecordExistsError(f"{path} already exists; pass --force to overwrite it or choose another --out")
    text = json.dumps(record, indent=2, sort_keys=True, allow_nan=False) + "\n"
    return atomic_write_text(path, text, overwrite=force)


def iter_record_files(results_dir: str | Path) -> list[Path]:
    """All record files under `results_dir`, sorted (benchmark JSON excluded)."""
    root = Path(results_dir)
    if not root.exists():
        return []
    return sorted(p for p in root.rglob("*.json") if not p.name.startswith(".") and "benchmarks" not in p.parts and "splits" not in p.parts)
