"""benchmarks.streaming: ImageFolder splits read from disk batch by batch (JPEG/PNG via torchvision.io)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler
from torchvision.io import ImageReadMode, decode_image, encode_jpeg, encode_png, read_file
from torchvision.transforms.v2 import functional as TF

from benchmarks import streaming
from benchmarks.errors import ConfigError, DatasetCorruptError, DatasetNotFoundError
from benchmarks.streaming import (
    EncodedBatches,
    EncodedImageFolder,
    PathTable,
    choose_storage,
    decode_batch,
    decoded_batches,
    imagenet100_classes,
    load_imagenet100,
)

REPO = Path(__file__).resolve().parent.parent
SIZES = [(40, 48), (48, 40), (32, 32), (37, 53), (60, 45)]  # (h, w): wide, tall, square, odd


def make_image(index: int, label: int, size: tuple[int, int], channels: int = 3) -> torch.Tensor:
    """A class-coloured image with a seeded pattern, uint8 [C, H, W]."""
    g = torch.Generator().manual_seed(index * 7919 + label)
    base = torch.tensor([(label * 80) % 256, (label * 150 + 40) % 256, (255 - label * 60) % 256])[:channels]
    noise = torch.randint(0, 60, (channels, *size), generator=g)
    return (base[:, None, None] + noise).clamp(0, 255).to(torch.uint8)


def write_folder(root: Path, split: str, classes: list[str], per_class: int, sizes=SIZES, png_every: int = 0,
                 grey_every: int = 0) -> None:
    for label, cls in enumerate(classes):
        folder = root / split / cls
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            grey = grey_every and j % grey_every == 1
            image = make_image(j, label, sizes[j % len(sizes)], channels=1 if grey else 3)
            if png_every and j % png_every == 0:
                (folder / f"img{j:04d}.png").write_bytes(encode_png(image).numpy().tobytes())
            else:
                (folder / f"img{j:04d}.jpg").write_bytes(encode_jpeg(image, quality=90).numpy().tobytes())


def test_labels_and_classes_are_the_sorted_class_folders(tmp_path):
    write_folder(tmp_path, "train", ["zebra", "ant", "moth"], per_class=3)
    write_folder(tmp_path, "val", ["ant", "bee"], per_class=2)  # a class seen only in val
    (tmp_path / "train" / "ant" / "notes.txt").write_text("not an image")
    train = EncodedImageFolder(tmp_path, "train", image_size=24)
    assert train.classes == ["ant", "bee", "moth", "zebra"] and train.num_classes == 4
    assert train.labels.tolist() == [0, 0, 0, 2, 2, 2, 3, 3, 3] and train.labels.dtype == torch.int64
    assert [Path(train.path(i)).relative_to(tmp_path).as_posix() for i in (0, 3, 8)] == [
        "train/ant/img0000.jpg", "train/moth/img0000.jpg", "train/zebra/img0002.jpg"]
    assert len(train) == 9 and train.image_shape == (3, 24, 24) and not train.in_memory and train.is_labelled
    val = EncodedImageFolder(tmp_path, "val", image_size=24)
    assert val.classes == train.classes and val.labels.tolist() == [0, 0, 1, 1]
    # a given class list: its folders only, labels index the sorted list
    subset_classes = EncodedImageFolder(tmp_path, "train", classes=["zebra", "ant"], image_size=24)
    assert subset_classes.classes == ["ant", "zebra"] and subset_classes.labels.tolist() == [0, 0, 0, 1, 1, 1]
    with pytest.raises(DatasetNotFoundError, match=r"1 of the 2 class folders are missing \(bee\)"):
        EncodedImageFolder(tmp_path, "train", classes=["ant", "bee"])
    part = train.subset(torch.tensor([8, 0]), split="train-part")
    assert part.labels.tolist() == [3, 0] and part.split == "train-part" and len(part) == 2
    assert torch.equal(part.get_batch(torch.arange(2)), train.get_batch(torch.tensor([8, 0])))
    assert [PathTable(["a/b.jpg", "é/ü.png", ""])[i] for i in range(3)] == ["a/b.jpg", "é/ü.png", ""]


def test_decode_batch_on_the_cpu_is_bitwise_get_batch(tmp_path):
    # 240 images of varied sizes: JPEG (RGB and grey) and, one in six, PNG
    write_folder(tmp_path, "train", ["a", "b", "c", "d"], per_class=60, png_every=6, grey_every=5)
    size = 32
    folder = EncodedImageFolder(tmp_path, "train", image_size=size)
    sampler = BatchSampler(SequentialSampler(range(len(folder))), 50, drop_last=False)
    loader = DataLoader(EncodedBatches(folder), sampler=sampler, batch_size=None, num_workers=2)
    seen = 0
    for encoded, labels, indices in loader:  # the workers only read the files' bytes
        assert all(e.dtype == torch.uint8 and e.dim() == 1 for e in encoded) and len(encoded) == len(indices)
        assert torch.equal(encoded[-1], read_file(folder.path(int(indices[-1]))))
        images = decode_batch(encoded, size, "cpu")
        assert images.shape == (len(indices), 3, size, size) and images.dtype == torch.uint8
        assert torch.equal(images, folder.get_batch(indices))
        assert torch.equal(labels, folder.labels[indices])
        # independently: decode, shorter side to S (antialiased bilinear), centre crop
        for k in (0, len(indices) - 1):
            raw = decode_image(str(folder.path(int(indices[k]))), mode=ImageReadMode.RGB)
            expected = TF.center_crop(TF.resize(raw, [size], antialias=True), [size, size])
            assert torch.equal(images[k], expected)
        seen += len(indices)
    assert seen == len(folder) == 240
    clean = torch.cat([images for images, _, _ in decoded_batches(folder, 64, num_workers=0)])
    assert torch.equal(clean, folder.get_batch(torch.arange(len(folder))))


def test_images_keep_their_centre_and_broken_files_are_named(tmp_path):
    wide = torch.zeros(3, 20, 60, dtype=torch.uint8)
    wide[0, :, :20] = 255  # red | green | blue thirds: the centre crop of the wide image is the green third
    wide[1, :, 20:40] = 255
    wide[2, :, 40:] = 255
    image = decode_batch([encode_png(wide)], 10)[0]
    assert image.shape == (3, 10, 10)
    assert image[1].float().mean() > 200 and image[0].float().mean() < 60 and image[2].float().mean() < 60
    broken = torch.tensor([0xFF, 0xD8, 0xFF, 0xE0, 1, 2, 3], dtype=torch.uint8)
    good = encode_jpeg(make_image(0, 0, (16, 16)))
    with pytest.raises(DatasetCorruptError, match=r"^/x/broken\.jpg: cannot decode image"):
        decode_batch([good, broken], 8, sources=["/x/good.jpg", "/x/broken.jpg"])


MEMORY_SCRIPT = textwrap.dedent("""
    import json, re, resource, sys
    import torch
    from torch.utils.data import BatchSampler, DataLoader, SequentialSampler
    from benchmarks.streaming import EncodedBatches, EncodedImageFolder, decode_batch

    def status(key):
        return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

    def reset_peak():
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM (the peak RSS) to the current RSS
            return True
        except OSError:
            return False

    def stream(folder, size, hoard):
        sampler = BatchSampler(SequentialSampler(range(len(folder))), 100, drop_last=False)
        loader = DataLoader(EncodedBatches(folder), sampler=sampler, batch_size=None, num_workers=2)
        reset = reset_peak()
        base = status("VmRSS") if reset else status("VmHWM")
        kept, n = [], 0
        for encoded, labels, indices in loader:
            images = decode_batch(encoded, size, "cpu")
            n += len(images)
            if hoard:
                kept.append(images)
            del images, encoded  # before the next batch: two alive at once fragment glibc's heap (noise)
        del loader  # joins the workers, so getrusage counts them
        workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # largest worker peak so far
        return {"n": n, "growth_mb": (status("VmHWM") - base) / 2**20, "peak_reset": reset,
                "worker_peak_mb": workers}

    torch.set_num_threads(1)
    size, roots = int(sys.argv[1]), sys.argv[2:]
    out = []
    for root in roots:
        folder = EncodedImageFolder(root, "train", image_size=size)
        decode_batch(folder.read_encoded(range(100)), size)  # one-off allocations out of the measurement
        out.append(stream(folder, size, hoard=False))
    if out[-1]["peak_reset"]:  # the last folder again, keeping every batch: what the measurement must catch
        out[-1]["hoard_growth_mb"] = stream(folder, size, hoard=True)["growth_mb"]
    print(json.dumps(out))
""")


def measure_streaming(roots: list[Path], size: int) -> list[dict]:
    """Peak RSS growth while streaming each root, in a fresh process (earlier tests cannot raise its peak).

    One process measures every root, the peak being reset before each (/proc/self/clear_refs); where
    the kernel does not allow that, each root gets a process of its own.
    """
    # glibc returns blocks of 128 KiB and more to the system when they are freed (no dynamic threshold,
    # no heap left untrimmed), so the peak follows the live memory, not where the allocator put it
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}

    def run(paths):
        args = [sys.executable, "-c", MEMORY_SCRIPT, str(size), *map(str, paths)]
        proc = subprocess.run(args, capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    results = run(roots)
    if not results[0]["peak_reset"]:
        results = [run([root])[0] for root in roots]
    return results


def test_streaming_memory_does_not_grow_with_the_number_of_images(tmp_path):
    size = 64  # 2,000 decoded 64x64 images are 24.6 MB, far above the bound below
    write_folder(tmp_path / "small", "train", ["a", "b", "c", "d"], per_class=125, sizes=[(64, 64)])
    write_folder(tmp_path / "large", "train", ["a", "b", "c", "d"], per_class=500, sizes=[(64, 64)])
    small, large = measure_streaming([tmp_path / "small", tmp_path / "large"], size)
    assert (small["n"], large["n"]) == (500, 2000)
    bound_mb = 12.0
    assert large["growth_mb"] < bound_mb, (small, large)
    assert large["growth_mb"] < 2 * small["growth_mb"] + 4.0, (small, large)  # not ~4x the 500-image growth
    if "hoard_growth_mb" in large:  # the measurement itself sees memory that grows with the images
        assert large["hoard_growth_mb"] > bound_mb + 3, large


def test_choose_storage(monkeypatch):
    shape = (3, 32, 32)  # 3,072 bytes an image
    assert choose_storage(10**9, shape, "memory") == "memory"
    assert choose_storage(10, shape, "stream") == "stream"
    assert choose_storage(1000, shape, "auto", memory_limit_bytes=3_072_000) == "memory"
    assert choose_storage(1001, shape, "auto", memory_limit_bytes=3_072_000) == "stream"
    monkeypatch.setattr(streaming, "available_memory_bytes", lambda: 4_000_000)  # 25% = 1,000,000 bytes
    assert choose_storage(325, shape) == "memory"  # 998,400 bytes
    assert choose_storage(326, shape) == "stream"  # 1,001,472 bytes
    monkeypatch.undo()
    assert streaming.available_memory_bytes() > 0
    assert choose_storage(126_689, (3, 224, 224)) in ("memory", "stream")
    assert choose_storage(10**9, (3, 224, 224)) == "stream"
    with pytest.raises(ConfigError, match="dataset.storage: unknown setting 'disk'"):
        choose_storage(10, shape, "disk")


def test_imagenet100_classes_and_loader(tmp_path):
    wnids = imagenet100_classes()
    assert len(wnids) == len(set(wnids)) == 100 and (wnids[0], wnids[-1]) == ("n02869837", "n02090622")
    assert all(w.startswith("n") and len(w) == 9 for w in wnids)
    with pytest.raises(DatasetNotFoundError) as missing:
        load_imagenet100(tmp_path, "train")
    text = str(missing.value)
    assert f"{tmp_path}/imagenet100/train/<wnid>/: no such folder" in text
    assert f"{tmp_path}/imagenet/train/<wnid>/: no such folder" in text
    assert "https://image-net.org" in text and "valprep" in text
    # full ImageNet with 3 of the classes only, and an unsorted val
    for w in wnids[:3]:
        (tmp_path / "imagenet" / "train" / w).mkdir(parents=True)
    (tmp_path / "imagenet" / "val").mkdir()
    for i in range(3):
        (tmp_path / "imagenet" / "val" / f"ILSVRC2012_val_{i:08d}.JPEG").write_bytes(b"")
    with pytest.raises(DatasetNotFoundError, match=rf"97 of the 100 class folders missing \({wnids[3]}, "):
        load_imagenet100(tmp_path, "train")
    with pytest.raises(DatasetNotFoundError, match="holds 3 images directly: val must be sorted into class"):
        load_imagenet100(tmp_path, "val")
    write_folder(tmp_path / "imagenet100", "val", wnids, per_class=1, sizes=[(24, 30)])
    val = load_imagenet100(tmp_path, "val", image_size=16)
    assert val.name == "imagenet100" and len(val) == 100 and val.classes == sorted(wnids)
    assert val.labels.tolist() == list(range(100)) and val.get_batch(torch.arange(2)).shape == (2, 3, 16, 16)


@pytest.mark.slow
def test_a_training_epoch_on_streamed_data_equals_the_in_memory_path_on_the_same_images(tmp_path):
    """The trainer's streaming path (workers read encoded files, the batch is decoded before the views are
    drawn) trains exactly as the in-memory path fed the same decoded images."""
    from benchmarks.augment import BatchAugment, Normalization, ViewSpec
    from benchmarks.backbones import small_cnn
    from benchmarks.config import TrainConfig
    from benchmarks.data import ImageDataset
    from benchmarks.training import PretrainModule, PretrainSettings, fit
    from methods import get_method
    from methods.base import DataInfo
    from ssl_common.typed import OptimizerConfig

    write_folder(tmp_path / "data", "train", ["ant", "bee", "cat"], per_class=12, sizes=((20, 24), (24, 20)))
    streamed = EncodedImageFolder(tmp_path / "data", "train", image_size=16)
    in_memory = ImageDataset("imagefolder", "train", streamed.labels.clone(), list(streamed.classes),
                             images=streamed.get_batch(torch.arange(len(streamed))))

    def one_epoch(dataset, folder):
        torch.manual_seed(0)
        method = get_method("simclr")(small_cnn(3, width=8), DataInfo(3, len(dataset), 3, 16))
        augment = BatchAugment([ViewSpec(size=16, count=2)], Normalization((0.5,) * 3, (0.5,) * 3))
        module = PretrainModule(method, augment, OptimizerConfig(lr=0.05), dataset,
                                PretrainSettings(batch_size=8, max_epochs=1, seed=0))
        train = TrainConfig(epochs=1, accelerator="cpu", devices=1, precision="32", num_workers=1)
        result = fit(module, train, tmp_path / folder, "fp", progress=False)
        return result.history, {k: v.clone() for k, v in method.state_dict().items()}

    streamed_history, streamed_state = one_epoch(streamed, "streamed")
    memory_history, memory_state = one_epoch(in_memory, "memory")
    assert streamed_history == memory_history  # the same loss, exactly
    assert all(torch.equal(streamed_state[k], memory_state[k]) for k in memory_state)
