"""Expand-and-Cluster end to end on fixed-seed toy teachers: the width and every neuron are
recovered, the held-out error is no worse than the best student's, and random elements of the
students' symmetry group applied to the trained students change the reconstruction only by that
group."""

from __future__ import annotations

from dataclasses import replace

import pandas as pd
import pytest
import torch

from pipeline.models import build, neuron_structure
from pipeline.recovery.chain import chain_of, forward, member, stack
from pipeline.recovery.cluster import ClusterHparams
from pipeline.recovery.collapse import reconstruct
from pipeline.recovery.evaluate import compare, recovery_summary
from pipeline.recovery.students import (
    ExpandHparams,
    FitHparams,
    per_network_mse,
    student_chain,
    train_students,
)
from pipeline.recovery.teachers import ToyTeacher, make_toy_teacher, probe_distribution
from pipeline.symmetry.actions import random_element

STUDENTS = ExpandHparams(
    students=10,
    rho=4,
    seed=0,
    fit=FitHparams(
        lr=1e-2,
        batch_size=0,
        max_epochs=2000,
        plateau_patience=50,
        plateau_cooldown=50,
        min_lr=1e-6,
        log_every=500,
    ),
)
CLUSTER = ClusterHparams(
    # hidden layers below the last: the students, with the recovered neurons in, are refitted
    # full batch (at a tenth of the students' rate) before the next layer is read from them
    finetune=replace(STUDENTS.fit, lr=1e-3, max_epochs=1500),
    final=FitHparams(optimizer="lbfgs", lr=1.0, max_epochs=60, log_every=10),
)
# (teacher, probe points): the deep teacher's gain 2 keeps its second layer off tanh's linear
# part (at gain 1 its pre-activations are small and that layer is nearly affine, hence not
# identifiable); its 4 + 3 neurons need more probe points than one layer of 4
TEACHERS = {
    "relu-10d-4": (ToyTeacher(10, (4,), "relu", min_angle=30, min_outgoing=0.5, seed=1), 500),
    "tanh-10d-4": (ToyTeacher(10, (4,), "tanh", min_angle=30, min_outgoing=0.5, seed=1), 500),
    "tanh-10d-4-3": (
        ToyTeacher(10, (4, 3), "tanh", gain=2.0, min_angle=30, min_outgoing=0.5, seed=1),
        2000,
    ),
}


def expand_and_cluster(chain, params, probes):
    data = probe_distribution(chain, params, probes, 1000, seed=1)
    s_chain, students = train_students(chain, data, STUDENTS)
    return data, students, reconstruct(s_chain, students, data, CLUSTER)


@pytest.fixture(scope="module", params=sorted(TEACHERS))
def recovered(request):
    torch.set_num_threads(1)
    spec, probes = TEACHERS[request.param]
    chain, params = make_toy_teacher(spec)
    data, students, rec = expand_and_cluster(chain, params, probes)
    return request.param, chain, params, data, students, rec


def test_toy_teachers_are_recovered(recovered):
    name, chain, params, data, students, rec = recovered
    neurons, layers = compare(chain, params, rec.chain, rec.params)
    assert rec.widths == chain.widths, (name, rec.clusters)
    teacher_rows = neurons[neurons.kind == "teacher"]
    assert len(teacher_rows) == sum(chain.widths)
    assert (teacher_rows.d_w < 1e-3).all(), teacher_rows
    # one recovered neuron each, within each layer
    assert (teacher_rows.groupby("layer").match.nunique() == list(chain.widths)).all()
    assert recovery_summary(layers)
    held_out = float(rec.finetune.test_loss[0])
    assert held_out <= 2 * float(students.test_loss.min()), (held_out, students.test_loss)
    # the students themselves did not get there: clustering did the work
    assert float(students.test_loss.min()) > 1e-9
    # every cluster is accounted for: kept ones are the recovered neurons, the rest say why
    table = rec.clusters
    assert (table.status == "kept").sum() == sum(rec.widths)
    assert set(table.status) <= {
        "kept",
        "dropped_small",
        "dropped_spread",
        "dropped_linear",
        "dropped_weak",
        "dropped_redundant",
        "merged",
    }
    for layer, width in zip(chain.layers[: chain.depth], chain.widths, strict=True):
        assert table[table.layer == layer]["size"].sum() == STUDENTS.students * 4 * width


def test_symmetry_of_the_students_changes_nothing(recovered):
    """Each trained student moved by its own random element of its symmetry group (hidden
    neurons permuted; ReLU: rescaled by factors in [0.5, 2]; tanh: signs flipped): the same
    functions as different parameter vectors, so clustering and reconstruction see other
    numbers and must canonicalise them. The reconstruction is the same up to the group (with
    the scale dropped from the canonical form, a rescaled ReLU student stack gave 5 neurons
    for 4)."""
    name, chain, params, data, students, rec = recovered
    s_chain = student_chain(chain, STUDENTS.rho)
    options = s_chain.model_options()
    model = build("mlp", (chain.input_dim,), chain.outputs, options, 0, torch.float64)
    structure = neuron_structure(model, (chain.input_dim,))
    assert chain_of(structure, chain.input_dim) == s_chain
    gen = torch.Generator().manual_seed(7)
    n = next(iter(students.params.values())).shape[0]
    moved = stack(
        [
            random_element(structure, gen).apply(member(students.params, i), structure)
            for i in range(n)
        ]
    )
    # different parameter vectors ...
    assert max((moved[k] - students.params[k]).abs().max() for k in moved) > 0.1
    # ... with the same functions (so the same ranking)
    x = data.x[:256]
    assert torch.allclose(
        per_network_mse(s_chain, moved, x, data.y[:256]),
        per_network_mse(s_chain, students.params, x, data.y[:256]),
        rtol=1e-10,
        atol=0,
    )
    rec_moved = reconstruct(s_chain, replace(students, params=moved), data, CLUSTER)
    assert rec_moved.widths == rec.widths
    if chain.depth == 1:
        # nothing is refitted between clustering and the collapse (deeper teachers refit the
        # students between layers, from starts that differ by round-off, so only the final
        # networks are compared): the same clusters, sizes and fates ...
        cols = ["layer", "size", "status"]

        def fates(table):
            return table[cols].sort_values(cols).reset_index(drop=True)

        pd.testing.assert_frame_equal(fates(rec_moved.clusters), fates(rec.clusters))
        # ... and the collapsed networks, before the final fit (which can repair a wrong merge
        # of the outgoing weights), compute the same function to round-off (measured: 1e-16)
        x = data.x[:1024]
        collapsed = forward(rec.collapsed_chain, rec.before_finetune, x)
        again = forward(rec_moved.collapsed_chain, rec_moved.before_finetune, x)
        rel = float((again - collapsed).norm() / collapsed.norm())
        assert rel < 1e-14, rel
    # the two recovered networks agree up to the group: each neuron of one has its partner
    neurons, _ = compare(rec.chain, rec.params, rec_moved.chain, rec_moved.params)
    pairs = neurons[neurons.kind == "teacher"]
    assert (pairs.groupby("layer").match.nunique() == list(rec.widths)).all(), pairs
    assert (pairs.d_w < 1e-6).all(), pairs
