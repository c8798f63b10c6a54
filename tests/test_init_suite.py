"""`python -m benchmarks init-suite --from-folder DIR`: a suite inferred from an ImageFolder runs without edits
(issue 24), grey and colour, with the channels, size, classes and normalization of the images."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from benchmarks.cli import main
from benchmarks.data import load_split
from benchmarks.records import iter_record_files, read_record

try:
    from tests import fixtures
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    import fixtures


@pytest.mark.parametrize("grey", [False, True], ids=["rgb", "grey"])
def test_init_suite_writes_a_suite_that_runs_without_edits(tmp_path, capsys, grey):
    root = fixtures.make_imagefolder(tmp_path / "pets", classes=("cat", "dog", "owl"), per_class=4, size=(20, 16),
                                     grey=grey)
    suite = tmp_path / "my_suite.yaml"
    assert main(["init-suite", "--from-folder", str(root), "--out", str(suite)]) == 0
    raw = yaml.safe_load(suite.read_text())
    channels = 1 if grey else 3
    assert (raw["in_channels"], raw["image_size"], raw["num_classes"]) == (channels, 16, 3)
    assert raw["dataset"]["options"]["channels"] == channels and raw["augment"]["views"][0]["size"] == 16
    assert raw["backbone"] == "small_cnn"  # 16 px: the CNN for small images
    # the normalization is the images' own, decoded as the loader decodes them
    images = load_split("imagefolder", "train", root, image_size=16, channels=channels).get_batch(
        np.arange(12)).double() / 255
    assert raw["augment"]["normalization"]["mean"] == pytest.approx(images.mean(dim=(0, 2, 3)).tolist(), abs=1e-4)
    assert raw["augment"]["normalization"]["std"] == pytest.approx(images.std(dim=(0, 2, 3), unbiased=False).tolist(),
                                                                   abs=1e-4)
    capsys.readouterr()

    out = tmp_path / "out"
    assert main(["run", "--suite", str(suite), "--data-root", str(root), "--methods", "simclr", "--epochs", "1",
                 "--seeds", "0", "--no-references", "--no-progress", "--out", str(out),
                 "--work-dir", str(tmp_path / "work")]) == 0
    (record_file,) = [p for p in iter_record_files(out)]
    record = read_record(record_file)
    assert record["status"] == "completed" and record["suite"] == "my_suite"
    assert record["dataset"] == "my_suite"  # named after the suite in the report, not "ImageFolder"
    report = (out / "report" / "report.md").read_text()
    assert "## my\\_suite — suite my\\_suite" in report and "ImageFolder" not in report  # (Markdown escapes _)


def test_init_suite_refuses_a_folder_without_a_test_split_and_an_existing_file(tmp_path, capsys):
    root = fixtures.make_imagefolder(tmp_path / "pets", splits=("train",))
    assert main(["init-suite", "--from-folder", str(root), "--out", str(tmp_path / "s.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --from-folder {root}: no test/ (or val/) folder") and "Expected layout" in err
    (tmp_path / "s.yaml").write_text("name: mine\n")
    fixtures.make_imagefolder(root, splits=("test",))
    assert main(["init-suite", "--from-folder", str(root), "--out", str(tmp_path / "s.yaml")]) == 2
    assert "pass --force to overwrite it" in capsys.readouterr().err
    assert (tmp_path / "s.yaml").read_text() == "name: mine\n"


def test_the_schema_documents_the_imagefolder_layout_and_every_option(capsys):
    import json

    from benchmarks.data import OPTIONS

    assert main(["config", "--schema"]) == 0
    dataset = json.loads(capsys.readouterr().out)["$defs"]["DatasetConfig"]["properties"]
    assert "ROOT = --data-root" in dataset["name"]["description"]
    assert "ROOT/<split>/<class>/<image>" in dataset["name"]["description"]
    options = dataset["options"]
    assert set(options["properties"]) == set(OPTIONS["imagefolder"].model_fields) == {
        "image_size", "channels", "in_memory", "storage", "verify"}
    for key, spec in options["properties"].items():
        assert len(spec.get("description", "")) > 30, key
        assert f"{key} (" in options["description"]


def test_an_imagefolder_without_a_display_name_is_named_after_its_suite(tmp_path):
    from benchmarks.config import config_from_dict
    from benchmarks.suite_data import dataset_name

    config = config_from_dict({"name": "pets", "dataset": {"name": "imagefolder", "options": {"image_size": 16}},
                               "backbone": "small_cnn", "image_size": 16, "num_classes": 2,
                               "augment": {"normalization": {"mean": [0.5] * 3, "std": [0.5] * 3},
                                           "views": [{"size": 16}]}})
    assert dataset_name(config, tmp_path / "pet_photos") == "pets"
    named = config.model_copy(update={"dataset": config.dataset.model_copy(update={"display_name": "Pets-2"})})
    assert dataset_name(named, tmp_path) == "Pets-2"
