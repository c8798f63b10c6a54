"""Tiny datasets written in exactly the standard on-disk formats, for tests.

Each `make_*` writes under `root` the layout the real download has and returns `root` (the folder to
pass as the dataset root to `benchmarks.data.load_split`). The images are deterministic (seeded numpy)
and class-dependent (a class-specific colour plus noise), so a classifier can learn them; labels are
balanced over classes where the counts allow. `*_arrays` functions return the arrays a fixture writes,
in the loaders' layout (uint8 [N, C, H, W], int64 labels, -1 = unlabelled), to compare pixel-exactly.

This module deliberately does not import `benchmarks.data`: the formats are written from their
specifications, so a reader that agrees with them is checked against an independent writer.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
STL10_NAMES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]

# The official CIFAR-100 super-class table (https://www.cs.toronto.edu/~kriz/cifar.html), with the
# class names spelled as in cifar-100-python/meta. Both label sets are in alphabetical order.
CIFAR100_SUPERCLASSES = {
    "aquatic_mammals": ["beaver", "dolphin", "otter", "seal", "whale"],
    "fish": ["aquarium_fish", "flatfish", "ray", "shark", "trout"],
    "flowers": ["orchid", "poppy", "rose", "sunflower", "tulip"],
    "food_containers": ["bottle", "bowl", "can", "cup", "plate"],
    "fruit_and_vegetables": ["apple", "mushroom", "orange", "pear", "sweet_pepper"],
    "household_electrical_devices": ["clock", "keyboard", "lamp", "telephone", "television"],
    "household_furniture": ["bed", "chair", "couch", "table", "wardrobe"],
    "insects": ["bee", "beetle", "butterfly", "caterpillar", "cockroach"],
    "large_carnivores": ["bear", "leopard", "lion", "tiger", "wolf"],
    "large_man-made_outdoor_things": ["bridge", "castle", "house", "road", "skyscraper"],
    "large_natural_outdoor_scenes": ["cloud", "forest", "mountain", "plain", "sea"],
    "large_omnivores_and_herbivores": ["camel", "cattle", "chimpanzee", "elephant", "kangaroo"],
    "medium_mammals": ["fox", "porcupine", "possum", "raccoon", "skunk"],
    "non-insect_invertebrates": ["crab", "lobster", "snail", "spider", "worm"],
    "people": ["baby", "boy", "girl", "man", "woman"],
    "reptiles": ["crocodile", "dinosaur", "lizard", "snake", "turtle"],
    "small_mammals": ["hamster", "mouse", "rabbit", "shrew", "squirrel"],
    "trees": ["maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"],
    "vehicles_1": ["bicycle", "bus", "motorcycle", "pickup_truck", "train"],
    "vehicles_2": ["lawn_mower", "rocket", "streetcar", "tank", "tractor"],
}
CIFAR100_COARSE_NAMES = sorted(CIFAR100_SUPERCLASSES)
CIFAR100_FINE_NAMES = sorted(f for fines in CIFAR100_SUPERCLASSES.values() for f in fines)
CIFAR100_COARSE_OF_FINE = np.array(
    [CIFAR100_COARSE_NAMES.index(next(c for c, fines in CIFAR100_SUPERCLASSES.items() if f in fines))
     for f in CIFAR100_FINE_NAMES], dtype=np.int64)


# ----------------------------------------------------------------------------- generators

def balanced_labels(n: int, num_classes: int, seed: int) -> np.ndarray:
    """n labels, each class n // num_classes or one more times, in a seeded random order."""
    labels = np.arange(n, dtype=np.int64) % num_classes
    return np.random.default_rng(seed).permutation(labels)


def class_images(labels: np.ndarray, shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """uint8 [N, C, H, W]: a class-specific brightness and tint plus seeded noise (-1 = random colour)."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels, dtype=np.int64)
    c = shape[0]
    channel = np.arange(c)
    brightness = 20 + (labels[:, None] * 67) % 120                 # distinct per class (up to 120 classes)
    base = brightness + (labels[:, None] * 37 * (channel[None, :] + 1)) % 60  # plus a class-specific tint
    unlabelled = labels < 0
    base[unlabelled] = rng.integers(20, 200, size=(int(unlabelled.sum()), c))
    noise = rng.integers(0, 56, size=(len(labels), *shape))
    return (base[:, :, None, None] + noise).clip(0, 255).astype(np.uint8)


def mnist_arrays(n_train: int = 40, n_test: int = 20) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for split, n, seed in (("train", n_train, 101), ("test", n_test, 102)):
        labels = balanced_labels(n, 10, seed)
        out[split] = (class_images(labels, (1, 28, 28), seed), labels)
    return out


def cifar10_arrays(n_train: int = 50, n_test: int = 20) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for split, n, seed in (("train", n_train, 201), ("test", n_test, 202)):
        labels = balanced_labels(n, 10, seed)
        out[split] = (class_images(labels, (3, 32, 32), seed), labels)
    return out


def cifar100_arrays(n_train: int = 100, n_test: int = 40) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """split -> (images, fine labels, coarse labels)."""
    out = {}
    for split, n, seed in (("train", n_train, 301), ("test", n_test, 302)):
        fine = balanced_labels(n, 100, seed)
        out[split] = (class_images(fine, (3, 32, 32), seed), fine, CIFAR100_COARSE_OF_FINE[fine])
    return out


def stl10_arrays(n_train: int = 20, n_test: int = 20,
                 n_unlabeled: int = 30) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """split -> (images [N,3,96,96] as viewed upright, 0-based labels; -1 for 'unlabeled')."""
    out = {}
    for split, n, seed in (("train", n_train, 401), ("test", n_test, 402)):
        labels = balanced_labels(n, 10, seed)
        out[split] = (class_images(labels, (3, 96, 96), seed), labels)
    labels = np.full(n_unlabeled, -1, dtype=np.int64)
    out["unlabeled"] = (class_images(labels, (3, 96, 96), 403), labels)
    return out


# ----------------------------------------------------------------------------- writers

def _write_bytes(path: Path, data: bytes, gz: bool) -> None:
    if gz:
        with open(path.with_name(path.name + ".gz"), "wb") as raw, \
                gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as f:
            f.write(data)
    else:
        path.write_bytes(data)


def make_mnist(root, n_train: int = 40, n_test: int = 20, gz: bool = False) -> Path:
    """root/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz], as torchvision lays them out."""
    root = Path(root)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = mnist_arrays(n_train, n_test)[split]
        n = len(labels)
        # idx: big-endian magic (0x0803 = ubyte, 3 dims / 0x0801 = ubyte, 1 dim), then the dims, then data
        _write_bytes(raw / f"{prefix}-images-idx3-ubyte",
                     struct.pack(">IIII", 2051, n, 28, 28) + images[:, 0].tobytes(), gz)
        _write_bytes(raw / f"{prefix}-labels-idx1-ubyte",
                     struct.pack(">II", 2049, n) + labels.astype(np.uint8).tobytes(), gz)
    return root


def _cifar_rows(images: np.ndarray) -> np.ndarray:
    """[N,3,32,32] -> [N,3072]: the 1024 red values (row-major), then green, then blue."""
    return np.ascontiguousarray(images.reshape(len(images), 3 * 32 * 32))


def _dump(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def make_cifar10(root, n_train: int = 50, n_test: int = 20) -> Path:
    """root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}; n_train spread over 5 batches."""
    root = Path(root)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    arrays = cifar10_arrays(n_train, n_test)
    images, labels = arrays["train"]
    for i, idx in enumerate(np.array_split(np.arange(len(labels)), 5), start=1):
        _dump(folder / f"data_batch_{i}", {
            b"batch_label": f"training batch {i} of 5".encode(),
            b"labels": [int(v) for v in labels[idx]],
            b"data": _cifar_rows(images[idx]),
            b"filenames": [f"img_{j:05d}.png".encode() for j in idx],
        })
    images, labels = arrays["test"]
    _dump(folder / "test_batch", {
        b"batch_label": b"testing batch 1 of 1",
        b"labels": [int(v) for v in labels],
        b"data": _cifar_rows(images),
        b"filenames": [f"test_{j:05d}.png".encode() for j in range(len(labels))],
    })
    _dump(folder / "batches.meta", {
        b"num_cases_per_batch": max(1, -(-n_train // 5)),
        b"label_names": [n.encode() for n in CIFAR10_NAMES],
        b"num_vis": 3072,
    })
    return root


def make_cifar100(root, n_train: int = 100, n_test: int = 40) -> Path:
    """root/cifar-100-python/{train, test, meta} with fine and (consistent) coarse labels."""
    root = Path(root)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for split, (images, fine, coarse) in cifar100_arrays(n_train, n_test).items():
        _dump(folder / split, {
            b"filenames": [f"{split}_{j:05d}.png".encode() for j in range(len(fine))],
            b"batch_label": f"{split}ing batch 1 of 1".encode(),
            b"fine_labels": [int(v) for v in fine],
            b"coarse_labels": [int(v) for v in coarse],
            b"data": _cifar_rows(images),
        })
    _dump(folder / "meta", {
        b"fine_label_names": [n.encode() for n in CIFAR100_FINE_NAMES],
        b"coarse_label_names": [n.encode() for n in CIFAR100_COARSE_NAMES],
    })
    return root


def stl10_bytes(images: np.ndarray) -> bytes:
    """STL-10 binary: per image, per channel, the 96x96 pixels in column-major order."""
    return np.ascontiguousarray(images.transpose(0, 1, 3, 2)).tobytes()


def make_stl10(root, n_train: int = 20, n_test: int = 20, n_unlabeled: int = 30) -> Path:
    """root/stl10_binary/{train_X,train_y,test_X,test_y,unlabeled_X}.bin + class_names.txt (labels 1..10)."""
    root = Path(root)
    folder = root / "stl10_binary"
    folder.mkdir(parents=True, exist_ok=True)
    arrays = stl10_arrays(n_train, n_test, n_unlabeled)
    for split in ("train", "test"):
        images, labels = arrays[split]
        (folder / f"{split}_X.bin").write_bytes(stl10_bytes(images))
        (folder / f"{split}_y.bin").write_bytes((labels + 1).astype(np.uint8).tobytes())
    (folder / "unlabeled_X.bin").write_bytes(stl10_bytes(arrays["unlabeled"][0]))
    (folder / "class_names.txt").write_text("".join(f"{n}\n" for n in STL10_NAMES))
    return root


def imagefolder_image(class_index: int, i: int, size: tuple[int, int] = (40, 30), seed: int = 0) -> np.ndarray:
    """uint8 [H, W, 3] image number i of a class (size is PIL's (width, height))."""
    labels = np.array([class_index])
    image = class_images(labels, (3, size[1], size[0]), seed * 100003 + class_index * 1009 + i)[0]
    return np.ascontiguousarray(image.transpose(1, 2, 0))


def make_imagefolder(root, classes=("cat", "dog"), per_class: int = 4, size: tuple[int, int] = (40, 30),
                     splits=("train", "test"), fmt: str = "png", grey: bool = False) -> Path:
    """root/<split>/<class>/<i>.png (or .jpg with fmt="jpeg"); size is (width, height); grey: 8-bit grey files."""
    from PIL import Image

    root = Path(root)
    ext = {"png": "png", "jpeg": "jpg", "jpg": "jpg"}[fmt.lower()]
    for s, split in enumerate(splits):
        for k, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                image = Image.fromarray(imagefolder_image(k, i, size, seed=s))
                image = image.convert("L") if grey else image
                if ext == "jpg":
                    image.save(folder / f"{i:03d}.jpg", quality=95)
                else:
                    image.save(folder / f"{i:03d}.png")
    return root
