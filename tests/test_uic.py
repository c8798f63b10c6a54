"""UIC (methods/uic.py): empty-class filling, class-balanced epochs, the label store."""

from __future__ import annotations

import functools

import pytest
import torch

try:
    from tests import ddp_harness
except ImportError:  # pytest's rootdir-less import mode
    import ddp_harness

from benchmarks.augment import BatchAugment, Normalization, ViewSpec
from benchmarks.config import TrainConfig
from benchmarks.data import ImageDataset
from benchmarks.errors import ConfigError
from methods import get_method
from methods.base import DataInfo, EpochContext, TrainBatch
from methods.uic import class_balanced_order, fill_empty_classes
from ssl_common.typed import OptimizerConfig
from tests.helpers import tiny_method

# -- fill_empty_classes -------------------------------------------------------------------------

# classes 2 and 4 are empty; class 0 (8 samples) is the largest
HAND_LABELS = torch.tensor([0, 1, 0, 3, 0, 1, 0, 0, 1, 3, 0, 1, 0, 0])


def test_fill_empty_classes_splits_the_largest_class_in_half_until_none_is_empty():
    before = HAND_LABELS.clone()
    filled = fill_empty_classes(HAND_LABELS, 5, torch.Generator().manual_seed(0))
    assert torch.equal(HAND_LABELS, before)  # input untouched
    counts = torch.bincount(filled, minlength=5).tolist()
    # class 2 takes half of class 0 (8 -> 4 + 4); then class 4 takes half of the largest,
    # a tie between 0, 1 and 2 (4 each) that goes to the lowest index: 0 -> 2 + 2
    assert counts == [2, 4, 4, 2, 2]
    others = (HAND_LABELS == 1) | (HAND_LABELS == 3)
    assert torch.equal(filled[others], HAND_LABELS[others])  # other classes untouched
    assert bool((HAND_LABELS[filled != HAND_LABELS] == 0).all())  # only class 0's samples moved
    assert bool((filled[HAND_LABELS == 0] != 1).all()) and bool((filled[HAND_LABELS == 0] != 3).all())


def test_fill_empty_classes_is_deterministic_for_a_fixed_generator():
    first = fill_empty_classes(HAND_LABELS, 5, torch.Generator().manual_seed(3))
    again = fill_empty_classes(HAND_LABELS, 5, torch.Generator().manual_seed(3))
    assert torch.equal(first, again)
    others = {tuple(fill_empty_classes(HAND_LABELS, 5, torch.Generator().manual_seed(s)).tolist())
              for s in range(10)}
    assert len(others) > 1  # the split is random


def test_fill_empty_classes_leaves_full_label_sets_alone_and_refuses_impossible_ones():
    labels = torch.tensor([2, 0, 1, 1])
    assert torch.equal(fill_empty_classes(labels, 3), labels)
    with pytest.raises(ValueError):
        fill_empty_classes(torch.tensor([0, 0]), 3)  # fewer samples than classes
    with pytest.raises(ValueError):
        fill_empty_classes(torch.tensor([0, 5]), 3)


# -- class-balanced epochs ------------------------------------------------------------------------

def test_class_balanced_order_visits_each_class_equally_often():
    labels = torch.tensor([0] * 50 + [1] * 5 + [2] * 15)  # 70 images, imbalanced
    order = class_balanced_order(labels, torch.Generator().manual_seed(0))
    assert len(order) == 70
    per_class = torch.bincount(labels[order], minlength=3)
    assert per_class.max() - per_class.min() <= 1 and per_class.sum() == 70
    # with a length the classes divide: exactly equal
    order = class_balanced_order(labels, torch.Generator().manual_seed(0), length=60)
    assert torch.bincount(labels[order], minlength=3).tolist() == [20, 20, 20]
    # the small class repeats its members evenly (20 draws of 5 images: 4 each); the large one does not repeat
    visits = torch.bincount(order, minlength=70)
    assert visits[50:55].tolist() == [4] * 5
    assert int(visits[:50].max()) == 1 and int(visits[55:].max()) == 2  # 20 draws of 15: 1 or 2 each


def test_class_balanced_order_is_a_shuffled_deterministic_order():
    labels = torch.tensor([0] * 10 + [1] * 10)
    order = class_balanced_order(labels, torch.Generator().manual_seed(1))
    assert torch.equal(order, class_balanced_order(labels, torch.Generator().manual_seed(1)))
    assert not torch.equal(order, torch.sort(order).values)


# -- the label store --------------------------------------------------------------------------------

# UIC on a tiny CNN: 2 true classes (DataInfo); its own number of classes K is the hparam num_classes
_tiny_uic = functools.partial(tiny_method, "uic", num_classes=2)


class Spy:
    """Records the hooks' calls and what each step trained against."""

    def __init__(self, method):
        self.method, self.events, self.steps = method, [], []
        for name in ("on_train_epoch_start", "epoch_order", "training_loss"):
            setattr(method, name, self._wrap(name, getattr(method, name)))

    def _wrap(self, name, fn):
        def wrapped(*args):
            if name == "training_loss":
                batch = args[0]
                result = fn(batch)
                with torch.no_grad():  # the same forward again, before the optimizer step
                    logits = self.method.scores(batch.views[0])
                self.steps.append({"epoch": batch.epoch, "indices": batch.indices.clone(),
                                   "targets": self.method.pseudo_labels[batch.indices].clone(),
                                   "predicted": logits.argmax(1)})
                return result
            epoch = args[0].epoch if name == "on_train_epoch_start" else args[0]
            self.events.append((name, epoch, self.method.pseudo_labels.clone()))
            return fn(*args)
        return wrapped


def test_two_epochs_train_against_the_previous_epochs_predictions(tmp_path):
    from benchmarks.training import (  # Lightning: imported here, not in the DDP workers
        PretrainModule,
        PretrainSettings,
        fit,
    )

    n = 48
    images = torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    dataset = ImageDataset("tiny", "train", torch.arange(n) % 2, ["a", "b"], images=images)
    method = _tiny_uic({"num_classes": 3, "head": "linear"}, num_train=n)
    spy = Spy(method)
    augment = BatchAugment([ViewSpec(size=8, count=2)], Normalization((0.5,), (0.5,)))
    module = PretrainModule(method, augment, OptimizerConfig(), dataset,
                            PretrainSettings(batch_size=8, max_epochs=2, seed=0))
    train_cfg = TrainConfig(epochs=2, accelerator="cpu", devices=1, precision="32")
    result = fit(module, train_cfg, tmp_path, "fp", progress=False)

    # Lightning calls on_train_epoch_start before the sampler asks for the epoch's order
    assert [(name, epoch) for name, epoch, _ in spy.events] == [
        ("on_train_epoch_start", 0), ("epoch_order", 0), ("on_train_epoch_start", 1), ("epoch_order", 1)]
    labels_at_order_1 = spy.events[3][2]
    # epoch 1's labels: for every image visited in epoch 0, the prediction of its (last) forward pass there
    expected = spy.events[2][2].clone()  # the labels of epoch 0 (images not visited keep theirs)
    for step in (s for s in spy.steps if s["epoch"] == 0):
        expected[step["indices"]] = step["predicted"]
    assert result.history[1]["empty_classes_filled"] == 0  # no filling: the store is the raw predictions
    assert torch.equal(labels_at_order_1, expected)
    for step in (s for s in spy.steps if s["epoch"] == 1):
        assert torch.equal(step["targets"], expected[step["indices"]])
    assert not torch.equal(spy.events[2][2], expected)  # the labels did change between epochs
    # epoch 1's order is class-balanced for the refreshed labels
    visited = torch.cat([s["indices"] for s in spy.steps if s["epoch"] == 1])
    assert torch.bincount(expected[visited], minlength=3).tolist() == [16, 16, 16]
    assert "pseudo_label_nmi" in result.history[0]


def test_first_epoch_labels_come_from_the_initial_network_and_empty_classes_are_filled():
    n = 30
    images = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    method = _tiny_uic({"num_classes": 4, "head": "linear"}, num_train=n)
    with torch.no_grad():
        method.head.bias.copy_(torch.tensor([100.0, 0.0, 0.0, 0.0]))  # the initial network predicts class 0
    method.eval()
    logs = method.on_train_epoch_start(EpochContext(0, 2, 0, lambda fn: fn(images), torch.device("cpu")))
    assert logs["empty_classes_filled"] == 3
    # 30 -> class 1 takes 15; tie 15/15 -> class 0 splits, class 2 takes 7; then class 1 splits, class 3 takes 7
    assert torch.bincount(method.pseudo_labels, minlength=4).tolist() == [8, 8, 7, 7]
    assert torch.equal(method.next_pseudo_labels, method.pseudo_labels)

    random_method = _tiny_uic({"num_classes": 4, "head": "linear", "init_labels": "random"}, num_train=n)

    def must_not_predict(fn):
        raise AssertionError("init_labels=random must not run the network")
    random_method.on_train_epoch_start(EpochContext(0, 2, 0, must_not_predict, torch.device("cpu")))
    assert bool((torch.bincount(random_method.pseudo_labels, minlength=4) > 0).all())
    assert len(torch.unique(random_method.pseudo_labels)) == 4


def test_the_label_store_is_checkpointed_and_restored():
    n = 20
    method = _tiny_uic({"num_classes": 3}, num_train=n)
    method.pseudo_labels.copy_(torch.arange(n) % 3)
    method.next_pseudo_labels.copy_((torch.arange(n) + 1) % 3)
    state = method.state_dict()
    assert {"pseudo_labels", "next_pseudo_labels"} <= set(state)
    resumed = _tiny_uic({"num_classes": 3}, num_train=n)
    resumed.load_state_dict(state)

    def must_not_predict(fn):
        raise AssertionError("a resumed run must not re-initialise its labels")
    resumed.on_train_epoch_start(EpochContext(5, 10, 0, must_not_predict, torch.device("cpu")))
    assert torch.equal(resumed.pseudo_labels, (torch.arange(n) + 1) % 3)


def _uic_ddp_worker(rank: int, world_size: int, images: torch.Tensor, rank_indices: list) -> torch.Tensor:
    method = _tiny_uic({"num_classes": 3, "head": "linear"}, num_train=len(images))
    method.pseudo_labels.copy_(torch.arange(len(images)) % 3)
    method.next_pseudo_labels.copy_(method.pseudo_labels)
    idx = rank_indices[rank]
    batch = TrainBatch([images[idx], images[idx]], idx, None, 1, 0, 2, torch.Generator())
    method.training_loss(batch)
    return method.next_pseudo_labels


def test_label_store_is_identical_on_every_rank_after_an_update_with_different_local_indices():
    n = 16
    images = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    rank_indices = [torch.tensor([0, 5, 9, 12]), torch.tensor([3, 4, 10, 15])]
    stores = ddp_harness.run_distributed(_uic_ddp_worker, world_size=2, args=(images, rank_indices))
    assert torch.equal(stores[0], stores[1])
    # the expected store: both ranks' predictions (single process, same weights, same local batches)
    reference = _tiny_uic({"num_classes": 3, "head": "linear"}, num_train=n)
    expected = torch.arange(n) % 3
    with torch.no_grad():
        for idx in rank_indices:
            expected[idx] = reference.scores(images[idx]).argmax(1)
    assert torch.equal(stores[0], expected)
    assert not torch.equal(expected, torch.arange(n) % 3)  # the update is visible


def test_the_linear_probe_reads_the_mlp_heads_output_as_sec_5_2():
    torch.manual_seed(0)
    method = _tiny_uic({"num_classes": 3}, num_train=20)  # head: official, probe_with_head by default
    method.eval()
    images = torch.randn(4, 1, 8, 8)
    mlp, classifier = method.head[0], method.head[1]
    with torch.no_grad():
        probed = method.probe_features(images)
        torch.testing.assert_close(probed, mlp(method.backbone(images)))  # the MLP's output ...
        torch.testing.assert_close(classifier(probed), method.scores(images))  # ... = the classifier's input
    assert probed.shape == (4, method.backbone.feature_dim)  # full width (the official head)
    # the former SimCLR head, probed at 128-d
    simclr = _tiny_uic({"num_classes": 3, "head": "simclr"}, num_train=20)
    assert simclr.eval().probe_features(images).shape == (4, simclr.hparams.mlp_out_dim)
    off = _tiny_uic({"num_classes": 3, "probe_with_head": False}, num_train=20)
    off.eval()
    with torch.no_grad():
        torch.testing.assert_close(off.probe_features(images), off.backbone(images))
    linear = _tiny_uic({"num_classes": 3, "head": "linear"}, num_train=20)  # no MLP: the backbone's features
    with torch.no_grad():
        torch.testing.assert_close(linear.eval().probe_features(images), linear.backbone(images))


def test_cifar10_uic_has_the_official_full_width_head_and_probe():
    """Built for the cifar10 suite (ResNet-18, d = 512): the official code's head (UIC/models/resnet50.py
    L182-190: conv1x1(d, 2048)-BN-ReLU-conv1x1(2048, 2048)-BN-ReLU, fc Linear(2048, K) with bias; 2048 = ResNet-50's
    width, d here), transcribed by hand as 1x1 convolutions on the pooled [B, d, 1, 1] map with the method's
    weights: max abs difference 2.6e-6 measured (float32 rounding; asserted <= 1e-5)."""
    from benchmarks.backbones import build_backbone
    from benchmarks.config import load_suite

    config = load_suite("cifar10")
    for name in ("uic", "uic/official"):
        settings = config.method(name)
        torch.manual_seed(0)
        data = DataInfo(num_classes=10, num_train=100, in_channels=3, image_size=32)
        method = get_method("uic")(build_backbone(config.backbone, 3), data, settings.hparams).eval()
        d = method.backbone.feature_dim
        assert d == 512
        mlp, fc = method.head
        assert [type(m).__name__ for m in mlp] == ["Linear", "BatchNorm1d", "ReLU"] * 2
        assert [tuple(m.weight.shape) for m in mlp if isinstance(m, torch.nn.Linear)] == [(d, d), (d, d)]
        assert all(m.bias is None for m in mlp if isinstance(m, torch.nn.Linear))  # conv1x1 has no bias
        assert tuple(fc.weight.shape) == (30, d) and fc.bias is not None
        with torch.no_grad():
            for bn in (mlp[1], mlp[4]):  # non-trivial BN statistics
                bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.2, 0.2)
            features = torch.randn(6, d)
            x = features.view(6, d, 1, 1)
            for conv_weight, bn in ((mlp[0].weight, mlp[1]), (mlp[3].weight, mlp[4])):
                x = torch.nn.functional.conv2d(x, conv_weight.view(d, d, 1, 1))  # conv1x1, bias=False
                x = (x - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(bn.running_var.view(1, -1, 1, 1) + bn.eps)
                x = torch.relu(x * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1))
            hand = torch.flatten(x, 1)
            assert (mlp(features) - hand).abs().max().item() <= 1e-5
            assert ((fc(mlp(features))) - (hand @ fc.weight.T + fc.bias)).abs().max().item() <= 1e-5
            images = torch.randn(2, 3, 32, 32)
            assert method.probe_features(images).shape == (2, d)  # the probe reads the backbone-width output
    official = config.method("uic/official")
    opt, view = official.optimizer, official.augment.views[0]
    assert (opt.schedule, opt.lr, opt.lr_scale_batch, opt.final_lr_fraction, opt.weight_decay) == (
        "cosine", 0.2, 1024, 0.0, 1e-4)
    assert (view.jitter_p, view.brightness, view.contrast, view.saturation, view.hue, view.blur_p) == (
        0.8, 0.8, 0.8, 0.8, 0.2, 0.5)
    assert config.method("uic").optimizer.schedule == "linear"  # the paper's default


@pytest.mark.parametrize("hparams,key", [
    ({"head": "linear", "probe_with_head": True}, "probe_with_head"),
    ({"head": "conv"}, "head"),
    ({"num_classes": 1}, "num_classes"),
    ({"num_classes": 100}, "num_classes"),  # more classes than images
    ({"init_labels": "zeros"}, "init_labels"),
    ({"mlp_out_dim": 0}, "mlp_out_dim"),
])
def test_invalid_hparams_name_the_key(hparams, key):
    with pytest.raises(ConfigError, match=rf"methods\.uic\.{key}"):
        _tiny_uic(hparams, num_train=20)
