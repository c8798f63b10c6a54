"""Self-Classifier: the loss against Eq. 3-4 written out by hand, gradients, the network."""

from __future__ import annotations

import functools
import inspect
import math

import numpy as np
import pytest
import torch

from benchmarks.errors import ConfigError
from methods import get_method
from methods.base import DataInfo
from methods.self_classifier import self_classifier_loss, self_classifier_view_loss
from tests.helpers import tiny_method, train_batch


def hand_view_loss(pred, target, row_tau, col_tau, row_l1_norm):
    """l(a, b) = -(1/N) sum_n sum_y p(b_n|y) log p(y|a_n) (Eq. 3), with explicit loops."""
    n_rows, n_classes = len(pred), len(pred[0])
    log_y_given_x = [[0.0] * n_classes for _ in range(n_rows)]
    for n in range(n_rows):  # row softmax over classes
        norm = sum(math.exp(pred[n][c] / row_tau) for c in range(n_classes))
        for y in range(n_classes):
            log_y_given_x[n][y] = pred[n][y] / row_tau - math.log(norm)
    x_given_y = [[0.0] * n_classes for _ in range(n_rows)]
    for y in range(n_classes):  # column softmax over the batch
        norm = sum(math.exp(target[m][y] / col_tau) for m in range(n_rows))
        for n in range(n_rows):
            x_given_y[n][y] = math.exp(target[n][y] / col_tau) / norm
    if row_l1_norm:
        for n in range(n_rows):
            row_sum = sum(x_given_y[n])
            x_given_y[n] = [v / row_sum for v in x_given_y[n]]
    total = 0.0
    for n in range(n_rows):
        for y in range(n_classes):
            total -= x_given_y[n][y] * log_y_given_x[n][y]
    return total / n_rows


def hand_loss(heads_a, heads_b, row_tau, col_tau, row_l1_norm):
    """Eq. 4, the mean over heads."""
    per_head = [0.5 * (hand_view_loss(a, b, row_tau, col_tau, row_l1_norm)
                       + hand_view_loss(b, a, row_tau, col_tau, row_l1_norm)) for a, b in zip(heads_a, heads_b)]
    return sum(per_head) / len(per_head)


LOGITS_A = [[0.9, -0.2, 0.1], [0.3, 0.8, -0.5], [-0.7, 0.2, 0.6], [0.1, 0.1, -0.9]]
LOGITS_B = [[0.5, 0.1, -0.3], [0.2, 0.6, 0.0], [-0.4, -0.1, 0.9], [0.3, -0.2, -0.6]]


def test_the_contract_signature():
    params = list(inspect.signature(self_classifier_loss).parameters)
    assert params == ["logits_a", "logits_b", "row_tau", "col_tau", "row_l1_norm", "official_prediction_norm"]
    assert inspect.signature(self_classifier_loss).parameters["official_prediction_norm"].default is False


@pytest.mark.parametrize("row_l1_norm", [False, True])
@pytest.mark.parametrize("row_tau,col_tau", [(0.3, 0.3), (0.1, 0.05)])
def test_single_head_matches_the_equation_by_hand(row_l1_norm, row_tau, col_tau):
    got = self_classifier_loss(torch.tensor(LOGITS_A, dtype=torch.float64), torch.tensor(LOGITS_B, dtype=torch.float64),
                               row_tau, col_tau, row_l1_norm)
    want = hand_loss([LOGITS_A], [LOGITS_B], row_tau, col_tau, row_l1_norm)
    assert got.item() == pytest.approx(want, rel=1e-10)


def test_row_l1_norm_changes_the_loss_and_closed_forms_hold():
    # equal logits: log p(y|a) = -log C; p(b|y) = 1/N, rows sum to C/N -> l = C log C / N; l1-normalised rows: log C
    zeros = torch.zeros(4, 3, dtype=torch.float64)
    assert self_classifier_loss(zeros, zeros, 0.1, 0.05, False).item() == pytest.approx(3 * math.log(3) / 4)
    assert self_classifier_loss(zeros, zeros, 0.1, 0.05, True).item() == pytest.approx(math.log(3))
    a, b = torch.tensor(LOGITS_A), torch.tensor(LOGITS_B)
    assert abs(self_classifier_loss(a, b, 0.1, 0.05, True) - self_classifier_loss(a, b, 0.1, 0.05, False)) > 1e-3


@pytest.mark.parametrize("row_l1_norm", [False, True])
def test_multi_head_is_the_mean_over_heads(row_l1_norm):
    rng = np.random.default_rng(0)
    heads_a = [LOGITS_A, rng.normal(size=(4, 5)).tolist()]
    heads_b = [LOGITS_B, rng.normal(size=(4, 5)).tolist()]
    got = self_classifier_loss([torch.tensor(h) for h in heads_a], [torch.tensor(h) for h in heads_b],
                               0.2, 0.1, row_l1_norm)
    want = hand_loss(heads_a, heads_b, 0.2, 0.1, row_l1_norm)
    assert got.item() == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="number of heads"):
        self_classifier_loss([torch.tensor(LOGITS_A)], [torch.tensor(LOGITS_B)] * 2, 0.1, 0.1, True)


def test_official_prediction_norm_variant_by_hand():
    """The official code: log(N/C * p(y|a_n) / sum_m p(y|a_m)) instead of log p(y|a_n)."""
    pred, target = np.array(LOGITS_A), np.array(LOGITS_B)
    n, c = pred.shape
    row = np.exp(pred / 0.1) / np.exp(pred / 0.1).sum(1, keepdims=True)
    row_col = row / row.sum(0, keepdims=True)
    col = np.exp(target / 0.05) / np.exp(target / 0.05).sum(0, keepdims=True)
    col = col / col.sum(1, keepdims=True)
    want = -(col * np.log(n / c * row_col + 1e-8)).sum() / n
    got = self_classifier_view_loss(torch.tensor(pred), torch.tensor(target), 0.1, 0.05, True,
                                    official_prediction_norm=True)
    assert got.item() == pytest.approx(want, rel=1e-8)


def hand_reimpl_view_loss(pred, target, row_tau, col_tau):
    """The reimplementation's sec. 3.2 with loops: -(1/N) sum_n sum_y [p(x2|y) / sum_y' p(x2|y')]
    * log(N/C * p(y|x1) / sum_x p(y|x) + 1e-8) (the official code's eps inside the log)."""
    n, c = len(pred), len(pred[0])
    row = [[math.exp(pred[i][y] / row_tau) / sum(math.exp(pred[i][k] / row_tau) for k in range(c)) for y in range(c)]
           for i in range(n)]
    row_sums = [sum(row[i][y] for i in range(n)) for y in range(c)]  # sum over the batch per class
    col = [[math.exp(target[i][y] / col_tau) / sum(math.exp(target[m][y] / col_tau) for m in range(n))
            for y in range(c)] for i in range(n)]
    total = 0.0
    for i in range(n):
        l1 = sum(col[i])
        for y in range(c):
            total -= col[i][y] / l1 * math.log(n / c * row[i][y] / row_sums[y] + 1e-8)
    return total / n


@pytest.mark.parametrize("row_tau,col_tau", [(0.1, 0.05), (0.07, 0.05)])
def test_reimplementation_loss_matches_its_formula_by_hand(row_tau, col_tau):
    """self_classifier_loss(official_prediction_norm=True): (l(a, b) + l(b, a)) / 2, mean over heads."""
    rng = np.random.default_rng(1)
    heads_a = [LOGITS_A, rng.normal(size=(4, 5)).tolist()]
    heads_b = [LOGITS_B, rng.normal(size=(4, 5)).tolist()]
    want = sum(0.5 * (hand_reimpl_view_loss(a, b, row_tau, col_tau) + hand_reimpl_view_loss(b, a, row_tau, col_tau))
               for a, b in zip(heads_a, heads_b)) / 2
    got = self_classifier_loss([torch.tensor(h, dtype=torch.float64) for h in heads_a],
                               [torch.tensor(h, dtype=torch.float64) for h in heads_b], row_tau, col_tau,
                               row_l1_norm=True, official_prediction_norm=True)
    assert got.item() == pytest.approx(want, rel=1e-9)
    # a different loss from Eq. 3 on the same logits
    eq3 = self_classifier_loss([torch.tensor(h, dtype=torch.float64) for h in heads_a],
                               [torch.tensor(h, dtype=torch.float64) for h in heads_b], row_tau, col_tau, True)
    assert abs(eq3.item() - got.item()) > 1e-3
    # balanced one-hot predictions: N/C * p / sum_x p = 1 where p = 1, so the log is ~0 there
    eye = torch.eye(3, dtype=torch.float64).repeat(2, 1) * 50
    assert self_classifier_loss(eye, eye, 0.1, 0.05, True, True).item() == pytest.approx(0.0, abs=1e-6)


def test_no_stop_gradient_both_views_get_the_full_gradient():
    """Finite differences of the hand-written Eq. 4 (no stop-gradient) equal autograd for both views."""
    a = torch.tensor(LOGITS_A, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(LOGITS_B, dtype=torch.float64, requires_grad=True)
    self_classifier_loss(a, b, 0.3, 0.2, True).backward()
    h = 1e-6
    for tensor, grad in ((a, a.grad), (b, b.grad)):
        assert grad.abs().sum() > 1e-3
        for n in range(4):
            for y in range(3):
                plus, minus = [r[:] for r in LOGITS_A], [r[:] for r in LOGITS_A]
                plus_b, minus_b = [r[:] for r in LOGITS_B], [r[:] for r in LOGITS_B]
                if tensor is a:
                    plus[n][y] += h
                    minus[n][y] -= h
                else:
                    plus_b[n][y] += h
                    minus_b[n][y] -= h
                numeric = (hand_loss([plus], [plus_b], 0.3, 0.2, True)
                           - hand_loss([minus], [minus_b], 0.3, 0.2, True)) / (2 * h)
                assert grad[n, y].item() == pytest.approx(numeric, abs=1e-6)


# 10 classes, 100 images, width 8; the tests seed torch themselves
_method = functools.partial(tiny_method, "self_classifier", num_classes=10, num_train=100, width=8, seed=None)


def test_network_fixed_orthonormal_cosine_classifier_and_default_over_clustering():
    torch.manual_seed(0)
    method = _method()
    assert method.head_sizes == [30]  # 3x the 10 true classes
    hp = method.hparams  # the paper's CIFAR settings by default (sec. 7.2)
    assert (hp.row_tau, hp.col_tau, hp.row_l1_norm, hp.official_prediction_norm) == (0.3, 0.3, True, False)
    assert [type(m).__name__ for m in method.mlp] == ["Linear", "BatchNorm1d", "LeakyReLU"] * 2 + ["Linear"]
    assert method.paper == "self-classifier" and method.display_name == "Self-Classifier"
    weight = method.classifiers[0].weight
    assert not weight.requires_grad
    torch.testing.assert_close(weight @ weight.T, torch.eye(30), atol=1e-5, rtol=0)  # 30 <= 64: orthonormal rows
    images = torch.randn(6, 1, 8, 8)
    logits = method.cluster_logits(images)
    assert logits.shape == (6, 30)
    assert logits.abs().max() <= 1 + 1e-5  # cosine similarities
    # more classes than dimensions: unit rows (cosine), and learnable behind the flag
    wide = _method({"heads": [100, 20], "output_dim": 16, "learnable_classifier": True})
    assert wide.head_sizes == [100, 20] and wide.classifiers[0].weight.requires_grad
    wide.eval()
    z = wide.mlp(wide.backbone(images)).detach().numpy()
    w = wide.classifiers[0].weight.detach().numpy()
    cosine = (z @ w.T) / np.linalg.norm(z, axis=1, keepdims=True) / np.linalg.norm(w, axis=1)[None, :]
    heads = wide.cluster_logits(images)  # several heads: every head's logits
    assert [h.shape[1] for h in heads] == [100, 20]
    np.testing.assert_allclose(heads[0].numpy(), cosine, atol=1e-5)


def test_cluster_logits_put_the_head_with_k_classes_first_and_mlp_layers():
    torch.manual_seed(0)
    method = _method({"heads": [20, 10, 40], "mlp_layers": 2, "hidden_dim": 32, "output_dim": 16})
    assert [type(m).__name__ for m in method.mlp] == ["Linear", "BatchNorm1d", "LeakyReLU", "Linear"]
    method.eval()
    images = torch.randn(6, 1, 8, 8)
    heads, raw = method.cluster_logits(images), method._logits(images)
    assert [h.shape[1] for h in heads] == [10, 20, 40]  # K = the 10 true classes first
    for got, want in zip(heads, [raw[1], raw[0], raw[2]]):
        torch.testing.assert_close(got, want)


def test_training_step_leaves_the_fixed_classifier_unchanged_and_trains_the_rest():
    torch.manual_seed(0)
    method = _method({"heads": [10, 20]})
    before = [c.weight.detach().clone() for c in method.classifiers]
    mlp_before = method.mlp[0].weight.detach().clone()
    params = [p for p in method.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1)
    views = [torch.randn(16, 1, 8, 8), torch.randn(16, 1, 8, 8)]
    batch = train_batch(views, max_epochs=1)
    loss, _ = method.training_loss(batch)
    loss.backward()
    optimizer.step()
    for c, w in zip(method.classifiers, before):
        assert torch.equal(c.weight, w)
    assert not torch.equal(method.mlp[0].weight, mlp_before)


@pytest.mark.parametrize("hparams,key", [({"row_tau": 0.0}, "row_tau"), ({"col_tau": -1.0}, "col_tau"),
                                         ({"heads": [10, 1]}, "heads"), ({"bogus": 1}, "bogus")])
def test_hparam_errors_name_the_key(hparams, key):
    with pytest.raises(ConfigError, match=f"methods.self_classifier.{key}"):
        _method(hparams)


def test_reimpl_variant_has_the_reimplementations_mlp_and_learned_weight_normalised_heads():
    """Built for the cifar10 suite (ResNet-18, d = 512): `self_classifier/reimpl` has the reimplementation's network
    (KTH Self-Classifier/model.py L10-45), its forward transcribed by hand: h = LeakyReLU(BN(W2 LeakyReLU(BN(W1 f +
    b1)) + b2)), z = h / ||h||, logits_k = z . (g_k v_k / ||v_k||) per head. Max abs difference to the method's
    logits: 2.8e-7 measured (float32; asserted <= 1e-5). The weight-normalised heads also equal torch's
    weight_norm parametrisation of a Linear(128, C, bias=False) with the same g and v."""
    from benchmarks.backbones import build_backbone
    from benchmarks.config import load_suite

    settings = load_suite("cifar10").method("self_classifier/reimpl")
    torch.manual_seed(0)
    data = DataInfo(num_classes=10, num_train=100, in_channels=3, image_size=32)
    method = get_method("self_classifier")(build_backbone("resnet18_cifar", 3), data, settings.hparams)
    assert method.version >= 2
    assert [(type(m).__name__, getattr(m, "in_features", getattr(m, "num_features", None))) for m in method.mlp] == [
        ("Linear", 512), ("BatchNorm1d", 4096), ("LeakyReLU", None), ("Linear", 4096), ("BatchNorm1d", 128),
        ("LeakyReLU", None)]  # ends in BatchNorm1d + LeakyReLU
    assert method.mlp[3].out_features == 128
    assert [tuple(c.weight_v.shape) for c in method.classifiers] == [(10, 128), (20, 128), (40, 128), (80, 128)]
    for c in method.classifiers:  # trainable v and g, g initialised to 1 (model.py L41-42)
        assert c.weight_v.requires_grad and c.weight_g.requires_grad
        assert torch.equal(c.weight_g.detach(), torch.ones(c.weight_g.shape[0], 1))
    method.eval()
    with torch.no_grad():
        for c in method.classifiers:  # g away from 1, so the gain matters
            c.weight_g.uniform_(0.5, 2.0)
        for bn in (method.mlp[1], method.mlp[4]):
            bn.running_mean.uniform_(-0.1, 0.1), bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.2, 0.2)
        images = torch.randn(5, 3, 32, 32)
        features = method.backbone(images).double()
        h = features
        for lin, bn in ((method.mlp[0], method.mlp[1]), (method.mlp[3], method.mlp[4])):
            h = h @ lin.weight.double().T + lin.bias.double()
            h = (h - bn.running_mean.double()) / torch.sqrt(bn.running_var.double() + bn.eps) * bn.weight.double() \
                + bn.bias.double()
            h = torch.where(h >= 0, h, 0.01 * h)  # LeakyReLU, slope 0.01
        z = h / h.norm(dim=1, keepdim=True)
        logits = method._logits(images)
        worst = 0.0
        for c, got in zip(method.classifiers, logits):
            v, g = c.weight_v.double(), c.weight_g.double()
            hand = z @ (g * v / v.norm(dim=1, keepdim=True)).T
            worst = max(worst, (got.double() - hand).abs().max().item())
            linear = torch.nn.Linear(128, v.shape[0], bias=False)
            linear = torch.nn.utils.parametrizations.weight_norm(linear)
            linear.parametrizations.weight.original0.copy_(c.weight_g)
            linear.parametrizations.weight.original1.copy_(c.weight_v)
            torch.testing.assert_close(linear(z.float()), c(z.float()))
        assert worst <= 1e-5
    # a training step changes the heads (learned), unlike the paper's fixed cosine heads
    method.train()
    before = [(c.weight_v.detach().clone(), c.weight_g.detach().clone()) for c in method.classifiers]
    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.5)
    views = [torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)]
    loss, _ = method.training_loss(train_batch(views, max_epochs=1))
    loss.backward()
    optimizer.step()
    for c, (v, g) in zip(method.classifiers, before):
        assert not torch.equal(c.weight_v, v) and not torch.equal(c.weight_g, g)
