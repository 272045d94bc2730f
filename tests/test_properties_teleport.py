"""Properties of neural teleportation (:mod:`pipeline.teleport`) on random architectures from the
model registry:

- a teleport, and a chain of teleports, by a change of basis drawn with any of the samplers
  (:data:`pipeline.teleport.cob.SAMPLINGS`, every keyword option of
  :func:`~pipeline.teleport.cob.sample` drawn too) leaves the function unchanged in train and
  eval mode, and the chain carries the composed change of basis;
- SGD with momentum, dampening, Nesterov and weight decay on the teleported network, mapped back
  to the original coordinates, is the ``D^-2``-preconditioned run of the original network
  (derivation in :func:`test_teleported_momentum_run_is_the_preconditioned_run`).

New samplers, and new options of ``sample`` (a bool, or a string whose allowed values are a
tuple constant of :mod:`pipeline.teleport.cob`), are drawn without editing this file.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from hypothesis import given, note, settings
from hypothesis import strategies as st
from strategies import (
    AFFORDABLE,
    EPS,
    cases,
    checked_dtype,
    compare,
    condition,
    describe,
    examples,
    forward,
    inputs,
    randomise_bn_,
    rel,
    sgd_hparams,
)

from pipeline.models import neuron_structure
from pipeline.teleport import cob as cob_module
from pipeline.teleport.cob import SAMPLINGS, parameter_scales, sample
from pipeline.teleport.network import current_cob, materialise, teleport_, teleported_parameters
from pipeline.teleport.training import Preconditioner

#: Small tensors: one torch thread, as every pipeline job uses (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def _option_strategies() -> dict:
    """``sample``'s keyword options beyond the sampler, range and center: a bool is drawn
    from both values, a string from the tuple constant of the cob module that holds its
    default (its allowed values); anything else keeps its default."""
    out = {}
    constants = [
        v
        for v in vars(cob_module).values()
        if isinstance(v, tuple) and v and all(isinstance(x, str) for x in v)
    ]
    for name, p in inspect.signature(sample).parameters.items():
        if p.default is inspect.Parameter.empty or name == "center":
            continue
        if isinstance(p.default, bool):
            out[name] = st.booleans()
        elif isinstance(p.default, str):
            allowed = next((c for c in constants if p.default in c), (p.default,))
            out[name] = st.sampled_from(allowed)
    return out


SAMPLE_OPTIONS = _option_strategies()


class CobSpec:
    """How to draw one change of basis (its repr is what a falsifying example prints)."""

    def __init__(self, sampling, cob_range, center, options):
        self.sampling, self.cob_range, self.center, self.options = (
            sampling,
            cob_range,
            center,
            options,
        )

    def __repr__(self):
        return (
            f"CobSpec({self.sampling!r}, cob_range={self.cob_range:.4g}, "
            f"center={self.center:.4g}, {self.options})"
        )

    def draw(self, structure, gen):
        return sample(structure, self.sampling, self.cob_range, gen, self.center, **self.options)


@st.composite
def cob_specs(draw, max_range=10.0):
    """A sampler and its parameters in their allowed domain: intra_landscape r <= 1,
    centered r <= center, the others any r > 0 (up to ``max_range``)."""
    sampling = draw(st.sampled_from(SAMPLINGS))
    center = 1.0
    if sampling == "intra_landscape":
        r = draw(st.floats(0.01, min(1.0, max_range)))
    elif sampling == "centered":
        center = draw(st.floats(0.25, 4.0))
        r = center * draw(st.floats(0.01, 1.0))
    else:
        r = draw(st.floats(0.01, max_range))
    options = {k: draw(s) for k, s in SAMPLE_OPTIONS.items()}
    return CobSpec(sampling, r, center, options)


@pytest.mark.parametrize("model", AFFORDABLE)
@settings(max_examples=examples(ci=3, thorough=20))
@given(data=st.data())
def test_teleports_leave_the_function_unchanged(model, data):
    """The bound is :func:`strategies.tolerance` (near roundoff: 1e-10 in float64, 1e-5 in
    float32, or 10 times the network's own rounding error where that is larger)."""
    case = data.draw(
        cases(
            model,
            arch={"dtypes": (torch.float64, torch.float32)},
            chain=st.lists(cob_specs(), min_size=1, max_size=3),
            seed=st.integers(0, 2**31 - 1),
        ),
        label="case",
    )
    arch, chain, seed = case.arch, case.chain, case.seed
    gen = torch.Generator().manual_seed(seed)
    model = arch.build(seed, torch.float64)
    randomise_bn_(model, gen)
    x = inputs(arch, 6, gen, torch.float64)
    cond = {train: condition(model, x, train, seed) for train in (True, False)}
    dtype = checked_dtype(arch, max(cond.values()))
    model, x = model.to(dtype), x.to(dtype)
    structure = neuron_structure(model, arch.input_shape)
    reference = {train: forward(model, x, train, seed) for train in (True, False)}
    original = {k: p.detach().clone() for k, p in model.named_parameters()}
    net = materialise(copy.deepcopy(model), arch.input_shape)
    composed = None
    for i, spec in enumerate(chain):
        cob = spec.draw(structure, gen)
        composed = cob if composed is None else composed.compose(cob)
        teleport_(net, cob)
        for train in (True, False):
            mode = "train" if train else "eval"
            where = f"after teleport {i + 1} of {len(chain)}, {mode} mode"
            compare(forward(net, x, train, seed), reference[train], dtype, cond[train], where)
    # the chain carries the composed change of basis, and its parameters are D(composed) theta
    carried = current_cob(net)
    expected = teleported_parameters(structure, original, composed)
    for k, p in net.named_parameters():
        assert rel(p.detach(), expected[k]) < 32 * EPS[dtype], k  # a few roundings per entry
    for k, t in composed.tau.items():
        assert rel(carried.tau[k], t) < 1e-12, k
    if structure.groups:
        moved = max(rel(p.detach(), original[k]) for k, p in net.named_parameters())
        assert moved > 1e-3, f"the teleports should move the parameters ({moved:.2e})"


# -- momentum: the teleported run is the preconditioned run ---------------------------------------
def _sgd_step(params: dict, grads: dict, buffers: dict, h: dict, precondition: dict) -> None:
    """One step of torch's SGD written out, with the gradient term scaled by
    ``precondition[name]`` (``D^-2``; absent: 1):

        u  = P g + lam theta
        v  = u                      (first step)
        v  = beta v + (1 - d) u     (later steps)
        s  = u + beta v  (Nesterov),  v  (heavy ball),  u  (no momentum)
        theta <- theta - lr s
    """
    lr, beta, d, lam = h["lr"], h["momentum"], h["dampening"], h["weight_decay"]
    for name, theta in params.items():
        g = grads[name]
        if g is None:
            continue
        u = g * precondition.get(name, 1.0) + lam * theta
        if beta:
            v = buffers.get(name)
            v = u.clone() if v is None else beta * v + (1 - d) * u
            buffers[name] = v
            s = u + beta * v if h["nesterov"] else v
        else:
            s = u
        theta.sub_(lr * s)


#: Smallest relative distance allowed between the float64 runs: a few steps of rounding (the
#: largest measured in 80 thorough examples: 2.8e-12).
TRAJECTORY = 1e-10
#: Rounding differences allowed, in units of the explicit run's own rounding error scaled from
#: float32 to float64 (the teleported run rounds differently at every operation).
TRAJECTORY_SAFETY = 100.0
#: Float32 drift beyond which the float32 probe is no longer linear in the rounding (a run
#: that amplifies rounding a thousandfold per few steps, e.g. a deep sigmoid ResNet whose
#: BatchNorms see 1x1 maps): the comparison stops there.
TRAJECTORY_CHAOTIC = 1e-4


def _flat(params) -> torch.Tensor:
    return torch.cat([p.detach().flatten().double() for _, p in sorted(params)])


def _loss(model, x, y, k):
    """Cross-entropy on batch ``k`` with dropout masks fixed by ``k``."""
    with torch.random.fork_rng():
        torch.manual_seed(k)
        return torch.nn.functional.cross_entropy(model(x), y)


class ExplicitRun:
    """The preconditioned run written out (:func:`_sgd_step`) on a copy of the stock network."""

    def __init__(self, model, h, dtype):
        self.model = copy.deepcopy(model).to(dtype)
        self.params = dict(self.model.named_parameters())
        self.h, self.dtype, self.buffers = h, dtype, {}

    def step(self, x, y, k, precondition):
        self.model.zero_grad(set_to_none=True)
        _loss(self.model, x.to(self.dtype), y, k).backward()
        with torch.no_grad():
            grads = {n: p.grad for n, p in self.params.items()}
            factors = {n: f.to(self.dtype) for n, f in precondition.items()}
            _sgd_step(self.params, grads, self.buffers, self.h, factors)

    def flat(self) -> torch.Tensor:
        return _flat(self.params.items())


@pytest.mark.parametrize("model", AFFORDABLE)
@settings(max_examples=examples(ci=3, thorough=20))
@given(data=st.data())
def test_teleported_momentum_run_is_the_preconditioned_run(model, data):
    r"""Teleporting by a change of basis multiplies every parameter entry by its factor D
    (diagonal, :func:`~pipeline.teleport.cob.parameter_scales`), and the teleported network
    computes f'(theta') = f(theta' / D) exactly (its modified activations, max-pools and
    BatchNorms undo the basis). By the chain rule its gradient is g' = grad f(theta'/D) / D =
    g / D. Torch's SGD on theta' (weight decay lam, momentum beta, dampening d, lr eta):

        u'_k = g'_k + lam theta'_k = D^-1 g_k + lam D theta_k
        v'_{k+1} = beta v'_k + (1 - d) u'_k          (v'_1 = u'_0)
        theta'_{k+1} = theta'_k - eta s'_k,   s' = v'_{k+1} (heavy ball) or u' + beta v'_{k+1}

    Divide by D: with theta = theta'/D, u = u'/D = D^-2 g + lam theta, v = v'/D, s = s'/D the
    recursion is the same SGD in the original coordinates, on the preconditioned gradient
    D^-2 g (the weight-decay term is not preconditioned). So a run that trains ``before``
    steps, teleports its weights and momentum buffers (v' = D v, what makes v = v'/D continue
    unchanged), and trains ``after`` more steps is, mapped back by D^-1, the original run
    whose gradient is multiplied by D^-2 from the teleport on. Here both runs are built: the
    teleported one with torch.optim.SGD and :func:`~pipeline.teleport.network.teleport_`, the
    preconditioned one written out (:func:`_sgd_step`) on the stock network, and the library's
    :class:`~pipeline.teleport.training.Preconditioner` on torch's SGD as a third; the weights
    and BatchNorm statistics must agree at every step, in float64, to 1e-10 relative or, where
    the trajectory is sensitive to rounding, 100 times its float32 drift scaled to float64.
    """
    case = data.draw(
        cases(
            model,
            h=sgd_hparams(),
            spec=cob_specs(max_range=0.5),
            before=st.integers(0, 3),
            after=st.integers(2, 5),
            seed=st.integers(0, 2**31 - 1),
        ),
        label="case",
    )
    arch, h, spec, before, after, seed = (
        case.arch,
        case.h,
        case.spec,
        case.before,
        case.after,
        case.seed,
    )
    gen = torch.Generator().manual_seed(seed)
    model = arch.build(seed, torch.float64).train()
    randomise_bn_(model, gen)
    structure = neuron_structure(model, arch.input_shape)
    cob = spec.draw(structure, gen)
    scales = parameter_scales(structure, cob, dict(model.named_parameters()))
    # the same cap for all three runs: the largest preconditioned step stays below lr 1
    worst = max((float((d**-2).max()) for d in scales.values()), default=1.0)
    h = {**h, "lr": min(h["lr"], 1.0 / worst)}
    note(f"hyperparameters: {describe(h)}; largest D^-2: {worst:.3g}")
    batches = [
        (
            inputs(arch, 8, gen, torch.float64),
            torch.randint(0, arch.num_classes, (8,), generator=gen),
        )
        for _ in range(before + after)
    ]

    # 1. the teleported run: torch's SGD, teleport of weights and momentum after `before` steps
    net = materialise(copy.deepcopy(model), arch.input_shape)
    opt = torch.optim.SGD(net.parameters(), **h)
    # 2. the explicit preconditioned run on the stock network, and the same in float32: its
    # drift from the float64 one measures how much rounding moves this trajectory
    ref, probe = ExplicitRun(model, h, torch.float64), ExplicitRun(model, h, torch.float32)
    # 3. the library's preconditioner on the stock network with torch's SGD
    lib = copy.deepcopy(model)
    lib_opt = torch.optim.SGD(lib.parameters(), **h)
    pre = Preconditioner(lib, structure)
    pre.attach(lib_opt)

    precondition: dict = {}
    for k, (x, y) in enumerate(batches):
        if k == before:
            teleport_(net, cob, opt)
            pre.teleport(cob)
            precondition = {name: d**-2 for name, d in scales.items()}
        for m, o in ((net, opt), (lib, lib_opt)):
            o.zero_grad(set_to_none=True)
            _loss(m, x, y, k).backward()
            o.step()
        ref.step(x, y, k, precondition)
        probe.step(x, y, k, precondition)

        # all parameters as one vector: a parameter whose every gradient is zero in exact
        # arithmetic (a Linear/Conv bias before a BatchNorm) moves by rounding errors only
        expected = ref.flat()
        drift = rel(probe.flat(), expected)
        if not drift <= TRAJECTORY_CHAOTIC:  # (or the run overflowed)
            note(f"step {k + 1}: float32 drift {drift:.2e}, too chaotic to compare further")
            break
        tol = max(TRAJECTORY, TRAJECTORY_SAFETY * drift * EPS[torch.float64] / EPS[torch.float32])
        back = [
            (n, p / scales[n] if k >= before and n in scales else p)
            for n, p in net.named_parameters()
        ]
        err = rel(_flat(back), expected)
        assert err < tol, f"step {k + 1}: teleported run mapped back differs by {err:.3e}"
        err = rel(_flat(lib.named_parameters()), expected)
        assert err < tol, f"step {k + 1}: Preconditioner run differs by {err:.3e}"
        for name, buf in ref.model.named_buffers():
            if buf.is_floating_point():
                err = rel(net.get_buffer(name), buf)
                assert err < tol, f"step {k + 1}: {name} differs by {err:.3e}"
