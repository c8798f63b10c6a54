"""Suite configs: YAML files holding the shared protocol and per-method hyperparameters.

A suite file is merged over `SUITE_DEFAULTS`; the defaults double as the schema:
a key that is not in them is an error naming the key and the allowed ones, and a
value must have the default's type. Method sections are checked against each
method's own `default_hparams` (plus an optional `optimizer` override).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import yaml

from benchmarks.errors import ConfigError

CONFIG_DIR = Path(__file__).parent / "configs"

# Any value may be None where the default is None ("not set"): such keys accept any type.
SUITE_DEFAULTS: dict[str, Any] = {
    "name": "",
    "description": "",
    "dataset": {
        "name": "",
        "display_name": None,  # name in tables; default from the loader
        "pretrain_split": "train",  # images used for self-supervised pretraining
        "train_split": "train",  # labelled split: kNN bank, linear/semi training
        "test_split": "test",
        "options": {},  # passed to the loader (e.g. image_size for imagefolder)
    },
    "backbone": "resnet18_cifar",
    "in_channels": 3,
    "image_size": 32,
    "num_classes": 10,
    "methods_to_run": [],  # default --methods
    "references": ["random_init", "supervised"],
    "train": {
        "epochs": 200,
        "batch_size": 256,
        "seeds": [0, 1, 2],
        "accelerator": "auto",  # auto | cpu | gpu
        "devices": "auto",  # auto | N
        "strategy": "auto",  # auto | ddp | ddp_spawn ...
        "num_nodes": 1,
        "precision": "auto",  # auto (bf16-mixed on GPU, 32 on CPU) | 32 | bf16-mixed | 16-mixed
        "num_workers": 0,  # DataLoader workers (ImageFolder data); in-memory data needs none
        "channels_last": "auto",  # auto = on for GPU
        "compile": False,  # torch.compile the backbone
        "deterministic": True,  # torch deterministic algorithms (CPU runs are bitwise reproducible)
        "online_knn_every": 1,  # epochs between online kNN monitor evaluations (0 = off)
        "online_knn_max_bank": 10000,  # cap on the bank size of the online monitor
        "log_every_n_steps": 10,
        "tensorboard": False,
    },
    "optimizer": {
        "name": "sgd",  # sgd | lars | adamw
        "lr": 0.03,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "warmup_epochs": 0,
        "final_lr_fraction": 0.001,  # cosine decay from lr to lr * this (dissertation: 0.6 -> 0.0006)
        "lr_scale_batch": 0,  # if > 0: lr *= batch_size / lr_scale_batch
    },
    "augment": {
        "normalization": {"mean": [0.5], "std": [0.5]},
        "views": [{"size": 32, "count": 2}],
    },
    "evaluation": {},  # validated by benchmarks.evaluation (its own defaults)
    "methods": {},  # method name -> hyperparameters (+ optional "optimizer" overrides)
}

OPTIMIZERS = ("sgd", "lars", "adamw")
PRECISIONS = ("auto", "32", "32-true", "bf16-mixed", "16-mixed", "bf16-true")


def _kind_ok(default: Any, value: Any) -> bool:
    if default is None or value is None:
        return True
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if isinstance(default, str) and default == "auto":
        return isinstance(value, (str, int))
    return isinstance(value, type(default))


# Sections whose keys are checked by their own schema later, not against the suite file: method
# hyperparameters (each method's default_hparams), evaluation (benchmarks.evaluation's defaults) and
# loader options (the loader's signature). Overrides merge into them key by key.
FREE_FORM = ("methods", "evaluation", "dataset.options")


def _merge_free(base: dict, extra: dict, path: str) -> dict:
    result = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = _merge_free(result[key], value, f"{path}.{key}")
        else:
            result[key] = copy.deepcopy(value)
    return result


def merge_checked(defaults: dict, given: dict | None, path: str = "") -> dict:
    """Deep-merge `given` over `defaults`, refusing unknown keys and wrong types."""
    result = copy.deepcopy(defaults)
    if given is None:
        return result
    if not isinstance(given, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(given).__name__}")
    for key, value in given.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in defaults:
            allowed = ", ".join(sorted(map(str, defaults))) or "(none)"
            raise ConfigError(f"{where}: unknown key; allowed: {allowed}")
        default = defaults[key]
        if where in FREE_FORM:
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"{where}: expected a mapping, got {value!r} ({type(value).__name__})")
            result[key] = _merge_free(default or {}, value or {}, where)
            continue
        if isinstance(default, dict) and default and isinstance(value, dict):
            result[key] = merge_checked(default, value, where)
        elif not _kind_ok(default, value):
            raise ConfigError(f"{where}: expected {type(default).__name__}, got {value!r} ({type(value).__name__})")
        else:
            result[key] = float(value) if isinstance(default, float) and isinstance(value, int) else value
    return result


def available_suites() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def suite_path(suite: str) -> Path:
    path = Path(suite)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"--suite: no such file {path.resolve()}")
        return path
    candidate = CONFIG_DIR / f"{suite}.yaml"
    if not candidate.is_file():
        raise ConfigError(f"--suite: unknown suite '{suite}'; available: {', '.join(available_suites())} "
                          "(or a path to a .yaml file)")
    return candidate


def load_suite(suite: str, overrides: dict | None = None) -> dict:
    """Load, merge and validate a suite config. `overrides` uses the same nesting."""
    path = suite_path(suite)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    config = merge_checked(SUITE_DEFAULTS, raw)
    if overrides:
        config = merge_checked(config, overrides)
    if not config["name"]:
        config["name"] = path.stem
    config["_source"] = str(path)
    check_suite(config)
    return config


def check_suite(config: dict) -> None:
    """Range checks the type-based merge cannot express."""
    train, opt = config["train"], config["optimizer"]
    if not config["dataset"]["name"]:
        raise ConfigError("dataset.name: missing; name one of the loaders (see benchmarks.data)")
    if train["epochs"] < 0:
        raise ConfigError(f"train.epochs: must be >= 0, got {train['epochs']}")
    if train["batch_size"] < 2:
        raise ConfigError(f"train.batch_size: must be >= 2 (self-supervised losses need pairs), got {train['batch_size']}")
    if not train["seeds"] or not all(isinstance(s, int) and s >= 0 for s in train["seeds"]):
        raise ConfigError(f"train.seeds: must be a non-empty list of non-negative integers, got {train['seeds']}")
    if str(train["precision"]) not in PRECISIONS:
        raise ConfigError(f"train.precision: got {train['precision']!r}; allowed: {', '.join(PRECISIONS)}")
    check_optimizer(opt, "optimizer")
    norm = config["augment"]["normalization"]
    for key in ("mean", "std"):
        if len(norm[key]) != config["in_channels"]:
            raise ConfigError(f"augment.normalization.{key}: needs {config['in_channels']} values "
                              f"(in_channels), got {len(norm[key])}")
    if any(s <= 0 for s in norm["std"]):
        raise ConfigError("augment.normalization.std: values must be > 0")
    if not config["augment"]["views"]:
        raise ConfigError("augment.views: at least one view spec is needed")
    from benchmarks.augment import ViewSpec

    allowed = set(ViewSpec.__dataclass_fields__)
    for i, view in enumerate(config["augment"]["views"]):
        unknown = set(view) - allowed
        if unknown:
            raise ConfigError(f"augment.views[{i}].{sorted(unknown)[0]}: unknown key; allowed: {', '.join(sorted(allowed))}")
        if "size" not in view:
            raise ConfigError(f"augment.views[{i}].size: missing")
        scale = view.get("scale", (0.2, 1.0))
        if not (0 < scale[0] <= scale[1] <= 1):
            raise ConfigError(f"augment.views[{i}].scale: needs 0 < low <= high <= 1, got {scale}")


def check_optimizer(opt: dict, where: str) -> None:
    if opt["name"] not in OPTIMIZERS:
        raise ConfigError(f"{where}.name: got {opt['name']!r}; allowed: {', '.join(OPTIMIZERS)}")
    if not (opt["lr"] > 0 and math.isfinite(opt["lr"])):
        raise ConfigError(f"{where}.lr: must be a positive number, got {opt['lr']}")
    if opt["weight_decay"] < 0:
        raise ConfigError(f"{where}.weight_decay: must be >= 0, got {opt['weight_decay']}")
    if not 0 <= opt["momentum"] < 1:
        raise ConfigError(f"{where}.momentum: must be in [0, 1), got {opt['momentum']}")


def method_settings(config: dict, method: str) -> tuple[dict, dict]:
    """(hyperparameters, optimizer) for `method` in this suite; the optimizer merges over the suite's."""
    section = config["methods"].get(method) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"methods.{method}: expected a mapping of hyperparameters, got {section!r}")
    section = dict(section)
    opt_override = section.pop("optimizer", None)
    optimizer = merge_checked(config["optimizer"], opt_override, f"methods.{method}.optimizer")
    check_optimizer(optimizer, f"methods.{method}.optimizer")
    return section, optimizer
