"""A suite's data: the pretraining, labelled train and test splits, checked against the suite config.

Kept apart from benchmarks.runner so that loading (and failing to find) a dataset needs only
torch and the loaders: a missing dataset is reported within seconds, before Lightning, the
methods and the evaluation libraries are imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from benchmarks.data import ImageDataset, dataset_display_name, load_split
from benchmarks.errors import ConfigError


@dataclass
class SuiteData:
    pretrain: ImageDataset  # unlabelled images for self-supervised pretraining
    train: ImageDataset  # labelled train split (kNN bank, linear/semi training, supervised reference)
    test: ImageDataset
    num_classes: int
    display_name: str


def load_suite_data(config: dict, data_root: str | Path | None = None, download: bool = False) -> SuiteData:
    ds = config.dataset
    root = data_root if data_root is not None else None
    opts = dict(ds.options)

    def load(split):
        return load_split(ds.name, split, root, download=download, **opts)

    train = load(ds.train_split)
    test = load(ds.test_split)
    pretrain = train if ds.pretrain_split == ds.train_split else load(ds.pretrain_split)
    data = SuiteData(pretrain, train, test, config.num_classes, dataset_name(config, data_root))
    check_data_matches(config, data)
    return data


def dataset_name(config, data_root: str | Path | None) -> str:
    """The dataset's name in records and the report: dataset.display_name, else the loader's (CIFAR-10, ...);
    your own ImageFolder is named after the suite (or its folder), not "ImageFolder"."""
    ds = config.dataset
    if ds.display_name:
        return ds.display_name
    if ds.name == "imagefolder":
        return config.name or (Path(data_root).resolve().name if data_root is not None else "ImageFolder")
    return dataset_display_name(ds.name)


def check_data_matches(config: dict, data: SuiteData) -> None:
    channels, height, width = data.train.image_shape
    if channels != config.in_channels:
        raise ConfigError(f"in_channels: the suite says {config.in_channels} but {data.train.name} images have "
                          f"{channels} channel(s); set in_channels: {channels} (and a matching normalization)")
    for split in (data.pretrain, data.test):
        if split is not data.train and split.image_shape != data.train.image_shape:
            raise ConfigError(f"dataset: the {split.split} split of {split.name} has {split.image_shape} images but "
                              f"the {data.train.split} split has {data.train.image_shape}; all splits must match")
    if (height, width) != (config.image_size, config.image_size):
        raise ConfigError(f"image_size: the suite says {config.image_size} but {data.train.name} images are "
                          f"{height}x{width}; set image_size: {height}"
                          + (" (or dataset.options.image_size for imagefolder data)" if height == width else ""))
    views = [(f"augment.views[{i}]", v) for i, v in enumerate(config.augment.views)]
    views += [(f"methods.{name}.augment.views[{i}]", v) for name in config.methods
              for i, v in enumerate(config.method(name).augment.views) if config.methods[name].get("augment")]
    for where, view in views:
        if view.size > min(height, width):
            raise ConfigError(f"{where}.size: {view.size} is larger than the {height}x{width} images of "
                              f"{data.train.name}; views are crops of an image, so use size <= {min(height, width)}")
    if data.train.num_classes != config.num_classes:
        raise ConfigError(f"num_classes: the suite says {config.num_classes} but {data.train.name} has "
                          f"{data.train.num_classes} classes")
    for split in (data.train, data.test):
        labels = split.labels
        if len(labels) == 0:
            raise ConfigError(f"dataset: the {split.split} split of {split.name} is empty")
        if (labels < 0).any() or (labels >= config.num_classes).any():
            raise ConfigError(f"dataset: the {split.split} split of {split.name} must be fully labelled with "
                              f"labels in [0, {config.num_classes})")
