"""Suite configs: typed models, key/type/range checks with the dotted key, --set parsing, method sections and
named variants, the canonical dump and the fingerprints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from benchmarks.cli_common import parse_set
from benchmarks.config import (
    SuiteConfig,
    TrainConfig,
    available_suites,
    config_from_dict,
    evaluation_fingerprint,
    load_suite,
    training_fingerprint,
)
from benchmarks.errors import ConfigError, UnknownMethodError
from ssl_common.typed import OptimizerConfig, load_yaml


def test_every_shipped_suite_loads_and_its_resolved_config_round_trips():
    assert {"digits", "mnist", "mnist-small", "cifar10", "cifar100", "cifar100-20", "stl10"} <= set(available_suites())
    for suite in available_suites():
        config = load_suite(suite)
        assert isinstance(config, SuiteConfig) and config.name == suite
        dump = config.model_dump(mode="json")
        # dump -> JSON text -> load -> the same object (and the same dump, and the same method settings)
        again = config_from_dict(json.loads(json.dumps(dump)))
        assert again == config and again.model_dump(mode="json") == dump
        again_yaml = config_from_dict(load_yaml(yaml.safe_dump(dump)))
        assert again_yaml == config
        for name in config.method_names():
            assert again.method(name) == config.method(name)


def test_suite_values_override_defaults_and_the_rest_is_default():
    config = load_suite("digits")
    assert config.backbone == "small_cnn" and config.train.batch_size == 128
    assert config.train.num_nodes == TrainConfig().num_nodes  # not in digits.yaml
    assert config.optimizer.final_lr_fraction == OptimizerConfig().final_lr_fraction


def test_overrides_merge_key_by_key_and_ints_become_floats():
    config = load_suite("digits", {"train": {"epochs": 3}, "optimizer": {"lr": 1}})
    assert config.train.epochs == 3 and config.train.batch_size == 128
    assert config.optimizer.lr == 1.0 and isinstance(config.optimizer.lr, float)


def test_method_and_evaluation_sections_merge_key_by_key():
    # digits.yaml sets only simclr's temperature; another simclr hyperparameter, an evaluation flag and a
    # loader option merge in beside it
    config = load_suite("digits", {"methods": {"simclr": {"hidden_dim": 64}}, "evaluation": {"per_layer": True},
                                   "dataset": {"options": {"test_fraction": 0.5}}})
    assert config.methods["simclr"] == {"temperature": 0.2, "hidden_dim": 64}
    hparams = config.method("simclr").hparams
    assert (hparams.temperature, hparams.hidden_dim, hparams.output_dim) == (0.2, 64, 128)
    assert config.evaluation.per_layer is True and "knn" in config.evaluation.protocols
    assert config.dataset.options == {"test_fraction": 0.5}
    with pytest.raises(ConfigError, match=r"methods: expected mapping, got \[1\]"):
        load_suite("digits", {"methods": [1]})


@pytest.mark.parametrize("overrides, expected", [
    ({"trian": {}}, "trian: unknown key; allowed: augment, backbone, backbone_options, dataset,"),
    ({"train": {"epoch": 3}}, "train.epoch: unknown key; allowed: accelerator, batch_size,"),
    ({"train": {"batch_size": "big"}}, "train.batch_size: expected int, got 'big' (str)"),
    ({"train": {"batch_size": 12.5}}, "train.batch_size: expected int, got 12.5 (float)"),
    ({"train": {"deterministic": 1}}, "train.deterministic: expected bool, got 1 (int)"),
    ({"train": {"epochs": -1}}, "train.epochs: must be >= 0, got -1"),
    ({"train": {"batch_size": 1}}, "train.batch_size: must be >= 2"),
    ({"train": {"seeds": []}}, "train.seeds: must be a non-empty list of non-negative integers"),
    ({"train": {"seeds": [0, -1]}}, "train.seeds: must be a non-empty list of non-negative integers"),
    ({"train": {"precision": "fp8"}}, "train.precision: got 'fp8'; allowed: auto, 32"),
    ({"train": {"accelerator": "tpu"}}, "train.accelerator: got 'tpu'; allowed: auto, cpu, gpu"),
    ({"train": {"logger": "neptune"}}, "train.logger: got 'neptune'; allowed: csv, tensorboard, wandb, mlflow"),
    ({"optimizer": {"name": "rmsprop"}}, "optimizer.name: got 'rmsprop'; allowed: sgd, lars, adamw"),
    ({"optimizer": {"lr": 0}}, "optimizer.lr: must be a positive number, got 0"),
    ({"optimizer": {"lr": float("nan")}}, "optimizer.lr: must be a positive number, got nan"),
    ({"optimizer": {"lr": "1e-3"}}, "optimizer.lr: expected float, got '1e-3' (str)"),
    ({"optimizer": {"weight_decay": -1e-4}}, "optimizer.weight_decay: must be >= 0"),
    ({"optimizer": {"momentum": 1.0}}, "optimizer.momentum: must be in [0, 1)"),
    ({"optimizer": {"schedule": "poly"}}, "optimizer.schedule: got 'poly'; allowed: cosine, step, linear, constant"),
    ({"optimizer": {"milestones": [120, 60]}}, "optimizer.milestones: must be increasing positive epochs"),
    ({"augment": {"normalization": {"mean": [0.5, 0.5, 0.5]}}},
     "augment.normalization.mean: needs 1 values (in_channels), got 3"),
    ({"augment": {"normalization": {"std": [0.0]}}}, "augment.normalization.std: values must be > 0"),
    ({"augment": {"views": []}}, "augment.views: at least one view spec is needed"),
    ({"augment": {"views": [{"size": 8, "blurr_p": 0.5}]}}, "augment.views[0].blurr_p: unknown key; allowed:"),
    ({"augment": {"views": [{"count": 2}]}}, "augment.views[0].size: missing"),
    ({"augment": {"views": [{"size": 8, "scale": [0.9, 0.1]}]}}, "augment.views[0].scale: needs 0 < low <= high"),
    ({"augment": {"views": [{"size": 8, "hflip_p": 2}]}}, "augment.views[0].hflip_p: must be in [0, 1], got 2"),
    ({"dataset": {"name": ""}}, "dataset.name: missing"),
    ({"dataset": {"name": "imagenet-22k"}}, "dataset.name: unknown dataset 'imagenet-22k'; allowed: cifar10"),
    ({"dataset": {"options": {"image_size": 16}}},
     "dataset.options.image_size: unknown option of dataset 'digits'; allowed: test_fraction"),
    ({"dataset": {"options": {"test_fraction": "half"}}}, "dataset.options.test_fraction: expected float"),
    ({"dataset": {"test_split": "val"}}, "dataset: 'digits' has no split 'val'; allowed: train, test"),
    ({"backbone": "vit_huge"}, "backbone: unknown backbone 'vit_huge'; allowed:"),
    ({"backbone_options": {"widht": 8}}, "backbone_options.widht: unknown option of backbone 'small_cnn'; allowed: width"),
    ({"backbone": "resnet18_cifar", "backbone_options": {"width": 8}},
     "backbone_options: backbone 'resnet18_cifar' takes no options"),
    ({"evaluation": {"linear": {"epoch": 3}}}, "evaluation.linear.epoch: unknown key; allowed: batch_size, epochs"),
    ({"evaluation": {"protocols": ["knn", "telepathy"]}}, "evaluation.protocols: unknown protocol 'telepathy'"),
    ({"launcher": {"jobs": 0}}, "launcher.jobs: must be >= 1, got 0"),
    # protocols that restate a Budget default keep its constraint (a bare `int` there would drop it)
    ({"evaluation": {"semi": {"epochs": 0}}}, "evaluation.semi.epochs: must be >= 1, got 0"),
    ({"evaluation": {"block_classifier": {"lr": float("inf")}}},
     "evaluation.block_classifier.lr: must be a positive number, got inf"),
    ({"evaluation": {"finetune": {"momentum": 1}}}, "evaluation.finetune.momentum: must be in [0, 1), got 1"),
    ({"evaluation": {"knn": {"temperature": 0}}}, "evaluation.knn.temperature: must be a positive number, got 0"),
    ({"augment": {"views": [{"size": 8, "hue": -0.1}]}}, "augment.views[0].hue: must be >= 0, got -0.1"),
])
def test_bad_values_name_the_key_and_the_fix(overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_suite("digits", overrides)
    assert expected in str(info.value)


@pytest.mark.parametrize("section, expected", [
    ({"simclr": {"temprature": 0.1}},
     "methods.simclr.temprature: unknown hyperparameter; allowed: hidden_dim, output_dim, temperature"),
    ({"simclr": {"temperature": 0}}, "methods.simclr.temperature: must be > 0, got 0"),
    ({"simclr": {"temperature": "hot"}}, "methods.simclr.temperature: expected float, got 'hot' (str)"),
    ({"simclr": {"optimizer": {"betas": [0.9]}}}, "methods.simclr.optimizer.betas: unknown key"),
    ({"simclr": {"optimizer": {"lr": -1}}}, "methods.simclr.optimizer.lr: must be a positive number"),
    ({"simclr": {"train": {"seeds": [1]}}}, "methods.simclr.train.seeds: unknown key; allowed: batch_size, epochs"),
    ({"simclr": {"augment": {"views": [{"size": 8, "cnt": 2}]}}}, "methods.simclr.augment.views[0].cnt: unknown key"),
    ({"simclr": 3}, "methods.simclr: expected mapping, got 3 (int)"),
    ({"simclr/": {}}, "methods.simclr/: a method is named"),
    ({"uic": {"head": "deep"}}, "methods.uic.head: got 'deep'; allowed: official, simclr, linear"),
    ({"sslpp": {"clustering_optimizer": {"lr": 0}}}, "methods.sslpp.clustering_optimizer.lr: must be a positive"),
])
def test_method_sections_are_checked_against_the_methods_own_model(section, expected):
    with pytest.raises(ConfigError) as info:
        load_suite("digits", {"methods": section})
    assert expected in str(info.value)


def test_a_methods_section_for_an_unregistered_method_names_the_fix():
    with pytest.raises(UnknownMethodError, match="methods.simclrr: no method is registered .* --import"):
        load_suite("digits", {"methods": {"simclrr": {"temperature": 0.2}}})


def test_suite_files_by_path_yaml12_floats_and_their_errors(tmp_path):
    good = tmp_path / "mine.yaml"
    # `lr: 1e-3` and `weight_decay: 5E-4` are floats in YAML 1.2 (YAML 1.1, PyYAML's default, reads strings)
    good.write_text("dataset: {name: digits}\nbackbone: small_cnn\nin_channels: 1\nimage_size: 8\n"
                    "optimizer: {lr: 1e-3, weight_decay: 5E-4}\n"
                    "augment: {normalization: {mean: [0.5], std: [0.5]}, views: [{size: 8}]}\n")
    config = load_suite(str(good))
    assert config.name == "mine" and config.source == str(good)
    assert config.optimizer.lr == 0.001 and config.optimizer.weight_decay == 0.0005
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochs: [\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        load_suite(str(bad))
    with pytest.raises(ConfigError, match="--suite: unknown suite 'digitz'; available: cifar10"):
        load_suite("digitz")
    not_a_mapping = tmp_path / "list.yaml"
    not_a_mapping.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="a suite file is a mapping of sections, got list"):
        load_suite(str(not_a_mapping))


def test_method_settings_merge_the_optimizer_and_train_overrides():
    config = load_suite("digits", {"methods": {"simclr": {"optimizer": {"lr": 0.5}, "train": {"batch_size": 64}}}})
    settings = config.method("simclr")
    assert settings.hparams.temperature == 0.2
    assert settings.optimizer == config.optimizer.model_copy(update={"lr": 0.5})
    assert settings.batch_size == 64 and settings.epochs == config.train.epochs
    assert config.method("byol").batch_size == config.train.batch_size  # other methods keep the suite's


def test_named_variants_resolve_to_their_registry_method():
    config = load_suite("digits", {"methods": {"simclr/t05": {"temperature": 0.5},
                                               "simclr/big": {"hidden_dim": 1024, "optimizer": {"lr": 0.1}}}})
    plain, t05, big = (config.method(n) for n in ("simclr", "simclr/t05", "simclr/big"))
    assert (t05.method, t05.variant, t05.hparams.temperature) == ("simclr", "t05", 0.5)
    assert big.hparams.hidden_dim == 1024 and big.hparams.temperature == 0.2  # the method's default
    assert big.optimizer.lr == 0.1 and plain.optimizer.lr == config.optimizer.lr
    assert {"simclr/t05", "simclr/big"} <= set(config.method_names())
    with pytest.raises(UnknownMethodError, match="unknown method variant 'simclr/none'"):
        config.method("simclr/none")


def test_parse_set_builds_nested_overrides_from_yaml12_values():
    assert parse_set(["train.epochs=3", "train.seeds=[0, 1]", "optimizer.name=adamw", "train.compile=true",
                      "evaluation.knn.ks=[20]", "optimizer.lr=1e-3"]) == {
        "train": {"epochs": 3, "seeds": [0, 1], "compile": True}, "optimizer": {"name": "adamw", "lr": 0.001},
        "evaluation": {"knn": {"ks": [20]}}}
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_set(["train.epochs"])
    with pytest.raises(ConfigError, match="empty key part"):
        parse_set(["train..epochs=3"])
    with pytest.raises(ConfigError, match="cannot also hold keys"):
        parse_set(["train=3", "train.epochs=2"])


def _fingerprint(overrides=None, method="simclr", seed=0):
    config = load_suite("digits", overrides)
    return training_fingerprint(config, config.method(method), seed)


def test_training_fingerprint_covers_training_and_nothing_else():
    base = _fingerprint()
    assert base == _fingerprint()
    # what changes the trained weights changes the fingerprint ...
    for changed in [_fingerprint({"methods": {"simclr": {"temperature": 0.5}}}),
                    _fingerprint({"optimizer": {"lr": 0.1}}), _fingerprint({"train": {"batch_size": 64}}),
                    _fingerprint({"train": {"epochs": 3}}), _fingerprint({"train": {"precision": "bf16-mixed"}}),
                    _fingerprint({"augment": {"views": [{"size": 8, "count": 2}]}}),
                    _fingerprint({"dataset": {"options": {"test_fraction": 0.5}}}),
                    _fingerprint({"methods": {"simclr": {"optimizer": {"lr": 0.2}}}}),
                    _fingerprint(method="byol"), _fingerprint(seed=1)]:
        assert changed != base
    # ... evaluation, other methods' sections, the seed list, the launcher and logging do not
    for same in [_fingerprint({"evaluation": {"knn": {"ks": [10]}}}),
                 _fingerprint({"methods": {"byol": {"momentum_base": 0.9}}}),
                 _fingerprint({"launcher": {"name": "local", "jobs": 2}}),
                 _fingerprint({"train": {"seeds": [0, 1, 2], "log_every_n_steps": 1, "logger": "mlflow",
                                         "online_knn_every": 3}})]:
        assert same == base


def test_evaluation_fingerprint_follows_the_evaluation_settings_only():
    base = evaluation_fingerprint(load_suite("digits"))
    assert evaluation_fingerprint(load_suite("digits", {"optimizer": {"lr": 0.5}})) == base
    assert evaluation_fingerprint(load_suite("digits", {"evaluation": {"knn": {"temperature": 0.2}}})) != base
    # which protocols run is not a setting of their results: a record gains the protocols it lacks
    assert evaluation_fingerprint(load_suite("digits", {"evaluation": {"protocols": ["knn"]}})) == base


# ----------------------------------------------------------------------------- suite inheritance (base:)

def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_a_suite_file_merges_over_its_base_by_the_inheritance_rules(tmp_path):
    from benchmarks.config import read_suite_file

    _write(tmp_path / "parent.yaml", "name: parent\ndescription: the parent\ndataset: {name: digits}\n"
           "backbone: small_cnn\nin_channels: 1\nimage_size: 8\n"
           "train: {epochs: 7, seeds: [0, 1, 2]}\n"
           "augment: {normalization: {mean: [0.5], std: [0.5]}, views: [{size: 8, count: 2}]}\n"
           "methods:\n  swav: {num_prototypes: 30, queue_length: 0, queue_start_epoch: 3}\n"
           "  iic: {num_clusters: 50, sobel: false}\n  carl: {num_prototypes: 100}\n")
    child = _write(tmp_path / "child.yaml", "base: parent.yaml\ntrain: {seeds: [5]}\n"
                   "augment: {views: [{size: 8, count: 1}]}\n"
                   "methods:\n  swav: {num_prototypes: 40, queue_start_epoch: null}\n"
                   "  iic: !replace {sobel: true, num_clusters: 70}\n  carl: null\n  simclr: {temperature: 0.2}\n")
    raw = read_suite_file(child)
    assert "name" not in raw and "base" not in raw  # the base's name is never inherited
    assert raw["description"] == "the parent" and raw["backbone"] == "small_cnn"
    assert raw["train"] == {"epochs": 7, "seeds": [5]}  # mappings merge key by key, lists replace
    assert raw["augment"]["views"] == [{"size": 8, "count": 1}] and raw["augment"]["normalization"]["mean"] == [0.5]
    # null removes an inherited key; !replace replaces a mapping whole, in its own key order; new keys come last
    assert raw["methods"] == {"swav": {"num_prototypes": 40, "queue_length": 0},
                              "iic": {"sobel": True, "num_clusters": 70}, "simclr": {"temperature": 0.2}}
    assert list(raw["methods"]["iic"]) == ["sobel", "num_clusters"] and type(raw["methods"]["iic"]) is dict
    config = load_suite(str(child))
    assert config.name == "child" and config.train.seeds == [5] and config.method("swav").hparams.num_prototypes == 40


def test_a_base_may_have_a_base_and_names_a_shipped_suite(tmp_path):
    _write(tmp_path / "middle.yaml", "base: mnist\nname: middle\ntrain: {epochs: 3}\n")
    leaf = _write(tmp_path / "leaf.yaml", "base: middle.yaml\ndescription: leaf\n")
    config, mnist = load_suite(str(leaf)), load_suite("mnist")
    assert config.name == "leaf" and config.description == "leaf" and config.train.epochs == 3
    assert config.in_channels == mnist.in_channels == 1 and config.methods == mnist.methods
    # the shipped chain mnist-small -> mnist -> cifar10: a key cifar10 sets and mnist removes stays removed
    assert "queue_start_epoch" not in load_suite("mnist-small").methods["swav"]
    # what reads the file's sections (the command line's budget notes) sees the inherited ones
    from benchmarks.config import read_suite_file, suite_path

    sections = read_suite_file(suite_path("cifar100-20"))["methods"]
    assert sections["self_classifier/reimpl"]["train"] == {"batch_size": 512, "epochs": 800}


def test_a_cycle_of_bases_is_one_error_naming_the_file_and_base(tmp_path):
    _write(tmp_path / "a.yaml", "base: b.yaml\n")
    _write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"b\.yaml: base: the chain of bases is a cycle \(.*a\.yaml -> .*b\.yaml "
                                          r"-> .*a\.yaml\)"):
        load_suite(str(tmp_path / "a.yaml"))
    _write(tmp_path / "self.yaml", "base: self.yaml\n")
    with pytest.raises(ConfigError, match=r"self\.yaml: base: the chain of bases is a cycle"):
        load_suite(str(tmp_path / "self.yaml"))


def test_a_missing_base_is_one_error_naming_the_file_and_base(tmp_path):
    orphan = _write(tmp_path / "orphan.yaml", "base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"orphan\.yaml: base: no such file .*nowhere\.yaml \(a path is relative"):
        load_suite(str(orphan))
    _write(orphan, "base: cifar1O\n")
    with pytest.raises(ConfigError, match=r"orphan\.yaml: base: unknown suite 'cifar1O'; available: .*did you mean"):
        load_suite(str(orphan))
    _write(orphan, "base: [cifar10]\n")
    with pytest.raises(ConfigError, match=r"orphan\.yaml: base: expected a shipped suite name or a path"):
        load_suite(str(orphan))


def test_the_schema_knows_base():
    from benchmarks.config import json_schema

    assert "shipped suite" in json_schema()["properties"]["base"]["description"]


SUITE_RESOLUTIONS = Path(__file__).parent / "suite_resolutions.json"


def _suite_resolutions() -> dict:
    """Per shipped suite: the SHA-256 of `config --suite X`'s output, the launcher section and every method's run
    fingerprint (seed 0). Regenerate (only when a change to a suite is meant) with `python tests/test_config.py`."""
    import hashlib

    from benchmarks.config import run_fingerprints

    out = {}
    for suite in available_suites():
        config = load_suite(suite)
        text = yaml.safe_dump(config.canonical(), sort_keys=False, default_flow_style=None, width=110)
        out[suite] = {"config_sha256": hashlib.sha256(text.encode()).hexdigest(),
                      "launcher": config.launcher.model_dump(mode="json"),
                      "runs": {name: run_fingerprints(config, config.method(name), config.train.seeds[0])["run"]
                               for name in config.method_names()}}
    return out


def test_every_shipped_suite_resolves_to_the_committed_resolution():
    """The shipped suites are written as `base:` + differences; they resolve byte-identically to the files they
    replaced (tests/suite_resolutions.json was generated from those), so no run fingerprint moved."""
    expected = json.loads(SUITE_RESOLUTIONS.read_text(encoding="utf-8"))
    assert _suite_resolutions() == expected


if __name__ == "__main__":
    SUITE_RESOLUTIONS.write_text(json.dumps(_suite_resolutions(), indent=1, sort_keys=True) + "\n", encoding="utf-8")
