"""Training teleported networks: SGD with momentum and weight decay on a teleported network (its
momentum buffers teleported too) equals SGD on the original with the gradient scaled by D^-2;
the train_run callback is reproducible and resumable; the pseudo-teleport and same-distribution
controls move the weights as the paper defines."""

from __future__ import annotations

import copy

import pytest
import torch
from scipy import stats

from pipeline.config import expand_runs
from pipeline.models import build, neuron_structure
from pipeline.teleport.cob import parameter_scales, sample
from pipeline.teleport.network import current_cob, materialise, teleport_
from pipeline.teleport.training import (
    TeleportCallback,
    pseudo_teleport_,
    reinitialise_,
    same_distribution_,
    sample_like,
)

#: Small tensors: one torch thread, as every pipeline job uses (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def _step(model, opt, x, y):
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss.item()


CASES = [
    ("mlp", (1, 6, 6), {"widths": [12, 10], "batch_norm": True, "activation": "tanh"}),
    ("conv", (1, 8, 8), {"channels": 4, "pool": True, "batch_norm": True}),
    (
        "densenet121",
        (3, 8, 8),
        {
            "growth_rate": 4,
            "block_config": (2, 2),
            "num_init_features": 6,
            "bn_size": 2,
            "stem": "cifar",
        },
    ),
]


@pytest.mark.parametrize("name,shape,opts", CASES, ids=[c[0] for c in CASES])
def test_sgd_on_teleported_network_equals_preconditioned_sgd(name, shape, opts):
    """fp64, 100 steps, inter-landscape 0.9, teleports at step 0 and step 40 (epochs 0, 1 of
    the callback): teleported weights = D * preconditioned weights to 1e-10, same losses and BN
    statistics. Control: not teleporting the momentum buffers (as the paper's code, which
    rebuilt the optimizer) breaks the equivalence."""
    model = build(name, shape, 5, opts, seed=2, dtype=torch.float64)
    structure = neuron_structure(model, shape)
    gen = torch.Generator().manual_seed(0)
    xs = torch.randn(100, 16, *shape, dtype=torch.float64, generator=gen)
    ys = torch.randint(0, 5, (100, 16), generator=gen)
    callback = TeleportCallback("teleport", "inter_landscape", 0.9, every_n_epochs=1)
    seed, teleports = 7, {0: 0, 40: 1}  # step -> epoch whose CoB is drawn

    def sgd(params):
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=0.01)

    teleported, plain, naive = (copy.deepcopy(model) for _ in range(3))
    teleported, naive = materialise(teleported, shape), materialise(naive, shape)
    opt_t, opt_p, opt_n = (
        sgd(teleported.parameters()),
        sgd(plain.parameters()),
        sgd(naive.parameters()),
    )
    losses_t, losses_p = [], []
    for step in range(100):
        if step in teleports:
            cob = callback.cob(structure, seed, teleports[step])
            teleport_(teleported, cob, opt_t)
            teleport_(naive, cob)  # momentum buffers left in the old basis
            callback.epoch_start(teleports[step], plain, opt_p, seed)
        losses_t.append(_step(teleported, opt_t, xs[step], ys[step]))
        losses_p.append(_step(plain, opt_p, xs[step], ys[step]))
        _step(naive, opt_n, xs[step], ys[step])
    scales = parameter_scales(structure, current_cob(teleported), dict(plain.named_parameters()))
    found = dict(teleported.named_parameters())
    errors = {
        k: _rel(found[k], p.detach() * scales.get(k, 1.0)) for k, p in plain.named_parameters()
    }
    assert max(errors.values()) < 1e-10, errors
    buffers = dict(teleported.named_buffers())
    for k, b in plain.named_buffers():
        if b.is_floating_point():
            assert _rel(buffers[k], b) < 1e-10, k
    assert max(abs(a - b) for a, b in zip(losses_t, losses_p, strict=True)) < 1e-10
    assert max(abs(a - b) for a, b in zip(losses_t[:41], losses_p[:41], strict=True)) < 1e-12
    wrong = dict(naive.named_parameters())
    assert max(_rel(wrong[k], found[k]) for k in found) > 1e-3


def test_callback_is_reproducible_and_resumable():
    """Teleport every epoch (4 steps each, 3 epochs). A fresh callback, model and optimizer
    loaded from the state after epoch 1 (a restart at an epoch boundary) or after the first
    step of epoch 2 (a mid-epoch restart: ``resume_at``) end with the uninterrupted run's
    weights, bit for bit."""
    shape, opts = (1, 6, 6), {"widths": [10], "activation": "elu", "batch_norm": True}
    model = build("mlp", shape, 5, opts, seed=1, dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    xs = torch.randn(12, 8, *shape, dtype=torch.float64, generator=gen)
    ys = torch.randint(0, 5, (12, 8), generator=gen)
    seed = 11

    def fresh(state=None):
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
        if state is not None:
            m.load_state_dict(state[0])
            opt.load_state_dict(state[1])
        cb = TeleportCallback(
            "teleport", "inter_landscape", 0.9, every_n_epochs=1, input_shape=shape
        )
        return m, opt, cb

    def run(m, opt, cb, start, stop, resume=None):
        """Steps ``start`` to ``stop - 1``; epoch starts call the callback."""
        if resume is not None:
            cb.resume_at(*divmod(start, 4), m, opt, seed)
        for step in range(start, stop):
            if step % 4 == 0:
                cb.epoch_start(step // 4, m, opt, seed)
            _step(m, opt, xs[step], ys[step])
        return m, opt

    def state(m, opt):
        return copy.deepcopy(m.state_dict()), copy.deepcopy(opt.state_dict())

    reference = dict(run(*fresh(), 0, 12)[0].named_parameters())
    again = run(*fresh(), 0, 12)[0]
    at_boundary = run(*fresh(state(*run(*fresh(), 0, 8))), 8, 12)[0]
    mid_epoch = run(*fresh(state(*run(*fresh(), 0, 9))), 9, 12, resume=True)[0]
    for other in (again, at_boundary, mid_epoch):
        for k, p in other.named_parameters():
            assert torch.equal(p, reference[k]), k
    plain = copy.deepcopy(model)
    opt = torch.optim.SGD(plain.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
    for step in range(12):
        _step(plain, opt, xs[step], ys[step])
    assert max(_rel(p, reference[k]) for k, p in plain.named_parameters()) > 1e-3


def test_callback_in_train_run(tmp_path):
    from pipeline.train.loop import train_run

    study = {
        "kind": "train",
        "dataset": {"name": "digits"},
        "model": {"name": "mlp", "widths": [16]},
        "train": {
            "lr": 0.01,
            "momentum": 0.9,
            "wd": 0.01,
            "batch_size": 64,
            "epochs": 2,
            "on_nan": "record",
        },
    }
    hp = expand_runs("t", study)[0].hparams
    out = {}
    for mode in ("none", "teleport", "teleport"):
        root = tmp_path / f"{mode}{len(out)}"
        cb = TeleportCallback(mode, "inter_landscape", 0.9)
        summary = train_run(root, hp, progress=False, callbacks=(cb,))
        assert summary["status"] == "completed"
        out[root.name] = torch.load(root / "final.pt", weights_only=True)["model"]
    (a, plain), (b, first), (c, second) = out.items()
    assert all(torch.equal(first[k], second[k]) for k in first)  # reproducible
    assert max(_rel(first[k], plain[k]) for k in plain) > 1e-3  # and not a plain run


@pytest.mark.parametrize("batch_norm", [False, True])
def test_pseudo_teleport_moves_each_tensor_by_the_teleport_distance(batch_norm):
    """Per tensor, as the original's simulate_teleportation_sphere: the L1 distance a real
    teleport moves it, in a random direction. A teleport leaves BatchNorm's running statistics
    where they are (BN computes BN(x / tau_in)), so their distance, and their shift, is zero in
    the original too."""
    shape = (1, 6, 6)
    opts = {"widths": [30, 20], "batch_norm": batch_norm}
    model = build("mlp", shape, 5, opts, seed=0, dtype=torch.float64)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.bias.uniform_(-0.5, 0.5)
    structure = neuron_structure(model, shape)
    cob = sample(structure, "intra_landscape", 0.9, torch.Generator().manual_seed(1))
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    scales = parameter_scales(structure, cob, before)
    net = materialise(copy.deepcopy(model), shape)
    teleport_(net, cob)
    moved = dict(net.named_buffers())
    assert all(torch.equal(moved[k], b) for k, b in buffers.items())  # the teleport's distance
    pseudo_teleport_(model, structure, cob, torch.Generator().manual_seed(2))
    assert all(torch.equal(b, buffers[k]) for k, b in model.named_buffers())
    assert set(scales) == set(before) - {"out.bias"}  # the logits keep their basis
    for k, p in model.named_parameters():
        if k not in scales:
            assert torch.equal(p, before[k])
            continue
        distance = (before[k] * (scales[k] - 1)).abs().sum()
        moved = (p - before[k]).abs().sum()
        assert abs(moved - distance) / distance < 1e-10, k
        if p.numel() >= 500:  # a random direction, not the teleport's: |cos| ~ 1/sqrt(n)
            cosine = torch.nn.functional.cosine_similarity(
                (p - before[k]).flatten(), (before[k] * (scales[k] - 1)).flatten(), dim=0
            )
            assert abs(cosine) < 0.2, k


def test_same_distribution_matches_teleported_histograms():
    shape = (1, 8, 8)
    model = build("mlp", shape, 5, {"widths": [200, 200]}, seed=0, dtype=torch.float64)
    structure = neuron_structure(model, shape)
    cob = sample(structure, "intra_landscape", 0.9, torch.Generator().manual_seed(1))
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    scales = parameter_scales(structure, cob, params)
    same_distribution_(model, structure, cob, torch.Generator().manual_seed(2))
    after = dict(model.named_parameters())
    w = "fc2.weight"
    teleported = (params[w] * scales[w]).flatten().numpy()
    assert stats.ks_2samp(after[w].detach().flatten().numpy(), teleported).statistic < 0.02
    assert stats.ks_2samp(params[w].flatten().numpy(), teleported).statistic > 0.1
    assert torch.equal(after["fc2.bias"], params["fc2.bias"])  # biases are left alone
    # inverse-CDF sampling recovers a planted bimodal distribution
    gen = torch.Generator().manual_seed(3)
    planted = torch.cat([torch.randn(20000, generator=gen) - 3, torch.randn(20000, generator=gen)])
    drawn = sample_like(planted, 40000, gen, bins=500)
    assert stats.ks_2samp(drawn.numpy(), planted.numpy()).statistic < 0.02


def test_reinitialise_for_the_initializer_study():
    model = build("mlp", (1, 8, 8), 5, {"widths": [300]}, seed=0, dtype=torch.float64)
    reinitialise_(model, "normal", 0.02, torch.Generator().manual_seed(0))
    assert abs(model.fc1.weight.std().item() - 0.02) < 0.001
    assert model.fc1.bias.abs().max() == 0 and model.out.bias.abs().max() == 0
    reinitialise_(model, "xavier", 0.5, torch.Generator().manual_seed(0))
    expected = 0.5 * (2 / (64 + 300)) ** 0.5  # Glorot-normal std with gain 0.5
    assert abs(model.fc1.weight.std().item() / expected - 1) < 0.05
    first = model.fc1.weight.clone()
    reinitialise_(model, "xavier", 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(first, model.fc1.weight)
    with pytest.raises(ValueError, match="teleport.initializer: 'orthogonal' not allowed"):
        TeleportCallback("none", initializer="orthogonal")
