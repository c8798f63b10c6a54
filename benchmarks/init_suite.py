"""`python -m benchmarks init-suite --from-folder DIR --out my_suite.yaml`: a suite file for your own images.

DIR is an ImageFolder (ROOT/<split>/<class>/<image>, the folder later passed as `--data-root`). The suite is
inferred from the images so that it runs without edits:
- classes: the sorted union of the class folders (as the loader numbers them); the test split is `test`,
  else `val`;
- channels: 1 when every sampled image is grey (grey files, or colour files whose channels are equal), else 3;
- image size: the median shorter side of the sampled images (at most 224): the loader resizes the shorter
  side to it and crops the centre;
- normalization: the per-channel mean and standard deviation of the sampled images, decoded exactly as the
  loader decodes them;
- views of that size (grey: no colour jitter), a backbone that fits it (small_cnn below 32 px, the CIFAR
  ResNet-18 up to 64 px, the ImageNet ResNet-18 above), a batch no larger than the train split, kNN k's no
  larger than its bank.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from benchmarks.errors import ConfigError

SAMPLE_IMAGES = 512  # images read to infer channels, size and normalization (evenly spread over the train split)
MAX_IMAGE_SIZE = 224
IN_MEMORY_BYTES = 2 * 2**30  # decoded train + test below this: decode once at load (`in_memory: true`)


def add_init_suite_parser(subparsers) -> None:
    init = subparsers.add_parser(
        "init-suite", help="write a suite file for your own ImageFolder of images",
        description="Write a suite YAML for a folder of images laid out as DIR/<split>/<class>/<image> (splits: "
        "train, and test or val), inferring the channels, image size, classes and normalization (per-channel "
        "mean/std) from the images, with views and a backbone that fit them. Run it with "
        "`python -m benchmarks run --suite my_suite.yaml --data-root DIR`.")
    init.add_argument("--from-folder", required=True, metavar="DIR",
                      help="the ImageFolder root (later given to run as --data-root)")
    init.add_argument("--out", required=True, metavar="FILE", help="the suite file to write, e.g. my_suite.yaml")
    init.add_argument("--name", help="suite name, also the dataset's name in the report (default: the file name)")
    init.add_argument("--force", action="store_true", help="overwrite --out if it exists")


def cmd_init_suite(args) -> int:
    out = Path(args.out)
    if out.suffix not in (".yaml", ".yml"):
        raise ConfigError(f"--out {out}: a suite file ends in .yaml (run reads --suite PATH.yaml); e.g. "
                          f"--out {out.with_suffix('.yaml').name}")
    if out.exists() and not args.force:
        raise ConfigError(f"--out {out}: exists; pass --force to overwrite it or choose another file")
    name = args.name or out.stem
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ConfigError(f"--name {name!r}: a suite name is letters, digits, '_', '-' and '.' (it names the "
                          "results folder); pass --name my_suite")
    suite, summary = infer_suite(Path(args.from_folder), name)
    from benchmarks.config import config_from_dict
    from benchmarks.records import atomic_write_text

    config_from_dict(suite)  # what is written is a valid suite
    atomic_write_text(out, suite_yaml(suite, Path(args.from_folder)))
    print(summary)
    print(f"suite written to {out}; run it with:\n  python -m benchmarks run --suite {out} --data-root "
          f"{args.from_folder}")
    return 0


def _split_files(root: Path, split: str, classes: list[str]) -> tuple[list[Path], list[int]]:
    from benchmarks.data import _is_image

    files, labels = [], []
    for label, name in enumerate(classes):
        folder = root / split / name
        if folder.is_dir():
            images = sorted(p for p in folder.iterdir() if _is_image(p))
            files += images
            labels += [label] * len(images)
    return files, labels


def _inferred_splits(root: Path) -> tuple[list[str], list[Path], list[Path], str]:
    """The classes, the train and test image files and the test split's name (test, else val) of the ImageFolder
    at `root`; a folder without train/, a test split, 2 classes or images in both splits is refused."""
    from benchmarks.data import IMAGEFOLDER_LAYOUT, imagefolder_classes

    layout = IMAGEFOLDER_LAYOUT.replace("ROOT", str(root))
    if not (root / "train").is_dir():
        raise ConfigError(f"--from-folder {root}: no train/ folder; expected layout:\n{layout}")
    test_split = next((s for s in ("test", "val") if (root / s).is_dir()), None)
    if test_split is None:
        raise ConfigError(f"--from-folder {root}: no test/ (or val/) folder to evaluate on; move some images of each "
                          f"class there. Expected layout:\n{layout}")
    classes = imagefolder_classes(root)
    train_files, _ = _split_files(root, "train", classes)
    test_files, _ = _split_files(root, test_split, classes)
    if len(classes) < 2 or not train_files or not test_files:
        raise ConfigError(f"--from-folder {root}: needs at least 2 class folders with images in train/ and "
                          f"{test_split}/ (found {len(classes)} classes, {len(train_files)} train and "
                          f"{len(test_files)} {test_split} images). Expected layout:\n{layout}")
    return classes, train_files, test_files, test_split


@dataclass
class ImageStats:
    """What init-suite measures on the sampled images."""

    size: int  # the median shorter side (at most MAX_IMAGE_SIZE)
    grey: bool
    mean: list[float]  # per channel, of the images decoded as the loader decodes them, in [0, 1]
    std: list[float]

    @property
    def channels(self) -> int:
        return 1 if self.grey else 3


def _measure_images(root: Path, sample: list[Path]) -> ImageStats:
    """Size, greyness and per-channel mean/std of the `sample` images (size from the files' headers, the rest from
    the images decoded at that size)."""
    import numpy as np
    from PIL import Image

    from benchmarks.data import ImageFolderReader

    sides = []
    for path in sample:
        try:
            with Image.open(path) as im:
                sides.append(min(im.size))
        except Exception as exc:  # PIL raises many types for a broken file
            raise ConfigError(f"{path}: unreadable image ({exc}); remove or replace it") from exc
    size = int(min(np.median(sides), MAX_IMAGE_SIZE))
    if size < 8:
        raise ConfigError(f"--from-folder {root}: the images are {size} px on their shorter side; the backbones need "
                          "at least 8 px")
    reader = ImageFolderReader(sample, size, channels=3)
    pixels = np.stack([reader(i).numpy() for i in range(len(sample))]).astype(np.float64) / 255.0  # [N, 3, S, S]
    grey = bool(np.all(pixels[:, 0] == pixels[:, 1]) and np.all(pixels[:, 1] == pixels[:, 2]))
    pixels = pixels[:, :1] if grey else pixels
    mean = [round(float(m), 4) for m in pixels.mean(axis=(0, 2, 3))]
    std = [max(round(float(s), 4), 1e-3) for s in pixels.std(axis=(0, 2, 3))]
    return ImageStats(size, grey, mean, std)


def infer_suite(root: Path, name: str) -> tuple[dict, str]:
    """The suite mapping for the ImageFolder at `root`, and a summary of what was inferred."""
    classes, train_files, test_files, test_split = _inferred_splits(root)
    step = max(1, len(train_files) // SAMPLE_IMAGES)
    sample = train_files[::step][:SAMPLE_IMAGES]
    stats = _measure_images(root, sample)
    size, grey, channels = stats.size, stats.grey, stats.channels
    backbone = "small_cnn" if size < 32 else ("resnet18_cifar" if size <= 64 else "resnet18")
    view = {"size": size, "count": 2, "scale": [0.5, 1.0] if size < 32 else [0.2, 1.0]}
    if grey:
        view.update({"saturation": 0.0, "hue": 0.0, "grayscale_p": 0.0})
    n_train = len(train_files)
    ks = [k for k in (20, 200) if k <= n_train] or [max(1, n_train // 2)]
    decoded = (n_train + len(test_files)) * channels * size * size
    suite = {
        "name": name,
        "description": f"ImageFolder {root.name}: {len(classes)} classes, {n_train} train and {len(test_files)} "
                       f"{test_split} images, {channels}x{size}x{size} (written by init-suite)",
        "dataset": {"name": "imagefolder", "display_name": name, "train_split": "train", "pretrain_split": "train",
                    "test_split": test_split,
                    "options": {"image_size": size, "channels": channels, "in_memory": decoded < IN_MEMORY_BYTES}},
        "backbone": backbone,
        "in_channels": channels,
        "image_size": size,
        "num_classes": len(classes),
        "methods_to_run": ["simclr", "byol"],
        "train": {"epochs": 100, "batch_size": min(256, n_train), "seeds": [0, 1, 2]},
        "augment": {"normalization": {"mean": stats.mean, "std": stats.std}, "views": [view]},
        "evaluation": {"protocols": ["knn", "linear", "clustering"], "knn": {"ks": ks}},
    }
    summary = (f"{root}: {len(classes)} classes ({', '.join(classes[:8])}{', ...' if len(classes) > 8 else ''}), "
               f"{n_train} train / {len(test_files)} {test_split} images; from {len(sample)} of them: "
               f"{'grey' if grey else 'colour'} ({channels} channel(s)), {size} px, mean {stats.mean}, "
               f"std {stats.std}; backbone {backbone}")
    return suite, summary


def suite_yaml(suite: dict, root: Path) -> str:
    import yaml

    header = (f"# A suite for the ImageFolder {root} (python -m benchmarks init-suite). Its layout:\n"
              "#   ROOT/<split>/<class>/<image>.{png,jpg,...}   ROOT = --data-root of `run`\n"
              f"# Run: python -m benchmarks run --suite THIS_FILE --data-root {root}\n"
              "# channels, image size, classes and normalization were measured on the images; edit freely\n"
              "# (`python -m benchmarks config --suite THIS_FILE` prints every resolved setting).\n")
    return header + yaml.safe_dump(suite, sort_keys=False, default_flow_style=None, width=110)

