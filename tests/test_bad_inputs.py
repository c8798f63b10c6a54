"""Every bad input stops the CLI with `error: <cause and fix>` and exit status 2, before any work.

The CLI runs in this process (`benchmarks.cli.main`); "before any work" is checked by
the absence of anything under --out and --work-dir. Divergence and a full disk run a
real (tiny) training.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch.nn.functional as F
from torch import nn

import methods
from benchmarks import records
from benchmarks.cli import main
from benchmarks.records import read_record, same_run_records
from methods import register_method
from methods.base import MethodHparams, SSLMethod, TrainBatch

try:
    from tests import fixtures
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    import fixtures

# a quarter of digits for training keeps the few real runs here short
DIGITS = ["--suite", "digits", "--methods", "simclr", "--epochs", "1", "--seeds", "0", "--no-references", "--no-report",
          "--no-progress"]
SMALL = ["dataset.options.test_fraction=0.75", "evaluation.protocols=[knn]", "train.online_knn_every=0"]


def run_cli(tmp_path: Path, args: list[str], sets: list[str] = ()) -> int:
    set_args = ["--set", *sets] if sets else []
    return main(["run", *args, *set_args, "--out", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work")])


def assert_refused(tmp_path, capsys, args, sets, *expected):
    """Exit 2, `error: ` + every expected fragment, and nothing written."""
    assert run_cli(tmp_path, args, sets) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: "), err
    for fragment in expected:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()
    return err


# ----------------------------------------------------------------------------- names, config keys, values

@pytest.mark.parametrize("args, sets, expected", [
    (["--suite", "nosuch"], [], ["--suite: unknown suite 'nosuch'; available: ", "cifar10", "digits", ".yaml"]),
    (["--suite", "missing.yaml"], [], ["--suite: no such file", "missing.yaml"]),
    (DIGITS[:2] + ["--methods", "simclr", "nope"], [], ["unknown method 'nope'; available: ", "byol", "--import"]),
    (DIGITS, ["methods.simclrr.temperature=0.2"], ["methods.simclrr: no method is registered", "--import"]),
    (DIGITS, ["train.epoch=3"], ["train.epoch: unknown key; allowed: ", "batch_size", "epochs"]),
    (DIGITS, ["train.batch_size=abc"], ["train.batch_size: expected int, got 'abc' (str)"]),
    (DIGITS, ["optimizer.lr=-0.1"], ["optimizer.lr: must be a positive number, got -0.1"]),
    (DIGITS, ["methods.simclr.optimizer.lr=-1"], ["methods.simclr.optimizer.lr: must be a positive number"]),
    (DIGITS, ["methods.simclr.temprature=0.1"],
     ["methods.simclr.temprature: unknown hyperparameter; allowed: hidden_dim, output_dim, temperature"]),
    (DIGITS, ["methods.simclr.temperature=0"], ["methods.simclr.temperature: must be > 0"]),
    (DIGITS, ["methods.simclr.temperature=hot"], ["methods.simclr.temperature: expected float, got 'hot'"]),
    (DIGITS + ["--epochs", "-1"], [], ["train.epochs: must be >= 0, got -1"]),
    (DIGITS + ["--batch-size", "5000"], [], ["train.batch_size: 5000 is more than the 1437 pretraining images"]),
    (DIGITS + ["--protocols", "knn", "telepathy"], [], ["evaluation.protocols: unknown protocol 'telepathy'"]),
    (DIGITS + ["--jobs", "2"], [], ["--jobs 2: needs --launcher local (or slurm)"]),
    (DIGITS + ["--devices", "two"], [], ["--devices: expected a number of devices or 'auto', got 'two'"]),
    (DIGITS, ["evaluation.knn.ks=[20, 5000]"],
     ["evaluation.knn.ks: k = 5000 is larger than the kNN bank (the 1437 images of the train split)"]),
    (DIGITS, ["evaluation.protocols=[semi]", "evaluation.semi.fractions=[0.001]"],
     ["evaluation.semi.fractions: 0.001 of 1437 labelled images is fewer than one image per class"]),
    (DIGITS, ["evaluation.protocols=[semi]", "evaluation.semi.per_class=[5, 500]"],
     ["evaluation.semi.per_class: 500 images per class, but the smallest class of the labelled train split has"]),
    (DIGITS, ["foo"], ["--set 'foo': expected KEY=VALUE"]),
    (DIGITS, ["train.seeds=[0, 1"], ["--set 'train.seeds=[0, 1': the value is not valid YAML"]),
])
def test_bad_names_keys_and_values(tmp_path, capsys, args, sets, expected):
    assert_refused(tmp_path, capsys, args, sets, *expected)


# ----------------------------------------------------------------------------- issue 24: the last tracebacks

LONG_VARIANT = "simclr/" + "v" * 300


@pytest.mark.parametrize("args, sets, expected", [
    # near misses: the closest allowed name is proposed
    (["--suite", "digts"], [], ["--suite: unknown suite 'digts'", "did you mean 'digits'?"]),
    (DIGITS[:2] + ["--methods", "simclrr"], [], ["unknown method 'simclrr'", "did you mean 'simclr'?"]),
    (DIGITS, ["train.epoch=3"], ["train.epoch: unknown key", "did you mean 'epochs'?"]),
    (DIGITS + ["--protocols", "knnn"], [], ["unknown protocol 'knnn'", "did you mean 'knn'?"]),
    (DIGITS[:2] + ["--methods", "simclr/t5"], ["methods.simclr/t05.temperature=0.5"],
     ["unknown method variant 'simclr/t5'", "did you mean 'simclr/t05'?"]),
    # a 300-character variant: its record file name would be too long for the file system
    (DIGITS[:2] + ["--methods", LONG_VARIANT], [f"methods.{LONG_VARIANT}.temperature=0.5"],
     ["the name is 307 bytes long", "over the 255-byte limit of file names", "use a name of at most"]),
    # list items cannot be addressed: the whole list is given instead
    (DIGITS, ["augment.views[0].size=16"],
     ["list items cannot be addressed", "--set 'augment.views=[{size: 16, count: 2}]'"]),
    # per-block blocks that the backbone lacks: refused before training, with the fix
    (DIGITS + ["--protocols", "knn_k10"], ["evaluation.knn_k10.blocks=[2, 3, 4]"],
     ["evaluation.knn_k10.blocks: block 4 does not exist; the backbone small_cnn has 3 blocks",
      "--set 'evaluation.knn_k10.blocks=[2, 3]'"]),
    (DIGITS + ["--protocols", "block_classifier"], ["evaluation.block_classifier.blocks=[4]"],
     ["evaluation.block_classifier.blocks: block 4 does not exist"]),
])
def test_first_contact_mistakes_get_one_line_with_the_fix(tmp_path, capsys, args, sets, expected):
    err = assert_refused(tmp_path, capsys, args, sets, *expected)
    assert err.count("\n") == 1, err  # one line


def test_an_empty_model_file_is_refused_in_one_line(tmp_path, capsys):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert main(["evaluate", "--checkpoint", str(empty), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {empty}: the file is empty (0 bytes)") and err.count("\n") == 1, err
    assert "model.pt that `run`" in err


def test_an_unreadable_model_file_without_a_message_is_one_line(tmp_path, capsys):
    """Exceptions without a message (EOFError) once crashed the error formatter (`splitlines()[0]`)."""
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(b"\x80")  # a pickle that ends before its first opcode is complete
    assert main(["evaluate", "--checkpoint", str(truncated), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {truncated}: refused to load") and err.count("\n") == 1, err


def test_evaluate_answers_a_near_miss_protocol_in_one_line(tmp_path, capsys):
    from benchmarks.config import load_suite
    from benchmarks.runner import build_method, load_suite_data, model_settings, save_model

    config = load_suite("digits")
    method, settings = build_method(config, "simclr", load_suite_data(config))
    model = tmp_path / "model.pt"
    save_model(model, method, {"suite": "digits", "method": "simclr", "seed": 0, "epochs": 1, "backbone": "small_cnn",
                               "in_channels": 1, "fingerprint": "0" * 12, **model_settings(config, settings)})
    assert main(["evaluate", "--checkpoint", str(model), "--protocols", "knnn", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: evaluation.protocols: unknown protocol 'knnn'") and err.count("\n") == 1, err
    assert "did you mean 'knn'?" in err and not (tmp_path / "out").exists()


def test_per_block_protocols_default_to_the_blocks_of_the_backbone():
    from benchmarks.config import load_suite

    assert load_suite("digits").evaluation.knn_k10.blocks == [2, 3]  # small_cnn: 3 blocks
    assert load_suite("digits").evaluation.block_classifier.blocks == [2, 3]
    assert load_suite("cifar10").evaluation.knn_k10.blocks == [2, 3, 4]  # ResNet-18: 4 blocks
    explicit = load_suite("digits", {"evaluation": {"knn_k10": {"blocks": [3]}}})
    assert explicit.evaluation.knn_k10.blocks == [3]


# ----------------------------------------------------------------------------- data vs. config

def test_wrong_channels(tmp_path, capsys):
    assert_refused(tmp_path, capsys, DIGITS, ["in_channels=3", "augment.normalization.mean=[0.5, 0.5, 0.5]",
                                              "augment.normalization.std=[0.5, 0.5, 0.5]"],
                   "in_channels: the suite says 3 but digits images have 1 channel(s); set in_channels: 1")


def test_wrong_image_size(tmp_path, capsys):
    assert_refused(tmp_path, capsys, DIGITS, ["image_size=32"],
                   "image_size: the suite says 32 but digits images are 8x8; set image_size: 8")


def test_views_larger_than_the_images(tmp_path, capsys):
    assert_refused(tmp_path, capsys, DIGITS, ["augment.views=[{size: 16, count: 2}]"],
                   "augment.views[0].size: 16 is larger than the 8x8 images of digits", "use size <= 8")


def test_backbone_that_cannot_take_the_views(tmp_path, capsys):
    # small_cnn pools twice: a 2x2 view shrinks to nothing
    assert_refused(tmp_path, capsys, DIGITS, ["augment.views=[{size: 2, count: 2}]"],
                   "backbone: small_cnn cannot take 1x2x2 views", "use larger views")


# ----------------------------------------------------------------------------- datasets

def test_missing_dataset(tmp_path, capsys):
    assert_refused(tmp_path, capsys, ["--suite", "mnist", "--data-root", str(tmp_path / "nodata"), "--no-report"],
                   [], "MNIST not found. Looked for:", str(tmp_path / "nodata" / "MNIST" / "raw"), "--download")


def test_truncated_dataset_file(tmp_path, capsys):
    root = fixtures.make_cifar10(tmp_path / "data")
    batch = root / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:200])
    err = assert_refused(tmp_path, capsys, ["--suite", "cifar10", "--data-root", str(root), "--no-report"], [],
                         str(batch))
    assert any(word in err for word in ("truncated", "corrupt")), err


IMAGEFOLDER_SUITE = """
name: folder
dataset: {name: imagefolder, options: {image_size: 16}}
backbone: small_cnn
in_channels: 3
image_size: 16
num_classes: 2
methods_to_run: [simclr]
references: []
augment:
  normalization: {mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5]}
  views: [{size: 16, count: 2}]
train: {epochs: 1, batch_size: 4, seeds: [0]}
evaluation: {protocols: [knn], knn: {ks: [1]}}
"""


def _folder_suite(tmp_path) -> Path:
    suite = tmp_path / "folder.yaml"
    suite.write_text(IMAGEFOLDER_SUITE)
    return suite


def test_imagefolder_without_images(tmp_path, capsys):
    root = tmp_path / "data"
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            (root / split / name).mkdir(parents=True)
        (root / split / "cat" / "notes.txt").write_text("not an image")
    assert_refused(tmp_path, capsys, ["--suite", str(_folder_suite(tmp_path)), "--data-root", str(root)], [],
                   f"{root / 'train'}: no image files", "Expected layout:")


def test_imagefolder_with_an_unreadable_image(tmp_path, capsys):
    root = fixtures.make_imagefolder(tmp_path / "data", size=(20, 20))
    broken = root / "train" / "dog" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    assert_refused(tmp_path, capsys, ["--suite", str(_folder_suite(tmp_path)), "--data-root", str(root)], [],
                   f"{broken}: unreadable or corrupted image", "remove or replace it")


# ----------------------------------------------------------------------------- divergence

class NanAfterSomeSteps(SSLMethod):
    """A test method whose loss turns NaN from optimizer step `nan_from_step` on."""

    display_name = "NaN test"

    class Hparams(MethodHparams):
        nan_from_step: int = 4

    def __init__(self, backbone, data, hparams=None):
        super().__init__(backbone, data, hparams)
        self.head = nn.Linear(backbone.feature_dim, 8)

    def training_loss(self, batch: TrainBatch):
        z_a, z_b = (self.head(self.backbone(v)) for v in batch.views[:2])
        loss = F.mse_loss(z_a, z_b)
        if batch.step >= self.hparams.nan_from_step:
            loss = loss * float("nan")
        return loss, {}


@pytest.fixture
def nan_method():
    register_method("nan_loss_test")(NanAfterSomeSteps)
    yield "nan_loss_test"
    methods._REGISTRY.pop("nan_loss_test", None)


def test_nan_loss_stops_the_run_with_a_diverged_record(tmp_path, capsys, nan_method):
    # 449 training images / batch 128 = 3 steps per epoch: steps 0-3 are finite, step 4 (epoch 2) is NaN
    args = ["--suite", "digits", "--methods", nan_method, "--epochs", "3", "--seeds", "0", "--no-references", "--no-report",
            "--no-progress"]
    assert run_cli(tmp_path, args, SMALL) == 0
    assert f"{nan_method} seed 0: status diverged" in capsys.readouterr().out
    (path,) = same_run_records(tmp_path / "out", "digits", nan_method, 3, 0)
    record = read_record(path)
    assert record["status"] == "diverged"
    assert record["message"].startswith("the loss became nan in epoch 2 (optimizer step 4)")
    assert [h["epoch"] for h in record["history"]] == [1]  # the finished epoch is kept
    assert record["metrics"] == [] and record["checkpoint"] is None
    run_dir = tmp_path / "work" / "digits" / f"{nan_method}_e3_s0_{record['fingerprints']['training']}"
    assert run_dir.is_dir() and not (run_dir / "model.pt").exists()


# ----------------------------------------------------------------------------- disk full

def test_disk_full_while_writing_the_record_keeps_the_previous_one(tmp_path, capsys, monkeypatch):
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to tell the record's temp file from other files")
    assert run_cli(tmp_path, DIGITS, SMALL) == 0
    (record,) = same_run_records(tmp_path / "out", "digits", "simclr", 1, 0)
    before = record.read_bytes()
    real_fsync = os.fsync

    def full_for_records(fd):  # only the record's temp file hits the full disk
        if ".json." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(records.os, "fsync", full_for_records)
    assert run_cli(tmp_path, DIGITS + ["--force"], SMALL) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {record}: cannot be written (No space left on device)")
    assert "rerun the same command" in err
    assert record.read_bytes() == before
    # no partial temp file
    assert sorted(p.name for p in record.parent.iterdir()) == [record.name, record.stem + ".predictions.npz"]
    monkeypatch.undo()
    # space freed: the rerun reuses the finished checkpoint (no retraining) and replaces the record
    assert run_cli(tmp_path, DIGITS + ["--force"], SMALL) == 0
    assert read_record(record)["history"] == read_record_json(before)["history"]


def read_record_json(data: bytes) -> dict:
    import json

    return json.loads(data)
