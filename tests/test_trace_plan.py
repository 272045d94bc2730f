"""Property: the mechanics trace's batched reductions (:class:`pipeline.models.part_plan.PartSumsq`)
give the numbers of their definition, :func:`~pipeline.models.reductions.part_sumsq` part by part
and :func:`~pipeline.models.reductions.column_sums`, bit for bit on one thread (the training
jobs' setting), on random registered architectures in float64 and float32, for the three update
kinds the trace records (momentum velocity, plain SGD with weight decay on all parameters or on
weights only, the parameter change under Adam), including gradients left ``None``.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import architectures, examples, inputs

from pipeline.config import TrainHparams
from pipeline.models import neuron_structure
from pipeline.models.reductions import column_sums, part_sumsq
from pipeline.train.optim import decayed, loss_fn, make_optimizer
from pipeline.train.trace import MechanicsTrace

KINDS = {
    "velocity": {"optimizer": "sgd", "momentum": 0.9},
    "sgd": {"optimizer": "sgd"},
    "delta": {"optimizer": "adam"},
}


#: Small tensors: one torch thread, as every pipeline job uses (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def reference(parts, tensors: dict) -> torch.Tensor:
    if not parts:
        return next(iter(tensors.values())).new_zeros(0)
    return torch.cat([part_sumsq(tensors, p) for p in parts])


@settings(max_examples=examples(ci=8, thorough=100), deadline=None)
@given(
    arch=architectures(dtypes=(torch.float64, torch.float32)),
    kind=st.sampled_from(sorted(KINDS)),
    wd_on=st.sampled_from(["all", "weights"]),
    frozen=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_trace_equals_part_sumsq_bit_for_bit(arch, kind, wd_on, frozen, seed):
    gen = torch.Generator().manual_seed(seed)
    model = arch.build(seed).train()
    h = TrainHparams(lr=0.01, wd=0.01, wd_on=wd_on, mechanics=True, **KINDS[kind])
    structure = neuron_structure(model, arch.input_shape)
    optimizer = make_optimizer(model.named_parameters(), h)
    trace = MechanicsTrace(model, structure, optimizer, h)
    named = dict(model.named_parameters())
    if frozen:  # a parameter without a gradient: zeros in the trace
        next(iter(named.values())).requires_grad_(False)
    loss = loss_fn(h.loss)
    expected = {"g2": [], "u2": [], "colsum": []}
    for _ in range(3):
        x = inputs(arch, 6, gen)
        y = torch.randint(0, arch.num_classes, (6,), generator=gen)
        optimizer.zero_grad(set_to_none=True)
        loss(model(x), y).backward()
        with torch.no_grad():
            grads = {
                n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                for n, p in named.items()
            }
            before = {n: p.detach().clone() for n, p in named.items()}
        trace.before_step()
        optimizer.step()
        trace.after_step(h.lr)
        with torch.no_grad():
            if kind == "velocity":
                state = optimizer.state
                u = {
                    n: state[p]["momentum_buffer"]
                    if "momentum_buffer" in state[p]
                    else torch.zeros_like(p)
                    for n, p in named.items()
                }
            elif kind == "sgd":
                u = {
                    n: g + (h.wd if decayed(n, wd_on) else 0.0) * before[n]
                    for n, g in grads.items()
                }
            else:
                u = {n: (before[n] - p) / h.lr for n, p in named.items()}
            expected["g2"].append(reference(trace.parts, grads))
            expected["u2"].append(reference(trace.parts, u))
            if structure.output is not None:
                out = structure.output
                b = grads[out.bias] if out.bias else None
                expected["colsum"].append(column_sums(grads[out.weight], b))
    got = trace.flush()
    assert sorted(got) == sorted(k for k, v in expected.items() if v)
    for key, value in got.items():
        want = torch.stack(expected[key]).numpy()
        assert value.dtype == want.dtype and value.shape == want.shape, key
        assert (value == want).all(), (key, abs(value - want).max())
