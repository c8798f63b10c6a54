"""Run records: one JSON file per run (suite, method or variant, epochs, seed, settings fingerprint),
written atomically, with its per-test-image predictions in a compact file beside it.

The schema (version 3) is the pydantic model `RunRecord` below; its fields' comments are the documentation.
Metrics are typed entries (`MetricEntry`): the protocol, that protocol's settings, the metric and the value, so
nothing downstream decodes string keys. Records of schema 2 (metrics as `{key: {metric: value}}`, provenance
also at the top level) are still read: `read_record` verifies them as written and converts them on load
(`upgrade_record`); the key suffixes are read in that one converter (`metric_entries`) and nowhere else.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import os
import re
import tempfile
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from benchmarks.errors import BenchmarkError, RecordError, RecordExistsError, StorageError, first_line

SCHEMA_VERSION = 3
READABLE_SCHEMAS = (2, 3)  # 2 is converted on load
STATUSES = ("completed", "diverged", "failed")
PREDICTIONS_FORMAT = "ssl-bench-predictions/1"
PREDICTIONS_SUFFIX = ".predictions.npz"
FINGERPRINTS = ("training", "settings", "evaluation", "run")


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class MetricEntry(_Strict):
    """One number of a run: which protocol, under which settings, which metric, and its value."""

    protocol: str      # knn, linear, online_linear, semi, finetune, transfer, clustering, clustering_head,
    #                    knn_k10, block_classifier (benchmarks.evaluation.protocols)
    settings: dict[str, Any]  # what a table column must agree on (k, temperature, fraction / per_class, the
    #                    probe's budget, ...) plus the entry's place: `block` (int, or "avg" for the mean over
    #                    blocks), `head` (a second head with the same K), `dataset` (a transfer target)
    metric: str        # top1, top5 (percent correct); NMI, AMI, ARI, ACC, ACC_MANY_TO_ONE (percent)
    value: float       # percent, as in the papers' tables; AMI/ARI may be negative (worse than chance)
    key: str           # the evaluation's name: links the entry to `evaluation[key]`, `clusters[key]` and the
    #                    predictions' arrays. An identifier: nothing parses it.

    @field_validator("value")
    @classmethod
    def _percent(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError(f"must be a finite number, got {value!r}")
        if not -100.0 <= value <= 100.0:
            raise ValueError(f"= {value} is outside -100..100 (percent)")
        return value


class Fingerprints(_Strict):
    """12 hex digits each (benchmarks.config.fingerprint of the canonical dumps): training = everything that
    decides the trained weights, seed included (names the checkpoint folder); settings = the same without the
    seed (one row of a table: the same experiment over seeds); evaluation = the evaluation section; run =
    training + evaluation (part of the file name)."""

    training: str
    settings: str
    evaluation: str
    run: str

    @field_validator("training", "settings", "evaluation", "run")
    @classmethod
    def _hex12(cls, value: str) -> str:
        if not re.fullmatch(r"[0-9a-f]{12}", value):
            raise ValueError(f"must be 12 hex digits, got {value!r}")
        return value


class PredictionsFile(_Strict):
    """The per-test-image predictions (numpy .npz beside the record, see write_predictions)."""

    file: str
    sha256: str
    format: str = PREDICTIONS_FORMAT


CLUSTERING_PROTOCOLS = ("clustering", "clustering_head")
CLUSTERING_METRICS = ("NMI", "AMI", "ARI", "ACC", "ACC_M2O", "ACC_MANY_TO_ONE")


class ClusterInfo(BaseModel):
    """The clusters a clustering entry scored: counts, where they came from (k-means or a method's head) and
    how ACC matched them to classes."""

    model_config = ConfigDict(strict=True, extra="allow")
    num_clusters: int = Field(ge=1)
    num_nonempty: int = Field(ge=1)
    num_classes: int = Field(ge=1)
    source: Literal["kmeans", "head"]


class HistoryPoint(BaseModel):
    """One epoch of the training curve: {epoch, loss, online_knn_top1?, stage?, ...}."""

    model_config = ConfigDict(strict=True, extra="allow")
    epoch: int
    loss: float


class RunRecord(_Strict):
    """A run record, schema 3. Every field is required unless it has a default."""

    schema_version: Literal[3]
    status: Literal["completed", "diverged", "failed"]
    suite: str                 # suite name, e.g. "digits", "cifar10"
    dataset: str               # display name, e.g. "CIFAR-10" (matches paper_results.csv)
    method: str                # method or named variant: "simclr", "self_classifier/reimpl"
    method_base: str           # its registry name: "self_classifier"
    variant: str | None        # "reimpl"
    method_display: str        # name used in tables, e.g. "Self-Classifier (reimpl)"
    paper_reference: str | None  # the paper (first column of paper_results.csv) this method/variant follows
    is_reference: bool         # random-init / supervised rows, kept apart in tables
    seed: int
    epochs: int                # pretraining epochs (the last stage's, for methods with several stages)
    backbone: str              # registry name, e.g. "resnet18_cifar", "small_cnn", "nin"
    batch_size: int
    fingerprints: Fingerprints
    config: dict[str, Any]     # the canonical dump of the resolved suite config
    method_config: dict[str, Any]  # the resolved settings of the method (hparams, optimizer, views, budget)
    metrics: list[MetricEntry]
    evaluation: dict[str, dict[str, Any]]  # evaluation key -> parameters used, with `protocol` and `settings`
    clusters: dict[str, ClusterInfo]  # clustering key -> {num_clusters, num_nonempty, num_classes, source, acc}
    predictions: PredictionsFile | None
    history: list[HistoryPoint]  # per-epoch curve
    provenance: dict[str, Any]  # {pretraining: {cpu, device, git_commit, versions, threads, created},
    #                             evaluations: [{command, protocols, git_commit, versions, device, cpu, created}]}
    #                             CPU results are bitwise reproducible on the same CPU model and thread count only
    wall_time_s: float         # every attempt's time (SLURM requeues, resumes after a kill)
    attempts: int | None = None  # processes that worked on the run (runs since issue 20)
    devices: int | None = None   # DDP ranks of the training run (1 without DDP)
    global_batch_size: int | None = None  # batch_size x devices
    throughput_images_per_s: float | None
    peak_memory_mb: float | None
    peak_memory_source: str | None = None  # "process_peak_rss" (CPU) or "cuda_max_allocated"
    checkpoint: str | None     # path of the final model checkpoint
    created: str               # ISO-8601 UTC
    message: str | None = None  # required (non-empty) when status is diverged/failed
    checksum: str              # SHA-256 of the record without this key (canonical JSON); it covers the
    #                            predictions through predictions.sha256, so an edited copy is refused

    @field_validator("created")
    @classmethod
    def _iso_timestamp(cls, value: str) -> str:
        try:
            datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"must be an ISO-8601 timestamp, got {value!r}") from None
        return value

    @model_validator(mode="after")
    def _failure_says_why(self) -> RunRecord:
        if self.status in ("diverged", "failed") and not self.message:
            raise ValueError(f"a {self.status} record needs a 'message' saying why")
        return self

    @model_validator(mode="after")
    def _clusters_match_their_entries(self) -> RunRecord:
        """Every clustering entry has the clusters it scored (a head's as many as its K) and a known metric."""
        problems = []
        for entry in self.metrics:
            if entry.protocol not in CLUSTERING_PROTOCOLS:
                continue
            info = self.clusters.get(entry.key)
            k = entry.settings.get("k") if entry.protocol == "clustering_head" else None
            if info is None:
                problems.append(f"clusters['{entry.key}'] is missing")
            elif k is not None and info.num_clusters != k:
                problems.append(f"clusters['{entry.key}']['num_clusters'] is {info.num_clusters}, the entry says "
                                f"k = {k}")
            if entry.metric not in CLUSTERING_METRICS:
                problems.append(f"metrics['{entry.key}'] has an unknown clustering metric '{entry.metric}'")
        if problems:
            raise ValueError("; ".join(dict.fromkeys(problems)))
        return self


def method_slug(method: str) -> str:
    """A method or named variant as a file name part: `self_classifier/reimpl` -> `self_classifier+reimpl`."""
    return method.replace("/", "+")


def record_stem(method: str, epochs: int, seed: int, run_fingerprint: str | None = None) -> str:
    stem = f"{method_slug(method)}_e{epochs}_s{seed}"
    return f"{stem}_{run_fingerprint}" if run_fingerprint else stem


def record_path(results_dir: str | Path, suite: str, method: str, epochs: int, seed: int,
                run_fingerprint: str | None = None) -> Path:
    """`<results>/<suite>/<method>_e<epochs>_s<seed>_<run fingerprint>.json`: a changed setting is another file."""
    return Path(results_dir) / suite / f"{record_stem(method, epochs, seed, run_fingerprint)}.json"


def predictions_path(record_file: str | Path) -> Path:
    record_file = Path(record_file)
    return record_file.with_name(record_file.stem + PREDICTIONS_SUFFIX)


def canonical_json(payload: Any) -> str:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)


def record_checksum(record: dict) -> str:
    """SHA-256 of the record without its `checksum` key, as canonical JSON."""
    return hashlib.sha256(canonical_json({k: v for k, v in record.items() if k != "checksum"}).encode()).hexdigest()


def _where(loc: tuple) -> str:
    """A pydantic error location as the record's own path: metrics[3].value, fingerprints.training."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _problem(error: dict) -> str:
    where, kind = _where(error["loc"]), error["type"]
    if kind == "missing":
        return f"missing key '{where}'"
    if kind == "extra_forbidden":
        return f"unknown key '{where}'"
    if kind == "value_error":  # our validators' messages, pydantic's "Value error, " prefix removed
        message = str(error["ctx"]["error"])
        return f"'{where}' {message}" if message.startswith(("must", "=")) else message
    got = type(error["input"]).__name__ if "input" in error else "?"
    return f"'{where}': {error['msg'].lower()}, got {got}"


def validate_record(record: Any) -> RunRecord:
    """Validate a schema-3 record (the checksum is checked by read_record); raise RecordError naming every
    problem found. Returns the typed record."""
    if not isinstance(record, dict):
        raise RecordError(f"a record must be a JSON object, got {type(record).__name__}")
    version = record.get("schema_version")
    if version != SCHEMA_VERSION:
        readable = "" if version in READABLE_SCHEMAS else \
            f" (written by {'an older' if isinstance(version, int) and version < 2 else 'another'} version " \
            "of the suite: rerun the run to regenerate it)"
        raise RecordError(f"schema_version is {version!r}, this suite writes version {SCHEMA_VERSION} and reads "
                          f"{' and '.join(map(str, READABLE_SCHEMAS))}{readable}")
    try:
        return RunRecord.model_validate(record)
    except ValidationError as exc:
        raise RecordError("; ".join(_problem(e) for e in exc.errors())) from None


# Schema 2 named an evaluation's place in its key only: `<base>_B<i>` (block i), `<base>_avg` (the mean over
# blocks), `clustering_head_k<K>_h<i>` (another head with the same K). Read here, in the converter, only.
_SCHEMA2_BLOCK = re.compile(r"_B(\d+)$")
_SCHEMA2_HEAD = re.compile(r"^clustering_head_k\d+_h(\d+)$")


PLACE = ("block", "head", "dataset")  # the settings that place an entry rather than describe its protocol


def evaluation_entries(key: str, values: dict, details: dict, *, block: int | str | None = None,
                       head: int | None = None, dataset: str | None = None) -> list[dict]:
    """The entries of one evaluation `key` ({metric: value}, `details` naming protocol and settings), each with
    the protocol's settings plus its place (block, head, transfer dataset)."""
    place = {"block": block, "head": head, "dataset": dataset}
    settings = {**details.get("settings", {}), **{name: value for name, value in place.items() if value is not None}}
    return [{"protocol": details["protocol"], "settings": settings, "metric": metric, "value": value, "key": key}
            for metric, value in values.items()]


def metric_entries(metrics: dict, evaluation: dict) -> list[dict]:
    """Schema 2's `metrics` ({key: {metric: value}}, with `evaluation[key]` giving protocol and settings) as
    schema-3 entries, in the same order."""
    entries = []
    for key, values in metrics.items():
        details = evaluation.get(key)
        if not isinstance(details, dict) or "protocol" not in details:
            raise RecordError(f"metrics['{key}'] has no evaluation['{key}'] naming its protocol and settings")
        block = _SCHEMA2_BLOCK.search(key)
        head = _SCHEMA2_HEAD.match(key)
        entries += evaluation_entries(
            key, values, details, block=int(block.group(1)) if block else ("avg" if key.endswith("_avg") else None),
            head=int(head.group(1)) if head else None,
            dataset=details.get("target") if details["protocol"] == "transfer" else None)
    return entries


_TOP_LEVEL_PROVENANCE = ("versions", "git_commit", "device", "cpu")


def upgrade_record(record: dict) -> dict:
    """A schema-2 record as schema 3: metrics as entries, provenance only under `provenance` (the top-level
    copies are dropped; where the pretraining provenance lacks one, it is kept there). The checksum is
    recomputed for the converted content (the file's own was checked before)."""
    if record.get("schema_version") != 2:
        return record
    upgraded = {k: v for k, v in record.items() if k not in _TOP_LEVEL_PROVENANCE}
    upgraded["schema_version"] = SCHEMA_VERSION
    upgraded["metrics"] = metric_entries(record.get("metrics", {}), record.get("evaluation", {}))
    provenance = dict(record.get("provenance") or {})
    pretraining = dict(provenance.get("pretraining") or {})
    for key in _TOP_LEVEL_PROVENANCE:
        if key in record:
            pretraining.setdefault(key, record[key])
    upgraded["provenance"] = {**provenance, "pretraining": pretraining}
    upgraded["checksum"] = record_checksum(upgraded)
    return upgraded


def entry_table(record: dict) -> dict[str, dict[str, float]]:
    """{key: {metric: value}}: a record's entries for display and tests; tables group entries by protocol,
    settings and metric instead (keys are names, not data)."""
    table: dict[str, dict[str, float]] = {}
    for entry in record["metrics"]:
        table.setdefault(entry["key"], {})[entry["metric"]] = entry["value"]
    return table


def at_place(settings: dict, wanted: dict) -> bool:
    """Whether an entry's `settings` include `wanted` and hold no place (``PLACE``) that `wanted` does not name:
    asking for k=20 finds the whole-backbone entry, not block 2's."""
    return all(settings.get(k) == v for k, v in wanted.items()) \
        and not any(k in settings and k not in wanted for k in PLACE)


def metric_value(record: dict, protocol: str, metric: str, **settings) -> float | None:
    """The value of the first entry of `protocol` and `metric` at `settings` (``at_place``); None if none."""
    return next((e["value"] for e in record["metrics"] if e["protocol"] == protocol and e["metric"] == metric
                 and at_place(e["settings"], settings)), None)


def provenance_of(record: dict) -> dict:
    """Where the run was trained: cpu, device, git_commit, versions, threads (`provenance.pretraining`)."""
    return record["provenance"].get("pretraining") or {}


def _check_checksum(record: dict) -> None:
    if record_checksum(record) != record.get("checksum"):
        raise RecordError("its checksum does not match its content (the file was edited or damaged after it was "
                          "written); rerun the run to regenerate it")


def read_record(path: str | Path, verify_predictions: bool = True) -> dict:
    """Read, validate and verify one record: its checksum, and the hash of its predictions file (unless
    `verify_predictions` is False). A schema-2 file is verified as written, then returned converted to schema 3.
    Errors name the file and what is wrong; any file, also one that is not UTF-8 or not JSON, raises
    RecordError, never something else."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise RecordError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise RecordError(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from exc
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecordError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from exc
    except (ValueError, RecursionError) as exc:
        raise RecordError(f"{path}: not valid JSON ({exc})") from exc
    try:
        if isinstance(record, dict) and record.get("schema_version") == 2:
            _check_checksum(record)  # as written, before the conversion changes the content
            record = upgrade_record(record)
        validate_record(record)
        _check_checksum(record)
    except RecordError as exc:
        raise RecordError(f"{path}: {exc}") from exc
    if verify_predictions and record["predictions"] is not None:
        file = path.parent / record["predictions"]["file"]
        try:
            digest = hashlib.sha256(file.read_bytes()).hexdigest()
        except OSError as exc:
            raise RecordError(f"{path}: its predictions file {file.name} cannot be read "
                              f"({exc.strerror or exc})") from exc
        if digest != record["predictions"]["sha256"]:
            raise RecordError(f"{path}: its predictions file {file.name} does not match the hash the record "
                              "holds (replaced or damaged); rerun the run to regenerate both")
    return record


def read_predictions(record_file: str | Path, record: dict) -> dict:
    """The per-test-image predictions of a record (read_record checked their hash): {array name: array}.

    Arrays: `labels` (the test labels, int64 [n]); per classification protocol key, its ranked top-5 classes
    (int16 [n, 5], -1 = no prediction; [subsets, n, 5] for semi-supervised keys with several subsets) and,
    where its test set is not the suite's (transfer), `<key>:labels`; per clustering key, the cluster of
    every test image (int32 [n])."""
    import numpy as np

    if record.get("predictions") is None:
        return {}
    file = Path(record_file).parent / record["predictions"]["file"]
    try:
        with np.load(file, allow_pickle=False) as arrays:
            return {name: arrays[name] for name in arrays.files}
    except (OSError, ValueError) as exc:
        raise RecordError(f"{record_file}: its predictions file {file.name} cannot be read ({exc})") from exc


def check_writable_folder(folder: str | Path, what: str) -> Path:
    """`folder` exists as a folder (made if needed) and a file can be written in it; else StorageError naming the
    flag, the path and the fix. Nothing is left behind."""
    folder = Path(folder)
    created: list[Path] = []  # the folders this check makes, removed again: a refused run leaves nothing behind
    try:
        if folder.exists() and not folder.is_dir():
            raise StorageError(f"{what} {folder}: is a file, not a folder; choose a folder (it is created if missing)")
        missing = folder
        while not missing.exists() and missing.parent != missing:
            created.append(missing)
            missing = missing.parent
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=folder)
        os.close(fd)
        os.unlink(probe)
        for made in created:  # deepest first
            made.rmdir()
    except StorageError:
        raise
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise StorageError(f"{what} {str(folder)[:200]}{'...' if len(str(folder)) > 200 else ''}: cannot be "
                           f"written ({reason}); choose a folder you can write to (or fix its permissions)") from None
    return folder


def default_file_mode() -> int:
    """0o666 minus the process umask: the mode an ordinary open() gives a new file (a shared results folder
    stays readable by others when the umask says so)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


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


def _storage_error(path: Path, exc: BaseException) -> BaseException:
    """An OSError while writing `path` as the StorageError the CLI prints (other errors pass unchanged)."""
    if isinstance(exc, OSError) and not isinstance(exc, (BenchmarkError, FileExistsError)):
        reason = exc.strerror or str(exc)
        return StorageError(f"{path}: cannot be written ({reason}); nothing was written and any previous "
                            "file there is unchanged. Free disk space or fix the folder's permissions "
                            "(or choose another folder), then rerun the same command.")
    return exc


def _write_temp(path: Path, write: Callable[[BinaryIO], None]) -> Path:
    """A temp file beside `path`, filled by `write(handle)` and fsynced; removed again on any error (raised as
    StorageError naming `path`)."""
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        tmp = Path(tmp_name)
        os.fchmod(fd, default_file_mode())  # mkstemp makes 0600: give the file the mode open() would
        with os.fdopen(fd, "wb") as handle:
            try:
                write(handle)
            except RuntimeError as exc:  # torch.save reports a failed write (disk full) as a RuntimeError
                if "writ" not in str(exc).lower():
                    raise
                raise OSError(errno.EIO, f"the write failed: {first_line(exc)[:160]}") from exc
            handle.flush()
            os.fsync(handle.fileno())
        return tmp
    except BaseException as exc:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        error = _storage_error(path, exc)
        if error is exc:
            raise
        raise error from exc


def _move_into_place(tmp: Path, path: Path, overwrite: bool) -> None:
    """Rename the finished temp file to `path` (overwrite=False: a hard link, which fails atomically with
    RecordExistsError if another writer got there first)."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise RecordExistsError(f"{path} already exists; pass --force to overwrite it or choose another --out") from None
    tmp.unlink()


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None], overwrite: bool = True) -> Path:
    """Write a file through a temp file in the same folder + fsync + rename.

    `write(handle)` fills the temp file. A reader never sees a half-written file; on
    any error (disk full included) the temp file is removed, the previous file, if
    any, is left untouched, and an OSError is raised as StorageError naming the file.
    With overwrite=False the final step is a hard link, which fails atomically if
    another writer got there first (RecordExistsError).
    """
    path = Path(path)
    tmp = _write_temp(path, write)
    try:
        _move_into_place(tmp, path, overwrite)
        _fsync_dir(path.parent)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        error = _storage_error(path, exc)
        if error is exc:
            raise
        raise error from exc
    return path


def atomic_write_text(path: str | Path, text: str, overwrite: bool = True) -> Path:
    """`atomic_write` for UTF-8 text."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda handle: handle.write(data), overwrite=overwrite)


def predictions_bytes(arrays: dict) -> bytes:
    """The predictions as the bytes of a compressed .npz."""
    import numpy as np

    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def write_predictions(path: str | Path, arrays: dict) -> str:
    """Write the predictions atomically as compressed .npz; returns the file's SHA-256."""
    data = predictions_bytes(arrays)
    atomic_write(path, lambda handle: handle.write(data))
    return hashlib.sha256(data).hexdigest()


def write_record(record: dict, path: str | Path, force: bool = False, predictions: dict | None = None) -> Path:
    """Write the record and its `predictions` (if any, beside it) as one unit.

    Both files are written to temp files first (a full disk fails there, before anything is replaced), then
    renamed into place, predictions first; if the record cannot be put in place the previous predictions file
    is put back (or the new one removed). So on any failure either neither new file is left or the previous
    pair is unchanged. An existing record is never overwritten unless force=True. `record` is completed in
    place (`predictions`, `checksum`).
    """
    path = Path(path)
    if path.exists() and not force:
        raise RecordExistsError(f"{path} already exists; pass --force to overwrite it or choose another --out")
    file = predictions_path(path)
    data = predictions_bytes(predictions) if predictions else None
    record["predictions"] = None if data is None else {
        "file": file.name, "sha256": hashlib.sha256(data).hexdigest(), "format": PREDICTIONS_FORMAT}
    record["checksum"] = ""
    validate_record(record)
    record["checksum"] = record_checksum(record)
    text = (json.dumps(record, indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")
    staged_predictions = _write_temp(file, lambda handle: handle.write(data)) if data is not None else None
    backup: Path | None = None
    try:
        staged_record = _write_temp(path, lambda handle: handle.write(text))
        try:
            if staged_predictions is not None:
                backup = _backup(file)
                os.replace(staged_predictions, file)
                staged_predictions = None
            _move_into_place(staged_record, path, overwrite=force)
        except BaseException as exc:
            staged_record.unlink(missing_ok=True)
            if data is not None and staged_predictions is None:  # the new predictions are in place: undo that
                if backup is not None:
                    os.replace(backup, file)
                    backup = None
                else:
                    file.unlink(missing_ok=True)
            error = _storage_error(path, exc)
            if error is exc:
                raise
            raise error from exc
        _fsync_dir(path.parent)
    finally:
        for leftover in (staged_predictions, backup):
            if leftover is not None:
                leftover.unlink(missing_ok=True)
    return path


def _backup(file: Path) -> Path | None:
    """A second name (hard link) for an existing `file`, so it can be put back; None if there is no file."""
    if not file.exists():
        return None
    fd, name = tempfile.mkstemp(prefix=f".{file.name}.", suffix=".previous", dir=file.parent)
    os.close(fd)
    backup = Path(name)
    backup.unlink()
    try:
        os.link(file, backup)
    except OSError:  # a file system without hard links: a copy
        import shutil

        shutil.copy2(file, backup)
    return backup


def iter_record_files(results_dir: str | Path) -> list[Path]:
    """All record files under `results_dir`, sorted (benchmark JSON, split files and reports excluded)."""
    root = Path(results_dir)
    if not root.exists():
        return []
    skip = {"benchmarks", "splits", "report"}
    return sorted(p for p in root.rglob("*.json")
                  if not p.name.startswith(".") and not skip & set(p.relative_to(root).parts[:-1]))


def same_run_records(results_dir: str | Path, suite: str, method: str, epochs: int, seed: int) -> list[Path]:
    """Record files of the same suite, method, epochs and seed, whatever their settings fingerprint."""
    folder = Path(results_dir) / suite
    stem = record_stem(method, epochs, seed)
    return sorted(p for p in folder.glob(f"{stem}_*.json") if len(p.stem) == len(stem) + 13)
