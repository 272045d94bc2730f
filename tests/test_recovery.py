"""Expand-and-Cluster end to end on fixed-seed toy teachers, one and two hidden layers (the
10-4-3 tanh ones here, the 8-6-4 ones in ``test_recovery_deep.py``), at the embedded default's
student and cluster settings: every layer's width and every neuron are recovered, the held-out
error is no worse than the best student's, and moving every trained student by its own element
of its symmetry group before clustering changes nothing."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from recovery_cases import CLUSTER, DEEP_FILE, STUDENTS, TEACHERS, check_recovered, marked, solved

from pipeline.models import build, neuron_structure
from pipeline.recovery.chain import chain_of, forward, member, stack
from pipeline.recovery.collapse import reconstruct
from pipeline.recovery.evaluate import compare
from pipeline.recovery.students import FitResult
from pipeline.symmetry.actions import random_element


@pytest.mark.parametrize("name", marked([n for n in TEACHERS if n not in DEEP_FILE]))
def test_toy_teachers_are_recovered(name):
    check_recovered(name)


@pytest.mark.parametrize("name", marked(["relu-10d-4", "tanh-10-4-3-s11"]))
def test_moving_each_student_by_its_own_symmetry_changes_nothing(name):
    """Every trained student moved by its own random element of its group (a permutation of
    each layer's neurons, with positive scalings for relu and sign flips for tanh) computes the
    same function, and clustering the moved students gives the same recovered network."""
    chain, params, data, s_chain, students, rec = solved(name)
    model = build("mlp", (s_chain.input_dim,), s_chain.outputs, s_chain.model_options(), 0)
    structure = neuron_structure(model, (s_chain.input_dim,))
    assert chain_of(structure, s_chain.input_dim) == s_chain
    gen = torch.Generator().manual_seed(7)
    moved = stack(
        [
            random_element(structure, gen, dtype=students.params["fc1.weight"].dtype).apply(
                member(students.params, n), structure
            )
            for n in range(STUDENTS.students)
        ]
    )
    # other parameters, the same functions
    assert max(float((moved[k] - students.params[k]).abs().max()) for k in moved) > 0.1
    x = data.x[:256].to(moved["fc1.weight"].dtype)
    same = forward(s_chain, moved, x) - forward(s_chain, students.params, x)
    assert float(same.abs().max()) < 1e-4 * float(data.y.abs().max())
    moved_students = FitResult(
        moved, students.train_loss, students.test_loss, students.status, students.epochs, None
    )
    rec_moved = reconstruct(s_chain, moved_students, data, CLUSTER, students_polish=STUDENTS.polish)
    assert rec_moved.widths == rec.widths
    if len(rec.widths) == 1:
        # nothing is refitted between clustering and the collapse (deeper teachers refit the
        # students between layers, from starts that differ by round-off, so only the final
        # networks are compared): the same clusters, sizes and fates ...
        cols = ["layer", "size", "status"]

        def fates(table):
            return table[cols].sort_values(cols).reset_index(drop=True)

        pd.testing.assert_frame_equal(fates(rec_moved.clusters), fates(rec.clusters))
        # ... and the collapsed networks, before the final fit (which can repair a wrong merge
        # of the outgoing weights), compute the same function to the rounding of the moved
        # students' parameters: one rounding in the students' dtype, and the collapse's own
        # float64 arithmetic (canonical scaling, means over the members, the forward pass; 16
        # roundings). Float32 students measured 1e-8, float64 (polished) ones 5e-16 = 2.3 eps
        x = data.x[:1024]
        collapsed = forward(rec.collapsed_chain, rec.before_finetune, x)
        again = forward(rec_moved.collapsed_chain, rec_moved.before_finetune, x)
        rel = float((again - collapsed).norm() / collapsed.norm())
        rounding = torch.finfo(students.params["fc1.weight"].dtype).eps
        assert rel < max(rounding, 16 * torch.finfo(torch.float64).eps), rel
    neurons, _ = compare(rec.chain, rec.params, rec_moved.chain, rec_moved.params)
    pairs = neurons[neurons.kind == "teacher"]
    assert (pairs.groupby("layer", sort=False).match.nunique() == list(rec.widths)).all(), pairs
    assert (pairs.d_w < 1e-8).all(), pairs
    assert (pairs.d_a < 1e-8).all(), pairs
    outputs = forward(rec_moved.chain, rec_moved.params, data.x_test)
    reference = forward(rec.chain, rec.params, data.x_test)
    assert float((outputs - reference).abs().max()) < 1e-5 * float(data.y_test.abs().max())
