"""Run records: schema validation on write and read, atomic writes, no silent overwrite, concurrency."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import records
from benchmarks.errors import RecordError, RecordExistsError, StorageError
from benchmarks.records import (
    atomic_write,
    atomic_write_text,
    iter_record_files,
    predictions_path,
    read_predictions,
    read_record,
    record_checksum,
    record_path,
    validate_record,
    write_record,
)

REPO = Path(__file__).resolve().parent.parent


def entry(protocol: str, metric: str, value: float, key: str | None = None, **settings) -> dict:
    return {"protocol": protocol, "settings": settings, "metric": metric, "value": value, "key": key or protocol}


def make_record(**changes) -> dict:
    record = {
        "schema_version": 3, "status": "completed", "suite": "digits", "dataset": "digits", "method": "simclr",
        "method_base": "simclr", "variant": None, "method_display": "SimCLR", "paper_reference": None,
        "is_reference": False, "seed": 0, "epochs": 2, "backbone": "small_cnn", "batch_size": 128,
        "fingerprints": {"training": "a" * 12, "settings": "b" * 12, "evaluation": "c" * 12, "run": "d" * 12},
        "config": {"train": {"epochs": 2}}, "method_config": {"name": "simclr"},
        "metrics": [entry("knn", "top1", 91.5, "knn_k20", k=20), entry("knn", "top5", 99.0, "knn_k20", k=20),
                    entry("clustering", "AMI", -1.5), entry("clustering", "ARI", -0.2)],
        "evaluation": {"knn_k20": {"k": 20, "protocol": "knn", "settings": {"k": 20}},
                       "clustering": {"protocol": "clustering", "settings": {}}},
        "clusters": {"clustering": {"num_clusters": 10, "num_nonempty": 10, "num_classes": 10, "source": "kmeans"}},
        "predictions": None,
        "history": [{"epoch": 1, "loss": 4.2}, {"epoch": 2, "loss": 3.1, "online_knn_top1": 90.0}],
        "provenance": {"pretraining": {"versions": {"torch": "2.5"}, "git_commit": None, "device": "cpu",
                                       "cpu": None}, "evaluations": []},
        "wall_time_s": 3.5, "throughput_images_per_s": 1000.0, "peak_memory_mb": None,
        "checkpoint": "runs/digits/simclr_e2_s0/model.pt", "created": "2025-01-01T00:00:00+00:00", "checksum": "",
    }
    record.update(changes)
    return record


def leftovers(folder: Path) -> list[str]:
    """Temp files a writer left behind (there must be none after success or failure)."""
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".tmp"))


# ----------------------------------------------------------------------------- schema

def test_valid_record_round_trips(tmp_path):
    path = record_path(tmp_path, "digits", "simclr", 2, 0, "d" * 12)
    assert path == tmp_path / "digits" / f"simclr_e2_s0_{'d' * 12}.json"
    record = make_record()
    write_record(record, path)
    assert record["checksum"] == record_checksum(record) and record["predictions"] is None
    assert read_record(path) == record
    assert json.loads(path.read_text()) == record
    # a variant's file name: the '/' becomes '+'
    assert record_path(tmp_path, "digits", "self_classifier/reimpl", 2, 0, "e" * 12).name == \
        f"self_classifier+reimpl_e2_s0_{'e' * 12}.json"


def test_predictions_round_trip_and_are_covered_by_the_checksum(tmp_path):
    path = tmp_path / "digits" / "simclr_e2_s0_dddddddddddd.json"
    arrays = {"labels": np.arange(6, dtype=np.int64), "knn_k20": np.tile(np.arange(5, dtype=np.int16), (6, 1)),
              "clustering": np.array([0, 0, 1, 1, 2, 2], dtype=np.int32)}
    record = make_record()
    write_record(record, path, predictions=arrays)
    assert record["predictions"]["file"] == "simclr_e2_s0_dddddddddddd.predictions.npz"
    back = read_predictions(path, read_record(path))
    assert set(back) == set(arrays) and all(np.array_equal(back[k], arrays[k]) and back[k].dtype == arrays[k].dtype
                                            for k in arrays)
    # replacing the predictions file is noticed (its hash is in the record, the record's in its checksum)
    other = tmp_path / "other.json"
    write_record(make_record(), other, predictions={**arrays, "clustering": np.zeros(6, dtype=np.int32)})
    predictions_path(path).write_bytes(predictions_path(other).read_bytes())
    with pytest.raises(RecordError, match="predictions file .* does not match the hash"):
        read_record(path)


def test_an_edited_record_fails_its_checksum(tmp_path):
    path = tmp_path / "digits" / "simclr_e2_s0_dddddddddddd.json"
    write_record(make_record(), path)
    edited = json.loads(path.read_text())
    edited["metrics"][0]["value"] = 99.9  # a hand-edited number
    path.write_text(json.dumps(edited))
    with pytest.raises(RecordError, match="checksum does not match its content"):
        read_record(path)


def test_any_unreadable_file_is_a_record_error_that_names_it(tmp_path):
    binary = tmp_path / "x.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(RecordError, match=r"x\.json: not a UTF-8 text file"):
        read_record(binary)
    old = tmp_path / "old.json"
    old.write_text(json.dumps({**make_record(), "schema_version": 1}))
    with pytest.raises(RecordError, match="schema_version is 1, this suite writes version 3 .*rerun the run"):
        read_record(old)


def test_records_get_the_mode_the_umask_gives(tmp_path):
    previous = os.umask(0o022)
    try:
        path = write_record(make_record(), tmp_path / "digits" / "r.json")
        assert path.stat().st_mode & 0o777 == 0o644  # readable by others (mkstemp alone makes 0600)
        os.umask(0o077)
        private = write_record(make_record(), tmp_path / "digits" / "p.json")
        assert private.stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(previous)


def test_a_failing_torch_save_is_a_storage_error_and_keeps_the_previous_file(tmp_path):
    """torch.save reports a full disk as a RuntimeError (inline_container.cc): it must read like any write error."""
    path = tmp_path / "last.ckpt"
    atomic_write_text(path, "previous")

    def torch_disk_full(handle):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                           "data/3: file write failed")

    with pytest.raises(StorageError, match=r"last\.ckpt: cannot be written \(the write failed: .*PytorchStreamWriter"):
        atomic_write(path, torch_disk_full)
    assert path.read_text() == "previous" and leftovers(tmp_path) == []


@pytest.mark.parametrize("change, expected", [
    ({"schema_version": 4}, "schema_version is 4, this suite writes version 3 and reads 2 and 3"),
    ({"fingerprints": {"training": "xyz", "settings": "b" * 12, "evaluation": "c" * 12, "run": "d" * 12}},
     "'fingerprints.training' must be 12 hex digits, got 'xyz'"),
    ({"status": "done"}, "'status': input should be 'completed', 'diverged' or 'failed', got str"),
    ({"seed": "0"}, "'seed': input should be a valid integer, got str"),
    ({"is_reference": 1}, "'is_reference': input should be a valid boolean, got int"),
    ({"epochs": True}, "'epochs': input should be a valid integer, got bool"),
    ({"metrics": [entry("knn", "top1", 0.915 * 1000, k=20)]}, "'metrics[0].value' = 915.0 is outside -100..100"),
    ({"metrics": [entry("knn", "top1", float("nan"), k=20)]}, "'metrics[0].value' must be a finite number"),
    ({"metrics": {"knn_k20": {"top1": 91.5}}}, "'metrics': input should be a valid list, got dict"),
    ({"metrics": [{"protocol": "knn", "metric": "top1", "value": 1.0, "key": "knn_k20"}]},
     "missing key 'metrics[0].settings'"),
    ({"history": [{"epoch": 1}]}, "missing key 'history[0].loss'"),
    ({"status": "diverged"}, "a diverged record needs a 'message' saying why"),
    ({"message": 3}, "'message': input should be a valid string, got int"),
    ({"cpu": "x"}, "unknown key 'cpu'"),
    ({"created": "yesterday"}, "'created' must be an ISO-8601 timestamp, got 'yesterday'"),
    ({"clusters": {}}, "clusters['clustering'] is missing"),
    ({"clusters": {"clustering": {"num_clusters": 0, "num_nonempty": 1, "num_classes": 10, "source": "kmeans"}}},
     "'clusters.clustering.num_clusters': input should be greater than or equal to 1, got int"),
    ({"clusters": {"clustering": {"num_clusters": 10, "num_nonempty": 10, "num_classes": 10, "source": "gmm"}}},
     "'clusters.clustering.source': input should be 'kmeans' or 'head', got str"),
    ({"metrics": [entry("clustering_head", "NMI", 50.0, "head", k=30)],
      "clusters": {"head": {"num_clusters": 10, "num_nonempty": 10, "num_classes": 10, "source": "head"}}},
     "clusters['head']['num_clusters'] is 10, the entry says k = 30"),
    ({"metrics": [entry("clustering", "F1", 50.0)]}, "metrics['clustering'] has an unknown clustering metric 'F1'"),
])
def test_schema_violations_are_named(change, expected):
    with pytest.raises(RecordError) as info:
        validate_record(make_record(**change))
    assert expected in str(info.value)


def test_missing_keys_are_all_listed():
    record = make_record()
    del record["suite"], record["created"]
    with pytest.raises(RecordError, match="missing key 'suite'; missing key 'created'"):
        validate_record(record)


def test_invalid_record_is_not_written(tmp_path):
    path = tmp_path / "digits" / "simclr_e2_s0.json"
    with pytest.raises(RecordError):
        write_record(make_record(status="bogus"), path)
    assert not path.exists() and leftovers(tmp_path) == []


def test_nan_anywhere_is_refused_before_writing(tmp_path):
    # JSON has no NaN; a record holding one (e.g. a NaN loss in the history) must not be written
    path = tmp_path / "r.json"
    with pytest.raises(ValueError):
        write_record(make_record(history=[{"epoch": 1, "loss": float("nan")}]), path)
    assert not path.exists() and leftovers(tmp_path) == []


def test_read_names_the_file_and_the_problem(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"schema_version": 2, "status": ')  # a half-written record
    with pytest.raises(RecordError, match=r"broken\.json: not valid JSON \(Expecting value at line 1"):
        read_record(broken)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps(make_record(seed=-1.5)))  # (the schema is checked before the checksum)
    with pytest.raises(RecordError, match=r"wrong\.json: 'seed': input should be a valid integer, got float"):
        read_record(wrong)
    with pytest.raises(RecordError, match=r"absent\.json: cannot be read"):
        read_record(tmp_path / "absent.json")


def test_iter_record_files_skips_temp_and_benchmark_files(tmp_path):
    write_record(make_record(), tmp_path / "digits" / "simclr_e2_s0.json")
    (tmp_path / "digits" / ".simclr_e2_s1.json.abc.tmp").write_text("{")
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "latest.json").write_text("{}")
    assert iter_record_files(tmp_path) == [tmp_path / "digits" / "simclr_e2_s0.json"]


# ----------------------------------------------------------------------------- no silent overwrite

def test_existing_record_is_never_overwritten_without_force(tmp_path):
    path = tmp_path / "digits" / "simclr_e2_s0.json"
    write_record(make_record(), path)
    before = path.read_bytes()
    with pytest.raises(RecordExistsError, match="already exists; pass --force"):
        write_record(make_record(seed=0, wall_time_s=9.0), path)
    assert path.read_bytes() == before
    write_record(make_record(wall_time_s=9.0), path, force=True)
    assert read_record(path)["wall_time_s"] == 9.0
    assert leftovers(tmp_path) == []


def test_race_lost_after_the_exists_check_is_caught_by_the_link(tmp_path, monkeypatch):
    """Another writer creates the record between our exists() check and our write: os.link refuses."""
    path = tmp_path / "digits" / "simclr_e2_s0.json"
    write_record(make_record(), path)
    before = path.read_bytes()
    real_exists = Path.exists
    monkeypatch.setattr(Path, "exists", lambda self: False if self == path else real_exists(self))
    with pytest.raises(RecordExistsError):
        write_record(make_record(wall_time_s=9.0), path)
    assert path.read_bytes() == before
    assert leftovers(tmp_path) == []


def _write_same_record(path: str, wall_time: float, barrier) -> str:
    barrier.wait()  # all writers start together
    try:
        write_record(make_record(wall_time_s=wall_time), Path(path))
    except RecordExistsError:
        return "exists"
    return "written"


def test_concurrent_writers_of_one_record_exactly_one_wins(tmp_path):
    path = tmp_path / "digits" / "simclr_e2_s0.json"
    ctx = multiprocessing.get_context("spawn")
    writers = 4
    with ctx.Manager() as manager:
        barrier = manager.Barrier(writers)
        with ctx.Pool(writers) as pool:
            outcomes = pool.starmap(_write_same_record, [(str(path), float(i), barrier) for i in range(writers)])
    assert sorted(outcomes) == ["exists"] * (writers - 1) + ["written"]
    winner = outcomes.index("written")
    assert read_record(path)["wall_time_s"] == float(winner)
    assert leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- atomicity, disk full

def test_disk_full_at_fsync_keeps_the_previous_record(tmp_path, monkeypatch):
    path = tmp_path / "digits" / "simclr_e2_s0.json"
    write_record(make_record(), path)
    before = path.read_bytes()

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(records.os, "fsync", no_space)
    with pytest.raises(StorageError) as info:
        write_record(make_record(wall_time_s=9.0), path, force=True)
    message = str(info.value)
    assert str(path) in message and "No space left on device" in message and "unchanged" in message
    assert isinstance(info.value, OSError)  # callers catching OSError still see it
    assert path.read_bytes() == before
    assert leftovers(tmp_path) == []


PREDICTIONS = {"labels": np.arange(6, dtype=np.int64), "knn_k20": np.arange(6, dtype=np.int32)}


def _record_fsync_fails(monkeypatch):
    """A full disk for the record's temp file only (its predictions' temp file is written fine)."""
    real_fsync = os.fsync

    def fsync(fd):
        if ".json." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(records.os, "fsync", fsync)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to tell the temp files apart")
def test_disk_full_on_a_new_record_leaves_neither_file(tmp_path, monkeypatch):
    path = tmp_path / "digits" / "simclr_e2_s0.json"
    _record_fsync_fails(monkeypatch)
    with pytest.raises(StorageError, match="No space left on device"):
        write_record(make_record(), path, predictions=PREDICTIONS)
    assert sorted(p.name for p in path.parent.iterdir()) == []


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to tell the temp files apart")
def test_disk_full_on_a_rewritten_record_keeps_the_previous_pair(tmp_path, monkeypatch):
    path = tmp_path / "digits" / "simclr_e2_s0.json"
    write_record(make_record(), path, predictions=PREDICTIONS)
    before = {p.name: p.read_bytes() for p in path.parent.iterdir()}
    _record_fsync_fails(monkeypatch)
    changed = {k: v + 1 for k, v in PREDICTIONS.items()}
    with pytest.raises(StorageError):
        write_record(make_record(wall_time_s=9.0), path, force=True, predictions=changed)
    assert {p.name: p.read_bytes() for p in path.parent.iterdir()} == before
    monkeypatch.undo()
    read_predictions(path, read_record(path))  # the pair still agrees (checksum and predictions hash)


@pytest.mark.parametrize("previous", [False, True])
def test_a_record_that_cannot_be_put_in_place_takes_its_predictions_back(tmp_path, monkeypatch, previous):
    """The predictions are renamed into place first: if the record's rename then fails, they are undone."""
    path = tmp_path / "digits" / "simclr_e2_s0.json"
    if previous:
        write_record(make_record(), path, predictions=PREDICTIONS)
    before = {p.name: p.read_bytes() for p in path.parent.iterdir()} if previous else {}
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith(".json"):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_replace(src, dst)

    monkeypatch.setattr(records.os, "replace", replace)
    with pytest.raises(StorageError, match=str(path)):
        write_record(make_record(wall_time_s=9.0), path, force=True, predictions={k: v + 1 for k, v in
                                                                                   PREDICTIONS.items()})
    assert {p.name: p.read_bytes() for p in path.parent.iterdir()} == before


def test_disk_full_mid_write_leaves_no_partial_file(tmp_path):
    path = tmp_path / "model.bin"

    def half_then_full(handle):
        handle.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(StorageError, match="No space left on device"):
        atomic_write(path, half_then_full)
    assert not path.exists() and leftovers(tmp_path) == []
    atomic_write_text(path, "complete")
    with pytest.raises(StorageError):
        atomic_write(path, half_then_full)
    assert path.read_text() == "complete"


def test_a_reader_sees_the_old_or_the_new_file_never_a_mix(tmp_path, monkeypatch):
    """The target is replaced by a rename: until then it still holds the previous content."""
    path = tmp_path / "r.json"
    atomic_write_text(path, "old")
    seen_during_write = []

    def writer(handle):
        handle.write(b"new")
        seen_during_write.append(path.read_text())

    atomic_write(path, writer)
    assert seen_during_write == ["old"] and path.read_text() == "new"


# ----------------------------------------------------------------------------- two runs, one results folder

@pytest.mark.slow
def test_two_concurrent_runs_write_separate_valid_records(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"

    def command(seed: int) -> list[str]:
        return [sys.executable, "-m", "benchmarks", "run", "--suite", "digits", "--methods", "simclr",
                "--seeds", str(seed), "--epochs", "1", "--no-references", "--out", str(out), "--work-dir", str(work),
                "--no-report", "--no-progress", "--set", "dataset.options.test_fraction=0.75",
                "evaluation.protocols=[knn]", "train.online_knn_every=0"]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes side by side: one thread each
    procs = [subprocess.Popen(command(seed), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for seed in (0, 1)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for proc, (_stdout, stderr) in zip(procs, outputs):
        assert proc.returncode == 0, stderr
    files = iter_record_files(out)
    assert [f.name[:len("simclr_e1_s0")] for f in files] == ["simclr_e1_s0", "simclr_e1_s1"]
    recs = [read_record(f) for f in files]  # validated against the schema
    assert [r["seed"] for r in recs] == [0, 1]
    assert all(r["status"] == "completed" and 0 <= records.metric_value(r, "knn", "top1", k=20) <= 100 for r in recs)
    # different seeds train differently: the two processes did not share or swap state
    assert recs[0]["history"] != recs[1]["history"]
    assert leftovers(out) == [] and leftovers(work) == []


# ----------------------------------------------------------------------------- schema 2, converted on load

def schema2_record() -> dict:
    """A schema-2 record as the suite wrote them before schema 3: metrics under string keys, whose place
    (block, head, transfer target) was only in the key."""
    record = make_record(schema_version=2, versions={"torch": "2.5"}, git_commit="abc", device="cpu", cpu="EPYC")
    record["provenance"] = {"pretraining": {"threads": 1}, "evaluations": []}
    record["metrics"] = {"knn_k20": {"top1": 91.5, "top5": 99.0}, "knn_k20_B2": {"top1": 80.0, "top5": 95.0},
                         "block_classifier_avg": {"top1": 70.0}, "clustering_head_k10_h2": {"NMI": 50.0},
                         "transfer_linear:cifar100": {"top1": 40.0}}
    record["evaluation"] = {
        "knn_k20": {"protocol": "knn", "settings": {"k": 20, "temperature": 0.07}},
        "knn_k20_B2": {"protocol": "knn", "settings": {"k": 20, "temperature": 0.07}},
        "block_classifier_avg": {"protocol": "block_classifier", "settings": {"epochs": 5}},
        "clustering_head_k10_h2": {"protocol": "clustering_head", "settings": {"k": 10, "source": "head"}},
        "transfer_linear:cifar100": {"protocol": "transfer", "settings": {"epochs": 3}, "target": "cifar100"}}
    record["clusters"] = {"clustering_head_k10_h2": {"num_clusters": 10, "num_nonempty": 9, "num_classes": 10,
                                                     "source": "head"}}
    record["checksum"] = record_checksum(record)
    return record


def test_schema2_metrics_become_entries_with_their_place():
    converted = records.upgrade_record(schema2_record())
    assert converted["schema_version"] == 3
    assert converted["metrics"] == [
        entry("knn", "top1", 91.5, "knn_k20", k=20, temperature=0.07),
        entry("knn", "top5", 99.0, "knn_k20", k=20, temperature=0.07),
        entry("knn", "top1", 80.0, "knn_k20_B2", k=20, temperature=0.07, block=2),
        entry("knn", "top5", 95.0, "knn_k20_B2", k=20, temperature=0.07, block=2),
        entry("block_classifier", "top1", 70.0, "block_classifier_avg", epochs=5, block="avg"),
        entry("clustering_head", "NMI", 50.0, "clustering_head_k10_h2", k=10, source="head", head=2),
        entry("transfer", "top1", 40.0, "transfer_linear:cifar100", epochs=3, dataset="cifar100")]
    # provenance once: the top-level copies move under provenance.pretraining (what it already held stays)
    assert not {"versions", "git_commit", "device", "cpu"} & set(converted)
    assert converted["provenance"]["pretraining"] == {"threads": 1, "versions": {"torch": "2.5"},
                                                      "git_commit": "abc", "device": "cpu", "cpu": "EPYC"}
    validate_record(converted)
    assert records.entry_table(converted) == schema2_record()["metrics"]  # nothing lost or renamed


def test_schema2_files_are_verified_as_written_then_read_as_schema3(tmp_path):
    path = tmp_path / "digits" / "old.json"
    path.parent.mkdir()
    path.write_text(json.dumps(schema2_record()))
    record = read_record(path)
    assert record["schema_version"] == 3 and record == records.upgrade_record(schema2_record())
    edited = schema2_record()
    edited["metrics"]["knn_k20"]["top1"] = 99.9  # a hand edit of the old file is still refused
    path.write_text(json.dumps(edited))
    with pytest.raises(RecordError, match="old.json: its checksum does not match"):
        read_record(path)


def test_a_metric_without_its_evaluation_is_named():
    record = schema2_record()
    del record["evaluation"]["knn_k20"]
    with pytest.raises(RecordError, match=r"metrics\['knn_k20'\] has no evaluation\['knn_k20'\]"):
        records.upgrade_record(record)


def test_metric_value_picks_by_protocol_settings_and_place():
    record = records.upgrade_record(schema2_record())
    assert records.metric_value(record, "knn", "top1", k=20) == 91.5  # not the block-2 entry
    assert records.metric_value(record, "knn", "top1", k=20, block=2) == 80.0
    assert records.metric_value(record, "knn", "top1", k=200) is None
