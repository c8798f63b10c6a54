"""Named variants of a method in one suite (`method/variant`), and the paper settings the suite files carry."""

from __future__ import annotations

import pytest
import torch

from benchmarks.backbones import small_cnn
from benchmarks.config import available_suites, load_suite
from methods import get_method
from methods.base import DataInfo

SUITES = ["digits", "mnist", "mnist-small", "cifar10", "cifar100", "cifar100-20", "stl10", "cifar10-nin", "stl10-nin", "digits-nin"]


def test_the_suite_files_include_the_nin_suites():
    assert set(SUITES) <= set(available_suites())


def test_two_variants_of_one_method_resolve_to_two_method_configs():
    config = load_suite("cifar10")
    paper, reimpl = config.method("self_classifier"), config.method("self_classifier/reimpl")
    assert (paper.method, paper.variant, reimpl.method, reimpl.variant) == (
        "self_classifier", None, "self_classifier", "reimpl")
    assert paper != reimpl
    # the paper's Table 2 settings (sec. 7.2-7.4) ...
    hp = paper.hparams
    assert (hp.heads, hp.row_tau, hp.col_tau, hp.row_l1_norm, hp.official_prediction_norm) == ([30], 0.3, 0.3, True,
                                                                                           False)
    assert (paper.optimizer.name, paper.optimizer.lr, paper.optimizer.weight_decay, paper.optimizer.warmup_epochs,
            paper.optimizer.lr * paper.optimizer.final_lr_fraction) == ("sgd", 3.2, 1e-6, 0.0, pytest.approx(0.032))
    assert paper.augment.views[0].scale == (0.2, 1.0) and paper.batch_size == 256
    # ... and the reimplementation's (sec. 3.2-3.3): its loss, heads, taus, schedule, batch, epochs, BYOL's views
    hp, opt = reimpl.hparams, reimpl.optimizer
    assert (hp.heads, hp.row_tau, hp.col_tau, hp.official_prediction_norm) == ([10, 20, 40, 80], 0.1, 0.05, True)
    assert (opt.name, opt.lr, opt.momentum, opt.weight_decay, opt.warmup_epochs) == ("sgd", 0.4, 0.9, 1e-4, 10)
    assert opt.lr * opt.warmup_start_fraction == pytest.approx(0.01)
    assert opt.lr * opt.final_lr_fraction == pytest.approx(0.0004)
    assert (reimpl.batch_size, reimpl.epochs) == (512, 800)
    assert [(v.blur_p, v.solarize_p) for v in reimpl.augment.views] == [(1.0, 0.0), (0.1, 0.2)]
    assert reimpl.paper == "self-classifier-reimplementation" and reimpl.display_name == "Self-Classifier (reimpl)"
    # the official CIFAR scripts' 30 heads are a third variant
    assert config.method("self_classifier/official").hparams.heads == [30] * 30


@pytest.mark.parametrize("suite,heads,taus,epochs", [
    ("mnist", [10, 20, 40, 80], (0.1, 0.05), 800), ("cifar100-20", [20, 40, 80, 160], (0.1, 0.05), 800),
    ("stl10", [10, 20, 40, 80], (0.07, 0.05), 300)])
def test_the_reimplementation_variant_per_dataset(suite, heads, taus, epochs):
    reimpl = load_suite(suite).method("self_classifier/reimpl")
    assert (reimpl.hparams.heads, (reimpl.hparams.row_tau, reimpl.hparams.col_tau), reimpl.epochs,
            reimpl.batch_size) == (heads, taus, epochs, 512)


@pytest.mark.parametrize("suite", SUITES)
def test_every_configured_method_and_variant_builds(suite):
    config = load_suite(suite)
    for name in config.method_names():
        settings = config.method(name)
        data = DataInfo(num_classes=config.num_classes, num_train=1000, in_channels=1, image_size=8)
        torch.manual_seed(0)
        method = get_method(settings.method)(small_cnn(1, width=4), data, settings.hparams)  # runs check_hparams
        stages = method.stages(settings)  # SSL++: its two budgets, its views validated
        assert stages is None or [s.name for s in stages] == ["clustering", "rotation"]


@pytest.mark.parametrize("suite", SUITES)
def test_every_reimplementation_variant_has_its_codes_network(suite):
    """Where the report is silent (issue 25): the code's MLP (final BN + LeakyReLU) and learned weight-normalised
    heads, in every suite that defines `self_classifier/reimpl`; the paper's variant keeps its fixed cosine heads."""
    config = load_suite(suite)
    if "self_classifier/reimpl" not in config.method_names():
        pytest.skip(f"{suite} has no self_classifier/reimpl")
    hp = config.method("self_classifier/reimpl").hparams
    assert (hp.mlp_style, hp.classifier) == ("reimpl", "weight_norm")
    paper = config.method("self_classifier").hparams
    assert (paper.mlp_style, paper.classifier) == ("paper", "cosine")


def test_digits_runs_the_reimplementation_variant():
    config = load_suite("digits")
    assert "self_classifier/reimpl" in config.methods_to_run
    assert config.method("self_classifier/reimpl").batch_size == config.train.batch_size  # digits' budget


@pytest.mark.parametrize("suite", ["cifar10-nin", "stl10-nin"])
def test_nin_suites_carry_ssl_plus_plus_table_ii(suite):
    config = load_suite(suite)
    assert config.backbone == "nin" and config.methods_to_run == ["rotation", "sslpp"]
    assert config.references == ["random_init", "supervised"]
    for name in ("rotation", "sslpp"):
        m = config.method(name)
        opt = m.optimizer
        assert (m.batch_size, m.epochs, opt.name, opt.lr, opt.momentum, opt.weight_decay) == (
            128, 200, "sgd", 0.1, 0.9, 5e-4)
        assert (opt.schedule, opt.milestones, opt.gamma) == ("step", [60, 120, 160], 0.1)
    sslpp = config.method("sslpp")
    data = DataInfo(num_classes=10, num_train=1000, in_channels=3, image_size=32)
    method = get_method("sslpp")(small_cnn(3, width=4), data, sslpp.hparams)
    clustering, rotation = method.stages(sslpp)
    assert (clustering.optimizer.name, clustering.optimizer.lr, clustering.optimizer.schedule) == (
        "adamw", 1e-4, "constant")
    assert sslpp.hparams.num_clusters == 70 and sslpp.hparams.pseudo_label_weight == 0.05 and sslpp.hparams.sobel
    weak, strong = clustering.augment.views
    assert (weak.count, weak.grayscale_p, weak.hflip_p, weak.jitter_p) == (1, 1.0, 0.0, 0.0)  # Cr + G (+ S)
    assert (strong.grayscale_p, strong.hflip_p, strong.jitter_p) == (1.0, 0.5, 1.0)  # Cr + F + Co + G (+ S)
    assert rotation.epochs == 200 and rotation.augment.views[0].size == 32


def test_the_mnist_suite_of_the_reimplementations_table_trains_resnet18_with_a_grey_cifar_stem():
    """The reimplementation's Table 1 is ResNet-18 on every dataset (its sec. 3.3): `mnist` (which runs
    self_classifier/reimpl, paper: its Table 1) builds ResNet-18 with a 1-channel CIFAR stem for 28x28 images."""
    from benchmarks.backbones import build_backbone

    config = load_suite("mnist")
    assert (config.backbone, config.in_channels, config.image_size) == ("resnet18_cifar", 1, 28)
    assert config.method("self_classifier/reimpl").paper == "self-classifier-reimplementation"
    backbone = build_backbone(config.backbone, config.in_channels, **config.backbone_options)
    stem_conv = backbone.stem[0]
    assert (stem_conv.in_channels, stem_conv.kernel_size, stem_conv.stride) == (1, (3, 3), (1, 1))
    with torch.no_grad():
        stages = backbone.forward_stages(torch.randn(2, 1, 28, 28))
        assert [tuple(s.shape[1:]) for s in stages] == [(64, 28, 28), (128, 14, 14), (256, 7, 7), (512, 4, 4)]
        assert backbone(torch.randn(2, 1, 28, 28)).shape == (2, 512)


def test_the_small_cnn_mnist_suite_is_named_so_and_trains_every_method_with_its_shared_optimizer():
    config = load_suite("mnist-small")
    assert config.backbone == "small_cnn" and config.dataset.name == "mnist"
    assert "self_classifier/reimpl" not in config.method_names()  # its Table 1 is ResNet-18's (mnist.yaml)
    for name in config.methods_to_run:
        settings = config.method(name)
        assert settings.optimizer == config.optimizer, name  # nothing transplanted from another backbone
    sslpp = config.method("sslpp")
    method = get_method("sslpp")(small_cnn(1, width=4), DataInfo(10, 1000, 1, 28), sslpp.hparams)
    clustering, rotation = method.stages(sslpp)
    assert clustering.optimizer == config.optimizer and rotation.optimizer == config.optimizer
