"""IIC's loss (the `methods.sslpp.iic_loss` contract) and SSL++ (methods/sslpp.py): hand-computed values from the
paper's equations, its two stages through the stage API, resume."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import normalized_mutual_info_score

try:
    from tests import ddp_harness
except ImportError:  # pytest's rootdir-less import mode
    import ddp_harness

from benchmarks.errors import ConfigError
from methods.base import EpochContext
from methods.sslpp import iic_loss, random_rotation_batch, rotation_batch, sslpp_loss
from tests.helpers import tiny_method, train_batch

# -- iic_loss ---------------------------------------------------------------------------------

def _iic_by_hand(a: list[list[float]], b: list[list[float]], lamb: float) -> float:
    """SSL++ Eq. 2 with IIC's symmetrisation, written with loops (0 log 0 = 0)."""
    n, c = len(a), len(a[0])
    joint = [[sum(a[i][p] * b[i][q] for i in range(n)) / n for q in range(c)] for p in range(c)]
    joint = [[(joint[p][q] + joint[q][p]) / 2 for q in range(c)] for p in range(c)]
    total = sum(sum(row) for row in joint)
    joint = [[joint[p][q] / total for q in range(c)] for p in range(c)]
    p_i = [sum(joint[p][q] for q in range(c)) for p in range(c)]
    p_j = [sum(joint[p][q] for p in range(c)) for q in range(c)]
    loss = 0.0
    for p in range(c):
        for q in range(c):
            if joint[p][q] > 0:
                loss -= joint[p][q] * (math.log(joint[p][q]) - lamb * math.log(p_i[p]) - lamb * math.log(p_j[q]))
    return loss


def _mutual_information_by_hand(a, b) -> float:
    """I(z, z') = sum P log(P / (Pi Pj)) of the symmetrised, normalised joint (Eq. 2)."""
    n, c = len(a), len(a[0])
    joint = [[sum(a[i][p] * b[i][q] + a[i][q] * b[i][p] for i in range(n)) / (2 * n) for q in range(c)]
             for p in range(c)]
    marg = [sum(row) for row in joint]  # symmetric: row and column marginals agree
    return sum(joint[p][q] * math.log(joint[p][q] / (marg[p] * marg[q]))
               for p in range(c) for q in range(c) if joint[p][q] > 0)


PROBS_A = [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.05, 0.15, 0.8]]
PROBS_B = [[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.25, 0.25, 0.5]]


def test_iic_loss_at_lamb_1_is_minus_the_mutual_information():
    a, b = torch.tensor(PROBS_A, dtype=torch.float64), torch.tensor(PROBS_B, dtype=torch.float64)
    expected = -_mutual_information_by_hand(PROBS_A, PROBS_B)
    assert iic_loss(a, b).item() == pytest.approx(expected, abs=1e-12)
    assert iic_loss(a, b, lamb=1.0).item() == pytest.approx(_iic_by_hand(PROBS_A, PROBS_B, 1.0), abs=1e-12)
    # symmetric in the two views (P is symmetrised)
    assert iic_loss(b, a).item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("lamb", [1.5, 0.5])
def test_iic_loss_with_lamb(lamb):
    a, b = torch.tensor(PROBS_A, dtype=torch.float64), torch.tensor(PROBS_B, dtype=torch.float64)
    expected = _iic_by_hand(PROBS_A, PROBS_B, lamb)
    assert iic_loss(a, b, lamb=lamb).item() == pytest.approx(expected, abs=1e-12)
    assert expected != pytest.approx(_iic_by_hand(PROBS_A, PROBS_B, 1.0), abs=1e-3)


def test_iic_loss_of_perfect_balanced_agreement_is_minus_log_c():
    # z = z' uniform over C clusters: I = H(z) = log C
    c = 4
    one_hot = torch.eye(c, dtype=torch.float64).repeat(3, 1)
    assert iic_loss(one_hot, one_hot).item() == pytest.approx(-math.log(c), abs=1e-9)


def test_iic_eps_clamp_is_out_of_place_and_gradients_stay_finite():
    # exact zeros: empty clusters and zero joint entries
    a = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]], requires_grad=True)
    b = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.0, 1.0, 0.0]], requires_grad=True)
    a_before, b_before = a.detach().clone(), b.detach().clone()
    loss = iic_loss(a, b)
    loss.backward()
    assert torch.equal(a.detach(), a_before) and torch.equal(b.detach(), b_before)
    assert torch.isfinite(loss) and torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    # zero entries contribute nothing (0 log 0 = 0): the clamp does not change the value
    assert loss.item() == pytest.approx(_iic_by_hand(a_before.tolist(), b_before.tolist(), 1.0), abs=1e-6)


def test_iic_loss_gradient_matches_finite_differences():
    gen = torch.Generator().manual_seed(0)
    logits_a = torch.randn(6, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    logits_b = torch.randn(6, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, y: iic_loss(F.softmax(x, dim=1), F.softmax(y, dim=1), lamb=1.3), (logits_a, logits_b))


def _iic_through_head(x_a, x_b, w, lamb):
    return iic_loss(F.softmax(x_a @ w, dim=1), F.softmax(x_b @ w, dim=1), lamb)


def test_iic_loss_under_ddp_equals_single_process_on_the_concatenated_batch():
    gen = torch.Generator().manual_seed(0)
    x_a, x_b = (torch.randn(8, 5, generator=gen, dtype=torch.float64) for _ in range(2))
    w = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    cases = {f"iic_lamb{lamb}": (functools.partial(_iic_through_head, lamb=lamb), [x_a, x_b], [w])
             for lamb in (1.0, 1.7)}
    ddp = ddp_harness.run_distributed(ddp_harness.ddp_cases_worker, world_size=2, args=(cases,))
    for name, (fn, inputs, params) in cases.items():
        single = ddp_harness.single_process_loss_and_grads(fn, inputs, params)
        local_only = ddp_harness.single_process_loss_and_grads(fn, [x[:4] for x in inputs], params)
        assert not torch.allclose(local_only["loss"], single["loss"], atol=1e-4), name  # the check has power
        ddp_harness.assert_matches_single_process([r[name] for r in ddp], single, atol=1e-9, rtol=1e-7)


# -- SSL++ stage 2: rotation + pseudo-labels -------------------------------------------------------

def test_rotation_batch_rotates_by_k_quarter_turns_with_label_k():
    images = torch.arange(2 * 1 * 3 * 3, dtype=torch.float32).view(2, 1, 3, 3)
    rotated, labels = rotation_batch(images)
    assert rotated.shape == (8, 1, 3, 3)
    for k in range(4):
        for i in range(2):
            expected = np.rot90(images[i, 0].numpy(), k)  # counter-clockwise quarter turns
            np.testing.assert_array_equal(rotated[k * 2 + i, 0].numpy(), expected)
            assert labels[k * 2 + i].item() == k
    # 90 degrees counter-clockwise: the top-right pixel moves to the top-left corner
    assert rotated[2, 0, 0, 0].item() == images[0, 0, 0, 2].item()


def test_random_rotation_batch_turns_each_image_by_its_label():
    images = torch.randn(64, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    rotated, labels = random_rotation_batch(images, torch.Generator().manual_seed(1))
    assert set(labels.tolist()) == {0, 1, 2, 3}
    for i in range(64):
        np.testing.assert_array_equal(rotated[i, 0].numpy(), np.rot90(images[i, 0].numpy(), int(labels[i])))


def _ce_by_hand(logits: list[float], target: int) -> float:
    return -(logits[target] - math.log(sum(math.exp(v) for v in logits)))


def test_sslpp_loss_adds_the_pseudo_label_ce_with_weight_lambda():
    rot_logits = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 0.3, 0.4]])
    rot_labels = torch.tensor([0, 3])
    pl_logits = torch.tensor([[0.3, -0.2, 1.1], [1.0, 1.0, -2.0]])
    pl_labels = torch.tensor([2, 1])
    total, ls, lc = sslpp_loss(rot_logits, rot_labels, pl_logits, pl_labels, weight=0.05)
    want_s = (_ce_by_hand(rot_logits[0].tolist(), 0) + _ce_by_hand(rot_logits[1].tolist(), 3)) / 2
    want_c = (_ce_by_hand(pl_logits[0].tolist(), 2) + _ce_by_hand(pl_logits[1].tolist(), 1)) / 2
    assert ls.item() == pytest.approx(want_s, abs=1e-6)
    assert lc.item() == pytest.approx(want_c, abs=1e-6)
    assert total.item() == pytest.approx(want_s + 0.05 * want_c, abs=1e-6)


def _noisy_batch(images, indices, epoch, max_epochs=4, step=0, stage=1):
    """Two views of the given images: each plus noise, drawn from the step's seed."""
    gen = torch.Generator().manual_seed(step)
    views = [images + 0.1 * torch.randn(images.shape, generator=gen) for _ in range(2)]
    return train_batch(views, indices, epoch=epoch, step=step, max_epochs=max_epochs, generator_seed=step,
                       stage=stage)


def _context(epoch, images, labels=None, max_epochs=4, stage=1):
    def predict(fn):
        return torch.cat([fn(images[i:i + 5]) for i in range(0, len(images), 5)]).float()
    return EpochContext(epoch, max_epochs, 0, predict, torch.device("cpu"), labels=labels, stage=stage)


def test_sslpp_stage2_loss_is_rotation_ce_plus_weighted_pseudo_label_ce_on_every_rotated_copy():
    method = tiny_method("sslpp", {"num_clusters": 5, "pseudo_label_weight": 0.05})
    images = torch.randn(12, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    method.pseudo_labels.copy_(torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]))
    method.eval()  # BatchNorm on running statistics: samples are independent, so loops can recompute them
    indices = torch.tensor([3, 7, 10])
    batch = _noisy_batch(images[indices], indices, epoch=2)
    loss, _ = method.training_loss(batch)
    terms_s, terms_c = [], []
    with torch.no_grad():
        view = batch.views[0]  # the four rotations of the first view
        for k in range(4):
            for i in range(3):
                feats = method.backbone(torch.rot90(view[i:i + 1], k, dims=(2, 3)))
                terms_s.append(_ce_by_hand(method.rotation_head(feats)[0].tolist(), k))
                terms_c.append(_ce_by_hand(method.pseudo_label_head(feats)[0].tolist(),
                                           int(method.pseudo_labels[indices[i]])))
    assert loss.item() == pytest.approx(np.mean(terms_s) + 0.05 * np.mean(terms_c), abs=1e-5)
    # upright-only variant: L_c on the 0-degree copies (the first 3 terms)
    method.hparams.pseudo_labels_upright_only = True
    loss_upright, _ = method.training_loss(batch)
    assert loss_upright.item() == pytest.approx(np.mean(terms_s) + 0.05 * np.mean(terms_c[:3]), abs=1e-5)
    # one random rotation of each view: k drawn from the batch's generator, view by view
    method.hparams = method.hparams.model_copy(update=dict(pseudo_labels_upright_only=False, rotation_copies=1))
    loss_random, _ = method.training_loss(_noisy_batch(images[indices], indices, epoch=2, step=7))
    batch = _noisy_batch(images[indices], indices, epoch=2, step=7)
    terms_s, terms_c = [], []
    with torch.no_grad():
        for view in batch.views:
            turns = torch.randint(4, (3,), generator=batch.generator)
            for i in range(3):
                feats = method.backbone(torch.rot90(view[i:i + 1], int(turns[i]), dims=(2, 3)))
                terms_s.append(_ce_by_hand(method.rotation_head(feats)[0].tolist(), int(turns[i])))
                terms_c.append(_ce_by_hand(method.pseudo_label_head(feats)[0].tolist(),
                                           int(method.pseudo_labels[indices[i]])))
    assert loss_random.item() == pytest.approx(np.mean(terms_s) + 0.05 * np.mean(terms_c), abs=1e-5)


def _settings(**sslpp):
    """The resolved settings of SSL++ in a tiny digits-nin (the stage budgets come from them)."""
    from benchmarks.config import load_suite

    section = {"num_clusters": 4, "num_heads": 2, "clustering_epochs": 2, "clustering_batch_size": 8,
               "clustering_optimizer": {"lr": 0.01}, "train": {"epochs": 2, "batch_size": 8}, **sslpp}
    config = load_suite("digits-nin", {"methods": {"sslpp": section}})
    return config.method("sslpp")


def test_sslpp_stages_come_from_iics_budget_and_the_methods_settings():
    settings = _settings(clustering_epochs=3, clustering_batch_size=6,
                         clustering_views=[{"size": 8, "count": 1, "grayscale_p": 1.0},
                                           {"size": 8, "count": 3, "hflip_p": 0.5}])
    method = tiny_method("sslpp", settings.hparams.model_dump())
    clustering, rotation = method.stages(settings)
    assert (clustering.name, clustering.epochs, clustering.batch_size) == ("clustering", 3, 6)
    # IIC's Adam, lr 1e-4 by default (here 0.01), no schedule; not the Rotation stage's SGD
    assert (clustering.optimizer.name, clustering.optimizer.lr, clustering.optimizer.weight_decay,
            clustering.optimizer.schedule) == ("adamw", 0.01, 0.0, "constant")
    assert [(v.count, v.grayscale_p) for v in clustering.augment.views] == [(1, 1.0), (3, 0.2)]
    assert clustering.augment.normalization == settings.augment.normalization
    assert (rotation.name, rotation.epochs, rotation.batch_size) == ("rotation", 2, 8)
    assert rotation.optimizer == settings.optimizer and rotation.augment == settings.augment
    method.hparams = method.hparams.model_copy(update={"clustering_views": [{"size": 8}, {"size": 8, "cnt": 2}]})
    with pytest.raises(ConfigError, match=r"methods\.sslpp\.clustering_views\[1\]\.cnt"):
        method.stages(settings)
    defaults = tiny_method("sslpp").hparams
    assert (defaults.num_clusters, defaults.pseudo_label_weight) == (70, 0.05)  # Table XIII, sec. V-A.4


def test_sslpp_stages_train_only_their_own_model_and_pseudo_labels_come_from_stage_1():
    from benchmarks.training import build_optimizer  # Lightning: imported here, not in the DDP workers
    from ssl_common.typed import OptimizerConfig

    method = tiny_method("sslpp", {"num_clusters": 4, "num_heads": 2}, num_train=20)
    gen = torch.Generator().manual_seed(2)
    images = torch.randn(20, 1, 8, 8, generator=gen)
    true_labels = torch.arange(20) % 3
    stage1 = dict(method.clustering.named_parameters())
    stage2 = {n: p for n, p in method.named_parameters() if not n.startswith("clustering.")}

    def snapshot(params):
        return {n: p.detach().clone() for n, p in params.items()}

    def optimizer_for_stage(index):
        method.set_stage(index)  # before the stage's optimizer is built, as the runner does
        params = [p for p in method.parameters() if p.requires_grad]
        return params, build_optimizer(params, OptimizerConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=0.1), 8)

    def train_step(optimizer, epoch, step, stage):
        optimizer.zero_grad(set_to_none=True)
        idx = torch.arange(step % 3, 20, 3)[:6]
        loss, _ = method.training_loss(_noisy_batch(images[idx], idx, epoch, step=step, stage=stage))
        loss.backward()
        optimizer.step()

    params, optimizer = optimizer_for_stage(0)
    assert {id(p) for p in params} == {id(p) for p in stage1.values()}  # the clustering model only
    assert method.on_train_epoch_start(_context(0, images, true_labels, stage=0)) == {}
    before, before_stage1 = snapshot(stage2), snapshot(stage1)
    for step in range(3):
        train_step(optimizer, step, step, stage=0)  # epochs 0-2: both IIC heads take turns
    assert all(torch.equal(before[n], p) for n, p in stage2.items())  # no update, decay or momentum
    assert not all(torch.equal(before_stage1[n], p) for n, p in stage1.items())
    assert bool((method.pseudo_labels < 0).all())  # none yet

    params, optimizer = optimizer_for_stage(1)
    assert {id(p) for p in params} == {id(p) for p in stage2.values()}  # the representation model only
    method.eval()  # the trainer's predict pass runs in eval mode
    logs = method.on_train_epoch_start(_context(0, images, true_labels, stage=1))
    expected = method.clustering.overcluster_logits(images).argmax(dim=1)  # the 4-way over-clustering head
    method.train()
    assert torch.equal(method.pseudo_labels, expected)
    assert logs["pseudo_label_nmi"] == pytest.approx(normalized_mutual_info_score(true_labels, expected))
    frozen = snapshot(stage1)
    before = snapshot(stage2)
    for step in range(3, 6):
        train_step(optimizer, 0, step, stage=1)
    assert all(torch.equal(frozen[n], p) for n, p in stage1.items())  # stage-1 model no longer trains
    assert not all(torch.equal(before[n], p) for n, p in stage2.items())

    # the pseudo-labels are computed once: later epochs (and resumed runs) keep the stored ones
    resumed = tiny_method("sslpp", {"num_clusters": 4, "num_heads": 2}, num_train=20)
    resumed.load_state_dict(method.state_dict())

    def must_not_predict(fn):
        raise AssertionError("pseudo-labels recomputed")
    logs = resumed.on_train_epoch_start(EpochContext(1, 4, 0, must_not_predict, torch.device("cpu"), stage=1))
    assert logs == {} and torch.equal(resumed.pseudo_labels, expected)
    # the clustering metrics read stage 1's heads: [main (K = 3 classes), over-clustering (4)]
    method.eval()
    heads = method.cluster_logits(images)
    assert [h.shape[1] for h in heads] == [3, 4]
    torch.testing.assert_close(heads[1], method.clustering.overcluster_logits(images))


def test_sslpp_asks_ddp_to_allow_unused_parameters():
    from benchmarks.config import TrainConfig
    from benchmarks.training import ddp_strategy_for

    method = tiny_method("sslpp")
    cfg = TrainConfig(strategy="ddp", accelerator="cpu", devices=2, num_nodes=1)
    assert ddp_strategy_for(method, cfg) == "ddp_find_unused_parameters_true"
    assert ddp_strategy_for(method, cfg.model_copy(update={"strategy": "auto"})) == "ddp_find_unused_parameters_true"
    assert ddp_strategy_for(method, cfg.model_copy(update={"strategy": "auto", "devices": 1})) == "auto"
    assert ddp_strategy_for(tiny_method("iic"), cfg) == "ddp_find_unused_parameters_true"  # one head per epoch
    assert ddp_strategy_for(tiny_method("rotation"), cfg) == "ddp"


@pytest.mark.parametrize("name,hparams,key", [
    ("sslpp", {"clustering_epochs": 0}, "clustering_epochs"),
    ("sslpp", {"clustering_batch_size": 1}, "clustering_batch_size"),
    ("sslpp", {"clustering_views": []}, "clustering_views"),
    ("sslpp", {"pseudo_label_weight": -0.1}, "pseudo_label_weight"),
    ("sslpp", {"num_clusters": 1}, "num_clusters"),
    ("sslpp", {"rotation_copies": 2}, "rotation_copies"),
    ("sslpp", {"rotation_copies": 1, "pseudo_labels_upright_only": True}, "pseudo_labels_upright_only"),
    ("sslpp", {"clustering_optimizer": {"name": "rmsprop"}}, r"clustering_optimizer\.name"),
    ("sslpp", {"clustering_optimizer": {"betas": [0.9, 0.99]}}, "clustering_optimizer"),
    ("sslpp", {"stage1_fraction": 0.5}, "stage1_fraction"),  # the one-fit design is gone
    ("iic", {"num_heads": 0}, "num_heads"),
    ("iic", {"iic_lamb": 0.0}, "iic_lamb"),
])
def test_invalid_hparams_name_the_key(name, hparams, key):
    with pytest.raises(ConfigError, match=rf"methods\.{name}\.{key}"):
        tiny_method(name, hparams)


class _Crash(RuntimeError):
    pass


def _run_stages(run_dir, n=32, crash=None, snapshots=None):
    """Both stages as the runner runs them: set_stage, one PretrainModule + fit per stage, each in its own folder
    with its own checkpoint and fingerprint. `crash` = (stage, epoch): raise in that epoch's first step."""
    from benchmarks.augment import BatchAugment, Normalization
    from benchmarks.config import TrainConfig
    from benchmarks.data import ImageDataset
    from benchmarks.training import PretrainModule, PretrainSettings, fit

    images = torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    dataset = ImageDataset("tiny", "train", torch.arange(n) % 2, ["a", "b"], images=images)
    settings = _settings()
    method = tiny_method("sslpp", settings.hparams.model_dump(), num_train=n)
    train_cfg = TrainConfig(accelerator="cpu", devices=1, precision="32")
    original = method.training_loss

    def training_loss(batch):
        if crash is not None and (batch.stage, batch.epoch) == crash:
            raise _Crash
        if snapshots is not None:
            snapshots.append((batch.stage, batch.epoch, [g["lr"] for g in module.trainer.optimizers[0].param_groups],
                              {k: v.clone() for k, v in method.clustering.state_dict().items()}))
        return original(batch)
    method.training_loss = training_loss
    history = []
    for index, stage in enumerate(method.stages(settings)):
        method.set_stage(index)
        norm = stage.augment.normalization
        augment = BatchAugment(list(stage.augment.views), Normalization(tuple(norm.mean), tuple(norm.std)))
        module = PretrainModule(method, augment, stage.optimizer, dataset,
                                PretrainSettings(stage.batch_size, stage.epochs, seed=0, stage=index))
        result = fit(module, train_cfg, run_dir / f"stage{index + 1}-{stage.name}", f"fp-{index}", progress=False)
        history += [{**h, "stage": index + 1} for h in result.history]
    return method, history, result


def test_sslpp_trains_both_stages_under_lightning(tmp_path):
    snapshots = []
    method, history, _ = _run_stages(tmp_path, snapshots=snapshots)
    assert [(h["stage"], h["epoch"]) for h in history] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert "pseudo_label_nmi" in history[2] and "pseudo_label_nmi" not in history[3]
    stage1 = [s for s in snapshots if s[0] == 0]
    stage2 = [s for s in snapshots if s[0] == 1]
    # stage 1: IIC's Adam at its own constant lr (0.01); stage 2: the Rotation stage's step schedule from 0.1
    assert {lr for _, _, lrs, _ in stage1 for lr in lrs} == {0.01}
    assert stage2[0][2] == [pytest.approx(0.1)]
    # stage 1 changed the clustering model, stage 2 left it alone
    assert not torch.equal(stage1[0][3]["heads.overcluster.heads.0.weight"], stage2[0][3]["heads.overcluster.heads.0.weight"])
    final = method.clustering.state_dict()
    assert all(torch.equal(final[k], v) for k, v in stage2[0][3].items() if k.endswith("weight"))
    assert bool((method.pseudo_labels >= 0).all())


def test_sslpp_resumed_mid_stage_2_ends_bitwise_like_an_uninterrupted_run(tmp_path):
    """The stage-2 checkpoint carries the pseudo-labels, the optimizer state and the schedule; the finished
    stage 1 is restored from its own checkpoint without training again."""
    full_method, full_history, _ = _run_stages(tmp_path / "full")
    with pytest.raises(_Crash):
        _run_stages(tmp_path / "resumed", crash=(1, 1))  # killed in stage 2, after one stage-2 epoch
    resumed_method, resumed_history, result = _run_stages(tmp_path / "resumed")
    assert result.extra["resumed_after_epochs"] == 1
    assert resumed_history == full_history
    full_state, resumed_state = full_method.state_dict(), resumed_method.state_dict()
    assert full_state.keys() == resumed_state.keys()
    assert all(torch.equal(full_state[k], resumed_state[k]) for k in full_state)


# -- the trainer's CombinedOptimizer (the online linear probe steps beside the method's optimizer)

def test_combined_optimizer_steps_each_part_with_its_own_settings_and_one_schedule():
    from benchmarks.training import CombinedOptimizer

    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    sgd = torch.optim.SGD([a], lr=0.1)
    adam = torch.optim.AdamW([b], lr=0.01, weight_decay=0.0)
    combined = CombinedOptimizer([sgd, adam])
    scheduler = torch.optim.lr_scheduler.LambdaLR(combined, lambda step: 0.5 ** step)
    ((a * torch.tensor([1.0, 2.0, 3.0])).sum() + (b * 4.0).sum()).backward()
    combined.step()
    torch.testing.assert_close(a.detach(), 1 - 0.1 * torch.tensor([1.0, 2.0, 3.0]))  # SGD: lr * grad
    torch.testing.assert_close(b.detach(), torch.full((2,), 1 - 0.01))  # Adam's first step: lr * sign(grad)
    scheduler.step()
    assert sgd.param_groups[0]["lr"] == pytest.approx(0.05) and adam.param_groups[0]["lr"] == pytest.approx(0.005)
    combined.zero_grad()
    assert a.grad is None and b.grad is None
    # a checkpoint round trip restores both parts (Adam's moments included)
    state = combined.state_dict()
    fresh = CombinedOptimizer([torch.optim.SGD([a], lr=1.0), torch.optim.AdamW([b], lr=1.0)])
    fresh.load_state_dict(state)
    assert fresh.param_groups[1]["lr"] == pytest.approx(0.005)
    torch.testing.assert_close(fresh.optimizers[1].state[b]["exp_avg"], adam.state[b]["exp_avg"])


def test_the_online_knn_monitor_follows_the_network_the_stage_trains():
    """Stage 1 trains the clustering model's trunk and leaves the evaluated backbone at its random weights:
    the monitor must watch the trunk there, and the evaluated backbone in stage 2 (and in one-stage methods)."""
    from benchmarks.augment import BatchAugment, Normalization, ViewSpec
    from benchmarks.data import ImageDataset
    from benchmarks.training import MonitorData, PretrainModule, PretrainSettings
    from ssl_common.typed import OptimizerConfig

    method = tiny_method("sslpp")
    method.set_stage(0)
    assert method.monitored_backbone() is method.clustering.backbone
    method.set_stage(1)
    assert method.monitored_backbone() is method.backbone
    simclr = tiny_method("simclr")
    assert simclr.monitored_backbone() is simclr.backbone

    images = torch.randint(0, 256, (12, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    dataset = ImageDataset("tiny", "train", torch.arange(12) % 2, ["a", "b"], images=images)
    watched = []

    class Spy(torch.nn.Module):
        def forward(self, x):
            watched.append(len(x))
            return x.flatten(1)

    method.set_stage(0)
    spy = Spy()
    method.monitored_backbone = lambda: spy
    module = PretrainModule(method, BatchAugment([ViewSpec(size=8)], Normalization((0.5,), (0.5,))),
                            OptimizerConfig(), dataset, PretrainSettings(4, 1, seed=0),
                            monitor=MonitorData(dataset, dataset, 2, 1))
    assert 0 <= module.online_knn() <= 100
    assert sum(watched) == 2 * len(dataset)  # the bank and the queries went through the watched network
