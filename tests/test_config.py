"""Suite configs: typed models, key/type/range checks with the dotted key, --set parsing, method sections and
named variants, the canonical dump and the fingerprints."""

from __future__ import annotations

import json

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
