"""Image folders streamed from disk, for datasets that do not fit in memory (ImageNet-100 at 224 px: ~19 GB).

The in-memory path holds a split as one uint8 [N, C, H, W] tensor. The streaming path keeps only the
file list and labels in memory and reads each batch when it is needed:

    folder = EncodedImageFolder(root, "train", image_size=224)     # lists files; quacks like ImageDataset
    loader = DataLoader(EncodedBatches(folder), sampler=<batches of indices>, batch_size=None,
                        num_workers=8)                              # workers only read the files' bytes
    for encoded, labels, indices in loader:
        images = decode_batch(encoded, 224, device)                 # uint8 [B, 3, 224, 224] on the device

Decoding happens in one call per batch (nvJPEG on a GPU), then every image is brought to S x S
(shorter side resized to S, antialiased bilinear, centre crop). The training views (random-resized
crops, flips, colour) are then taken on the device from this S x S image, as for in-memory data. That
differs from the usual per-image pipeline, which crops the full-resolution image: a crop of the S x S
centre never sees the parts of a non-square image outside the centre square, and is upsampled from S
pixels rather than from the original resolution. Stream at a larger S (e.g. 256 for 224 views) to
keep more detail.

`choose_storage` decides between the two paths from the dataset's size and the machine's memory;
`load_imagenet100` finds ImageNet-100 (layout in its doc).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler
from torchvision.io import ImageReadMode, decode_image, decode_jpeg, read_file
from torchvision.transforms.v2 import functional as TF

from benchmarks.errors import ConfigError, DatasetCorruptError, DatasetNotFoundError

# what torchvision.io decodes (JPEG with libjpeg-turbo / nvJPEG; the rest with decode_image on the CPU)
STREAM_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif")
# what PIL reads but torchvision.io does not: such a folder needs the in-memory (PIL) path
PIL_ONLY_EXTENSIONS = (".bmp", ".tif", ".tiff", ".ppm", ".pgm")
SPLITS = ("train", "val", "test")
JPEG_MAGIC = (0xFF, 0xD8, 0xFF)
MEMORY_FRACTION = 0.25


class PathTable:
    """Many file paths as two numpy arrays (UTF-8 bytes + offsets) instead of a list of str.

    DataLoader workers are forked from the main process; reading a Python object there writes its
    reference count, which copies its memory page, so a list of a million str grows every worker by
    the whole list over an epoch (pytorch/pytorch#13246). Numpy buffers are not touched that way.
    Written by hand: neither torch nor torchvision has such a table.
    """

    def __init__(self, paths: Sequence[str]):
        encoded = [p.encode("utf-8", "surrogateescape") for p in paths]
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=self.offsets[1:])
        self.data = np.frombuffer(b"".join(encoded), dtype=np.uint8) if encoded else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self.data[self.offsets[i]:self.offsets[i + 1]].tobytes().decode("utf-8", "surrogateescape")

    def take(self, indices: np.ndarray) -> PathTable:
        return PathTable([self[int(i)] for i in indices])


def _first_few(names: Sequence[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def _class_folders(split_dir: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


class EncodedImageFolder:
    """An ImageFolder split (ROOT/<split>/<class>/<image>) read from disk batch by batch.

    Quacks like benchmarks.data.ImageDataset where the trainer and the evaluation use one: `name`,
    `split`, `labels` (int64), `classes`, `num_classes`, `len()`, `image_shape` = (3, S, S),
    `get_batch(indices)` -> uint8 [B, 3, S, S] (read, decode, resize on the CPU), `subset`,
    `in_memory` = False, `is_labelled`, `images` = None, `read_image(i)`.

    Files are sorted by class folder, then by name, so indices are the same on every machine. Labels
    index `classes`: the given class names (e.g. ImageNet-100's WordNet IDs; folders of other classes
    are ignored) or the class folders found in any split (train, val, test) under `root`, sorted either
    way (torchvision ImageFolder's order), so train and val agree. Images are RGB (grey and palette
    images are converted, alpha is dropped). Files are not verified up front: a broken one raises
    DatasetCorruptError, naming it, when its batch is decoded.
    """

    in_memory = False
    images = None

    def __init__(self, root: str | Path, split: str, classes: Sequence[str] | None = None,
                 image_size: int = 224, name: str = "imagefolder"):
        if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size <= 0:
            raise ConfigError(f"image_size: must be a positive int, got {image_size!r}")
        self.root, self.split, self.image_size, self.name = Path(root), split, image_size, name
        split_dir = self.root / split
        layout = f"{self.root}/{split}/<class>/<image>.{{jpg,png,...}}"
        if not split_dir.is_dir():
            raise DatasetNotFoundError(f"{split_dir}: no such folder; expected an image folder laid out as "
                                       f"{layout}")
        if classes is None:
            present = [self.root / s for s in SPLITS if (self.root / s).is_dir()]
            classes = sorted({c for folder in present for c in _class_folders(folder)})
        else:
            missing = [c for c in classes if not (split_dir / c).is_dir()]
            if missing:
                raise DatasetNotFoundError(f"{split_dir}: {len(missing)} of the {len(classes)} class folders "
                                           f"are missing ({_first_few(missing)}); expected {layout}")
        self.classes = sorted(set(classes))
        files, labels = [], []
        for label, cls in enumerate(self.classes):
            folder = split_dir / cls
            if not folder.is_dir():  # a class found only in another split
                continue
            for entry in sorted(os.scandir(folder), key=lambda e: e.name):
                suffix = os.path.splitext(entry.name)[1].lower()
                if entry.name.startswith(".") or not entry.is_file():
                    continue
                if suffix in PIL_ONLY_EXTENSIONS:
                    raise ConfigError(f"{entry.path}: {suffix} images cannot be streamed (torchvision.io "
                                      f"decodes {', '.join(STREAM_EXTENSIONS)}); convert them, or load this "
                                      "dataset in memory")
                if suffix in STREAM_EXTENSIONS:
                    files.append(f"{cls}/{entry.name}")
                    labels.append(label)
        if not files:
            raise DatasetCorruptError(f"{split_dir}: no image files ({', '.join(STREAM_EXTENSIONS)}) in its "
                                      f"class folders; expected {layout}")
        self.directory = str(split_dir)
        self.files = PathTable(files)  # relative to self.directory
        self.labels = torch.tensor(labels, dtype=torch.int64)

    # -- what ImageDataset has ---------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_images(self) -> int:
        return len(self.labels)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    @property
    def is_labelled(self) -> bool:
        return bool((self.labels >= 0).all())

    def path(self, i: int) -> str:
        return os.path.join(self.directory, self.files[int(i)])

    def read_encoded(self, indices) -> list[torch.Tensor]:
        """The files' bytes (uint8 1-D tensors), undecoded: the cheap part, done in DataLoader workers."""
        out = []
        for i in torch.as_tensor(indices, dtype=torch.long).tolist():
            path = self.path(i)
            try:
                out.append(read_file(path))
            except (RuntimeError, OSError) as exc:
                raise DatasetCorruptError(f"{path}: cannot be read ({(str(exc).splitlines() or [''])[0]}); "
                                          "check the file and the disk") from exc
        return out

    def decode(self, encoded: Sequence[torch.Tensor] | EncodedFiles, indices,
               device: torch.device | str = "cpu") -> torch.Tensor:
        """decode_batch with this folder's image size, naming the files in any error."""
        names = [self.path(i) for i in torch.as_tensor(indices, dtype=torch.long).tolist()]
        return decode_batch(encoded, self.image_size, device, sources=names)

    def get_batch(self, indices: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, S, S] for the given indices, read and decoded on the CPU (the evaluation's path)."""
        return self.decode(self.read_encoded(indices), indices, "cpu")

    def read_image(self, i: int) -> torch.Tensor:
        return self.get_batch(torch.tensor([int(i)]))[0]

    def subset(self, indices, split: str | None = None) -> EncodedImageFolder:
        indices = torch.as_tensor(indices, dtype=torch.long)
        part = copy.copy(self)
        part.files = self.files.take(indices.numpy())
        part.labels = self.labels[indices]
        part.split = split or self.split  # a name only: the files stay where they are (self.directory)
        return part

    def __repr__(self) -> str:
        return (f"EncodedImageFolder({self.name!r}, split={self.split!r}, {len(self)} images, "
                f"{self.num_classes} classes, {self.image_size}px, root={str(self.root)!r})")


class EncodedFiles:
    """A batch's encoded files packed in one uint8 tensor + offsets; reads as a sequence of 1-D byte tensors.

    Two reasons to pack in the worker: a tensor straight from torchvision.io.read_file cannot be sent
    from a DataLoader worker at all (torch 2.14 / torchvision 0.29: EBADF while sharing its storage,
    then the loader hangs; a copy of it can), and a worker sends every tensor through a shared-memory
    segment and a file descriptor of its own, so one tensor per batch beats hundreds. Item i is a
    zero-copy view. Deliberately not a collections.abc.Sequence and without `.to`, so
    Lightning's batch transfer leaves it on the CPU, where decode_jpeg wants its input even when it
    decodes on the GPU. Written by hand: torch has no packed list of byte strings.
    """

    def __init__(self, data: torch.Tensor, offsets: torch.Tensor):
        self.data, self.offsets = data, offsets

    @classmethod
    def pack(cls, files: Sequence[torch.Tensor]) -> EncodedFiles:
        offsets = torch.zeros(len(files) + 1, dtype=torch.int64)
        torch.cumsum(torch.tensor([f.numel() for f in files], dtype=torch.int64), 0, out=offsets[1:])
        data = torch.cat(list(files)) if files else torch.zeros(0, dtype=torch.uint8)
        return cls(data, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> torch.Tensor:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        return self.data[int(self.offsets[i]):int(self.offsets[i + 1])]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[i] for i in range(len(self)))


class EncodedBatches(Dataset):
    """`dataset[list_of_indices]` -> (encoded files as EncodedFiles, labels [B], indices [B]).

    For a DataLoader with batch_size=None and a sampler of index batches (benchmarks.training's
    EpochBatchSampler): its workers only read the files' bytes (torchvision.io.read_file); decoding
    is decode_batch's, on the device. EncodedFiles reads like a list of 1-D uint8 tensors.
    """

    def __init__(self, folder: EncodedImageFolder):
        self.folder = folder

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, indices):
        idx = torch.as_tensor(indices, dtype=torch.long)
        return EncodedFiles.pack(self.folder.read_encoded(idx)), self.folder.labels[idx], idx


def _is_jpeg(data: torch.Tensor) -> bool:
    return data.numel() >= 3 and tuple(data[:3].tolist()) == JPEG_MAGIC


def _square(image: torch.Tensor, size: int) -> torch.Tensor:
    """[3, h, w] -> [3, S, S]: shorter side resized to S (antialiased bilinear), then the centre crop."""
    if min(image.shape[-2:]) != size:
        image = TF.resize(image, [size], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    return TF.center_crop(image, [size, size])


def decode_batch(encoded: Sequence[torch.Tensor] | EncodedFiles, image_size: int,
                 device: torch.device | str = "cpu", sources: Sequence[str] | None = None) -> torch.Tensor:
    """Decode encoded image files into uint8 [B, 3, S, S] on `device`, each image brought to S x S.

    JPEGs are decoded in one torchvision.io.decode_jpeg call (a batched nvJPEG decode on a GPU; on the
    CPU libjpeg-turbo, the same as get_batch, so the CPU result is bitwise get_batch's). Other formats
    (PNG, WebP, GIF), and JPEGs the GPU decoder refuses (e.g. CMYK), are decoded by decode_image on
    the CPU and moved over. Each image then gets its shorter side resized to S (antialiased bilinear)
    and its centre S x S cropped, on `device`. The training views are random-resized crops taken on
    the device from this S x S image, not from the full-resolution file (see the module doc).
    `sources` (file names, one per image) only make error messages name the broken file.
    """
    device = torch.device(device)
    encoded = list(encoded)
    out = torch.empty((len(encoded), 3, image_size, image_size), dtype=torch.uint8, device=device)

    def name(i: int) -> str:
        return sources[i] if sources is not None else f"image {i} of the batch"

    def decode_on_cpu(i: int) -> torch.Tensor:
        try:
            return decode_image(encoded[i], mode=ImageReadMode.RGB)
        except RuntimeError as exc:
            first = (str(exc).splitlines() or [""])[0]
            raise DatasetCorruptError(f"{name(i)}: cannot decode image ({first}); remove or replace "
                                      "it") from exc

    jpegs = [i for i in range(len(encoded)) if _is_jpeg(encoded[i])]
    decoded: dict[int, torch.Tensor] = {}
    if jpegs:
        try:
            images = decode_jpeg([encoded[i] for i in jpegs], mode=ImageReadMode.RGB, device=device)
            decoded.update(zip(jpegs, images, strict=True))
        except RuntimeError:  # one bad (or, for nvJPEG, unsupported) file fails the call: each on the CPU
            pass
    for i in range(len(encoded)):
        image = decoded[i] if i in decoded else decode_on_cpu(i).to(device, non_blocking=True)
        out[i] = _square(image, image_size)
    return out


def decoded_batches(folder: EncodedImageFolder, batch_size: int, device: torch.device | str = "cpu",
                    num_workers: int = 2) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(images uint8 [B, 3, S, S] on `device`, labels, indices) over `folder` in index order.

    For one clean pass (feature extraction, a method's epoch hook) with the reading done in workers.
    """
    sampler = BatchSampler(SequentialSampler(range(len(folder))), batch_size, drop_last=False)
    loader = DataLoader(EncodedBatches(folder), sampler=sampler, batch_size=None, num_workers=num_workers)
    for encoded, labels, indices in loader:
        yield folder.decode(encoded, indices, device), labels, indices


# ----------------------------------------------------------------------------- memory or stream

def available_memory_bytes() -> int:
    """RAM available for new allocations: psutil, else /proc/meminfo's MemAvailable, else sysconf."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")  # free pages only: an underestimate


def choose_storage(num_images: int, image_shape: Sequence[int],
                   setting: Literal["auto", "memory", "stream"] = "auto",
                   memory_limit_bytes: int | None = None) -> Literal["memory", "stream"]:
    """Hold a split in memory as uint8 [N, C, H, W], or stream it from disk?

    "memory" and "stream" are taken as they are. "auto" streams when the tensor (N * C * H * W bytes)
    would exceed `memory_limit_bytes`, which defaults to 25% of the RAM available now
    (available_memory_bytes): what is left must hold the model, the other splits, DataLoader workers
    and the page cache, and another run may be sharing the machine.
    """
    if setting not in ("auto", "memory", "stream"):
        raise ConfigError(f"dataset.storage: unknown setting {setting!r}; allowed: auto, memory, stream")
    if setting != "auto":
        return setting
    needed = int(num_images) * int(np.prod(list(image_shape)))
    budget = memory_limit_bytes
    if budget is None:
        budget = MEMORY_FRACTION * available_memory_bytes()
    return "stream" if needed > budget else "memory"


# ----------------------------------------------------------------------------- ImageNet-100

IMAGENET100_CLASSES_FILE = Path(__file__).resolve().parent / "configs" / "imagenet100_classes.txt"
IMAGENET_URL = "https://image-net.org"
IMAGENET100_SPLITS = ("train", "val")


def imagenet100_classes() -> list[str]:
    """The 100 WordNet IDs of ImageNet-100 (CMC's list, also solo-learn's), in the file's order."""
    lines = IMAGENET100_CLASSES_FILE.read_text().splitlines()
    wnids = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if len(wnids) != 100 or len(set(wnids)) != 100:
        raise DatasetCorruptError(f"{IMAGENET100_CLASSES_FILE}: expected 100 distinct WordNet IDs, found "
                                  f"{len(set(wnids))}")
    return wnids


def load_imagenet100(root: str | Path | None, split: str, image_size: int = 224, download: bool = False,
                     ) -> EncodedImageFolder:
    """ImageNet-100 (100 ImageNet-1k classes, ~126.7k train / 5,000 val images), streamed.

    Looks, in this order, for
      <root>/imagenet100/<split>/<wnid>/*.JPEG   a copy (or symlinks) of just the 100 classes
      <root>/imagenet/<split>/<wnid>/*.JPEG      full ImageNet-1k (ILSVRC2012); only the 100 are read
    with split = train or val, val sorted into class folders like train. Labels index the sorted
    WordNet IDs either way. ImageNet cannot be downloaded by the suite (it needs registration).
    """
    if split not in IMAGENET100_SPLITS:
        raise ConfigError(f"dataset 'imagenet100' has no split '{split}'; allowed: "
                          f"{', '.join(IMAGENET100_SPLITS)}")
    root = Path(root) if root is not None else Path("data")
    wnids = imagenet100_classes()
    looked = []
    for folder in ("imagenet100", "imagenet"):
        split_dir = root / folder / split
        if not split_dir.is_dir():
            looked.append(f"    {split_dir}/<wnid>/: no such folder")
            continue
        missing = [w for w in wnids if not (split_dir / w).is_dir()]
        if not missing:
            return EncodedImageFolder(root / folder, split, wnids, image_size=image_size, name="imagenet100")
        loose = sum(1 for e in os.scandir(split_dir)
                    if e.is_file() and e.name.lower().endswith((".jpeg", ".jpg")))
        hint = f" (it holds {loose} images directly: val must be sorted into class folders)" if loose else ""
        looked.append(f"    {split_dir}/<wnid>/: {len(missing)} of the 100 class folders missing "
                      f"({_first_few(missing)}){hint}")
    raise DatasetNotFoundError(
        f"ImageNet-100 {split} split not found{' (it cannot be downloaded)' if download else ''}. "
        "Looked for:\n"
        + "\n".join(looked) + "\n"
        f"Expected layout: {root}/imagenet100/{{train,val}}/<wnid>/<image>.JPEG (the 100 WordNet IDs in "
        f"{IMAGENET100_CLASSES_FILE.name}), or full ImageNet in {root}/imagenet/{{train,val}}/<wnid>/.\n"
        f"ImageNet needs registration at {IMAGENET_URL}: download ILSVRC2012 train and val, unpack train "
        "into one folder per WordNet ID, and sort val into class folders (e.g. with the well-known "
        "valprep.sh of soumith/imagenetloader.torch).")
