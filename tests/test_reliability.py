"""Reliability, tried as a new user would: a changed setting never returns an old record, `run --out X` never
touches the repository's report, faults end in one `error:` line (exit 2) that names the cause and the fix,
checked before any training where they can be, and nothing is lost or clobbered.

The CLI runs in this process (`benchmarks.cli.main`); the few real runs are 1-epoch digits runs on a
quarter of the data, evaluated with kNN only.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import training
from benchmarks.cli import main
from benchmarks.data import load_split
from benchmarks.records import entry_table, iter_record_files, read_record, same_run_records
from benchmarks.training import load_checkpoint_file

try:
    from tests import fixtures
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    import fixtures

REPO = Path(__file__).resolve().parent.parent
DIGITS = ["--suite", "digits", "--methods", "simclr", "--epochs", "1", "--seeds", "0", "--no-references",
          "--no-progress"]
SMALL = ["dataset.options.test_fraction=0.75", "evaluation.protocols=[knn]", "train.online_knn_every=0"]


def run(tmp_path: Path, *args: str, sets: tuple[str, ...] = (), out: Path | None = None) -> int:
    out = out or tmp_path / "out"
    return main(["run", *DIGITS, *args, "--set", *SMALL, *sets, "--out", str(out), "--work-dir", str(tmp_path / "work")])


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- 1. a changed setting, a new record

@pytest.mark.slow
def test_a_changed_setting_gives_a_new_record_never_the_old_one(tmp_path, capsys):
    assert run(tmp_path, "--no-report") == 0
    capsys.readouterr()
    (first,) = same_run_records(tmp_path / "out", "digits", "simclr", 1, 0)
    first_bytes = first.read_bytes()
    # the same settings: skipped, and it says so
    assert run(tmp_path, "--no-report") == 0
    assert f"skipped: finished record {first} (same settings" in capsys.readouterr().out
    # a learning rate (written as YAML 1.2's 1e-3) and a temperature: a new record, never the old numbers
    assert run(tmp_path, "--no-report", sets=("optimizer.lr=1e-3", "methods.simclr.temperature=0.9")) == 0
    printed = capsys.readouterr().out
    assert "skipped" not in printed and "method_config.optimizer.lr" in printed and "hparams.temperature" in printed
    # and the batch size
    assert run(tmp_path, "--no-report", "--batch-size", "64") == 0
    records = {p: read_record(p) for p in same_run_records(tmp_path / "out", "digits", "simclr", 1, 0)}
    assert len(records) == 3 and first.read_bytes() == first_bytes
    settings = sorted((r["method_config"]["optimizer"]["lr"], r["method_config"]["hparams"]["temperature"],
                       r["batch_size"]) for r in records.values())
    assert settings == [(0.001, 0.9, 128), (0.05, 0.2, 64), (0.05, 0.2, 128)]
    assert len({r["fingerprints"]["run"] for r in records.values()}) == 3
    assert len({tuple(h["loss"] for h in r["history"]) for r in records.values()}) == 3


@pytest.mark.slow
def test_protocols_a_finished_record_lacks_are_added_under_the_runs_lock(tmp_path, capsys):
    from benchmarks.runner import run_lock

    assert run(tmp_path, "--no-report") == 0
    (path,) = same_run_records(tmp_path / "out", "digits", "simclr", 1, 0)
    before = read_record(path)
    capsys.readouterr()
    # another process (here: this one, through another handle) holds the run folder: no concurrent rewrite
    with run_lock(Path(before["checkpoint"]).parent, "someone else"):
        assert run(tmp_path, "--no-report", sets=("evaluation.protocols=[knn, clustering]",)) == 2
    assert "is running it in" in capsys.readouterr().err
    assert read_record(path) == before
    assert run(tmp_path, "--no-report", sets=("evaluation.protocols=[knn, clustering]",)) == 0
    assert "lacks clustering: evaluating them with the finished model" in capsys.readouterr().out
    after = read_record(path)
    assert "clustering" in entry_table(after) and entry_table(after)["knn_k20"] == entry_table(before)["knn_k20"]


# ----------------------------------------------------------------------------- 2. the repository's report is left alone

@pytest.mark.slow
def test_run_with_another_out_writes_its_report_there_and_leaves_the_repositorys_alone(tmp_path):
    committed = REPO / "reports" / "generated"
    before = digest(committed) if committed.is_dir() else {}
    assert run(tmp_path) == 0  # the report is on
    assert (tmp_path / "out" / "report" / "report.md").is_file()
    assert (digest(committed) if committed.is_dir() else {}) == before
    status = subprocess.run(["git", "status", "--porcelain", "--", "reports", "results"], cwd=REPO,
                            capture_output=True, text=True)
    if status.returncode == 0:  # a git checkout: nothing the run wrote shows up in it
        assert str(tmp_path) not in status.stdout


# ----------------------------------------------------------------------------- 3. the report reads what it can trust

@pytest.mark.slow
def test_the_report_skips_unreadable_and_edited_files_by_name_and_a_stale_copy_never_wins(tmp_path, capsys):
    from reports.__main__ import main as report_main

    assert run(tmp_path, "--no-report") == 0
    out = tmp_path / "out"
    (record,) = same_run_records(out, "digits", "simclr", 1, 0)
    true_top1 = entry_table(read_record(record))["knn_k20"]["top1"]
    # a backup copy whose number was edited by hand, and a file that is not even text
    backup = out / "backup" / "digits"
    backup.mkdir(parents=True)
    edited = record.read_text().replace(repr(true_top1), "99.99", 1)
    (backup / record.name).write_text(edited)
    (backup / record.name.replace(".json", ".predictions.npz")).write_bytes(
        record.with_name(record.stem + ".predictions.npz").read_bytes())
    (out / "digits" / "x.json").write_bytes(b"\xff\xfe not utf-8")
    capsys.readouterr()
    assert report_main(["build", "--results", str(out), "--out", str(tmp_path / "report"), "--no-figures"]) == 0
    err = capsys.readouterr().err
    assert "x.json" in err and "UTF-8" in err
    assert record.name in err and "checksum" in err
    text = (tmp_path / "report" / "report.md").read_text()
    assert "99.99" not in text and f"{true_top1:.2f}" in text


# ----------------------------------------------------------------------------- 4. faults end in a clean error

def test_a_full_disk_at_the_first_checkpoint_is_a_clean_error(tmp_path, capsys, monkeypatch):
    real_save = torch.save

    def disk_full_for_checkpoints(obj, handle, *args, **kwargs):
        if isinstance(obj, dict) and "ssl_bench" in obj:  # an epoch checkpoint (model.pt has no such key)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                               "data/3: file write failed")
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(training.torch, "save", disk_full_for_checkpoints)
    assert run(tmp_path, "--no-report") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "last.ckpt: cannot be written (the write failed" in err
    assert "Free disk space" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "digits").exists() or not iter_record_files(tmp_path / "out")


@pytest.mark.slow
def test_a_full_disk_at_a_later_checkpoint_keeps_the_previous_one(tmp_path, capsys, monkeypatch):
    real_save, saves = torch.save, []

    def full_from_the_second_checkpoint(obj, handle, *args, **kwargs):
        if isinstance(obj, dict) and "ssl_bench" in obj:  # an epoch checkpoint
            saves.append(1)
            if len(saves) >= 2:
                raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(training.torch, "save", full_from_the_second_checkpoint)
    assert main(["run", *DIGITS[:4], "--epochs", "2", *DIGITS[6:], "--no-report", "--set", *SMALL, "--out",
                 str(tmp_path / "out"), "--work-dir", str(tmp_path / "work")]) == 2
    assert "cannot be written" in capsys.readouterr().err
    (checkpoint,) = (tmp_path / "work").rglob("last.ckpt")
    assert len(load_checkpoint_file(checkpoint)["ssl_bench"]["history"]) == 1  # epoch 1's, intact
    assert not [p for p in checkpoint.parent.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()
    assert run(tmp_path, "--no-report", "--epochs", "2") == 0  # space freed: it resumes after epoch 1


@pytest.mark.parametrize("where", ["work", "out", "report"])
def test_unwritable_folders_are_refused_before_any_work(tmp_path, capsys, where):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    folders = {"work": ["--work-dir", str(blocker)], "out": ["--out", str(blocker)],
               "report": ["--report-dir", str(blocker / "sub")]}
    args = ["run", *DIGITS, "--set", *SMALL]
    defaults = {"--out": str(tmp_path / "out"), "--work-dir": str(tmp_path / "work")}
    given = folders[where]
    for flag, value in defaults.items():
        if flag not in given:
            args += [flag, value]
    assert main(args + given) == 2
    err = capsys.readouterr().err
    flag = {"work": "--work-dir", "out": "--out", "report": "--report-dir"}[where]
    assert err.startswith(f"error: {flag} ") and ("is a file, not a folder" in err or "Not a directory" in err)
    assert not (tmp_path / "work").exists() or not list((tmp_path / "work").rglob("*.ckpt"))


def test_a_path_too_long_for_the_file_system_is_a_clean_error(tmp_path, capsys):
    long = tmp_path / ("x" * 5000)
    assert main(["run", *DIGITS, "--set", *SMALL, "--out", str(long), "--work-dir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out ") and "File name too long" in err and len(err) < 600


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_accelerator_gpu_without_a_gpu_is_refused(tmp_path, capsys):
    assert run(tmp_path, "--accelerator", "gpu") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --accelerator gpu: no CUDA GPU is visible") and not (tmp_path / "work").exists()


def test_a_loader_option_the_loader_does_not_have_is_named(tmp_path, capsys):
    assert run(tmp_path, sets=("dataset.options.image_size=16",)) == 2
    err = capsys.readouterr().err
    assert "dataset.options.image_size: unknown option of dataset 'digits'; allowed: test_fraction" in err


@pytest.mark.parametrize("damage", ["missing", "mistyped"])
def test_a_model_file_with_our_tag_but_a_bad_field_is_refused(tmp_path, capsys, damage):
    payload = {"format": "ssl-bench-model/1", "suite": "digits", "method": "simclr", "seed": 0, "epochs": 1,
               "backbone": "small_cnn", "in_channels": 1, "state_dict": {}}
    if damage == "missing":
        del payload["seed"]
    else:
        payload["epochs"] = "one"
    model = tmp_path / "model.pt"
    torch.save(payload, model)
    assert main(["evaluate", "--checkpoint", str(model), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    field = "seed" if damage == "missing" else "epochs"
    assert err.startswith(f"error: {model}: a damaged ssl-bench model file: '{field}' must be int")


# ----------------------------------------------------------------------------- 5. before any work; modes; data

def test_an_out_that_is_a_file_is_found_before_training(tmp_path, capsys):
    out = tmp_path / "results.json"
    out.write_text("{}")
    assert run(tmp_path, out=out) == 2
    assert "error: --out" in capsys.readouterr().err and not (tmp_path / "work").exists()


@pytest.mark.slow
def test_files_get_the_mode_of_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        assert main(["run", *DIGITS, "--no-report", "--set", "dataset.options.test_fraction=0.75",
                     "evaluation.protocols=[knn, semi]", "evaluation.semi.per_class=[2]", "evaluation.semi.fractions=[]",
                     "evaluation.semi.epochs=1", "train.online_knn_every=0", "--out", str(tmp_path / "out"),
                     "--work-dir", str(tmp_path / "work")]) == 0
    finally:
        os.umask(previous)
    written = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    written += [p for p in (tmp_path / "work").rglob("*") if p.is_file() and p.suffix in (".pt", ".ckpt")]
    kinds = {p.suffix for p in written}
    assert {".json", ".npz", ".pt", ".ckpt"} <= kinds  # record, predictions, split file, model, checkpoint
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in written), {str(p): oct(p.stat().st_mode) for p in written}


def test_zero_epochs_would_label_random_weights_with_a_methods_name(tmp_path, capsys):
    assert run(tmp_path, "--epochs", "0") == 2
    err = capsys.readouterr().err
    assert "train.epochs: 0 pretraining epochs for simclr" in err and "random_init" in err
    assert not (tmp_path / "work").exists()


def test_an_empty_class_folder_is_named(tmp_path):
    root = fixtures.make_imagefolder(tmp_path / "data", classes=("cat", "dog", "emu"), size=(20, 20))
    for image in (root / "train" / "emu").iterdir():
        image.unlink()
    with pytest.raises(Exception, match=r"emu: the class folder 'emu' holds no image files"):
        load_split("imagefolder", "train", root, image_size=16)


def test_sixteen_bit_pngs_are_scaled_not_saturated(tmp_path):
    from PIL import Image

    folder = tmp_path / "data" / "train" / "ramp"
    folder.mkdir(parents=True)
    ramp = (np.arange(16 * 16, dtype=np.uint32).reshape(16, 16) * 257).astype(np.uint16)  # 0 .. 65535
    Image.fromarray(ramp).save(folder / "ramp.png")
    assert Image.open(folder / "ramp.png").mode.startswith("I")  # really a 16-bit file
    dataset = load_split("imagefolder", "train", tmp_path / "data", image_size=16, channels=1, in_memory=True)
    pixels = dataset.images[0, 0].numpy().astype(int)
    assert pixels.min() == 0 and pixels.max() == 255
    assert np.abs(pixels - np.round(ramp / 257)).max() <= 1  # the ramp, not 255 everywhere past pixel 1


@pytest.mark.slow
def test_sigterm_during_evaluation_says_how_to_resume(tmp_path):
    work = tmp_path / "work"
    command = [sys.executable, "-m", "benchmarks", "run", *DIGITS, "--no-report", "--set",
               "dataset.options.test_fraction=0.75", "train.online_knn_every=0", "evaluation.protocols=[linear]",
               "evaluation.linear.epochs=100000", "--out", str(tmp_path / "out"), "--work-dir", str(work)]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and not list(work.rglob("model.pt")):
        time.sleep(0.05)  # model.pt is written right before the evaluation starts
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "terminated (SIGTERM); rerun the same command to resume" in err and "Traceback" not in err


def test_imagenet100_without_its_data_fails_fast_saying_where_it_looked(tmp_path, capsys):
    root = tmp_path / "nodata"
    assert main(["run", "--suite", "imagenet100", "--data-root", str(root), "--out", str(tmp_path / "out"),
                 "--work-dir", str(tmp_path / "work")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ImageNet-100 train split not found")
    assert str(root / "imagenet100" / "train") in err and "image-net.org" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()
