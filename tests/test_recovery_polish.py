"""The reconstruction ends at the teacher itself, on drawn two-input teachers.

Two inputs are where the toy family failed with every width right: a neuron 5e-3 to 3e-2 off
in 1 - |cos|. The teacher is a zero of the residuals; from the collapsed network (each neuron
its winner's copy, some 1e-3 off) L-BFGS stops early (the loss floor) or stalls in the flat
valleys that nearly linear neurons make, where Levenberg-Marquardt (``cluster.polish``)
converges quadratically; and the redundancy test, comparing stalled losses, dropped needed
neurons (a softplus network one neuron short of its teacher fits to 1e-9..1e-7 of mean(y^2)).
Students are made, not trained: each holds the teacher's neurons with its own perturbation of
every incoming weight (``SPREAD``, what an imprecise student holds), so the test costs seconds
and isolates what follows the clustering."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from hypothesis import given, note, settings
from hypothesis import strategies as st
from strategies import examples

from pipeline.recovery.chain import member, stack
from pipeline.recovery.cluster import ClusterHparams
from pipeline.recovery.collapse import reconstruct
from pipeline.recovery.evaluate import compare
from pipeline.recovery.students import FitResult, per_network_mse
from pipeline.recovery.teachers import ToyTeacher, make_toy_teacher, probe_distribution

ROOT = Path(__file__).resolve().parents[1]
STUDY = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())["studies"]["recovery"]
CLUSTER = ClusterHparams.from_dict(STUDY["cluster"])
STUDENTS = 10
# each student's relative error on every incoming weight: 1 - |cos| ~ 1e-3..1e-2 off the teacher,
# as the family's Adam students hold the neurons of two-input teachers
SPREAD = 0.1


@settings(max_examples=examples(ci=4, thorough=40), deadline=None)
@given(
    activation=st.sampled_from(["tanh", "sigmoid", "softplus"]),
    width=st.integers(3, 6),
    seed=st.integers(0, 2**31 - 1),
)
def test_two_input_teachers_end_at_the_teacher_to_round_off(activation, width, seed):
    # the family's teachers (sigmoid at gain 2), every neuron nonlinear enough on the data that
    # the linear-neuron pruning keeps it: identifiable, so only the fit is under test
    spec = ToyTeacher(
        2,
        (width,),
        activation,
        gain=2.0 if activation == "sigmoid" else 1.0,
        min_angle=5.0,
        min_outgoing=0.3,
        min_nonlinearity=0.1,
        seed=seed,
    )
    chain, teacher = make_toy_teacher(spec)
    data = probe_distribution(chain, teacher, 1000, 1000, seed=seed % 1000)
    gen = torch.Generator().manual_seed(seed)
    t = member(teacher, 0)
    states = []
    for _ in range(STUDENTS):
        w = t["fc1.weight"] * (1 + SPREAD * torch.randn(t["fc1.weight"].shape, generator=gen))
        b = t["fc1.bias"] * (1 + SPREAD * torch.randn(t["fc1.bias"].shape, generator=gen))
        states.append({**t, "fc1.weight": w, "fc1.bias": b})
    params = stack(states)
    students = FitResult(
        params,
        per_network_mse(chain, params, data.x, data.y),
        per_network_mse(chain, params, data.x_test, data.y_test),
        ["converged"] * STUDENTS,
        0,
        None,
    )
    rec = reconstruct(chain, students, data, CLUSTER)
    note(f"widths {rec.widths}, final loss {float(rec.finetune.train_loss[0]):.1e}")
    assert rec.widths == chain.widths, rec.clusters
    neurons, _ = compare(chain, teacher, rec.chain, rec.params)
    d_w = neurons[neurons.kind == "teacher"].d_w
    note(f"1 - |cos| per teacher neuron: {d_w.tolist()}")
    # round-off: 1 - |cos| of float64 unit vectors, and the targets' squares to 1e-24
    assert (d_w < 1e-12).all()
    assert float(rec.finetune.train_loss[0]) < 1e-24 * float((data.y**2).mean())
