"""Run records: one JSON file per run (suite, method or variant, epochs, seed, settings fingerprint),
written atomically, with its per-test-image predictions in a compact file beside it.

Schema (version 2) -- every key is required unless marked optional:

    schema_version: 2
    status: "completed" | "diverged" | "failed"
    suite: str                # suite name, e.g. "digits", "cifar10"
    dataset: str              # display name, e.g. "CIFAR-10" (matches paper_results.csv)
    method: str               # method or named variant: "simclr", "self_classifier/reimpl"
    method_base: str          # its registry name: "self_classifier"
    variant: str | null       # "reimpl"
    method_display: str       # name used in tables, e.g. "Self-Classifier (reimpl)"
    paper_reference: str | null  # the paper (first column of paper_results.csv) this method/variant follows
    is_reference: bool        # random-init / supervised rows, kept apart in tables
    seed: int
    epochs: int               # pretraining epochs (the last stage's, for methods with several stages)
    backbone: str             # registry name, e.g. "resnet18_cifar", "small_cnn", "nin"
    batch_size: int
    fingerprints: {training, settings, evaluation, run}
        # 12 hex digits each (benchmarks.config.fingerprint of the canonical dumps): training = everything
        # that decides the trained weights, seed included (names the checkpoint folder); settings = the
        # same without the seed (one row of a table: the same experiment over seeds); evaluation = the
        # evaluation section; run = training + evaluation (part of the file name)
    config: dict              # the canonical dump of the resolved suite config
    method_config: dict       # the resolved settings of the method (hparams, optimizer, views, budget)
    metrics: {protocol key: {metric: float}}
        # percent, as in the papers' tables; AMI/ARI may be negative (worse than chance): [-100, 100].
        # Keys: knn_k<k>, linear, online_linear, semi_<p>pct / semi_<n>perclass, finetune_100pct,
        # transfer_linear:<Dataset> -> top1/top5; clustering (FAISS k-means, K = classes) -> NMI/AMI/ARI/ACC;
        # clustering_head_k<K> (a method's head) -> NMI/AMI/ARI + ACC (K = classes) or ACC_M2O (many-to-one,
        # K != classes); per block: knn_k20_B<i>, linear_B<i>, knn_k10_B<i>, block_classifier_B<i> (+ _avg)
    evaluation: {protocol key: {...parameters used..., protocol: str, settings: dict}}
        # `settings`: the protocol's settings (what a table column must agree on)
    clusters: {clustering key: {num_clusters, num_nonempty, num_classes, source: kmeans|head, acc}}
    predictions: {file, sha256, format} | null
        # the per-test-image predictions (numpy .npz beside the record, see write_predictions)
    history: [{epoch: int, loss: float, online_knn_top1?: float, stage?: int, ...}]  # per-epoch curve
    provenance: {pretraining: {...}, evaluations: [{command, protocols, git_commit, versions, device, created}]}
    versions: {package: version}
    git_commit: str | null
    device: str
    cpu: str | null           # processor model: CPU results are bitwise reproducible on the same model only
                              # (and thread count: config.train.threads, provenance.*.threads)
    wall_time_s: float        # every attempt's time (SLURM requeues, resumes after a kill): `run` records
    attempts: int             # optional (runs since issue 20): processes that worked on the run
    devices: int              # optional: DDP ranks of the training run (1 without DDP)
    global_batch_size: int    # optional: batch_size x devices
    throughput_images_per_s: float | null
    peak_memory_mb: float | null
    checkpoint: str | null    # path of the final model checkpoint
    created: str              # ISO-8601 UTC
    message: str | null       # optional; required (non-empty) when status is diverged/failed
    checksum: str             # SHA-256 of the record without this key (canonical JSON); it covers the
                              # predictions through predictions.sha256, so an edited copy is refused
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from benchmarks.errors import BenchmarkError, RecordError, RecordExistsError, StorageError, first_line

SCHEMA_VERSION = 2
STATUSES = ("completed", "diverged", "failed")
PREDICTIONS_FORMAT = "ssl-bench-predictions/1"
PREDICTIONS_SUFFIX = ".predictions.npz"
FINGERPRINTS = ("training", "settings", "evaluation", "run")

# key -> accepted python types (None allowed where listed)
_REQUIRED: dict[str, tuple[type, ...]] = {
    "schema_version": (int,),
    "status": (str,),
    "suite": (str,),
    "dataset": (str,),
    "method": (str,),
    "method_base": (str,),
    "variant": (str, type(None)),
    "method_display": (str,),
    "paper_reference": (str, type(None)),
    "is_reference": (bool,),
    "seed": (int,),
    "epochs": (int,),
    "backbone": (str,),
    "batch_size": (int,),
    "fingerprints": (dict,),
    "config": (dict,),
    "method_config": (dict,),
    "metrics": (dict,),
    "evaluation": (dict,),
    "clusters": (dict,),
    "predictions": (dict, type(None)),
    "history": (list,),
    "provenance": (dict,),
    "versions": (dict,),
    "git_commit": (str, type(None)),
    "device": (str,),
    "cpu": (str, type(None)),
    "wall_time_s": (int, float),
    "throughput_images_per_s": (int, float, type(None)),
    "peak_memory_mb": (int, float, type(None)),
    "checkpoint": (str, type(None)),
    "created": (str,),
    "checksum": (str,),
}


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


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_record(record: Any) -> None:
    """Raise RecordError naming every problem found in `record` (the checksum is checked by read_record)."""
    problems: list[str] = []
    if not isinstance(record, dict):
        raise RecordError(f"a record must be a JSON object, got {type(record).__name__}")
    version = record.get("schema_version")
    if version != SCHEMA_VERSION:
        hint = " (written by an older version of the suite: rerun the run to regenerate it)" \
            if isinstance(version, int) and version < SCHEMA_VERSION else ""
        raise RecordError(f"schema_version is {version!r}, this suite reads version {SCHEMA_VERSION}{hint}")
    for key, types in _REQUIRED.items():
        if key not in record:
            problems.append(f"missing key '{key}'")
        elif not isinstance(record[key], types) or (isinstance(record[key], bool) and bool not in types):
            names = "/".join("null" if t is type(None) else t.__name__ for t in types)
            problems.append(f"'{key}' must be {names}, got {type(record[key]).__name__}")
    if record.get("status") not in STATUSES:
        problems.append(f"'status' must be one of {', '.join(STATUSES)}, got {record.get('status')!r}")
    fingerprints = record.get("fingerprints")
    if isinstance(fingerprints, dict):
        for key in FINGERPRINTS:
            value = fingerprints.get(key)
            if not isinstance(value, str) or len(value) != 12 or any(c not in "0123456789abcdef" for c in value):
                problems.append(f"fingerprints['{key}'] must be 12 hex digits, got {value!r}")
    metrics = record.get("metrics")
    if isinstance(metrics, dict):
        for protocol, values in metrics.items():
            if not isinstance(values, dict):
                problems.append(f"metrics['{protocol}'] must map metric names to numbers")
                continue
            for metric, value in values.items():
                if not _is_number(value) or not math.isfinite(value):
                    problems.append(f"metrics['{protocol}']['{metric}'] must be a finite number, got {value!r}")
                elif not -100.0 <= value <= 100.0:
                    problems.append(f"metrics['{protocol}']['{metric}'] = {value} is outside -100..100 (percent)")
    predictions = record.get("predictions")
    if isinstance(predictions, dict) and not (isinstance(predictions.get("file"), str)
                                              and isinstance(predictions.get("sha256"), str)):
        problems.append("'predictions' must name its 'file' and 'sha256'")
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


def read_record(path: str | Path, verify_predictions: bool = True) -> dict:
    """Read, validate and verify one record: its checksum, and the hash of its predictions file (unless
    `verify_predictions` is False). Errors name the file and what is wrong; any file, also one that is not
    UTF-8 or not JSON, raises RecordError, never something else."""
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
        validate_record(record)
    except RecordError as exc:
        raise RecordError(f"{path}: {exc}") from exc
    if record_checksum(record) != record["checksum"]:
        raise RecordError(f"{path}: its checksum does not match its content (the file was edited or damaged "
                          "after it was written); rerun the run to regenerate it")
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
