"""Stitching: the planted G_ReLU element stitches a model to its permuted-and-rescaled copy with
zero penalty; activation matching recovers the planted permutation on every live unit; the
Birkhoff layer's projection, rounding and schedule; BatchNorm handling; the rotation control."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.config import expand_runs
from pipeline.data import load
from pipeline.models import build, neuron_structure
from pipeline.modelsym import register_stitching_layer
from pipeline.modelsym.matching import activation_matching, evaluate_model
from pipeline.modelsym.members import load_member, read_member, save_member
from pipeline.modelsym.rotation import insert_transform, random_transform, rotation_control
from pipeline.modelsym.stitch_layers import Birkhoff, Permutation, sinkhorn
from pipeline.modelsym.stitched import build_stitched
from pipeline.modelsym.stitching import (
    StitchSettings,
    fit_features,
    stitch_layer_pair,
    stitch_pair,
    train_stitch,
)
from pipeline.modelsym.zoo import train_zoo
from pipeline.symmetry.actions import random_element
from pipeline.train.engine import TrainingDiverged

DATA = None


def digits():
    global DATA
    if DATA is None:
        DATA = load("digits", "unused", 0.2, dtype=torch.float64)
    return DATA


@pytest.fixture(scope="module")
def member(tmp_path_factory):
    out = tmp_path_factory.mktemp("zoo")
    study = {
        "kind": "train",
        "dataset": {"name": "digits", "val_fraction": 0.2},
        "model": {"name": "mlp", "widths": [24, 16]},
        "train": {
            "optimizer": "adam",
            "lr": 3e-3,
            "batch_size": 64,
            "epochs": 6,
            "dtype": "float64",
        },
    }
    train_zoo(out, expand_runs("s", study)[0].hparams, [1])
    return out / "seed~1.pt"


def planted_copy(model, shape, seed=7):
    """``(copy, element)``: ``model`` moved by a random G_ReLU element (permutation times
    positive scaling of every hidden group; BN's own scale symmetry left out: eps breaks it)."""
    structure = neuron_structure(model, shape)
    element = random_element(structure, torch.Generator().manual_seed(seed))
    element.bn_scales = {}
    copy = build(*model._spec, seed=0, dtype=torch.float64)
    copy.load_state_dict(element.apply(dict(model.state_dict()), structure))
    return copy.eval(), element


def planted_map(element, group: str) -> torch.Tensor:
    """P D with S[i, p[i]] = a[p[i]]: the copy's unit i is a[p[i]] times the model's p[i]."""
    p, a = element.perms[group], element.scales[group]
    s = torch.zeros(len(p), len(p), dtype=torch.float64)
    s[torch.arange(len(p)), p] = a[p]
    return s


def fixed_layer(matrix):
    layer = Permutation(matrix.shape[1], matrix.shape[0]).double()
    layer.matrix.copy_(matrix)
    layer.fitted = True
    return layer


def _mlp_member(path):
    model, _ = load_member(path)
    model._spec = ("mlp", (1, 8, 8), 10, {"widths": [24, 16]})
    return model


def _random_bn(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


CASES = [
    ("mlp", "act1", "fc1"),
    ("mlp", "act2", "fc2"),
    ("myrtle", "act2", "conv2"),
    ("myrtle", "act4", "conv4"),
]


@pytest.mark.parametrize("kind,layer,group", CASES)
def test_planted_grelu_element_stitches_with_zero_penalty(member, kind, layer, group):
    data = digits()
    if kind == "mlp":
        model = _mlp_member(member)
    else:  # an untrained BN model with non-trivial statistics, frozen in eval mode
        model = _random_bn(
            build("myrtle", (1, 8, 8), 10, {"width": 4}, seed=2, dtype=torch.float64)
        )
        model._spec = ("myrtle", (1, 8, 8), 10, {"width": 4})
    copy, element = planted_copy(model, (1, 8, 8))
    loss_a, acc_a = evaluate_model(model, data.test)
    loss_b, acc_b = evaluate_model(copy, data.test)
    assert acc_a == acc_b and loss_a == pytest.approx(loss_b, abs=1e-9)
    gm = build_stitched(model, copy, layer, fixed_layer(planted_map(element, group)), "eval")
    res = train_stitch(gm, data, StitchSettings(epochs=0), seed=0)
    penalty = (acc_a + acc_b) / 2 - res["test_accuracy"]
    assert abs(penalty) <= 1e-6
    assert res["test_loss"] == pytest.approx((loss_a + loss_b) / 2, abs=1e-6)
    x = next(data.test.eval_batches(128))[0]
    with torch.no_grad():
        reference = model(x)
        torch.testing.assert_close(gm(x), reference, rtol=1e-9, atol=1e-9)
        # the identity in place of P D is not a symmetry: the logits move
        gm = build_stitched(
            model,
            copy,
            layer,
            fixed_layer(torch.eye(len(element.perms[group]), dtype=torch.float64)),
        )
        assert (gm(x) - reference).abs().max() > 1e-2 * reference.abs().max()


def test_activation_matching_recovers_the_planted_permutation(member):
    data = digits()
    model = _mlp_member(member)
    copy, element = planted_copy(model, (1, 8, 8), seed=11)
    for layer, group in (("act1", "fc1"), ("act2", "fc2")):
        x, y = fit_features(model, copy, layer, data, 1000, 256)
        p, d, live = activation_matching(x, y)
        planted, scales = element.perms[group], element.scales[group]
        assert live.double().mean() > 0.5, "too few live units for the test to mean anything"
        assert torch.equal(p[live], planted[live])
        torch.testing.assert_close(d[live], scales[planted][live], rtol=1e-9, atol=0)


def test_stitch_pair_on_a_planted_copy(member, tmp_path):
    record = read_member(member)
    model = _mlp_member(member)
    copy, _ = planted_copy(model, (1, 8, 8), seed=3)
    other = save_member(
        tmp_path / "b.pt",
        copy.state_dict(),
        record["hparams"],
        record["info"],
        record["epoch"],
        record["step"],
        record["metrics"],
    )
    types = {
        "matched": {"type": "permutation", "rescale": True},
        "birkhoff": {"type": "birkhoff", "alpha": 0.1},
        "rank1": {"type": "low_rank", "rank": 1},
    }
    table = stitch_pair(member, other, types, settings={"epochs": 2, "lr": 0.05, "batch_size": 64})
    assert len(table) == 6 and set(table.layer) == {"act1", "act2"}
    matched = table[table.stitch == "matched"]
    # activation matching on the training split finds the planted P D on every unit that
    # ever fires there; those units are the ones that fire on the test split
    assert (matched.penalty.abs() <= 1e-6).all() and (matched.loss_penalty.abs() <= 1e-6).all()
    learned = table[table.stitch == "birkhoff"]
    assert learned.projection_error.notna().all()
    assert (table.penalty == table.mean_test_accuracy - table.test_accuracy).all()
    assert (table[table.stitch == "rank1"].penalty > 0.1).all()  # a rank-1 map loses classes


def test_a_type_can_override_the_shared_stitching_settings(member):
    """The G_ReLU layer's projected SGD trains at its own learning rate and length."""
    types = {
        "linear": {"type": "linear"},
        "grelu": {"type": "birkhoff", "alpha": 10.0, "settings": {"lr": 0.5, "epochs": 4}},
    }
    shared = {"epochs": 2, "lr": 0.05, "batch_size": 64}
    table = stitch_pair(member, member, types, layers=["act1"], settings=shared)
    used = {r.stitch: json.loads(r.settings) for r in table.itertuples()}
    assert used["linear"]["lr"] == 0.05 and used["linear"]["epochs"] == 2
    assert used["grelu"]["lr"] == 0.5 and used["grelu"]["epochs"] == 4
    assert used["grelu"]["batch_size"] == 64  # the rest stays shared
    assert json.loads(table.set_index("stitch").options["grelu"]) == {"alpha": 10.0}


def test_sinkhorn_to_convergence_is_doubly_stochastic():
    gen = torch.Generator().manual_seed(0)
    for n in (5, 30, 64):
        a = torch.exp(2 * torch.randn(n, n, generator=gen, dtype=torch.float64))
        m = sinkhorn(a, tol=1e-9)
        assert (m > 0).all()
        assert (m.sum(0) - 1).abs().max() <= 1e-6 and (m.sum(1) - 1).abs().max() <= 1e-6
    # the paper's 16 rounds: exactly column-stochastic, rows only approximately (reported)
    m16 = sinkhorn(torch.exp(2 * torch.randn(30, 30, generator=gen, dtype=torch.float64)), 16)
    assert (m16.sum(0) - 1).abs().max() <= 1e-12


def test_birkhoff_layer_projection_rounding_and_phases():
    torch.manual_seed(0)
    layer = Birkhoff(6, 6).double()
    perm = torch.tensor([2, 0, 5, 1, 4, 3])
    with torch.no_grad():
        layer.mixing.copy_(0.7 * torch.eye(6)[perm] + 0.3 * layer.mixing - 0.05)  # negatives
        layer.scales.copy_(torch.tensor([1.0, 2.0, -0.5, 0.3, 1.5, 0.8]))
    layer.project()
    assert (layer.mixing >= 0).all() and (layer.scales >= 0).all()
    assert (layer.mixing.sum(0) - 1).abs().max() < 1e-12
    assert layer.phases(20) == [10, 10]
    layer.set_phase(0)
    layer.train()
    torch.testing.assert_close(layer.weight(), layer.mixing)  # phase 1: M only, soft
    layer.set_phase(1)
    layer.eval()
    expected = torch.eye(6, dtype=torch.float64)[perm] * layer.scales[None, :]
    torch.testing.assert_close(layer.weight(), expected)  # evaluation: P diag(s), rounded
    assert layer.report()["rounding_distance"] > 0
    reg = layer.regulariser()
    assert reg.item() == pytest.approx(-0.1 * torch.linalg.matrix_norm(layer.mixing).item())


def test_layer_types_keep_their_constraints():
    data = digits()
    model = build("mlp", (1, 8, 8), 10, {"widths": [12]}, seed=0, dtype=torch.float64)
    for spec, check in [
        (
            {"type": "low_rank", "rank": 2},
            lambda s: torch.linalg.matrix_rank(s.weight()).item() == 2,
        ),
        (
            {"type": "orthogonal", "init": "procrustes"},
            lambda s: torch.allclose(
                s.weight().T @ s.weight(), torch.eye(12, dtype=torch.float64), atol=1e-8
            ),
        ),
        (
            {"type": "lasso", "lam": 0.05},
            lambda s: bool(((s.weight() == 0) == (s.matrix.abs() < 1e-4)).all()),
        ),
    ]:
        kind = spec.pop("type")
        stitch = register_stitching_layer.get(kind)(12, 12, **spec).double()
        if stitch.needs_fit:
            stitch.fit(*fit_features(model, model, "act1", data, 200, 200))
        gm = build_stitched(model, model, "act1", stitch)
        before = {k: v.clone() for k, v in gm.state_dict().items() if not k.startswith("stitch")}
        train_stitch(gm, data, StitchSettings(epochs=1, lr=0.05, batch_size=64), seed=0)
        after = {k: v for k, v in gm.state_dict().items() if not k.startswith("stitch")}
        assert all(torch.equal(before[k], after[k]) for k in before), kind  # frozen models
        assert check(gm.stitch.eval()), kind


def test_a_non_finite_stitching_loss_stops_training():
    data = digits()
    model = build("mlp", (1, 8, 8), 10, {"widths": [12]}, seed=0, dtype=torch.float64)
    stitch = register_stitching_layer.get("linear")(12, 12).double()
    with torch.no_grad():
        next(stitch.parameters()).view(-1)[0] = float("nan")
    gm = build_stitched(model, model, "act1", stitch)
    settings = StitchSettings(epochs=2, lr=0.05, batch_size=64)
    with pytest.raises(TrainingDiverged, match="stitching loss became NaN/inf; lower the"):
        train_stitch(gm, data, settings, seed=0)


def test_batch_norm_modes():
    data = digits()
    a = _random_bn(build("myrtle", (1, 8, 8), 10, {"width": 2}, seed=0, dtype=torch.float64))
    b = _random_bn(build("myrtle", (1, 8, 8), 10, {"width": 2}, seed=1, dtype=torch.float64))
    stats = {k: v.clone() for k, v in b.state_dict().items() if "running" in k}
    for mode in ("eval", "train"):
        stitch = register_stitching_layer.get("linear")(4, 4).double()
        gm = build_stitched(a, b, "act2", stitch, bn_mode=mode)
        train_stitch(gm, data, StitchSettings(epochs=1, lr=0.01, batch_size=64), seed=0)
        top = {
            k.removeprefix("top."): v
            for k, v in gm.state_dict().items()
            if k.startswith("top.") and "running" in k
        }
        changed = [k for k in top if not torch.equal(top[k], stats[k])]
        if mode == "eval":
            assert not changed  # frozen models keep their own statistics
        else:  # re-estimated for the selected stitching map
            assert {"bn3.running_mean", "bn4.running_var"} <= set(changed)
    with pytest.raises(ValueError, match="bn_mode"):
        build_stitched(a, b, "act2", stitch, bn_mode="frozen")


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_learned_birkhoff_layer_recovers_the_planted_permutation(member, seed):
    """Stitching a model to a copy with its hidden units permuted (a planted permutation), the
    learned doubly stochastic map rounds to the planted permutation on the units that fire, up
    to a local optimum of the non-convex task loss: measured over the first draws, all 22 live
    units of 3 in 6 draws, 21 of 22 in the others (one unit firing on 99% of the inputs stuck
    in a swap, 2-4 points of penalty)."""
    data = digits()
    model = _mlp_member(member)
    structure = neuron_structure(model, (1, 8, 8))
    element = random_element(structure, torch.Generator().manual_seed(seed))
    element.scales, element.bn_scales = {}, {}  # a pure permutation
    copy = build(*model._spec, seed=0, dtype=torch.float64)
    copy.load_state_dict(element.apply(dict(model.state_dict()), structure))
    copy.eval()
    x, _ = fit_features(model, copy, "act1", data, 10_000, 512)
    planted = element.perms["fc1"]
    live = (x > 0).any(0)[planted]  # copy unit i is the model's unit planted[i]
    assert live.double().mean() > 0.5, "too few live units for the test to mean anything"
    torch.manual_seed(0)
    stitch = Birkhoff(24, 24, alpha=0.1).double()
    gm = build_stitched(model, copy, "act1", stitch)
    res = train_stitch(gm, data, StitchSettings(epochs=10, lr=0.2, batch_size=64), seed=0)
    rounded = stitch.permutation().argmax(1)
    matched = (rounded[live] == planted[live]).double().mean().item()
    assert matched >= 0.9, (matched, rounded, planted)
    assert (planted[live] != torch.arange(24)[live]).double().mean() > 0.5  # not ~ identity
    penalty = evaluate_model(copy, data.test, 512)[1] - res["test_accuracy"]
    assert penalty <= 0.05, penalty


def test_crossvalidated_alpha_is_the_validation_best(member):
    """The grid's choice is the validation-best option; the selection never reads the test
    split (scrambled test labels: the same choice and validation numbers; only the reported
    test accuracy changes), and the train, validation and test splits share no example."""
    import dataclasses

    data = digits()
    model = _mlp_member(member)
    spec = {"type": "birkhoff", "scales_from_start": True, "grid": {"alpha": [0.01, 1.0, 10.0]}}
    settings = StitchSettings(epochs=1, lr=0.05, batch_size=64)
    res = stitch_layer_pair(model, model, "act2", data, spec, settings, seed=0)
    grid = json.loads(res["grid"])
    assert [g["alpha"] for g in grid] == [0.01, 1.0, 10.0]
    best = max(grid, key=lambda g: g["val_accuracy"])
    assert json.loads(res["options"])["alpha"] == best["alpha"]
    assert res["val_accuracy"] == best["val_accuracy"]
    # scramble the test labels: selection unchanged
    test = data.test
    wrong = type(test)(test.x, (test.y + 1 + torch.arange(len(test.y)) % 9) % 10, test.normalise)
    assert (wrong.y != test.y).all()
    scrambled = stitch_layer_pair(
        model, model, "act2", dataclasses.replace(data, test=wrong), spec, settings, seed=0
    )
    assert scrambled["grid"] == res["grid"] and scrambled["options"] == res["options"]
    assert scrambled["val_accuracy"] == res["val_accuracy"]
    assert scrambled["test_accuracy"] < res["test_accuracy"] - 0.5
    # disjoint splits: no example (an input row) of one split is in another
    rows = {
        name: {tuple(r.tolist()) for r in split.x.reshape(len(split.x), -1)}
        for name, split in (("train", data.train), ("val", data.val), ("test", data.test))
    }
    assert not rows["train"] & rows["val"]
    assert not (rows["train"] | rows["val"]) & rows["test"]


def test_rotation_transforms_and_control(member):
    gen = torch.Generator().manual_seed(0)
    t = random_transform("grelu", 8, gen)
    z = torch.randn(5, 8, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(torch.relu(z @ t.T), torch.relu(z) @ t.T)  # in G_ReLU
    q = random_transform("orthogonal", 8, gen)
    torch.testing.assert_close(q.T @ q, torch.eye(8, dtype=torch.float64))
    # the next layer absorbs a G_ReLU T exactly: W2 T^-1 after T restores the function
    model = _mlp_member(member)
    t = random_transform("grelu", 24, gen)
    gm = insert_transform(model, "fc1", t)
    assert gm.frozen == ["flatten", "fc1"]
    with torch.no_grad():
        gm.fc2.weight.copy_(gm.fc2.weight @ torch.linalg.inv(t))
    x = next(digits().test.eval_batches(64))[0]
    torch.testing.assert_close(gm(x), model(x))
    table = rotation_control(member, layers=["fc1", "fc2"], groups=("identity", "grelu"), epochs=0)
    ident = table[table.group == "identity"]
    assert (ident.penalty == 0).all() and (
        ident.inserted_test_accuracy == ident.base_test_accuracy
    ).all()
    assert (
        table[table.group == "grelu"].inserted_test_accuracy < table.base_test_accuracy.iloc[0]
    ).all()


@pytest.mark.parametrize("draw", range(2))
def test_rotation_retraining_keeps_the_validation_best_state(member, draw):
    """``retrain_above`` equals a plain loop over the same batches that keeps the state of the
    best validation accuracy (epoch 0 = the inserted model, first of equals), bit for bit."""
    import copy
    import random

    from pipeline.modelsym.rotation import GROUPS, retrain_above
    from pipeline.train.optim import SGD, Adam, multi_head_ce

    rng = random.Random(draw)
    layer = rng.choice(["fc1", "fc2"])
    name, lr = rng.choice([("adam", 1e-2), ("sgd", 0.05)])
    epochs, batch, wd = rng.randint(2, 3), rng.choice([32, 128]), rng.choice([0.0, 1e-3])
    width = {"fc1": 24, "fc2": 16}[layer]
    t = random_transform(rng.choice(GROUPS), width, torch.Generator().manual_seed(draw))
    gm = insert_transform(_mlp_member(member), layer, t)
    ref = copy.deepcopy(gm)
    data = digits()
    result = retrain_above(gm, data, epochs, lr, name, wd, batch, seed=draw)

    params = [p for p in ref.parameters() if p.requires_grad]
    opt = (
        Adam(params, lr=lr, weight_decay=wd)
        if name == "adam"
        else SGD(params, lr=lr, momentum=0.9, weight_decay=wd)
    )
    scores, states = [evaluate_model(ref, data.val)], [copy.deepcopy(ref.state_dict())]
    for epoch in range(epochs):
        ref.train()
        for frozen in gm.frozen:  # (a deep copy of a GraphModule drops the attribute)
            ref.get_submodule(frozen).eval()
        for x, y in data.train.train_batches(batch, True, draw, epoch):
            opt.zero_grad(set_to_none=True)
            multi_head_ce(ref(x), y).backward()
            opt.step()
        scores.append(evaluate_model(ref, data.val))
        states.append(copy.deepcopy(ref.state_dict()))
    accuracies = [acc for _, acc in scores]
    best = accuracies.index(max(accuracies))
    assert (result["epoch"], result["val_loss"], result["val_accuracy"]) == (best, *scores[best])
    ref.load_state_dict(states[best])
    assert (result["test_loss"], result["test_accuracy"]) == evaluate_model(ref, data.test)
    assert all(torch.equal(v, gm.state_dict()[k]) for k, v in ref.state_dict().items())
    assert len(set(accuracies)) > 1  # the retraining moved the model


def test_stitching_figures_draw_from_the_tables(member, tmp_path):
    import pandas as pd

    from pipeline.plots import register_figure

    types = {
        "linear": {"type": "linear"},
        "lasso": {"type": "lasso", "grid": {"lam": [1e-3]}},
        "lasso2": {"type": "lasso", "lam": 0.1},
        "grelu": {"type": "birkhoff"},
    }
    from drawn import capture, check_drawn

    table = stitch_pair(member, member, types, settings={"epochs": 1, "batch_size": 128})
    rotation = rotation_control(member, layers=["fc1"], epochs=0)
    drawn = {}
    for kind, frame in (
        ("stitching_penalty", table),
        ("lasso_sparsity", table),
        ("rotation_penalty", rotation),
    ):
        pdf, png = tmp_path / f"{kind}.pdf", tmp_path / f"{kind}.png"
        with capture() as figs:
            register_figure.get(kind)({"table": frame}, {}, pdf, png)
        assert pdf.read_bytes()[:4] == b"%PDF" and png.read_bytes()[:4] == b"\x89PNG"
        (panel,) = check_drawn(figs[0])
        drawn[kind] = panel
    # one error-bar line per stitching type; one bar per (layer, group) of the rotation table
    assert drawn["stitching_penalty"].errorbars == len(types)
    assert drawn["rotation_penalty"].bars == rotation.groupby(["layer", "group"]).ngroups
    with pytest.raises(KeyError, match="stitching_penalty.*penalty"):
        register_figure.get("stitching_penalty")(
            {"table": pd.DataFrame({"stitch": []})}, {}, tmp_path / "x.pdf", tmp_path / "x.png"
        )
