"""Property: every symmetry operation of the neuron structure leaves the network function
unchanged, on random architectures from the model registry.

The operations (:mod:`pipeline.symmetry.actions`, on :mod:`pipeline.models.structure`):
permutation of every neuron group (tied groups follow), positive rescaling of positively
homogeneous neurons (incoming x a, outgoing / a, downstream BatchNorm statistics x a**power),
sign flips where the activation is odd (no max-pool, no downstream BatchNorm), BatchNorm
scaling of every normalised branch (its Linear/Conv and running statistics), and the softmax
translation of the logit layer (:func:`pipeline.symmetry.groups.translation_layer`: every
class's weights plus one vector, which leaves log-softmax unchanged). Each drawn case applies a
random subset of them, composed, and compares the outputs in train mode (batch statistics) and
eval mode (running statistics), in the drawn dtype, to a near-roundoff bound: 1e-10 in float64,
1e-5 in float32, or 10 times the network's own rounding error where that is larger
(:func:`strategies.tolerance`: deep networks whose BatchNorms see nearly equal values).
BatchNorms get eps 1e-20: eps breaks the BatchNorm scale symmetry at eps / variance (measured in
test_mechanics).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, note, settings
from hypothesis import strategies as st
from strategies import (
    AFFORDABLE,
    cases,
    checked_dtype,
    compare,
    condition,
    examples,
    forward,
    inputs,
    missing_options,
    off,
    randomise_bn_,
    rel,
)

from pipeline.models import neuron_structure
from pipeline.symmetry.actions import GroupElement
from pipeline.symmetry.groups import translation_layer

OPS = ("permute", "rescale", "sign_flip", "bn_scale", "translate")


#: Small tensors: one torch thread, as every pipeline job uses (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_model_option_has_a_strategy():
    """A registered model whose builder has an option no strategy draws is named here (add it to
    strategies.OPTIONS)."""
    missing = missing_options()
    assert not missing, f"add these options to OPTIONS in tests/strategies.py: {missing}"


def draw_element(structure, ops, gen, spread, dtype) -> GroupElement:
    """A random group element using only ``ops``: log-uniform positive factors in
    [1/spread, spread] for rescaling (homogeneous neurons) and BatchNorm scaling (normalised
    branches), fair random signs where the activation is odd."""
    el = GroupElement()

    def factors(n):
        u = torch.rand(n, generator=gen, dtype=dtype)
        return torch.exp((2 * u - 1) * torch.log(torch.tensor(spread, dtype=dtype)))

    for g in structure.groups:  # a tied group comes after the group it is tied to
        if "permute" in ops:
            el.perms[g.name] = (
                el.perms[g.tied_to] if g.tied_to else torch.randperm(g.size, generator=gen)
            )
        a = torch.ones(g.size, dtype=dtype)
        if "rescale" in ops and g.homogeneous:
            a = a * factors(g.size)
        if "sign_flip" in ops and g.odd:
            a = a * (torch.randint(0, 2, (g.size,), generator=gen) * 2 - 1).to(dtype)
        if not bool((a == 1).all()):
            el.scales[g.name] = a
        if "bn_scale" in ops:
            for b, branch in enumerate(g.branches):
                if branch.norm or branch.stats:
                    el.bn_scales[(g.name, b)] = factors(g.size)
    return el


def translate(state: dict, structure, gen) -> bool:
    """Add one random vector to every class's weights (and one number to every bias) of the
    logit layer, in place; False when there is none. The vector's entries are of the size of
    the weights (a much larger shift would only test log-softmax's cancellation)."""
    out = translation_layer(structure, "ce")
    if out is None:
        return False
    w = state[out.weight]
    size = w.abs().mean()
    state[out.weight] = w + size * torch.randn(w.shape[1], generator=gen, dtype=w.dtype)
    if out.bias:
        b = state[out.bias]
        state[out.bias] = b + size * torch.randn((), generator=gen, dtype=b.dtype)
    return True


def _moves(el: GroupElement) -> bool:
    perms = any(not torch.equal(p, torch.arange(len(p))) for p in el.perms.values())
    return perms or bool(el.scales) or bool(el.bn_scales)


@pytest.mark.parametrize("model", AFFORDABLE)
@settings(max_examples=examples(ci=3, thorough=20))
@given(data=st.data())
def test_symmetry_operations_leave_the_function_unchanged(model, data):
    case = data.draw(
        cases(
            model,
            arch={
                "dtypes": (torch.float64, torch.float32),
                "overrides": {"bn_eps": st.just(1e-20), "dropout": off},
            },
            ops=st.sets(st.sampled_from(OPS), min_size=1),
            spread=st.floats(1.5, 10.0),
            seed=st.integers(0, 2**31 - 1),
        ),
        label="case",
    )
    arch, ops, spread, seed = case.arch, case.ops, case.spread, case.seed
    gen = torch.Generator().manual_seed(seed)
    model = arch.build(seed, torch.float64)
    randomise_bn_(model, gen)
    x = inputs(arch, 6, gen, torch.float64)
    cond = {train: condition(model, x, train) for train in (True, False)}
    dtype = checked_dtype(arch, max(cond.values()))
    model, x = model.to(dtype), x.to(dtype)
    structure = neuron_structure(model, arch.input_shape)
    before = {train: forward(model, x, train) for train in (True, False)}
    state = dict(model.state_dict())
    el = draw_element(structure, ops, gen, spread, dtype)
    moved = el.apply(state, structure)
    translated = "translate" in ops and translate(moved, structure, gen)
    note(f"groups: {[(g.name, g.size, g.activation) for g in structure.groups]}")
    if _moves(el) or translated:
        change = max(rel(moved[k], v) for k, v in state.items() if v.is_floating_point())
        assert change > 1e-3, f"the group element should move the parameters ({change:.2e})"
    model.load_state_dict(moved)
    for train in (True, False):
        after = forward(model, x, train)
        a, b = after, before[train]
        if translated:
            a, b = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
        compare(a, b, dtype, cond[train], "train mode" if train else "eval mode")
