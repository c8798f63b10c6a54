"""Suite configs: merging over the defaults, key/type/range checks, --set parsing, the training fingerprint."""

from __future__ import annotations

import copy

import pytest

from benchmarks.cli import _parse_set
from benchmarks.config import SUITE_DEFAULTS, available_suites, load_suite, merge_checked, method_settings
from benchmarks.errors import ConfigError
from benchmarks.training import training_fingerprint


def test_every_shipped_suite_loads():
    assert {"digits", "mnist", "cifar10", "cifar100", "cifar100-20", "stl10"} <= set(available_suites())
    for suite in available_suites():
        config = load_suite(suite)
        assert config["name"] == suite
        assert set(config) == set(SUITE_DEFAULTS) | {"_source"}


def test_suite_values_override_defaults_and_the_rest_is_default():
    config = load_suite("digits")
    assert config["backbone"] == "small_cnn" and config["train"]["batch_size"] == 128
    assert config["train"]["num_nodes"] == SUITE_DEFAULTS["train"]["num_nodes"]  # not in digits.yaml
    assert config["optimizer"]["final_lr_fraction"] == SUITE_DEFAULTS["optimizer"]["final_lr_fraction"]


def test_overrides_merge_key_by_key_and_ints_become_floats():
    config = load_suite("digits", {"train": {"epochs": 3}, "optimizer": {"lr": 1}})
    assert config["train"]["epochs"] == 3 and config["train"]["batch_size"] == 128
    assert config["optimizer"]["lr"] == 1.0 and isinstance(config["optimizer"]["lr"], float)


def test_free_form_sections_merge_without_the_suite_listing_the_key():
    # digits.yaml sets only simclr's temperature; another simclr hyperparameter, an evaluation flag and a
    # loader option are still accepted here and checked later by their own schema
    config = load_suite("digits", {"methods": {"simclr": {"hidden_dim": 64}}, "evaluation": {"per_layer": True},
                                   "dataset": {"options": {"test_fraction": 0.5}}})
    assert config["methods"]["simclr"] == {"temperature": 0.2, "hidden_dim": 64}
    assert config["evaluation"]["per_layer"] is True and "knn" in config["evaluation"]["protocols"]
    assert config["dataset"]["options"] == {"test_fraction": 0.5}
    with pytest.raises(ConfigError, match=r"methods: expected a mapping, got \[1\]"):
        load_suite("digits", {"methods": [1]})


@pytest.mark.parametrize("overrides, expected", [
    ({"trian": {}}, "trian: unknown key; allowed: augment, backbone, dataset,"),
    ({"train": {"epoch": 3}}, "train.epoch: unknown key; allowed: accelerator, batch_size,"),
    ({"train": {"batch_size": "big"}}, "train.batch_size: expected int, got 'big' (str)"),
    ({"train": {"deterministic": 1}}, "train.deterministic: expected bool, got 1 (int)"),
    ({"train": {"epochs": -1}}, "train.epochs: must be >= 0, got -1"),
    ({"train": {"batch_size": 1}}, "train.batch_size: must be >= 2"),
    ({"train": {"seeds": []}}, "train.seeds: must be a non-empty list of non-negative integers"),
    ({"train": {"seeds": [0, -1]}}, "train.seeds: must be a non-empty list of non-negative integers"),
    ({"train": {"precision": "fp8"}}, "train.precision: got 'fp8'; allowed: auto, 32"),
    ({"optimizer": {"name": "rmsprop"}}, "optimizer.name: got 'rmsprop'; allowed: sgd, lars, adamw"),
    ({"optimizer": {"lr": 0}}, "optimizer.lr: must be a positive number, got 0"),
    ({"optimizer": {"lr": float("nan")}}, "optimizer.lr: must be a positive number, got nan"),
    ({"optimizer": {"weight_decay": -1e-4}}, "optimizer.weight_decay: must be >= 0"),
    ({"optimizer": {"momentum": 1.0}}, "optimizer.momentum: must be in [0, 1)"),
    ({"augment": {"normalization": {"mean": [0.5, 0.5, 0.5]}}},
     "augment.normalization.mean: needs 1 values (in_channels), got 3"),
    ({"augment": {"normalization": {"std": [0.0]}}}, "augment.normalization.std: values must be > 0"),
    ({"augment": {"views": []}}, "augment.views: at least one view spec is needed"),
    ({"augment": {"views": [{"size": 8, "blurr_p": 0.5}]}}, "augment.views[0].blurr_p: unknown key; allowed:"),
    ({"augment": {"views": [{"count": 2}]}}, "augment.views[0].size: missing"),
    ({"augment": {"views": [{"size": 8, "scale": [0.9, 0.1]}]}}, "augment.views[0].scale: needs 0 < low <= high"),
    ({"dataset": {"name": ""}}, "dataset.name: missing"),
])
def test_bad_values_name_the_key_and_the_fix(overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_suite("digits", overrides)
    assert expected in str(info.value)


def test_suite_files_by_path_and_their_errors(tmp_path):
    good = tmp_path / "mine.yaml"
    good.write_text("dataset: {name: digits}\nbackbone: small_cnn\nin_channels: 1\nimage_size: 8\n"
                    "augment: {normalization: {mean: [0.5], std: [0.5]}, views: [{size: 8}]}\n")
    config = load_suite(str(good))
    assert config["name"] == "mine" and config["_source"] == str(good)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochs: [\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        load_suite(str(bad))
    with pytest.raises(ConfigError, match="--suite: unknown suite 'digitz'; available: cifar10"):
        load_suite("digitz")


def test_merge_checked_keeps_the_defaults_untouched():
    defaults = {"a": {"b": 1, "c": [1, 2]}}
    snapshot = copy.deepcopy(defaults)
    merged = merge_checked(defaults, {"a": {"b": 5}})
    merged["a"]["c"].append(3)
    assert defaults == snapshot and merged == {"a": {"b": 5, "c": [1, 2, 3]}}


def test_method_settings_merge_the_optimizer_override():
    config = load_suite("digits", {"methods": {"simclr": {"optimizer": {"lr": 0.5}}}})
    hparams, optimizer = method_settings(config, "simclr")
    assert hparams == {"temperature": 0.2}
    assert optimizer == {**config["optimizer"], "lr": 0.5}
    with pytest.raises(ConfigError, match="methods.simclr.optimizer.betas: unknown key"):
        method_settings(load_suite("digits", {"methods": {"simclr": {"optimizer": {"betas": [0.9]}}}}), "simclr")
    with pytest.raises(ConfigError, match="methods.simclr: expected a mapping of hyperparameters"):
        method_settings(load_suite("digits", {"methods": {"simclr": 3}}), "simclr")


def test_parse_set_builds_nested_overrides_from_yaml_values():
    assert _parse_set(["train.epochs=3", "train.seeds=[0, 1]", "optimizer.name=adamw", "train.compile=true",
                       "evaluation.knn.ks=[20]"]) == {
        "train": {"epochs": 3, "seeds": [0, 1], "compile": True}, "optimizer": {"name": "adamw"},
        "evaluation": {"knn": {"ks": [20]}}}
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        _parse_set(["train.epochs"])
    with pytest.raises(ConfigError, match="empty key part"):
        _parse_set(["train..epochs=3"])
    with pytest.raises(ConfigError, match="cannot also hold keys"):
        _parse_set(["train=3", "train.epochs=2"])


def _fingerprint(overrides=None, method="simclr", seed=0):
    config = load_suite("digits", overrides)
    hparams, optimizer = method_settings(config, method)
    return training_fingerprint(config, method, hparams, optimizer, seed)


def test_training_fingerprint_covers_training_and_nothing_else():
    base = _fingerprint()
    assert base == _fingerprint()
    # what changes the trained weights changes the fingerprint ...
    for changed in [_fingerprint({"methods": {"simclr": {"temperature": 0.5}}}),
                    _fingerprint({"optimizer": {"lr": 0.1}}), _fingerprint({"train": {"batch_size": 64}}),
                    _fingerprint({"augment": {"views": [{"size": 8, "count": 2}]}}),
                    _fingerprint({"dataset": {"options": {"test_fraction": 0.5}}}),
                    _fingerprint(method="byol"), _fingerprint(seed=1)]:
        assert changed != base
    # ... evaluation, other methods' sections, the seed list and logging do not
    for same in [_fingerprint({"evaluation": {"knn": {"ks": [10]}}}),
                 _fingerprint({"methods": {"byol": {"momentum_base": 0.9}}}),
                 _fingerprint({"train": {"seeds": [0, 1, 2], "log_every_n_steps": 1, "tensorboard": True}})]:
        assert same == base
