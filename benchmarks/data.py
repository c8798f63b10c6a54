"""Datasets as uint8 image tensors, read from their standard on-disk layouts.

Every loader returns an `ImageDataset`: images as uint8 [N, C, H, W] (in memory, or
decoded lazily for ImageFolder data), int64 labels (-1 where unlabelled) and the
class names. Augmentation happens later on whole batches (benchmarks.augment), on
the training device, so no per-image PIL work sits between the loader and the GPU.

Supported names (`load_split(name, split, root)`):
    digits       scikit-learn's embedded 8x8 digits; fixed stratified train/test split
    mnist        idx files (train-images-idx3-ubyte[.gz], ...)
    cifar10      cifar-10-batches-py/ (python pickle batches)
    cifar100     cifar-100-python/ (fine labels)
    cifar100-20  cifar-100-python/ with the 20 super-class (coarse) labels
    stl10        stl10_binary/ (train, test, unlabeled)
    imagefolder  any folder of class sub-folders: ROOT/<split>/<class>/<image>
"""

from __future__ import annotations

import gzip
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from benchmarks.errors import ConfigError, DatasetCorruptError, DatasetNotFoundError

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


@dataclass
class ImageDataset:
    """A split of an image dataset.

    `images` holds every image as uint8 [N, C, H, W] for in-memory datasets; lazy
    datasets (ImageFolder) set `images=None` and decode through `read_image(i)`.
    """

    name: str
    split: str
    labels: torch.Tensor  # int64 [N]; -1 = no label (e.g. STL-10 unlabeled)
    classes: list[str]
    images: torch.Tensor | None = None
    read_image: Callable[[int], torch.Tensor] | None = field(default=None, repr=False)
    num_images: int | None = None

    def __post_init__(self) -> None:
        if self.images is not None:
            if self.images.dtype != torch.uint8 or self.images.dim() != 4:
                raise ValueError(f"{self.name}/{self.split}: images must be uint8 [N,C,H,W], got "
                                 f"{self.images.dtype} {tuple(self.images.shape)}")
            if len(self.images) != len(self.labels):
                raise ValueError(f"{self.name}/{self.split}: {len(self.images)} images but {len(self.labels)} labels")
            self.num_images = len(self.images)
        elif self.read_image is None:
            raise ValueError("an ImageDataset needs `images` or `read_image`")
        elif self.num_images is None:
            self.num_images = len(self.labels)

    @property
    def in_memory(self) -> bool:
        return self.images is not None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return int(self.num_images)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        if self.images is not None:
            return tuple(self.images.shape[1:])
        return tuple(self.read_image(0).shape)

    def get_batch(self, indices: torch.Tensor) -> torch.Tensor:
        """uint8 [B, C, H, W] for the given indices."""
        if self.images is not None:
            return self.images[indices]
        return torch.stack([self.read_image(int(i)) for i in indices])

    def subset(self, indices: torch.Tensor, split: str | None = None) -> ImageDataset:
        indices = torch.as_tensor(indices, dtype=torch.long)
        if self.images is not None:
            return ImageDataset(self.name, split or self.split, self.labels[indices], self.classes,
                                images=self.images[indices])
        base = self.read_image
        return ImageDataset(self.name, split or self.split, self.labels[indices], self.classes,
                            read_image=lambda i: base(int(indices[i])), num_images=len(indices))

    @property
    def is_labelled(self) -> bool:
        return bool((self.labels >= 0).all())


# name -> loader(split, root, download, **options) -> ImageDataset
LOADERS: dict[str, Callable[..., ImageDataset]] = {}
# name -> splits the loader understands
SPLITS: dict[str, tuple[str, ...]] = {}


# name -> typed model of the loader's options (`dataset.options` in a suite)
OPTIONS: dict[str, type] = {}


def _options_model(name: str, fn: Callable, option_help: dict[str, str] | None = None) -> type:
    """A strict pydantic model of the loader's keyword options, made from its signature (split, root and
    download are the loader protocol's own arguments, not options); `option_help` describes them (in
    `config --schema`)."""
    import inspect
    import typing

    from pydantic import Field, create_model

    from ssl_common.typed import StrictModel

    hints = typing.get_type_hints(fn)
    kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    fields = {p.name: (hints.get(p.name, typing.Any), Field(p.default, description=(option_help or {}).get(p.name)))
              for p in inspect.signature(fn).parameters.values()
              if p.name not in ("split", "root", "download") and p.kind in kinds}
    return create_model(f"{name}_options", __base__=StrictModel, **fields)


def register_loader(name: str, splits: tuple[str, ...], option_help: dict[str, str] | None = None):
    def decorator(fn):
        LOADERS[name] = fn
        SPLITS[name] = splits
        OPTIONS[name] = _options_model(name, fn, option_help)
        return fn
    return decorator


def check_loader_options(name: str, options: dict, splits: list[str]) -> None:
    """Before any loading: the dataset exists, has these splits, and takes these options (names and types)."""
    from ssl_common.typed import validate

    if name not in LOADERS:
        raise ConfigError(f"dataset.name: unknown dataset '{name}'; allowed: {', '.join(available_datasets())}")
    for split in splits:
        if split not in SPLITS[name]:
            raise ConfigError(f"dataset: '{name}' has no split '{split}'; allowed: {', '.join(SPLITS[name])}")
    model = OPTIONS[name]
    if options and not model.model_fields:
        raise ConfigError(f"dataset.options: dataset '{name}' takes no options; got: {', '.join(sorted(options))}")
    validate(model, options, "dataset.options", unknown_word=f"option of dataset '{name}'")


def available_datasets() -> list[str]:
    return sorted(LOADERS)


def load_split(name: str, split: str, root: str | Path | None = None, download: bool = False,
               **options) -> ImageDataset:
    """Load one split of a dataset by name. `root` is the data folder (see module doc)."""
    if name not in LOADERS:
        raise ConfigError(f"dataset.name: unknown dataset '{name}'; allowed: {', '.join(available_datasets())}")
    if split not in SPLITS[name]:
        raise ConfigError(f"dataset '{name}' has no split '{split}'; allowed: {', '.join(SPLITS[name])}")
    return LOADERS[name](split=split, root=Path(root) if root is not None else None, download=download, **options)


@register_loader("digits", splits=("train", "test"))
def load_digits(split: str, root: Path | None = None, download: bool = False,
                test_fraction: float = DIGITS_TEST_FRACTION) -> ImageDataset:
    """scikit-learn's embedded digits (1797 8x8 grey images, 0-16 levels, 10 classes).

    A fixed, stratified split (seed 0) keeps train/test identical everywhere.
    Pixels are scaled from 0..16 to 0..255 uint8.
    """
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # [N,1,8,8]
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=test_fraction,
                                           stratify=labels, random_state=DIGITS_SPLIT_SEED)
    idx = np.sort(train_idx if split == "train" else test_idx)
    return ImageDataset("digits", split, torch.from_numpy(labels[idx]), [str(i) for i in range(10)],
                        images=torch.from_numpy(np.ascontiguousarray(images[idx])))


# ----------------------------------------------------------------------------- helpers

DEFAULT_DATA_ROOT = Path("data")  # used when no root is given (git-ignored)

DISPLAY_NAMES = {
    "digits": "digits",
    "mnist": "MNIST",
    "cifar10": "CIFAR-10",
    "cifar100": "CIFAR-100",
    "cifar100-20": "CIFAR-100-20",
    "stl10": "STL-10",
    "imagefolder": "ImageFolder",
    "imagenet100": "ImageNet-100",
}


def dataset_display_name(name: str) -> str:
    """The spelling the papers use ("cifar100-20" -> "CIFAR-100-20"); unknown names pass through."""
    return DISPLAY_NAMES.get(name, name)


def _resolve_root(root: str | Path | None) -> Path:
    return Path(root) if root is not None else DEFAULT_DATA_ROOT


def _reject_options(name: str, options: dict) -> None:
    if options:
        raise ConfigError(f"dataset '{name}' takes no options; got: {', '.join(sorted(options))}")


def _not_found(display: str, looked_at: list[Path], layout: str, url: str | None) -> DatasetNotFoundError:
    looked = "\n".join(f"    {p}" for p in looked_at)
    if url is None:
        how = "This dataset cannot be downloaded; put the files there or point the dataset root elsewhere."
    else:
        how = (f"Get it with --download (torchvision downloads and unpacks it into the root), "
               f"or fetch it from {url} and unpack it there.")
    return DatasetNotFoundError(f"{display} not found. Looked for:\n{looked}\n"
                                f"Expected layout:\n{layout}\n{how}")


def _labels_tensor(labels) -> torch.Tensor:
    return torch.as_tensor(np.asarray(labels, dtype=np.int64))


# ----------------------------------------------------------------------------- MNIST

MNIST_URL = "https://yann.lecun.com/exdb/mnist/"
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned byte, 3 dims
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned byte, 1 dim


def _find_idx(folder: Path, base: str) -> Path | None:
    for candidate in (folder / base, folder / f"{base}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _locate_mnist(root: Path, split: str) -> tuple[Path, Path] | None:
    for folder in (root / "MNIST" / "raw", root):
        found = [_find_idx(folder, base) for base in MNIST_FILES[split]]
        if all(found):
            return found[0], found[1]
    return None


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Read an idx file (raw or .gz) of unsigned bytes, checking magic number and size."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise DatasetCorruptError(f"{path}: cannot read idx file ({e}); delete it and download again") from e
    if len(data) < 4:
        raise DatasetCorruptError(f"{path}: truncated idx file: {len(data)} bytes, no header")
    found_magic = int.from_bytes(data[:4], "big")
    if found_magic != magic:
        raise DatasetCorruptError(f"{path}: not an idx file of the expected kind: magic number {found_magic}, "
                                  f"expected {magic}")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetCorruptError(f"{path}: truncated idx file: {len(data)} bytes, header alone needs {header}")
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(data) != expected:
        raise DatasetCorruptError(f"{path}: truncated or corrupted idx file: header says shape {dims}, so "
                                  f"{expected} bytes expected, but the file has {len(data)} bytes "
                                  f"(decompressed); delete it and download again")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _download_mnist(root: Path) -> None:
    from torchvision.datasets import MNIST

    try:
        MNIST(str(root), train=True, download=True)
    except Exception as e:  # network / checksum errors: say what failed and keep the cause
        raise DatasetNotFoundError(f"downloading MNIST into {root / 'MNIST' / 'raw'} failed: {e}. "
                                   f"Fetch the files from {MNIST_URL} by hand.") from e


@register_loader("mnist", splits=("train", "test"))
def load_mnist(split: str, root: Path | None = None, download: bool = False, **options) -> ImageDataset:
    """MNIST from idx files (raw or .gz) in ROOT/MNIST/raw/ (torchvision's layout) or ROOT/ itself."""
    _reject_options("mnist", options)
    root = _resolve_root(root)
    found = _locate_mnist(root, split)
    if found is None and download:
        _download_mnist(root)
        found = _locate_mnist(root, split)
    if found is None:
        names = MNIST_FILES[split]
        looked = [folder / f"{base}[.gz]" for folder in (root / "MNIST" / "raw", root) for base in names]
        layout = (f"    {root}/MNIST/raw/" + "{" + ", ".join(n for s in MNIST_FILES.values() for n in s)
                  + "} (each raw or .gz)")
        raise _not_found("MNIST", looked, layout, MNIST_URL)
    images = read_idx(found[0], IDX_IMAGES_MAGIC)
    labels = read_idx(found[1], IDX_LABELS_MAGIC)
    if images.ndim != 3 or labels.ndim != 1:
        raise DatasetCorruptError(f"{found[0]}: expected images [N,H,W] and labels [N], got "
                                  f"{images.shape} and {labels.shape}")
    if len(images) != len(labels):
        raise DatasetCorruptError(f"{found[0]} has {len(images)} images but {found[1]} has {len(labels)} labels")
    if len(labels) and labels.max() > 9:
        raise DatasetCorruptError(f"{found[1]}: label {labels.max()} out of range 0..9")
    return ImageDataset("mnist", split, _labels_tensor(labels), [str(i) for i in range(10)],
                        images=torch.from_numpy(images[:, None].copy()))


# ----------------------------------------------------------------------------- CIFAR-10 / CIFAR-100

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR100_FOLDER = "cifar-100-python"
CIFAR100_FILES = {"train": ("train",), "test": ("test",)}

# The 100 fine classes in label order (alphabetical), as in cifar-100-python/meta.
CIFAR100_FINE_CLASSES = [
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck",
    "pine_tree", "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television",
    "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf",
    "woman", "worm",
]
# The 20 super-classes in coarse-label order, as in cifar-100-python/meta.
CIFAR100_COARSE_CLASSES = [
    "aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables",
    "household_electrical_devices", "household_furniture", "insects", "large_carnivores",
    "large_man-made_outdoor_things", "large_natural_outdoor_scenes", "large_omnivores_and_herbivores",
    "medium_mammals", "non-insect_invertebrates", "people", "reptiles", "small_mammals", "trees",
    "vehicles_1", "vehicles_2",
]
# CIFAR100_FINE_TO_COARSE[fine label] = coarse (super-class) label; 5 fine classes per super-class.
CIFAR100_FINE_TO_COARSE = [
    4, 1, 14, 8, 0, 6, 7, 7, 18, 3,
    3, 14, 9, 18, 7, 11, 3, 9, 7, 11,
    6, 11, 5, 10, 7, 6, 13, 15, 3, 15,
    0, 11, 1, 10, 12, 14, 16, 9, 11, 5,
    5, 19, 8, 8, 15, 13, 14, 17, 18, 10,
    16, 4, 17, 4, 2, 0, 17, 4, 18, 17,
    10, 3, 2, 12, 12, 16, 12, 1, 9, 19,
    2, 10, 0, 1, 16, 12, 9, 13, 15, 13,
    16, 19, 2, 4, 6, 19, 5, 5, 8, 19,
    18, 1, 2, 15, 6, 0, 17, 8, 14, 13,
]


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batches (dicts, lists, bytes, numpy arrays) and refuses anything else."""

    ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"), ("builtins", "bytearray"),
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a CIFAR batch")
        return super().find_class(module, name)


def _decode(value):
    return value.decode("latin1") if isinstance(value, bytes) else value


def _unpickle(path: Path) -> dict:
    """Load a CIFAR python batch; keys (and name strings) come back as str whatever pickle wrote."""
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            ImportError) as e:
        raise DatasetCorruptError(f"{path}: cannot unpickle CIFAR batch ({e}); delete it and download again") from e
    if not isinstance(obj, dict):
        raise DatasetCorruptError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return {_decode(k): v for k, v in obj.items()}


def _require_all(paths: list[Path], display: str, layout: str, url: str | None) -> None:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise _not_found(display, missing, layout, url)


def _cifar_batch(path: Path, label_keys: tuple[str, ...],
                 batch: dict | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    batch = _unpickle(path) if batch is None else batch
    if "data" not in batch:
        raise DatasetCorruptError(f"{path}: no 'data' entry; keys: {sorted(batch)}")
    data = np.asarray(batch["data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetCorruptError(f"{path}: 'data' should be uint8 [N, 3072], got {data.dtype} {data.shape}")
    labels = {}
    for key in label_keys:
        if key not in batch:
            raise DatasetCorruptError(f"{path}: no '{key}' entry; keys: {sorted(batch)}")
        labels[key] = np.asarray(batch[key], dtype=np.int64)
        if labels[key].shape != (len(data),):
            raise DatasetCorruptError(f"{path}: {len(data)} images but {labels[key].shape} '{key}'")
    return data.reshape(-1, 3, 32, 32), labels  # rows are R(1024) G(1024) B(1024), each row-major


def _cifar_meta_names(path: Path, key: str, default: list[str]) -> list[str]:
    if not path.is_file():
        return list(default)
    names = _unpickle(path).get(key)
    if names is None or len(names) != len(default):
        raise DatasetCorruptError(f"{path}: '{key}' should list {len(default)} class names")
    return [_decode(n) for n in names]


def _download_archive(root: Path, tv_class, display: str, url: str) -> None:
    from torchvision.datasets.utils import download_and_extract_archive

    try:
        download_and_extract_archive(tv_class.url, str(root), filename=tv_class.filename, md5=tv_class.tgz_md5)
    except Exception as e:
        raise DatasetNotFoundError(f"downloading {display} into {root} failed: {e}. "
                                   f"Fetch it from {url} by hand.") from e


def _load_cifar10_arrays(split: str, root: Path, download: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
    folder = root / CIFAR10_FOLDER
    paths = [folder / name for name in CIFAR10_FILES[split]]
    if download and not all(p.is_file() for p in paths):
        from torchvision.datasets import CIFAR10
        _download_archive(root, CIFAR10, "CIFAR-10", CIFAR_URL)
    layout = f"    {folder}/{{data_batch_1, ..., data_batch_5, test_batch, batches.meta}} (python pickles)"
    _require_all(paths, "CIFAR-10", layout, CIFAR_URL)
    batches = [_cifar_batch(p, ("labels",)) for p in paths]
    images = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1]["labels"] for b in batches])
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise DatasetCorruptError(f"{folder}: CIFAR-10 labels out of range 0..9")
    classes = _cifar_meta_names(folder / "batches.meta", "label_names", CIFAR10_CLASSES)
    return images, labels, classes


@register_loader("cifar10", splits=("train", "test"))
def load_cifar10(split: str, root: Path | None = None, download: bool = False, **options) -> ImageDataset:
    """CIFAR-10 from ROOT/cifar-10-batches-py/ (data_batch_1..5 = train, test_batch = test)."""
    _reject_options("cifar10", options)
    images, labels, classes = _load_cifar10_arrays(split, _resolve_root(root), download)
    return ImageDataset("cifar10", split, _labels_tensor(labels), classes, images=torch.from_numpy(images))


def _load_cifar100_arrays(split: str, root: Path, download: bool, coarse: bool):
    folder = root / CIFAR100_FOLDER
    path = folder / CIFAR100_FILES[split][0]
    if download and not path.is_file():
        from torchvision.datasets import CIFAR100
        _download_archive(root, CIFAR100, "CIFAR-100", CIFAR_URL)
    layout = f"    {folder}/{{train, test, meta}} (python pickles)"
    _require_all([path], "CIFAR-100", layout, CIFAR_URL)
    batch = _unpickle(path)
    has_coarse = "coarse_labels" in batch
    images, labels = _cifar_batch(path, ("fine_labels", "coarse_labels") if has_coarse else ("fine_labels",),
                                  batch)
    fine = labels["fine_labels"]
    if len(fine) and (fine.min() < 0 or fine.max() > 99):
        raise DatasetCorruptError(f"{path}: fine labels out of range 0..99")
    mapped = np.asarray(CIFAR100_FINE_TO_COARSE, dtype=np.int64)[fine]
    if has_coarse and not np.array_equal(labels["coarse_labels"], mapped):
        bad = int(np.flatnonzero(labels["coarse_labels"] != mapped)[0])
        raise DatasetCorruptError(f"{path}: image {bad} has fine label {fine[bad]} and coarse label "
                                  f"{labels['coarse_labels'][bad]}, but the CIFAR-100 super-class of fine "
                                  f"label {fine[bad]} is {mapped[bad]}")
    meta = folder / "meta"
    if coarse:
        return images, mapped, _cifar_meta_names(meta, "coarse_label_names", CIFAR100_COARSE_CLASSES)
    return images, fine, _cifar_meta_names(meta, "fine_label_names", CIFAR100_FINE_CLASSES)


@register_loader("cifar100", splits=("train", "test"))
def load_cifar100(split: str, root: Path | None = None, download: bool = False, **options) -> ImageDataset:
    """CIFAR-100 from ROOT/cifar-100-python/ with the 100 fine labels."""
    _reject_options("cifar100", options)
    images, labels, classes = _load_cifar100_arrays(split, _resolve_root(root), download, coarse=False)
    return ImageDataset("cifar100", split, _labels_tensor(labels), classes, images=torch.from_numpy(images))


@register_loader("cifar100-20", splits=("train", "test"))
def load_cifar100_20(split: str, root: Path | None = None, download: bool = False, **options) -> ImageDataset:
    """CIFAR-100 with the 20 super-class (coarse) labels, as used by clustering papers."""
    _reject_options("cifar100-20", options)
    images, labels, classes = _load_cifar100_arrays(split, _resolve_root(root), download, coarse=True)
    return ImageDataset("cifar100-20", split, _labels_tensor(labels), classes, images=torch.from_numpy(images))


# ----------------------------------------------------------------------------- STL-10

STL10_URL = "https://cs.stanford.edu/~acoates/stl10/"
STL10_FOLDER = "stl10_binary"
STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
STL10_IMAGE_BYTES = 3 * 96 * 96
# split -> [(images file, labels file or None)]
STL10_FILES = {
    "train": [("train_X.bin", "train_y.bin")],
    "test": [("test_X.bin", "test_y.bin")],
    "unlabeled": [("unlabeled_X.bin", None)],
    "train+unlabeled": [("train_X.bin", "train_y.bin"), ("unlabeled_X.bin", None)],
}


def _stl10_count(path: Path) -> int:
    size = path.stat().st_size
    if size == 0 or size % STL10_IMAGE_BYTES:
        raise DatasetCorruptError(f"{path}: truncated or corrupted STL-10 image file: {size} bytes is not a "
                                  f"positive multiple of 3*96*96 = {STL10_IMAGE_BYTES}; delete it and download again")
    return size // STL10_IMAGE_BYTES


def _stl10_labels(path: Path, n: int) -> np.ndarray:
    labels = np.fromfile(path, dtype=np.uint8).astype(np.int64)
    if len(labels) != n:
        raise DatasetCorruptError(f"{path}: {len(labels)} labels for {n} images (expected one byte per image)")
    if n and (labels.min() < 1 or labels.max() > 10):
        raise DatasetCorruptError(f"{path}: STL-10 labels must be 1..10, found {labels.min()}..{labels.max()}")
    return labels - 1


def _stl10_read_into(path: Path, out: np.ndarray, chunk: int = 4096) -> None:
    """Images are stored per channel in column-major order: [N,3,96,96] with the last two axes swapped."""
    stored = np.memmap(path, dtype=np.uint8, mode="r", shape=(len(out), 3, 96, 96))
    for start in range(0, len(out), chunk):
        out[start:start + chunk] = stored[start:start + chunk].transpose(0, 1, 3, 2)
    del stored


@register_loader("stl10", splits=("train", "test", "unlabeled", "train+unlabeled"))
def load_stl10(split: str, root: Path | None = None, download: bool = False, **options) -> ImageDataset:
    """STL-10 from ROOT/stl10_binary/. "train+unlabeled" = the 5k labelled + 100k unlabelled (label -1)."""
    _reject_options("stl10", options)
    root = _resolve_root(root)
    folder = root / STL10_FOLDER
    parts = [(folder / x, folder / y if y else None) for x, y in STL10_FILES[split]]
    needed = [p for pair in parts for p in pair if p is not None]
    if download and not all(p.is_file() for p in needed):
        from torchvision.datasets import STL10
        _download_archive(root, STL10, "STL-10", STL10_URL)
    layout = (f"    {folder}/{{train_X.bin, train_y.bin, test_X.bin, test_y.bin, unlabeled_X.bin, "
              f"class_names.txt}} (STL-10 binary format)")
    _require_all(needed, "STL-10", layout, STL10_URL)
    counts = [_stl10_count(x) for x, _ in parts]
    labels = np.concatenate([_stl10_labels(y, n) if y is not None else np.full(n, -1, dtype=np.int64)
                             for (_, y), n in zip(parts, counts)])
    images = np.empty((sum(counts), 3, 96, 96), dtype=np.uint8)
    start = 0
    for (x, _), n in zip(parts, counts):
        _stl10_read_into(x, images[start:start + n])
        start += n
    names_file = folder / "class_names.txt"
    classes = list(STL10_CLASSES)
    if names_file.is_file():
        classes = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
        if len(classes) != 10:
            raise DatasetCorruptError(f"{names_file}: expected 10 class names, found {len(classes)}")
    return ImageDataset("stl10", split, torch.from_numpy(labels), classes, images=torch.from_numpy(images))


# ----------------------------------------------------------------------------- ImageFolder

IMAGEFOLDER_SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
IMAGEFOLDER_LAYOUT = "    ROOT/<split>/<class>/<image>.{png,jpg,...}   (split: train, val or test)"


@register_loader("imagenet100", splits=("train", "val"))
def load_imagenet100_split(split: str, root: Path | None = None, download: bool = False, image_size: int = 224):
    """ImageNet-100 (solo-learn's / CMC's 100 classes), streamed from disk (benchmarks.streaming): about 19 GB as
    uint8 at 224 px, too much to hold in memory."""
    from benchmarks.streaming import load_imagenet100

    return load_imagenet100(root, split, image_size=image_size, download=download)


def _class_dirs(split_dir: Path) -> list[Path]:
    return sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _is_image(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def _verify_image(path: Path) -> None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, SyntaxError, OSError, ...)
        raise DatasetCorruptError(f"{path}: unreadable or corrupted image ({e}); remove or replace it") from e


def _eight_bit(im):
    """16-bit (and 32-bit integer) images scaled to 8 bits: PIL's convert("L"/"RGB") would clip every value above
    255, saturating a 16-bit PNG to near-white."""
    from PIL import Image

    if im.mode not in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        return im
    array = np.asarray(im)
    top = 65535.0 if im.mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
    scaled = np.clip(np.round(array.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)
    return Image.fromarray(scaled, mode="L")


class ImageFolderReader:
    """Decodes image i: RGB (or L), shorter side resized to `image_size`, centre crop -> uint8 [C,S,S].

    A plain class (not a closure) so datasets built on it can be pickled to worker processes.
    """

    def __init__(self, files: list[Path], image_size: int, channels: int):
        self.files = files
        self.image_size = image_size
        self.mode = "L" if channels == 1 else "RGB"

    def __call__(self, i: int) -> torch.Tensor:
        from PIL import Image

        path = self.files[i]
        size = self.image_size
        try:
            with Image.open(path) as im:
                im = _eight_bit(im).convert(self.mode)
                w, h = im.size
                if min(w, h) != size:
                    scale = size / min(w, h)
                    new = (max(size, round(w * scale)), max(size, round(h * scale)))
                    im = im.resize(new, Image.Resampling.BILINEAR)
                    w, h = new
                left, top = (w - size) // 2, (h - size) // 2
                im = im.crop((left, top, left + size, top + size))
                array = np.asarray(im, dtype=np.uint8)
        except Exception as e:
            raise DatasetCorruptError(f"{path}: cannot decode image ({e}); remove or replace it") from e
        if array.ndim == 2:
            array = array[:, :, None]
        return torch.from_numpy(array.transpose(2, 0, 1).copy())  # PIL's array is read-only


# `dataset.options` of an imagefolder suite (README "Your own images", `config --schema`)
IMAGEFOLDER_OPTION_HELP = {
    "image_size": "side (px) of the square images made from the files: the shorter side is resized to it, then "
                  "the centre cropped; must equal the suite's image_size (default 32)",
    "channels": "3 = RGB, 1 = grey (files are converted to it); must equal the suite's in_channels (default 3)",
    "in_memory": "true: decode every image once when loading (fast epochs; needs images x channels x size^2 "
                 "bytes of memory); false: decode each batch's images from disk (default false)",
    "storage": "memory (default): images decoded as above; stream: the files are read and decoded batch by batch "
               "(benchmarks.streaming: RGB only, for folders too large to hold decoded, e.g. ImageNet-100); auto: "
               "stream when the decoded split would take more than a quarter of the free memory",
    "verify": "true (default): open every file with PIL when loading, so a broken image stops the run before "
              "training, naming the file; false: skip that pass (a large folder you trust)",
}


def imagefolder_classes(root: Path) -> list[str]:
    """The class names of the ImageFolder at `root`: the sorted union of the class folders over all splits
    present, so label indices agree between train, val and test."""
    return sorted({d.name for s in IMAGEFOLDER_SPLITS if (root / s).is_dir() for d in _class_dirs(root / s)})


def _check_imagefolder_options(image_size: int, channels: int, storage: str) -> None:
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size <= 0:
        raise ConfigError(f"imagefolder option image_size must be a positive int, got {image_size!r}")
    if channels not in (1, 3):
        raise ConfigError(f"imagefolder option channels must be 1 or 3, got {channels!r}")
    if storage not in ("memory", "stream", "auto"):
        raise ConfigError(f"dataset.options.storage: got {storage!r}; allowed: memory, stream, auto")


def _streamed_imagefolder(root: Path, split: str, image_size: int, channels: int, storage: str):
    """The split as a streamed EncodedImageFolder when `storage` asks for it (stream; auto: when the decoded
    split would not fit in memory), else None: the images are decoded as usual."""
    if storage == "memory":
        return None
    from benchmarks.streaming import EncodedImageFolder, choose_storage

    folder = EncodedImageFolder(root, split, image_size=image_size)
    chosen = storage if storage == "stream" else choose_storage(len(folder), (channels, image_size, image_size))
    if chosen != "stream":
        return None
    if channels != 3:
        raise ConfigError("dataset.options.storage: streaming decodes RGB images; set channels: 3 or "
                          "storage: memory")
    return folder


def _imagefolder_files(root: Path, split: str) -> tuple[list[str], list[Path], list[int]]:
    """The classes (over all splits), the split's image files and their labels; a missing split, a split
    without class folders or images, and an empty class folder are refused, naming the folder."""
    layout = IMAGEFOLDER_LAYOUT.replace("ROOT", str(root))
    split_dir = root / split
    if not split_dir.is_dir():
        raise _not_found("ImageFolder data", [split_dir], layout, None)
    class_dirs = _class_dirs(split_dir)
    if not class_dirs:
        raise DatasetCorruptError(f"{split_dir}: no class folders. Expected layout:\n" + layout)
    classes = imagefolder_classes(root)
    index = {name: i for i, name in enumerate(classes)}
    files: list[Path] = []
    labels: list[int] = []
    empty = []
    for d in class_dirs:
        images = sorted(p for p in d.iterdir() if _is_image(p))
        empty += [d] if not images else []
        for f in images:
            files.append(f)
            labels.append(index[d.name])
    if not files:
        raise DatasetCorruptError(f"{split_dir}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in its class "
                                  f"folders. Expected layout:\n" + layout)
    if empty:
        more = f", nor do {len(empty) - 1} more" if len(empty) > 1 else ""
        raise DatasetCorruptError(f"{empty[0]}: the class folder '{empty[0].name}' holds no image files "
                                  f"({', '.join(IMAGE_EXTENSIONS)}){more}; add its images or remove the folder "
                                  "(an empty class is a class that can be neither learnt nor tested)")
    return classes, files, labels


@register_loader("imagefolder", splits=IMAGEFOLDER_SPLITS, option_help=IMAGEFOLDER_OPTION_HELP)
def load_imagefolder(split: str, root: Path | None = None, download: bool = False, image_size: int = 32,
                     channels: int = 3, in_memory: bool = False, verify: bool = True, storage: str = "memory"
                     ) -> ImageDataset:
    """Images in ROOT/<split>/<class>/<file>; decoded lazily unless `in_memory`.

    Options: `image_size` (output side; shorter side resized, then centre crop), `channels` (3 = RGB,
    1 = grey), `in_memory` (decode every image now), `verify` (check every file with PIL now, so a
    broken file fails before training). Class names are the sorted union of class folders over all
    splits present, so label indices agree between train, val and test.
    """
    _check_imagefolder_options(image_size, channels, storage)
    root = _resolve_root(root)
    streamed = _streamed_imagefolder(root, split, image_size, channels, storage)
    if streamed is not None:
        return streamed
    classes, files, labels = _imagefolder_files(root, split)
    if verify:
        for f in files:
            _verify_image(f)
    reader = ImageFolderReader(files, image_size, channels)
    label_tensor = _labels_tensor(labels)
    if in_memory:
        images = torch.stack([reader(i) for i in range(len(files))])
        return ImageDataset("imagefolder", split, label_tensor, classes, images=images)
    return ImageDataset("imagefolder", split, label_tensor, classes, read_image=reader, num_images=len(files))
