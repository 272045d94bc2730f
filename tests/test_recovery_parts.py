"""The parts of Expand-and-Cluster against naive references: the stacked forward, the batched
Adam and per-student plateau schedules, resume, distances, the one-pass cut, planted clusters,
and the exact collapse of duplicated, scaled and sign-flipped neurons."""

from __future__ import annotations

import math
import signal
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import pdist
from strategies import examples

from pipeline import io
from pipeline.models import build
from pipeline.recovery import students as students_module
from pipeline.recovery.chain import Chain, chain_of, forward, init_stack, member, stack
from pipeline.recovery.cluster import (
    SYMMETRIES,
    ClusterHparams,
    cluster_layer,
    condensed_distances,
    converged_students,
    cut,
    symmetry_of,
)
from pipeline.recovery.collapse import fold_constant_inputs, merge_twins, reconstruct
from pipeline.recovery.evaluate import compare
from pipeline.recovery.students import (
    ExpandHparams,
    FitHparams,
    FitResult,
    StackedPlateau,
    fit,
)
from pipeline.recovery.teachers import ProbeData, ToyTeacher, make_toy_teacher, probe
from pipeline.train.engine import ResumeStore
from pipeline.train.stop import TrainingStopped

F64 = torch.float64


def toy_data(chain, params, n=300, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, chain.input_dim, generator=gen, dtype=F64)
    xt = torch.randn(n, chain.input_dim, generator=gen, dtype=F64)
    return ProbeData(x, probe(chain, params, x), xt, probe(chain, params, xt))


def test_stacked_forward_equals_the_mlp_modules():
    chain = Chain(5, (7, 3), 2, "tanh")
    models = [build("mlp", (5,), 2, chain.model_options(), s, F64) for s in range(3)]
    params = stack([m.state_dict() for m in models])
    x = torch.randn(11, 5, dtype=F64)
    out = forward(chain, params, x)
    for n, m in enumerate(models):
        torch.testing.assert_close(out[n], m(x), rtol=0, atol=1e-14)
    per_model_inputs = torch.randn(3, 11, 5, dtype=F64)
    out = forward(chain, params, per_model_inputs)
    for n, m in enumerate(models):
        torch.testing.assert_close(out[n], m(per_model_inputs[n]), rtol=0, atol=1e-14)
    stacked = init_stack(chain, 2, seed=4)
    assert stacked["fc1.weight"].shape == (2, 7, 5) and not torch.equal(*stacked["fc1.weight"])


def test_chain_of_refuses_what_is_not_a_plain_mlp():
    from pipeline.models import neuron_structure

    model = build("mlp", (6,), 3, {"widths": [4], "batch_norm": True}, 0)
    with pytest.raises(ValueError, match="BatchNorm"):
        chain_of(neuron_structure(model, (6,)), 6)
    model = build("mlp", (1, 2, 3), 3, {"widths": [4, 5], "activation": "gelu"}, 0)
    assert chain_of(neuron_structure(model, (1, 2, 3)), 6) == Chain(6, (4, 5), 3, "gelu")


def test_vectorised_students_follow_separate_adam_runs():
    """Three students trained in one program equal three torch.optim.Adam runs (same batches)."""
    chain = Chain(4, (6,), 2, "tanh")
    teacher, t_params = make_toy_teacher(ToyTeacher(4, (3,), "tanh", outputs=2, seed=2))
    data = toy_data(teacher, t_params, 96)
    params = init_stack(chain, 3, seed=5)
    h = FitHparams(lr=3e-3, batch_size=32, max_epochs=4, plateau_patience=10**6, log_every=2)
    result = fit(chain, params, data, h, seed=1, tag="t")
    for n in range(3):
        model = build("mlp", (4,), 2, chain.model_options(), 0, F64)
        model.load_state_dict(member(params, n))
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for epoch in range(4):
            from pipeline import seeding

            order = torch.randperm(96, generator=seeding.generator(1, "order", "t", epoch))
            for b in range(3):
                idx = order[32 * b : 32 * (b + 1)]
                opt.zero_grad()
                ((model(data.x[idx]) - data.y[idx]) ** 2).mean().backward()
                opt.step()
        for k, v in model.state_dict().items():
            torch.testing.assert_close(result.params[k][n], v, rtol=0, atol=1e-13)
    assert len(result.history) == 2 * 3  # epochs 2 and 4, three students


def test_per_student_plateau_follows_torch_reduce_on_plateau():
    h = FitHparams(
        lr=0.1,
        plateau_factor=0.5,
        plateau_patience=3,
        plateau_cooldown=2,
        plateau_threshold=0.01,
        min_lr=1e-4,
    )
    gen = torch.Generator().manual_seed(0)
    n, epochs = 4, 80
    trend = torch.linspace(1, 0.2, epochs, dtype=F64)[:, None]
    losses = trend * torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=F64) + 0.05 * torch.rand(
        epochs, n, generator=gen, dtype=F64
    )
    losses[:, 0] = 1.0  # student 0 never improves: it drops fastest and stops
    sched = StackedPlateau(n, h, F64, "cpu")
    refs = []
    for _ in range(n):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        refs.append(
            (
                opt,
                torch.optim.lr_scheduler.ReduceLROnPlateau(
                    opt, factor=0.5, patience=3, cooldown=2, threshold=0.01, threshold_mode="rel"
                ),
            )
        )
    stopped = torch.zeros(n, dtype=torch.bool)
    for e in range(epochs):
        sched.update(losses[e])
        for s, (opt, ref) in enumerate(refs):
            if stopped[s]:
                continue
            ref.step(float(losses[e, s]))
            lr = opt.param_groups[0]["lr"]
            if lr < h.min_lr:  # our student stops where torch would go below min_lr
                stopped[s] = True
                assert not sched.active[s]
                continue
            assert sched.active[s] and math.isclose(float(sched.lr[s]), lr, rel_tol=1e-12)
    assert stopped[0] and sched.status[0] == 0  # converged
    assert sched.active[1:].any()


def test_a_killed_fit_resumes_bit_identically(tmp_path, monkeypatch):
    teacher, t_params = make_toy_teacher(ToyTeacher(3, (2,), "relu", seed=4))
    data = toy_data(teacher, t_params, 64)
    chain = Chain(3, (8,), 1, "relu")
    params = init_stack(chain, 4, seed=1)
    h = FitHparams(
        lr=1e-2,
        batch_size=16,
        max_epochs=30,
        checkpoint_every=10,
        log_every=5,
        plateau_patience=2,
        plateau_cooldown=1,
    )
    reference = fit(chain, params, data, h, seed=2)
    original = StackedPlateau.update
    calls = {"n": 0}

    def dies_at_25(self, loss):
        calls["n"] += 1
        if calls["n"] == 25:
            raise KeyboardInterrupt
        return original(self, loss)

    monkeypatch.setattr(StackedPlateau, "update", dies_at_25)
    state = tmp_path / "resume"
    with pytest.raises(KeyboardInterrupt):
        fit(chain, params, data, h, seed=2, resume=state)
    monkeypatch.setattr(StackedPlateau, "update", original)
    (saved,) = ResumeStore(state).files()  # keep_last=1: the newest scheduled state
    assert io.load_torch(saved)["epoch"] == 20
    resumed = fit(chain, params, data, h, seed=2, resume=state)
    for k in reference.params:
        assert torch.equal(resumed.params[k], reference.params[k])
    assert resumed.history.equals(reference.history)
    assert resumed.status == reference.status


@pytest.mark.parametrize("stop_at", [4 * 13 + 2, 4 * 7])  # mid-epoch; an unscheduled epoch end
def test_a_stopped_fit_saves_and_resumes_bit_identically(tmp_path, monkeypatch, stop_at):
    """SIGTERM during a fit: the engine saves a resume-only state (mid-epoch: with the epoch's
    loss sum so far) and raises; running it again ends as an uninterrupted fit."""
    teacher, t_params = make_toy_teacher(ToyTeacher(3, (2,), "tanh", seed=6))
    data = toy_data(teacher, t_params, 64)
    chain = Chain(3, (6,), 1, "tanh")
    params = init_stack(chain, 3, seed=2)
    h = FitHparams(
        lr=1e-2, batch_size=16, max_epochs=24, checkpoint_every=10, log_every=1, plateau_patience=1
    )
    reference = fit(chain, params, data, h, seed=3, keep_epoch=16)
    original = students_module.StudentsTask.forward_backward
    calls = {"n": 0}

    def signalled(self, batch):
        calls["n"] += 1
        if calls["n"] == stop_at:
            signal.raise_signal(signal.SIGTERM)
        return original(self, batch)

    monkeypatch.setattr(students_module.StudentsTask, "forward_backward", signalled)
    state = tmp_path / "resume"
    with pytest.raises(TrainingStopped):
        fit(chain, params, data, h, seed=3, resume=state, keep_epoch=16)
    monkeypatch.setattr(students_module.StudentsTask, "forward_backward", original)
    saved = io.load_torch(ResumeStore(state).files()[-1])
    assert saved["resume_only"] and saved["step"] == stop_at
    resumed = fit(chain, params, data, h, seed=3, resume=state, keep_epoch=16)
    for k in reference.params:
        assert torch.equal(resumed.params[k], reference.params[k])
        assert torch.equal(resumed.kept[k], reference.kept[k])
    assert resumed.history.equals(reference.history)
    assert resumed.status == reference.status
    assert [f.name for f in ResumeStore(state).files()] == ["step000000080.pt"]  # epoch 20
    never = FitHparams(**{**h.__dict__, "checkpoint_every": 0})
    with pytest.raises(ValueError, match="fit.checkpoint_every"):
        fit(chain, params, data, never, seed=3, resume=tmp_path / "other")


def test_distances_by_matrix_products_equal_pdist():
    rng = np.random.default_rng(0)
    u = rng.normal(size=(300, 7))
    np.testing.assert_allclose(condensed_distances(u, False, block=64), pdist(u), atol=1e-12)
    naive = np.minimum(pdist(u), pdist(u, lambda a, b: np.linalg.norm(a + b)))
    np.testing.assert_allclose(condensed_distances(u, True, block=50), naive, atol=1e-12)


def naive_cut(link, min_support, owner, rule):
    """fcluster at every distinct merge height; in the first run of the maximal count of
    clusters with >= min_support distinct owners, the highest height or the one followed by the
    largest gap to the next height."""
    heights = np.unique(link[:, 2])
    counts = []
    for t in heights:
        labels = fcluster(link, t, "distance")
        support = [len(set(owner[labels == c])) for c in np.unique(labels)]
        counts.append(sum(s >= min_support for s in support))
    counts = np.array(counts)
    first = int(np.argmax(counts == counts.max()))
    last = first
    while last + 1 < len(counts) and counts[last + 1] == counts.max():
        last += 1
    if rule == "highest":
        chosen = last
    else:
        gaps = [
            (heights[i + 1] if i + 1 < len(heights) else heights[i]) - heights[i]
            for i in range(first, last + 1)
        ]
        chosen = first + int(np.argmax(gaps))
    return fcluster(link, heights[chosen], "distance"), heights[chosen]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_pass_cut_equals_fcluster_at_every_height(seed):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(6, 5))
    points = np.concatenate([c + 0.05 * rng.normal(size=(8, 5)) for c in centres])
    points = np.concatenate([points, rng.normal(size=(12, 5))])
    points = np.round(points, 1)  # ties in the merge heights
    owner = rng.integers(0, 10, size=len(points))
    link = linkage(pdist(points), "average")
    for support in (None, owner):
        for rule in ("gap", "highest"):
            labels, height, count = cut(link, 5, support, rule)
            ref_labels, ref_height = naive_cut(
                link, 5, owner if support is not None else np.arange(len(points)), rule
            )
            assert height == ref_height
            assert np.array_equal(labels, ref_labels)


def test_planted_neurons_are_clustered_and_every_drop_is_reported():
    """Ten students each hold noisy, rescaled, sign-flipped copies of five directions (some
    missing) plus random neurons: five clusters are kept, the rest are listed as dropped."""
    gen = torch.Generator().manual_seed(3)
    directions = torch.nn.functional.normalize(torch.randn(5, 6, generator=gen, dtype=F64), dim=1)
    vectors, owner = [], []
    for s in range(10):
        for j in range(5):
            if (s + j) % 7 == 0:
                continue  # student s lacks direction j
            scale = 0.5 + torch.rand(1, generator=gen, dtype=F64)
            sign = 1 if torch.rand(1, generator=gen) < 0.5 else -1
            noise = 1e-3 * torch.randn(6, generator=gen, dtype=F64)
            vectors.append(sign * scale * (directions[j] + noise))
            owner.append(s)
        for _ in range(3):
            vectors.append(torch.randn(6, generator=gen, dtype=F64))
            owner.append(s)
    v, owner = torch.stack(vectors), np.array(owner)
    rank = np.arange(10)[::-1].copy()
    clusters = cluster_layer(v, owner, rank, symmetry_of("relu"), 10, ClusterHparams(), "fc1")
    assert len(clusters.members) == 5
    unit = torch.nn.functional.normalize(v, dim=1)
    found = torch.nn.functional.normalize(
        torch.stack([(clusters.sign[m, None] * unit[m]).mean(0) for m in clusters.members]), dim=1
    )
    assert ((found @ directions.T).abs().max(dim=1).values > 1 - 1e-5).all()
    assert clusters.table["size"].sum() == len(v)  # nothing vanishes from the table
    kept = clusters.table[clusters.table.status == "kept"]
    assert sorted(kept.recovered) == list(range(5))
    for members, winner in zip(clusters.members, clusters.winner, strict=True):
        owners = set(owner[members].tolist())
        assert winner == max(owners)  # the best-ranked owner (rank: 9 best)
    with pytest.raises(ValueError, match="gamma"):
        cluster_layer(v, owner, rank, symmetry_of("relu"), 10, ClusterHparams(gamma=0.1), "fc1")


def test_constant_inputs_fold_into_the_bias_exactly():
    chain = Chain(4, (5,), 1, "tanh")
    params = init_stack(chain, 3, seed=0)
    x = torch.randn(50, 4, dtype=F64)
    x[:, 1] = 0.7
    informative = torch.tensor([True, False, True, True])
    folded = fold_constant_inputs(chain, params, informative, x)
    assert (folded["fc1.weight"][:, :, 1] == 0).all()
    torch.testing.assert_close(forward(chain, folded, x), forward(chain, params, x))


@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "relu", "softplus", "leaky_relu"])
def test_duplicated_scaled_and_flipped_neurons_collapse_exactly(activation):
    """Students made of the teacher's neurons split into two copies each (rescaled where scaling
    is a symmetry, sign-flipped at random with the matching outgoing correction) collapse to a
    3-neuron network with the best student's function, before any finetuning. Odd activations:
    every student is the teacher; even-linear ones: a flip leaves a linear term (sigma(-z) =
    sigma(z) - lambda z, lambda = 1.01 for leaky relu), which the affine correction must find
    and the orientation must move into the skip exactly."""
    teacher, t_params = make_toy_teacher(
        ToyTeacher(3, (3,), activation, outputs=2, min_angle=40, seed=5)
    )
    t = member(t_params, 0)
    w, b, a, c = t["fc1.weight"], t["fc1.bias"], t["out.weight"], t["out.bias"]
    sym = symmetry_of(activation)
    gen = torch.Generator().manual_seed(1)
    states = []
    for _ in range(6):
        rows, biases, cols, out_bias = [], [], [], c.clone()
        for j in torch.randperm(3, generator=gen).tolist():
            for share in (0.3, 0.7):
                sign = -1.0 if bool(torch.rand(1, generator=gen) < 0.5) else 1.0
                scale = float(0.5 + torch.rand(1, generator=gen)) if sym.scale else 1.0
                rows.append(sign * scale * w[j])
                biases.append(sign * scale * b[j])
                col = share * a[:, j] / scale
                if sign < 0 and sym.sign in ("odd", "odd_constant"):
                    col = -col
                if sign < 0 and sym.sign == "odd_constant":  # sigmoid(-z) = 1 - sigmoid(z)
                    out_bias = out_bias + share * a[:, j]
                cols.append(col)
        states.append(
            {
                "fc1.weight": torch.stack(rows),
                "fc1.bias": torch.stack(biases),
                "out.weight": torch.stack(cols, 1),
                "out.bias": out_bias,
            }
        )
    chain = Chain(3, (6,), 2, activation)
    params = stack(states)
    x = torch.randn(400, 3, dtype=F64)
    outputs = forward(chain, params, x)
    if sym.sign != "even_linear":
        for n in range(6):
            torch.testing.assert_close(outputs[n], probe(teacher, t_params, x), rtol=0, atol=1e-12)
    data = ProbeData(x, outputs[0], x[:50], outputs[0, :50])
    result = FitResult(
        params,
        torch.linspace(1e-3, 2e-3, 6, dtype=F64),
        torch.zeros(6, dtype=F64),
        ["converged"] * 6,
        0,
        None,
    )
    h = ClusterHparams(final=FitHparams(max_epochs=0), min_nonlinearity=0.0, min_contribution=0.0)
    rec = reconstruct(chain, result, data, h)
    assert rec.widths == (3,)
    assert rec.collapsed_chain.skips == ((1,) if sym.sign == "even_linear" else ())
    out = forward(rec.collapsed_chain, rec.before_finetune, x)[0]
    torch.testing.assert_close(out, data.y, rtol=0, atol=1e-10)


@pytest.mark.parametrize("extra,seed", [(10, 4), (15, 5), (20, 3)])
def test_leftover_neurons_do_not_set_the_cut(extra, seed):
    """Ten students each hold the five planted directions (rescaled, 1e-3 noise) and ``extra``
    random leftover neurons. Counting every big cluster, loose unions of leftovers high in the
    tree outnumber the planted ones and the cut merges planted neurons away; counting only
    clusters formed below the spread limit (``tight_count``) recovers all five."""
    gen = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(5, 6, generator=gen, dtype=F64), dim=1)
    vectors, owner = [], []
    for s in range(10):
        for j in range(5):
            scale = 0.5 + torch.rand(1, generator=gen, dtype=F64)
            noise = 1e-3 * torch.randn(6, generator=gen, dtype=F64)
            vectors.append(scale * (directions[j] + noise))
            owner.append(s)
        for _ in range(extra):
            vectors.append(torch.randn(6, generator=gen, dtype=F64))
            owner.append(s)
    v, owner, rank = torch.stack(vectors), np.array(owner), np.arange(10)

    def found(tight, distinct=False):
        h = ClusterHparams(tight_count=tight, distinct=distinct)
        return cluster_layer(v, owner, rank, symmetry_of("relu"), 10, h, "fc1")

    assert len(found(False).members) < 5
    assert len(found(True, distinct=True).members) == 5
    clusters = found(True)
    assert len(clusters.members) == 5
    unit = torch.nn.functional.normalize(v, dim=1)
    centres = torch.stack([(clusters.sign[m, None] * unit[m]).mean(0) for m in clusters.members])
    cos = torch.nn.functional.normalize(centres, dim=1) @ directions.T
    assert (cos.abs().max(dim=1).values > 1 - 1e-5).all()
    assert sorted(cos.abs().argmax(dim=1).tolist()) == list(range(5))


@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid"])
def test_twin_neurons_fold_into_one_exactly(activation):
    """A finetuned reconstruction holding one teacher neuron twice (rescaled where scaling is a
    symmetry, sign-flipped where a flip is exact up to a constant) folds back into the teacher's
    width with the same function; distinct neurons are left alone."""
    teacher, t_params = make_toy_teacher(
        ToyTeacher(4, (3,), activation, outputs=2, min_angle=40, seed=2)
    )
    t = member(t_params, 0)
    sym = symmetry_of(activation)
    factor = 1.7 if sym.scale else 1.0
    sign = -1.0 if sym.sign in ("odd", "odd_constant") else 1.0
    twin = {
        "fc1.weight": torch.cat([t["fc1.weight"], sign * factor * t["fc1.weight"][1:2]]),
        "fc1.bias": torch.cat([t["fc1.bias"], sign * factor * t["fc1.bias"][1:2]]),
        "out.weight": torch.cat([t["out.weight"], torch.zeros(2, 1, dtype=F64)], 1),
        "out.bias": t["out.bias"].clone(),
    }
    share = 0.4 * twin["out.weight"][:, 1]
    twin["out.weight"][:, 1] -= share  # the copy carries 40% of the neuron's outgoing weight
    twin["out.weight"][:, 3] = sign * share / factor
    if sign < 0 and sym.sign == "odd_constant":  # sigmoid(-z) = 1 - sigmoid(z)
        twin["out.bias"] = twin["out.bias"] - sign * share
    chain, params = Chain(4, (4,), 2, activation), stack([twin])
    x = torch.randn(300, 4, dtype=F64)
    torch.testing.assert_close(
        forward(chain, params, x)[0], probe(teacher, t_params, x), rtol=0, atol=1e-12
    )
    merged_chain, merged, drop = merge_twins(chain, params, sym, tol=1e-6)
    assert merged_chain.widths == (3,) and drop[0].tolist() == [False, False, False, True]
    torch.testing.assert_close(
        forward(merged_chain, merged, x)[0], probe(teacher, t_params, x), rtol=0, atol=1e-12
    )
    assert merge_twins(teacher, t_params, sym, tol=0.1) is None


@pytest.mark.parametrize("seed", [0, 1])
def test_a_count_spike_of_fragments_does_not_set_the_cut(seed):
    """Every student holds five directions: the first as two fragments 0.006 apart, the fourth
    with loose copies (noise 1e-2), the rest tight (1e-4). Low in the tree the fragments are two
    big clusters while the loose copies are not one yet: the count's first maximum is that spike,
    and the published rule loses the loose neuron (the fragments are merged back after). The
    longest run of the count below the spread limit has all five."""
    gen = torch.Generator().manual_seed(seed)
    d = torch.nn.functional.normalize(torch.randn(5, 6, generator=gen, dtype=F64), dim=1)
    p = torch.nn.functional.normalize(torch.randn(6, generator=gen, dtype=F64), dim=0)
    vectors, owner = [], []
    for s in range(10):
        for j in range(5):
            noise = (1e-2 if j == 3 else 1e-4) * torch.randn(6, generator=gen, dtype=F64)
            for fragment in (0.003, -0.003) if j == 0 else (0.0,):
                vectors.append(d[j] + fragment * p + noise)
                owner.append(s)
    v, owner = torch.stack(vectors), np.array(owner)

    def found(tight, distinct=False):
        h = ClusterHparams(tight_count=tight, distinct=distinct)
        return cluster_layer(v, owner, np.arange(10), symmetry_of("relu"), 10, h, "fc1")

    assert len(found(False).members) == 4
    assert len(found(True, distinct=True).members) == 5
    clusters = found(True)
    centres = torch.stack([v[m].mean(0) for m in clusters.members])
    cos = torch.nn.functional.normalize(centres, dim=1) @ d.T
    assert sorted(cos.argmax(dim=1).tolist()) == list(range(5))
    assert (cos.max(dim=1).values > 1 - 1e-3).all()


@pytest.mark.parametrize("activation,seed", [("relu", 0), ("relu", 1), ("softplus", 2)])
def test_a_layers_correction_lives_in_its_own_input_space(activation, seed):
    """Collapsed stacks whose first hidden layer holds the teacher's neurons, some flipped
    (``sigma(-z) = sigma(z) - z``) and rescaled, with the teacher's outgoing weights: the
    correction fitted in that layer's input space (a skip into the second hidden layer) and the
    orientation that makes it vanish give back the teacher exactly, every neuron in the
    teacher's orientation and no skip left. The same for the last hidden layer and the output."""
    from pipeline.recovery.collapse import _correct, correct_layer

    gen = torch.Generator().manual_seed(seed)
    teacher, t_params = make_toy_teacher(
        ToyTeacher(5, (4, 3), activation, outputs=2, gain=1.5, min_angle=30, seed=seed)
    )
    stacked = {k: v.expand(3, *v.shape[1:]).clone() for k, v in t_params.items()}
    sym = symmetry_of(activation)
    x = torch.randn(600, 5, generator=gen, dtype=F64)

    def collapse_flipped(params, layer):
        """Neurons of hidden ``layer`` flipped at random (the first always) and rescaled where
        scaling is a symmetry, outgoing weights unchanged up to the scale (as merged)."""
        flip = torch.rand(teacher.widths[layer], generator=gen) < 0.5
        flip[0] = True
        scale = (0.5 + torch.rand(teacher.widths[layer], generator=gen, dtype=F64)) ** sym.scale
        factor = torch.where(flip, -1.0, 1.0).to(F64) * scale
        name, nxt = teacher.layers[layer], teacher.layers[layer + 1]
        params = dict(params)
        params[f"{name}.weight"] = params[f"{name}.weight"] * factor[:, None]
        params[f"{name}.bias"] = params[f"{name}.bias"] * factor
        params[f"{nxt}.weight"] = params[f"{nxt}.weight"] / scale
        return params

    chain, fixed = correct_layer(teacher, stacked, teacher, collapse_flipped(stacked, 0), 0, x, sym)
    assert chain.skips == (1,)
    assert float(fixed["skip.fc2.weight"].abs().max()) < 1e-9
    torch.testing.assert_close(forward(chain, fixed, x), forward(teacher, stacked, x))
    cos = torch.nn.functional.cosine_similarity(fixed["fc1.weight"][0], t_params["fc1.weight"][0])
    assert (cos > 1 - 1e-12).all()  # every neuron back in the teacher's orientation
    # the last hidden layer: its flips leave a linear term in ITS inputs (the first layer's
    # activations); fitted from the network inputs instead, it would not vanish
    one = {k: v[:1] for k, v in collapse_flipped(fixed, 1).items()}
    data = ProbeData(x, forward(teacher, t_params, x)[0], x[:10], x[:10, :2])
    net_chain, net = _correct(chain, one, data, sym)
    assert net_chain.skips == (1, 2)
    assert float(net["skip.out.weight"].abs().max()) < 1e-9
    torch.testing.assert_close(forward(net_chain, net, x)[0], data.y, rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    "act, seed",
    list(
        zip(
            ("relu", "tanh", "sigmoid"),
            [int(s) for s in np.random.default_rng(2026).integers(0, 2**31, 3)],
            strict=True,
        )
    ),
)
def test_teachers_drawn_nonlinear_have_every_neuron_nonlinear_on_fresh_inputs(act, seed):
    """``min_nonlinearity``: every neuron of a drawn deep teacher keeps a part no affine function
    of its pre-activation explains, on inputs the rejection never saw (relu: neither dead nor
    always active; at the deep family's gains); without it, upper relu layers often draw such
    neurons (inputs nonnegative: a pre-activation's mean is comparable to its spread)."""
    from pipeline.recovery.chain import incoming, states
    from pipeline.recovery.teachers import nonaffine

    rng = np.random.default_rng(seed)
    widths = tuple(int(w) for w in rng.integers(3, 8, size=int(rng.integers(2, 4))))
    gain = 4.0 if act == "sigmoid" else 2.0
    spec = dict(input_dim=int(rng.integers(4, 10)), widths=widths, activation=act, gain=gain)
    grid = (torch.arange(4001, dtype=F64) + 0.5) / 4001
    unit = nonaffine(act, math.sqrt(2.0) * torch.special.erfinv(2 * grid - 1))
    x = torch.randn(
        20_000, spec["input_dim"], generator=torch.Generator().manual_seed(seed), dtype=F64
    )

    def lowest(chain, params):
        hidden, out = states(chain, params, x), []
        for layer in range(chain.depth):
            v = incoming(chain, params, layer)[0]
            z = hidden[layer].reshape(len(x), -1) @ v[:, :-1].T + v[:, -1]
            out.append(float((nonaffine(act, z) / unit).min()))
        return min(out)

    assert lowest(*make_toy_teacher(ToyTeacher(**spec, seed=seed, min_nonlinearity=0.25))) > 0.2
    if act == "relu":
        plain = [make_toy_teacher(ToyTeacher(**spec, seed=seed + k)) for k in range(20)]
        assert min(lowest(*teacher) for teacher in plain) < 0.2


def _moved_by_symmetry(chain: Chain, params: dict, gen: torch.Generator):
    """The network ``params`` (a stack of one) moved by a random element of its activation's
    group, top layer first, with the function kept exactly: each hidden layer's neurons
    permuted, scaled by ``a > 0`` where the activation is homogeneous, and flipped (``s = -1``)
    where it has a sign symmetry; a flipped neuron's constant (``sigma(-u) = kappa -
    sigma(u)``) goes into the next bias, its linear term (``sigma(-u) = sigma(u) - lambda u``)
    into a skip from the layer below. Moving from the top down, no layer's incoming vector
    holds a skip when it is moved; a skip reading a layer moved later takes its columns like
    the next weight, so even-linear flips (whose linear terms would then need a skip over two
    layers) skip the layer below a layer with flips."""
    from pipeline.models.activations import make as make_activation
    from pipeline.recovery.chain import incoming, skip_name, with_incoming

    symmetry = symmetry_of(chain.activation)
    act = make_activation(chain.activation)
    one, zero = torch.ones((), dtype=F64), torch.zeros((), dtype=F64)
    kappa = float(act(one) + act(-one)) if symmetry.sign == "odd_constant" else 0.0
    lam = float(act(one) - act(-one)) if symmetry.sign == "even_linear" else 0.0
    assert symmetry.sign != "odd_constant" or abs(float(act(zero)) - kappa / 2) < 1e-15
    params, flips_above = dict(params), False
    for layer in reversed(range(chain.depth)):
        width, nxt = chain.widths[layer], chain.layers[layer + 1]
        perm = torch.randperm(width, generator=gen)
        a = torch.ones(width, dtype=F64)
        if symmetry.scale:
            a = 0.5 + 1.5 * torch.rand(width, generator=gen, dtype=F64)
        s = torch.ones(width, dtype=F64)
        if symmetry.sign is not None and not (lam and flips_above):
            s = (torch.randint(0, 2, (width,), generator=gen) * 2 - 1).to(F64)
        flips_above = bool((s < 0).any())
        if layer + 2 in chain.skips:  # the skip into Linear layer + 2 reads this layer
            over = skip_name(chain, layer + 2)
            params[over] = params[over][:, :, perm] / a[None, None, :]
        v = incoming(chain, params, layer)[0][perm]  # [width, fan_in + 1], no skip yet
        a_cols = params[f"{nxt}.weight"][0][:, perm]  # [out, width]
        flipped = (s < 0).to(F64)
        params = with_incoming(chain, params, layer, ((a * s)[:, None] * v)[None])
        coef = a * s if symmetry.sign in ("odd", "odd_constant", None) else a
        params[f"{nxt}.weight"] = (a_cols / coef[None, :])[None]
        shift = kappa * a_cols @ flipped + lam * (a_cols * flipped[None, :]) @ v[:, -1]
        params[f"{nxt}.bias"] = params[f"{nxt}.bias"] + shift[None]
        if lam and bool(flipped.any()):
            chain = chain.with_skips((*chain.skips, layer + 1))
            skip = lam * (a_cols * flipped[None, :]) @ v[:, :-1]
            params[skip_name(chain, layer + 1)] = skip[None]
    return chain, params


@settings(max_examples=examples(ci=40, thorough=300), deadline=None)
@given(
    activation=st.sampled_from(sorted(SYMMETRIES)),
    widths=st.lists(st.integers(2, 6), min_size=1, max_size=3),
    d_in=st.integers(2, 6),
    outputs=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_a_teacher_moved_by_its_symmetry_is_recovered_at_every_layer(
    activation, widths, d_in, outputs, seed
):
    """``compare`` measures a network against the teacher moved by its own group (every layer
    permuted, scaled, flipped; the flips' constants in the next bias, their linear terms in
    skips) as the teacher itself: every width right, every neuron at ``d_w``, ``d_a`` of round-
    off. Deeper layers are compared in the teacher's basis of the layer below, which must undo
    the sigmoid flips' constants and must not flip relu's outgoing weights."""
    chain = Chain(d_in, tuple(widths), outputs, activation)
    teacher = init_stack(chain, 1, seed=seed % 1000, dtype=F64)
    gen = torch.Generator().manual_seed(seed)
    moved_chain, moved = _moved_by_symmetry(chain, teacher, gen)
    x = torch.randn(200, d_in, generator=gen, dtype=F64)
    expected = forward(chain, teacher, x)
    # the move keeps the function (the construction is right) ...
    diff = float((forward(moved_chain, moved, x) - expected).abs().max())
    assert diff < 1e-12 * (1 + float(expected.abs().max())), diff
    # ... and compare sees the teacher at every layer
    neurons, layers = compare(chain, teacher, moved_chain, moved)
    assert (layers.inferred_width == layers.teacher_width).all()
    assert (layers.excess == 0).all()
    teacher_rows = neurons[neurons.kind == "teacher"]
    assert float(teacher_rows.d_w.max()) < 1e-12, layers
    assert float(teacher_rows.d_a.max()) < 1e-12, teacher_rows


@settings(max_examples=examples(ci=6, thorough=60), deadline=None)
@given(
    activation=st.sampled_from(["tanh", "sigmoid", "softplus"]),
    width=st.integers(2, 5),
    d_in=st.integers(3, 6),
    seed=st.integers(0, 2**31 - 1),
)
def test_a_float32_fit_ends_in_a_float64_polish(activation, width, d_in, seed):
    """``expand.polish`` runs in ``polish_dtype`` on the probe data as given: a float32 student
    at the teacher (rho 1), each weight moved by 1e-3, is polished (Levenberg-Marquardt, which
    converges quadratically to a zero residual) in float64 to the teacher, a loss below 1e-28 x
    mean(y^2). Float32 cannot get there: its rounding of the weights, or of the data, alone
    leaves ~1e-15."""
    teacher, t_params = make_toy_teacher(
        ToyTeacher(d_in, (width,), activation, min_angle=30, seed=seed % 1000)
    )
    data = toy_data(teacher, t_params, 200, seed)
    gen = torch.Generator().manual_seed(seed)
    start = {
        k: (v + 1e-3 * torch.randn(v.shape, generator=gen, dtype=F64)).float().contiguous()
        for k, v in t_params.items()
    }
    fitted = FitResult(start, torch.zeros(1), torch.zeros(1), ["max_epochs"], 7, pd.DataFrame())
    polish = FitHparams(optimizer="lm", max_epochs=200, tolerance=0.0)
    h = ExpandHparams(students=1, rho=1, dtype="float32", polish=polish)
    result = students_module.polish_students(teacher, fitted, data, h)
    assert all(v.dtype == F64 for v in result.params.values())
    relative = result.train_loss / (data.y**2).mean()
    assert float(relative.max()) < 1e-28, relative  # round-off: <= 2e-31 over 60 draws
    torch.testing.assert_close(
        result.train_loss, students_module.per_network_mse(teacher, result.params, data.x, data.y)
    )
    assert result.epochs > 7 and result.epochs == int(result.history.epoch.max())


def _embedded(teacher: dict, width: int, gen: torch.Generator, noise: float) -> dict:
    """A student of ``width`` hidden neurons holding ``teacher``'s (a stack of one, one hidden
    layer) with relative noise ``noise``, at random positions; the others are random neurons
    with zero outgoing weights (leftovers that change nothing)."""
    w, b = teacher["fc1.weight"][0], teacher["fc1.bias"][0]
    a, c = teacher["out.weight"][0], teacher["out.bias"][0]
    r, d = w.shape
    pos = torch.randperm(width, generator=gen)[:r]
    weight = torch.randn(width, d, generator=gen, dtype=F64)
    bias = torch.randn(width, generator=gen, dtype=F64)
    out = torch.zeros(a.shape[0], width, dtype=F64)
    weight[pos] = w * (1 + noise * torch.randn(r, d, generator=gen, dtype=F64))
    bias[pos] = b * (1 + noise * torch.randn(r, generator=gen, dtype=F64))
    out[:, pos] = a
    return {"fc1.weight": weight, "fc1.bias": bias, "out.weight": out, "out.bias": c.clone()}


@settings(max_examples=examples(ci=4, thorough=40), deadline=None)
@given(
    activation=st.sampled_from(["tanh", "sigmoid", "relu", "softplus"]),
    width=st.integers(2, 3),
    d_in=st.integers(5, 8),
    converged=st.integers(3, 4),
    seed=st.integers(0, 2**31 - 1),
)
def test_students_stuck_far_above_the_best_do_not_outvote_the_converged(
    activation, width, d_in, converged, seed
):
    """Ten students 4x wider than a one-hidden-layer teacher: ``converged`` (3-4) hold the
    teacher's neurons (relative noise 1e-8), the other 6-7 share another network's neurons (a
    local minimum, noise 1e-4), at a loss of order mean(y^2); the rest of each student is random
    neurons with no outgoing weight. Pooled, the stuck students make that network's clusters
    and outnumber the teacher's (support 3-4 < floor(gamma N) = 5): the collapse is the local
    minimum. The converged students (within 100x of the best, at least four) are clustered
    too, and the reconstruction kept is the teacher to round-off."""
    teacher_spec = ToyTeacher(d_in, (width,), activation, min_angle=30, min_outgoing=0.5)
    chain, teacher = make_toy_teacher(replace(teacher_spec, seed=seed % 10_000))
    _, local = make_toy_teacher(replace(teacher_spec, seed=seed % 10_000 + 1))
    data = toy_data(chain, teacher, n=400, seed=seed % 1000)
    gen = torch.Generator().manual_seed(seed)
    nets = [_embedded(teacher, 4 * width, gen, 1e-8) for _ in range(converged)]
    nets += [_embedded(local, 4 * width, gen, 1e-4) for _ in range(10 - converged)]
    order = torch.randperm(10, generator=gen).tolist()
    s_chain = Chain(d_in, (4 * width,), chain.outputs, activation)
    params = stack([nets[i] for i in order])
    with torch.no_grad():
        loss = ((forward(s_chain, params, data.x) - data.y) ** 2).mean(dim=(1, 2))
        test = ((forward(s_chain, params, data.x_test) - data.y_test) ** 2).mean(dim=(1, 2))
    scale = float((data.y**2).mean())
    assert float(loss.max()) > 1e-4 * scale and float(loss.min()) < 1e-12 * scale
    students = FitResult(params, loss, test, ["converged"] * 10, 0, pd.DataFrame())
    h = ClusterHparams()
    chosen = converged_students(loss, h)
    assert {order.index(i) for i in range(converged)} <= set(chosen.tolist())
    assert len(chosen) == 4

    def farthest(chain_b, params_b):
        neurons, _ = compare(chain, teacher, chain_b, params_b)
        return float(neurons[neurons.kind == "teacher"].d_w.max())

    rec = reconstruct(s_chain, students, data, h)
    assert rec.widths == chain.widths, rec.clusters
    assert farthest(rec.chain, rec.params) < 1e-12
    # pooled, the clusters are the local minimum's (the final fit may still find the teacher
    # from there on a problem this small, so the collapse is what is compared; the four
    # students' collapse can hold a random pair of leftovers, which support two admits, and
    # lose a neuron to it, which the final fit repairs)
    pooled = reconstruct(s_chain, students, data, replace(h, converged=None))
    assert pooled.clustered == tuple(range(10))
    assert farthest(pooled.collapsed_chain, pooled.before_finetune) > 1e-3, pooled.clusters


LBFGS8 = {"optimizer": "lbfgs", "lr": 1.0, "max_epochs": 8, "log_every": 4}


def _lbfgs(chain, params, data, **h) -> FitResult:
    """The stacked L-BFGS on ``params`` (whatever their number; ``fit`` hands one network to
    torch's L-BFGS instead)."""
    h = FitHparams(optimizer="lbfgs", lr=1.0, log_every=1, **h)
    return students_module._fit_lbfgs_stack(chain, params, data, h, None, None)


@settings(max_examples=examples(ci=6, thorough=60), deadline=None)
@given(
    activation=st.sampled_from(["tanh", "sigmoid", "relu", "softplus"]),
    widths=st.lists(st.integers(2, 6), min_size=1, max_size=3),
    d_in=st.integers(2, 8),
    count=st.integers(2, 5),
    seed=st.integers(0, 2**31 - 1),
)
def test_stacked_lbfgs_fits_each_network_as_it_would_alone(activation, widths, d_in, count, seed):
    """The stacked L-BFGS is ``count`` independent fits run in one pass: each network's
    parameters after 8 iterations equal those of its fit as a stack of one (each trial of the
    line search evaluates only the networks still searching, so none waits for another), to
    the rounding that the other networks' GEMM shapes change, which the iterations amplify
    (<= 8e-11 over 120 draws)."""
    teacher, t_params = make_toy_teacher(ToyTeacher(d_in, tuple(widths), activation, seed=seed))
    data = toy_data(teacher, t_params, 200, seed)
    student = teacher.with_widths(2 * w for w in widths)
    params = init_stack(student, count, seed=seed % 1000, dtype=F64)
    together = _lbfgs(student, params, data, max_epochs=8)
    for n in range(count):
        alone = _lbfgs(student, stack([member(params, n)]), data, max_epochs=8)
        for k, v in alone.params.items():
            torch.testing.assert_close(together.params[k][n : n + 1], v, rtol=1e-8, atol=1e-8)
        assert together.status[n] == alone.status[0]
    # one history row per network and logged iteration (the last one too, once)
    single = fit(student, stack([member(params, 0)]), data, replace(FitHparams(), **LBFGS8))
    for result in (together, single):
        assert not result.history.duplicated(["epoch", "student"]).any(), result.history
        assert int(result.history.epoch.max()) == result.epochs


@settings(max_examples=examples(ci=6, thorough=60), deadline=None)
@given(
    activation=st.sampled_from(["tanh", "sigmoid", "softplus"]),
    width=st.integers(2, 5),
    d_in=st.integers(2, 8),
    behind=st.sampled_from([10.0, 100.0, 1000.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_a_network_far_behind_the_best_stops_where_it_falls_behind(
    activation, width, d_in, behind, seed
):
    """``behind``: a network whose loss is above ``behind`` x the best network's stops. The
    teacher moved by 1e-3 (its loss falls fast) and a random network of the same shape are
    fitted together: the random one ends with status ``behind`` and the parameters of its own
    fit run for exactly the iterations after which, by the two solo fits' loss histories, its
    loss is first above ``behind`` x the teacher's (that the others' paths are their own is
    the test above)."""
    teacher, t_params = make_toy_teacher(ToyTeacher(d_in, (width,), activation, seed=seed))
    data = toy_data(teacher, t_params, 200, seed)
    gen = torch.Generator().manual_seed(seed)
    near = {
        k: v + 1e-3 * torch.randn(v.shape, generator=gen, dtype=F64) for k, v in t_params.items()
    }
    far = init_stack(teacher, 1, seed=seed % 1000, dtype=F64)
    both = stack([member(near, 0), member(far, 0)])
    solo = [_lbfgs(teacher, p, data, max_epochs=200) for p in (near, far)]
    losses = [r.history.set_index("epoch").loss for r in solo]
    best = np.minimum(losses[0].reindex(losses[1].index).ffill(), losses[1])  # (stopped: kept)
    gap = losses[1] > behind * best
    together = _lbfgs(teacher, both, data, max_epochs=200, behind=behind)
    if not gap.any():  # the random network kept up (then nothing stops it)
        assert together.status[1] != "behind"
        return
    stop = int(gap.idxmax())
    assert together.status[1] == "behind"
    at_stop = _lbfgs(teacher, far, data, max_epochs=stop)
    for k, v in at_stop.params.items():
        torch.testing.assert_close(together.params[k][1:], v, rtol=1e-8, atol=1e-8)
    assert together.status[0] != "behind" and stop <= together.epochs
