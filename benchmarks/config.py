"""Suite configs: a YAML file plus `--set` overrides, validated once into one typed `SuiteConfig`.

One pydantic model per section (`dataset`, `train`, `optimizer`, `augment`, `evaluation` and each
protocol's settings, `launcher`); every method declares its hyperparameters as a model in its own
file (`SSLMethod.Hparams`). `load_suite` merges the overrides into the file's mapping, validates
the whole tree (unknown keys, types and ranges, with the dotted key in the error), then checks
what spans sections: loader options against the loader, normalisation against in_channels, every
`methods:` section against its method's model. Code reads attributes (`config.train.batch_size`).

Methods and named variants: `methods: {self_classifier: {...}, self_classifier/reimpl: {...}}`
configures the method `self_classifier` twice; the part before `/` is the registry name. A
section holds the method's hyperparameters plus optional overrides of the suite's `optimizer`,
`augment` (the method's own views, where its paper requires them) and `train` (`batch_size`,
`epochs`). `config.method(name)` returns the resolved settings (`MethodConfig`).

Inheritance: a suite file may say `base: cifar10` (a shipped suite, or a YAML file relative to it) and hold
only its differences; `read_suite_file` merges it over its base (`_inherit`: mappings key by key, lists and
scalars replace, `null` removes a key, `!replace` replaces a mapping whole), a base may have a base, and `name`
is never inherited.

The canonical dump (`canonical`) is what run records store, and what run fingerprints hash.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, PrivateAttr, SerializeAsAny, field_validator

from benchmarks.augment import ViewSpec
from benchmarks.errors import ConfigError, UnknownMethodError, did_you_mean
from benchmarks.evaluation.settings import EvaluationConfig
from ssl_common.typed import (
    AtLeastOne,
    MethodHparams,
    NonNegativeInt,
    OptimizerConfig,
    StrictModel,
    _Yaml12Loader,
    validate,
)

CONFIG_DIR = Path(__file__).parent / "configs"
PRECISIONS = ("auto", "32", "32-true", "bf16-mixed", "16-mixed", "bf16-true")


class DatasetConfig(StrictModel):
    name: str = ""
    display_name: str | None = None  # name in tables; default from the loader
    pretrain_split: str = "train"  # images used for self-supervised pretraining
    train_split: str = "train"  # labelled split: kNN bank, linear/semi training
    test_split: str = "test"
    options: dict[str, Any] = Field(default_factory=dict)  # the loader's options (checked against the loader)


class TrainConfig(StrictModel):
    epochs: NonNegativeInt = 200
    batch_size: int = 256
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    devices: Any = "auto"  # auto | N (| -1: all)
    strategy: str = "auto"  # auto | ddp | ddp_spawn ...
    num_nodes: AtLeastOne = 1
    precision: Any = "auto"  # auto (bf16-mixed on GPU, 32 on CPU) | 32 | bf16-mixed | 16-mixed
    num_workers: NonNegativeInt = 0  # DataLoader workers (ImageFolder data); in-memory data needs none
    channels_last: Any = "auto"  # auto = on for GPU | true | false
    compile: bool = False  # torch.compile the backbone
    deterministic: bool = True  # torch deterministic algorithms (CPU runs are bitwise reproducible)
    online_knn_every: NonNegativeInt = 1  # epochs between online kNN monitor evaluations (0 = off)
    online_knn_max_bank: NonNegativeInt = 10000  # cap on the bank size of the online monitor
    log_every_n_steps: AtLeastOne = 10
    logger: Literal["csv", "tensorboard", "wandb", "mlflow"] = "csv"  # extra tracker beside the CSV log
    # CPU threads of one run (torch intra-op, OMP/MKL). CPU results are bitwise reproducible only on the same
    # CPU model AND thread count, so the resolved number is part of the training fingerprint and the record.
    # auto: the CPUs this process may use (os.sched_getaffinity) shared between the runs and the DDP ranks that
    # run at once on this machine; under SLURM, the job's cpus_per_task (see resolve_threads)
    threads: Any = "auto"

    @field_validator("batch_size")
    @classmethod
    def _batch_size(cls, value: int) -> int:
        if value < 2:
            raise ValueError(f"must be >= 2 (self-supervised losses need pairs), got {value}")
        return value

    @field_validator("seeds", mode="before")
    @classmethod
    def _seeds(cls, value):
        if not isinstance(value, list) or not value or not all(
                isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value):
            raise ValueError(f"must be a non-empty list of non-negative integers, got {value}")
        return value

    @field_validator("devices", mode="before")
    @classmethod
    def _devices(cls, value):
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and (value >= 1 or value == -1)):
            return value
        raise ValueError(f"expected a number of devices (>= 1, or -1 for all) or 'auto', got {value!r}")

    @field_validator("precision", mode="before")
    @classmethod
    def _precision(cls, value):
        text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
        if text not in PRECISIONS:
            raise ValueError(f"got {value!r}; allowed: {', '.join(PRECISIONS)}")
        return text

    @field_validator("threads", mode="before")
    @classmethod
    def _threads(cls, value):
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError(f"expected a number of CPU threads (>= 1) or 'auto', got {value!r}")

    @field_validator("channels_last", mode="before")
    @classmethod
    def _channels_last(cls, value):
        if value == "auto" or isinstance(value, bool):
            return value
        raise ValueError(f"expected true, false or 'auto', got {value!r}")


# train.* keys that do not change what is trained (so they may differ between a run and its resume)
NON_TRAINING_KEYS = ("seeds", "num_workers", "log_every_n_steps", "logger", "online_knn_every",
                     "online_knn_max_bank")


class NormalizationConfig(StrictModel):
    mean: list[float] = Field(default_factory=lambda: [0.5])
    std: list[float] = Field(default_factory=lambda: [0.5])

    @field_validator("std")
    @classmethod
    def _std(cls, value: list[float]) -> list[float]:
        if any(s <= 0 for s in value):
            raise ValueError("values must be > 0")
        return value


class AugmentConfig(StrictModel):
    normalization: NormalizationConfig = Field(default_factory=NormalizationConfig)
    views: list[ViewSpec] = Field(default_factory=lambda: [ViewSpec(size=32, count=2)])

    @field_validator("views")
    @classmethod
    def _views(cls, value: list[ViewSpec]) -> list[ViewSpec]:
        if not value:
            raise ValueError("at least one view spec is needed")
        return value


class SlurmConfig(StrictModel):
    """submitit's SLURM parameters (`--launcher slurm`); a suite sets what fits its runs, `--slurm-*` flags win.

    `gpus_per_node` auto: none when the run trains on the CPU (`train.accelerator: cpu`), else one per device of
    the run. `cpus_per_task` auto: the run's threads (`train.threads`) plus its DataLoader workers, or
    DEFAULT_SLURM_CPUS when the threads are auto too (they then follow the CPUs SLURM gives the job)."""

    partition: str | None = None
    time_min: AtLeastOne = 24 * 60
    gpus_per_node: Any = "auto"
    cpus_per_task: Any = "auto"
    mem_gb: AtLeastOne = 32
    account: str | None = None
    array_parallelism: AtLeastOne = 64
    # a job that reaches its time limit (or is pre-empted) is requeued and resumes from its last epoch checkpoint,
    # at most this many times: generous, so a run longer than many time slots of its partition still finishes
    max_requeues: NonNegativeInt = 100
    signal_delay_s: AtLeastOne = 90  # SLURM signals the job this long before its time limit (then it requeues)
    poll_s: float = Field(30.0, gt=0)  # seconds between two looks at the queue while the jobs run
    extra: dict[str, Any] = Field(default_factory=dict)  # further submitit `slurm_*` parameters

    @field_validator("gpus_per_node", "cpus_per_task", mode="before")
    @classmethod
    def _count_or_auto(cls, value, info):
        minimum = 0 if info.field_name == "gpus_per_node" else 1
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= minimum):
            return value
        raise ValueError(f"expected a number (>= {minimum}) or 'auto', got {value!r}")


DEFAULT_SLURM_CPUS = 8


class LauncherConfig(StrictModel):
    """How the runs of a command are executed: one after another (`none`), N local worker processes
    (`local`), or a SLURM job array through submitit (`slurm`)."""

    name: Literal["none", "local", "slurm"] = "none"
    jobs: AtLeastOne = 1
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)



class TrainOverride(StrictModel):
    """What a method section may change of the suite's `train` section (its paper's batch and budget)."""

    batch_size: int | None = None
    epochs: int | None = None


class MethodConfig(StrictModel):
    """The resolved settings of one method or named variant, as it is trained and recorded."""

    name: str  # registry name, or `<registry name>/<variant>`
    method: str  # registry name
    variant: str | None = None
    display_name: str  # the row label in tables, e.g. "Self-Classifier (reimpl)"
    paper: str | None = None  # the paper (paper_results.csv's first column) this method or variant follows
    version: int = 1  # the method's code version (SSLMethod.version): part of the run fingerprint
    hparams: SerializeAsAny[MethodHparams]
    optimizer: OptimizerConfig
    augment: AugmentConfig
    batch_size: int
    epochs: int


class SuiteConfig(StrictModel):
    name: str = ""
    description: str = ""
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    backbone: str = "resnet18_cifar"
    backbone_options: dict[str, Any] = Field(default_factory=dict)  # the backbone's own options (small_cnn: width)
    in_channels: AtLeastOne = 3
    image_size: AtLeastOne = 32
    num_classes: AtLeastOne = 10
    methods_to_run: list[str] = Field(default_factory=list)  # default --methods
    references: list[str] = Field(default_factory=lambda: ["random_init", "supervised"])
    train: TrainConfig = Field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    launcher: LauncherConfig = Field(default_factory=LauncherConfig)
    # method or `method/variant` -> hyperparameters (+ optional optimizer / augment / train overrides)
    methods: dict[str, dict[str, Any]] = Field(default_factory=dict)

    _source: str | None = PrivateAttr(default=None)
    _resolved: dict[str, MethodConfig] = PrivateAttr(default_factory=dict)


    def __eq__(self, other) -> bool:
        """Equal settings (the suite file it came from and the resolved-method cache do not count)."""
        return isinstance(other, SuiteConfig) and self.model_dump(mode="json") == other.model_dump(mode="json")

    __hash__ = None

    @property
    def source(self) -> str | None:
        """The suite file this config was read from."""
        return self._source

    def canonical(self) -> dict:
        """The JSON-ready dump records store (the resolved settings, every default filled in). The launcher is
        left out: how runs are scheduled changes no result, and a run's record is the same whichever ran it."""
        return self.model_dump(mode="json", exclude={"launcher"})

    def method(self, name: str) -> MethodConfig:
        """The resolved settings of method `name` (a registry name or a `method/variant` of `methods:`)."""
        if name not in self._resolved:
            self._resolved[name] = resolve_method(self, name)
        return self._resolved[name]

    def method_names(self) -> list[str]:
        """Every method and variant this suite configures or runs by default."""
        return sorted(set(self.methods_to_run) | set(self.methods))


def base_method(name: str) -> tuple[str, str | None]:
    """`self_classifier/reimpl` -> (`self_classifier`, `reimpl`); `simclr` -> (`simclr`, None)."""
    method, sep, variant = name.partition("/")
    return method, (variant if sep else None)


MAX_FILE_NAME_BYTES = 255  # the file name limit of ext4, XFS, APFS and NTFS


def check_name_length(name: str, epochs: int, seeds: list[int]) -> None:
    """A method or variant name fits in the file names built from it (record, predictions, run folder):
    `<name>_e<epochs>_s<seed>_<12 hex>.predictions.npz` is at most 255 bytes, checked before any work."""
    from benchmarks.records import PREDICTIONS_SUFFIX, method_slug, record_stem

    longest = record_stem(name, epochs, max(seeds, default=0), "0" * 12) + PREDICTIONS_SUFFIX
    size = len(longest.encode("utf-8"))
    if size > MAX_FILE_NAME_BYTES:
        room = MAX_FILE_NAME_BYTES - (size - len(method_slug(name).encode("utf-8")))
        shown = name if len(name) <= 40 else f"{name[:37]}..."
        raise ConfigError(f"methods.{shown}: the name is {len(name.encode('utf-8'))} bytes long, so its record file "
                          f"name would be {size} bytes, over the {MAX_FILE_NAME_BYTES}-byte limit of file names; "
                          f"use a name of at most {room} bytes")


def _check_variant_name(name: str) -> None:
    method, variant = base_method(name)
    ok = bool(method) and method.replace("_", "").isalnum()
    if variant is not None:
        ok = ok and bool(variant) and variant.replace("_", "").replace("-", "").replace(".", "").isalnum()
    if not ok:
        raise ConfigError(f"methods.{name}: a method is named `<registry name>` or `<registry name>/<variant>` "
                          "(letters, digits, '_'; the variant also '-' and '.')")


def resolve_method(config: SuiteConfig, name: str) -> MethodConfig:
    """Validate the `methods.<name>` section against its method's model and merge it over the suite's."""
    from methods import get_method

    _check_variant_name(name)
    registry_name, variant = base_method(name)
    section = config.methods.get(name)
    if section is None and variant is not None:
        raise UnknownMethodError(f"unknown method variant '{name}': the suite has no `methods: {{{name}: ...}}` "
                                 f"section; configured: {', '.join(sorted(config.methods)) or '(none)'}"
                                 f"{did_you_mean(name, config.methods)}")
    cls = get_method(registry_name)
    section = dict(section or {})
    where = f"methods.{name}"
    optimizer = section.pop("optimizer", None)
    augment = section.pop("augment", None)
    train = validate(TrainOverride, section.pop("train", None), f"{where}.train")
    display = section.pop("display_name", None) or (f"{cls.display_name} ({variant})" if variant else cls.display_name)
    paper = section.pop("paper", cls.paper)
    for key, value in (("display_name", display), ("paper", paper)):
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{where}.{key}: expected str, got {value!r} ({type(value).__name__})")
    hparams = cls.resolve_hparams(section, where)
    optimizer = merge_optimizer(config.optimizer, optimizer, f"{where}.optimizer")
    augment_cfg = config.augment if augment is None else validate(
        AugmentConfig, _deep_merge(config.augment.model_dump(mode="json"), _mapping(augment, f"{where}.augment")),
        f"{where}.augment")
    _check_normalization(augment_cfg, config.in_channels, f"{where}.augment")
    epochs = config.train.epochs if train.epochs is None else train.epochs
    batch_size = config.train.batch_size if train.batch_size is None else train.batch_size
    validate(TrainConfig, {"epochs": epochs, "batch_size": batch_size}, f"{where}.train")
    check_name_length(name, epochs, config.train.seeds)
    return MethodConfig(name=name, method=registry_name, variant=variant, display_name=display, paper=paper,
                        version=cls.version, hparams=hparams, optimizer=optimizer, augment=augment_cfg,
                        batch_size=batch_size, epochs=epochs)


def command_line_budget(sections: dict, budget: dict) -> tuple[dict, dict[str, list[str]]]:
    """`--epochs` / `--batch-size` (`budget`: train key -> value) over the `train` values of the method sections
    (`sections`: the suite's `methods:` mapping): a section's budget is its default, the command line wins.

    Returns the `methods:` overrides that apply the budget to every section with its own value (so a launcher job
    that rebuilds the config from the overrides trains the same), and per section the notes on the values they
    replace."""
    overrides: dict = {}
    notes: dict[str, list[str]] = {}
    for name, section in sorted(sections.items()):
        train = section.get("train") if isinstance(section, dict) else None
        if not isinstance(train, dict):
            continue
        for key, value in budget.items():
            if train.get(key) is None:
                continue
            overrides.setdefault(name, {}).setdefault("train", {})[key] = value
            if train[key] != value:
                notes.setdefault(name, []).append(f"note: --{key.replace('_', '-')} {value} replaces "
                                                  f"methods.{name}.train.{key} ({train[key]}) for {name}")
    return overrides, notes


def merge_optimizer(base: OptimizerConfig, override: dict | None, where: str) -> OptimizerConfig:
    """`base` with the keys of `override` replaced, validated (errors name `where`.<key>)."""
    if override is None:
        return base
    return validate(OptimizerConfig, {**base.model_dump(), **_mapping(override, where)}, where)


def _mapping(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {value!r} ({type(value).__name__})")
    return value


def _deep_merge(base: dict, extra: dict) -> dict:
    """`extra` merged into a copy of `base` key by key (mappings merge, everything else is replaced)."""
    result = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = _deep_merge(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def available_suites() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def suite_path(suite: str) -> Path:
    """The suite file `--suite` names: a shipped suite, or a YAML file (relative to the working directory)."""
    return _suite_file(suite, "--suite")


def _suite_file(value: str, where: str, including_file: Path | None = None) -> Path:
    """The file a suite reference names: a shipped suite name (configs/<name>.yaml), or a .yaml path -- as given
    for --suite, relative to `including_file`'s folder (resolved) for its `base:`. Errors start with `where`."""
    if Path(value).suffix in (".yaml", ".yml"):
        candidate = Path(value) if including_file is None else (including_file.parent / value).resolve()
        if not candidate.is_file():
            hint = "" if including_file is None else " (a path is relative to the including file)"
            raise ConfigError(f"{where}: no such file {candidate.resolve()}{hint}")
        return candidate
    candidate = CONFIG_DIR / f"{value}.yaml"
    if not candidate.is_file():
        relative = "" if including_file is None else ", relative to this file"
        raise ConfigError(f"{where}: unknown suite '{value}'; available: {', '.join(available_suites())} "
                          f"(or a path to a .yaml file{relative}){did_you_mean(value, available_suites())}")
    return candidate


class Replace(dict):
    """A mapping tagged `!replace` in a suite file: it replaces its base's mapping instead of merging into it."""


class _SuiteLoader(_Yaml12Loader):
    """The YAML loader of suite files: YAML 1.2 floats plus the `!replace` tag."""


_SuiteLoader.add_constructor("!replace", lambda loader, node: Replace(loader.construct_mapping(node, deep=True)))


def _plain(value: Any) -> Any:
    """`value` with every `Replace` turned back into a plain dict (what the models and the YAML dump expect)."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def _inherit(base: dict, extra: dict) -> dict:
    """`extra` (a suite file) over `base` (its resolved base): mappings merge key by key, lists and scalars
    replace, `null` removes the key, and a mapping tagged `!replace` replaces the base's mapping whole (its own
    keys in its own order). A merged mapping keeps the base's key order; keys new to it come after."""
    result = copy.deepcopy(base)
    for key, value in extra.items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict) and not isinstance(value, Replace) and isinstance(result.get(key), dict):
            result[key] = _inherit(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def _base_path(value: Any, path: Path) -> Path:
    """The file `base: value` in the suite file `path` names: a shipped suite, or a YAML file relative to `path`."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{path}: base: expected a shipped suite name or a path to a .yaml file, got {value!r}")
    return _suite_file(value, f"{path}: base", including_file=path)


def _read_yaml_mapping(path: Path) -> dict:
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_SuiteLoader) or {}  # noqa: S506 (SafeLoader)
    except (UnicodeDecodeError, OSError) as exc:
        raise ConfigError(f"{path}: cannot be read ({exc})") from exc
    except Exception as exc:  # yaml.YAMLError and its subclasses
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a suite file is a mapping of sections, got {type(raw).__name__}")
    return raw


def read_suite_file(path: Path, _chain: tuple[Path, ...] = ()) -> dict:
    """The suite file's mapping with its `base:` chain resolved: the file merged over its base (see `_inherit`).
    `name` is never inherited: a file without one is named by `load_suite` after its own stem."""
    raw = _read_yaml_mapping(path)
    if "base" not in raw:
        return _plain(raw)
    resolved = Path(path).resolve()
    base_path = _base_path(raw.pop("base"), Path(path))
    if base_path.resolve() in (*_chain, resolved):
        cycle = " -> ".join(str(p) for p in (*_chain, resolved, base_path.resolve()))
        raise ConfigError(f"{path}: base: the chain of bases is a cycle ({cycle})")
    base = read_suite_file(base_path, (*_chain, resolved))
    base.pop("name", None)
    return _plain(_inherit(base, raw))


def load_suite(suite: str, overrides: dict | None = None) -> SuiteConfig:
    """Read the suite file, merge `overrides` (the same nesting) into it and validate everything once."""
    path = suite_path(suite)
    raw = _deep_merge(read_suite_file(path), overrides or {})
    raw.setdefault("name", raw.get("name") or path.stem)
    if not raw["name"]:
        raw["name"] = path.stem
    config = config_from_dict(raw)
    config._source = str(path)
    return config


def config_from_dict(raw: dict) -> SuiteConfig:
    """Validate a suite mapping (a YAML file's, or a record's `config`) into a SuiteConfig."""
    config = validate(SuiteConfig, raw)
    check_suite(config)
    return config


def _check_normalization(augment: AugmentConfig, in_channels: int, where: str) -> None:
    for key in ("mean", "std"):
        values = getattr(augment.normalization, key)
        if len(values) != in_channels:
            raise ConfigError(f"{where}.normalization.{key}: needs {in_channels} values (in_channels), "
                              f"got {len(values)}")


BLOCK_PROTOCOLS = ("knn_k10", "block_classifier")


def _fit_blocks(config: SuiteConfig) -> None:
    """The per-block protocols' `blocks`: unset, the backbone's own (benchmarks.backbones.default_blocks); set, they
    must exist in the backbone where the protocol runs (checked now, not after training)."""
    from benchmarks.backbones import backbone_blocks, default_blocks

    count = backbone_blocks(config.backbone, config.in_channels, **config.backbone_options)
    for protocol in BLOCK_PROTOCOLS:
        settings = getattr(config.evaluation, protocol)
        if "blocks" not in settings.model_fields_set:
            settings.blocks = default_blocks(count)
        missing = [b for b in settings.blocks if b > count]
        if missing and protocol in config.evaluation.protocols:
            fitted = default_blocks(count)
            raise ConfigError(f"evaluation.{protocol}.blocks: block {missing[0]} does not exist; the backbone "
                              f"{config.backbone} has {count} blocks; use blocks 1 to {count}, e.g. --set "
                              f"'evaluation.{protocol}.blocks={fitted}' (or leave the key unset: the default is "
                              f"{fitted})")


def check_suite(config: SuiteConfig) -> None:
    """What spans sections: the dataset and its options, the backbone, normalisation, every method section."""
    from benchmarks.backbones import BACKBONES, check_backbone_options
    from benchmarks.data import check_loader_options

    if not config.dataset.name:
        raise ConfigError("dataset.name: missing; name one of the loaders (see `python -m benchmarks list`)")
    check_loader_options(config.dataset.name, config.dataset.options,
                         [config.dataset.pretrain_split, config.dataset.train_split, config.dataset.test_split])
    if config.backbone not in BACKBONES:
        raise ConfigError(f"backbone: unknown backbone '{config.backbone}'; allowed: {', '.join(sorted(BACKBONES))}")
    check_backbone_options(config.backbone, config.backbone_options)
    _check_normalization(config.augment, config.in_channels, "augment")
    _fit_blocks(config)
    from methods import available_methods

    for name in config.methods:
        registry_name, _ = base_method(name)
        if registry_name not in available_methods():
            raise UnknownMethodError(f"methods.{name}: no method is registered under this name (the suite's "
                                     f"`methods` section configures registered methods; available: "
                                     f"{', '.join(available_methods())}). Fix the name, or import the module that "
                                     "registers it with --import MODULE_OR_FILE"
                                     f"{did_you_mean(registry_name, available_methods())}")
        if not isinstance(config.methods[name], dict):
            raise ConfigError(f"methods.{name}: expected a mapping of hyperparameters, got {config.methods[name]!r}")
        config.method(name)


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask: what a cgroup, `taskset` or a scheduler grants)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def ranks_per_run(train: TrainConfig) -> int:
    """Processes one run starts on this machine (DDP ranks; one without DDP)."""
    return train.devices if isinstance(train.devices, int) and train.devices > 1 else 1


def resolve_threads(config: SuiteConfig, concurrent_runs: int = 1) -> SuiteConfig:
    """`config` with `train.threads` as a number, and under the SLURM launcher its CPUs and GPUs per job too.

    - `--launcher slurm`: cpus_per_task auto = threads x ranks + DataLoader workers (DEFAULT_SLURM_CPUS when
      the threads are auto as well); threads auto = what the job's CPUs leave per rank; gpus_per_node auto =
      0 for a CPU run (`train.accelerator: cpu`), else one per rank. Threads that need more CPUs than the job
      asks for are refused.
    - otherwise: threads auto = the CPUs of this process split between the runs that go at once
      (`concurrent_runs`, the local launcher's jobs) and the ranks of each run.
    The number is applied to every run (benchmarks.runner) and is part of its training fingerprint."""
    train, launcher = config.train, config.launcher
    ranks, threads = ranks_per_run(train), train.threads
    update: dict[str, Any] = {}
    if launcher.name == "slurm":
        slurm = launcher.slurm
        cpus = slurm.cpus_per_task
        if cpus == "auto":
            cpus = threads * ranks + train.num_workers if threads != "auto" else DEFAULT_SLURM_CPUS
        if threads == "auto":
            threads = max(1, (cpus - train.num_workers) // ranks)
        elif threads * ranks + train.num_workers > cpus:
            raise ConfigError(f"train.threads: {threads} thread(s) x {ranks} rank(s) + {train.num_workers} DataLoader "
                              f"worker(s) need more than the {cpus} CPUs per job of launcher.slurm.cpus_per_task; "
                              f"raise --slurm-cpus to {threads * ranks + train.num_workers} or lower --threads")
        gpus = slurm.gpus_per_node
        if gpus == "auto":
            gpus = 0 if train.accelerator == "cpu" else ranks
        update["launcher"] = launcher.model_copy(update={"slurm": slurm.model_copy(
            update={"cpus_per_task": cpus, "gpus_per_node": gpus})})
    elif threads == "auto":
        threads = max(1, available_cpus() // max(1, concurrent_runs * ranks))
    update["train"] = train.model_copy(update={"threads": threads})
    return config.model_copy(update=update)


# ----------------------------------------------------------------------------- fingerprints

def fingerprint(payload: Any) -> str:
    """12 hex digits of the SHA-256 of the canonical JSON of `payload` (sorted keys, no whitespace)."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def training_payload(config: SuiteConfig, method: MethodConfig, seed: int | None) -> dict:
    """Everything that decides the trained weights: data, backbone, views, schedule, method, seed (None:
    the same without the seed, i.e. what all seeds of one experiment share).

    Evaluation settings, other methods' sections, the seed list, the launcher and logging options are
    left out, so changing them neither retrains nor stops a run from resuming -- except the online linear
    probe's settings where that protocol is on: the probe is trained with the backbone."""
    dataset = config.dataset.model_dump(mode="json", exclude={"display_name"})
    train = config.train.model_dump(mode="json", exclude=set(NON_TRAINING_KEYS) | {"epochs", "batch_size"})
    payload = {"suite": config.name, "dataset": dataset, "backbone": config.backbone,
               "backbone_options": config.backbone_options,
               "in_channels": config.in_channels, "image_size": config.image_size, "num_classes": config.num_classes,
               "train": train, "method": method.model_dump(mode="json", exclude={"display_name", "paper"})}
    if "online_linear" in config.evaluation.protocols:
        payload["online_linear"] = config.evaluation.online_linear.model_dump(mode="json")
    if seed is not None:
        payload["seed"] = int(seed)
    return payload


def training_fingerprint(config: SuiteConfig, method: MethodConfig, seed: int) -> str:
    return fingerprint(training_payload(config, method, seed))


def settings_fingerprint(config: SuiteConfig, method: MethodConfig) -> str:
    """The training fingerprint without the seed: one experiment (one table row) over its seeds."""
    return fingerprint(training_payload(config, method, None))


def evaluation_fingerprint(config: SuiteConfig) -> str:
    """The protocols' settings; not which protocols run, nor the inference batch size: a record of the same
    settings gains the protocols it lacks (run and evaluate add them) instead of a second record."""
    return fingerprint(config.evaluation.model_dump(mode="json", exclude={"protocols", "batch_size"}))


def run_fingerprint(training: str, evaluation: str) -> str:
    """The record file's fingerprint: the training and the evaluation fingerprints together."""
    return fingerprint({"training": training, "evaluation": evaluation})


def run_fingerprints(config: SuiteConfig, method: MethodConfig, seed: int) -> dict[str, str]:
    """The record's `fingerprints`: training (names the checkpoint folder), settings, evaluation and run (the
    record file's name: training + evaluation, so any changed setting is another record, never the old one)."""
    training, evaluation = training_fingerprint(config, method, seed), evaluation_fingerprint(config)
    return {"training": training, "settings": settings_fingerprint(config, method), "evaluation": evaluation,
            "run": run_fingerprint(training, evaluation)}


def flatten(payload: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: settings side by side, to name the keys in which two runs differ."""
    if isinstance(payload, dict):
        out: dict[str, Any] = {}
        for key, value in payload.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: payload}


def differing_keys(a: dict, b: dict) -> list[str]:
    fa, fb = flatten(a), flatten(b)
    return sorted(k for k in set(fa) | set(fb) if fa.get(k, "<unset>") != fb.get(k, "<unset>"))


def json_schema() -> dict:
    """The JSON schema of a suite file, for editors (method sections are free-form mappings here: each
    method's own model is printed by `python -m benchmarks config --method NAME`)."""
    from benchmarks.data import IMAGEFOLDER_LAYOUT, OPTIONS, available_datasets

    schema = SuiteConfig.model_json_schema()
    schema["title"] = "ssl-cluster-bench suite file"
    schema["properties"]["base"] = {
        "type": "string", "title": "Base",
        "description": "the suite this file holds the differences from: a shipped suite's name (e.g. cifar10) or "
                       "a path to a .yaml file relative to this file. The file is merged over its base recursively: "
                       "mappings merge key by key, lists and scalars replace, `null` removes an inherited key, a "
                       "mapping tagged `!replace` replaces the base's mapping whole; a base may have a base; `name` "
                       "is never inherited (default: this file's stem)"}
    dataset = schema["$defs"]["DatasetConfig"]["properties"]
    dataset["name"]["description"] = (f"the loader: {', '.join(available_datasets())}. Its files are found under "
                                      "`--data-root` (default $SSL_BENCH_DATA or ./data); imagefolder: your own "
                                      f"images, ROOT = --data-root:\n{IMAGEFOLDER_LAYOUT.strip()}")
    dataset["display_name"]["description"] = ("the dataset's name in records and the report (default: the loader's, "
                                              "e.g. CIFAR-10; for imagefolder the suite's name)")
    for split in ("pretrain_split", "train_split", "test_split"):
        dataset[split]["description"] = {"pretrain_split": "images for self-supervised pretraining",
                                         "train_split": "labelled split: kNN bank, linear and semi-supervised training",
                                         "test_split": "the split every metric is measured on"}[split]
    folder = OPTIONS["imagefolder"].model_json_schema()
    dataset["options"]["description"] = (
        "the loader's options (checked against the loader named in `name`). imagefolder: "
        + "; ".join(f"{key} ({spec.get('type', 'any')}): {spec.get('description', '')}"
                    for key, spec in folder["properties"].items())
        + ". Other loaders: " + ", ".join(f"{name} ({', '.join(OPTIONS[name].model_fields) or 'none'})"
                                          for name in available_datasets() if name != "imagefolder"))
    dataset["options"]["properties"] = folder["properties"]  # editors complete imagefolder's options
    return schema
