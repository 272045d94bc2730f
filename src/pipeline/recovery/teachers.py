"""Teachers and the datasets made by probing them.

A *toy teacher* is the registered ``mlp`` model with ``input_dim`` inputs, hidden ``widths``, one
``activation`` and ``outputs`` linear outputs, its weights drawn from a seeded distribution:
``normal`` (``W_ij ~ N(0, gain^2/fan_in)``, biases ``N(0, (gain bias_scale)^2/fan_in)``) or
``uniform`` (same variances). Well-conditioned teachers are drawn by rejection: every pair of
neurons of a layer is at least ``min_angle`` degrees apart (by ``|cos|`` of the incoming
vectors ``[w; b]`` where the activation has a sign symmetry, so that ``v`` and ``-v`` count as
close), every neuron's outgoing norm is at least ``min_outgoing`` times the layer's mean
outgoing norm, and every neuron is nonlinear on the inputs (:func:`nonaffine`, over ``N(0, I)``
reference inputs, 4096 seeded by the teacher's seed): its part that no affine function of its
pre-activation explains is at least ``min_nonlinearity`` times that of a neuron with unit
Gaussian pre-activations. A neuron dead, active on a few points or always active (relu), or
near-linear or saturated (tanh, sigmoid) is (almost) an affine function of its layer's inputs
on the data, which cannot tell it from a linear term: the teacher's width is then not
identifiable. Upper layers of deep relu teachers draw such neurons often (their inputs are
nonnegative, so a pre-activation's mean is comparable to its spread).

A *trained teacher* is any finished run of the pipeline whose model is a plain MLP.

Probing: inputs ``X`` from a distribution (``gaussian``: ``N(0, scale^2 I)``, ``uniform``:
``U(-scale, scale)^d``) or from a registered dataset (flattened, normalised, optionally plus
Gaussian noise), targets ``Y = teacher(X)`` (all outputs, no softmax). The held-out probe set
is drawn independently (distribution) or is the dataset's test split: the original code has
none and measures everything on the probe inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline import io, seeding
from pipeline.recovery.chain import (
    Chain,
    chain_of,
    forward,
    incoming,
    outgoing,
    stack,
    states,
)

SIGN_SYMMETRIC = {"relu", "leaky_relu", "tanh", "identity", "sigmoid", "softplus", "gelu", "silu"}


@dataclass(frozen=True)
class ToyTeacher:
    input_dim: int
    widths: tuple[int, ...]
    activation: str = "relu"
    outputs: int = 1
    weights: str = "normal"
    gain: float = 1.0
    bias_scale: float = 1.0
    min_angle: float = 0.0
    min_outgoing: float = 0.0
    min_nonlinearity: float = 0.0
    seed: int = 0
    max_draws: int = 10_000

    def chain(self) -> Chain:
        return Chain(self.input_dim, tuple(self.widths), self.outputs, self.activation)


def _draw(gen, shape, fan_in, kind, dtype, scale=1.0):
    std = scale / math.sqrt(fan_in)
    if kind == "normal":
        return std * torch.randn(shape, generator=gen, dtype=dtype)
    if kind == "uniform":
        half = std * math.sqrt(3.0)
        return (2 * torch.rand(shape, generator=gen, dtype=dtype) - 1) * half
    raise ValueError(f"teacher.weights: {kind!r} not allowed; allowed: normal, uniform")


def well_conditioned(
    chain: Chain,
    params: dict,
    min_angle: float,
    min_outgoing: float,
    min_nonlinearity: float = 0.0,
    reference: torch.Tensor | None = None,
) -> bool:
    """Every layer's neurons pairwise >= ``min_angle`` degrees apart (``|cos|`` for activations
    with a sign symmetry), outgoing norms >= ``min_outgoing`` x the layer's mean and, on the
    ``reference`` inputs ``[n, d]``, every neuron's :func:`nonaffine` part >=
    ``min_nonlinearity`` x that of a neuron with unit Gaussian pre-activations."""
    limit = math.cos(math.radians(min_angle))
    for layer in range(chain.depth):
        v = incoming(chain, params, layer)[0]
        u = v / v.norm(dim=1, keepdim=True)
        cos = u @ u.T
        if chain.activation in SIGN_SYMMETRIC:
            cos = cos.abs()
        cos.fill_diagonal_(-1.0)
        if len(u) > 1 and cos.max() > limit:
            return False
        out_norm = outgoing(chain, params, layer)[0].norm(dim=1)
        if out_norm.min() < min_outgoing * out_norm.mean():
            return False
    if min_nonlinearity > 0 and chain.activation != "identity":
        grid = (torch.arange(4001, dtype=reference.dtype) + 0.5) / 4001
        unit = nonaffine(chain.activation, math.sqrt(2.0) * torch.special.erfinv(2 * grid - 1))
        hidden = states(chain, params, reference)
        for layer in range(chain.depth):
            v = incoming(chain, params, layer)[0]  # [width, fan_in + 1]
            source = hidden[layer].reshape(len(reference), -1)
            z = source @ v[:, :-1].T + v[:, -1]
            if bool((nonaffine(chain.activation, z) < min_nonlinearity * unit).any()):
                return False
    return True


def nonaffine(activation: str, z: torch.Tensor) -> torch.Tensor:
    """Per column of pre-activations ``z [n, k]``: the variance of ``sigma(z)`` that no affine
    function of ``z`` explains, ``var(sigma(z)) (1 - R^2)``, divided by ``var(z)`` where
    ``sigma`` is positively homogeneous (relu: then independent of the neuron's scale, which
    its outgoing weight can take). 0 for a neuron affine (or constant) on the data."""
    from pipeline.models.activations import TABLE, make

    s = make(activation)(z)
    zc, sc = z - z.mean(0), s - s.mean(0)
    var_z = (zc * zc).mean(0).clamp_min(torch.finfo(z.dtype).tiny)
    out = ((sc * sc).mean(0) - (zc * sc).mean(0) ** 2 / var_z).clamp_min(0.0)
    return out / var_z if TABLE[activation].homogeneous else out


def make_toy_teacher(spec: ToyTeacher, dtype=torch.float64) -> tuple[Chain, dict]:
    """Draw a toy teacher: its chain and stacked parameters (one network)."""
    chain = spec.chain()
    gen = seeding.generator(spec.seed, "toy-teacher")
    reference = None
    if spec.min_nonlinearity > 0:
        reference = torch.randn(
            4096,
            spec.input_dim,
            generator=seeding.generator(spec.seed, "toy-teacher-reference"),
            dtype=dtype,
        )
    for _ in range(spec.max_draws):
        state = {}
        for i, name in enumerate(chain.layers):
            fan_in, fan_out = chain.fan_in(i), chain.fan_out(i)
            state[f"{name}.weight"] = _draw(
                gen, (fan_out, fan_in), fan_in, spec.weights, dtype, spec.gain
            )
            state[f"{name}.bias"] = _draw(
                gen, (fan_out,), fan_in, spec.weights, dtype, spec.gain * spec.bias_scale
            )
        params = stack([state])
        if well_conditioned(
            chain, params, spec.min_angle, spec.min_outgoing, spec.min_nonlinearity, reference
        ):
            return chain, params
    raise ValueError(
        f"teacher: no draw in {spec.max_draws} met min_angle={spec.min_angle}, "
        f"min_outgoing={spec.min_outgoing} and min_nonlinearity={spec.min_nonlinearity}; "
        "lower them"
    )


def load_run_teacher(run_dir, input_shape, num_classes, dtype=torch.float64):
    """A finished run (``hparams.json`` + ``final.pt``) as a teacher chain; its model must be a
    plain MLP (see :func:`pipeline.recovery.chain.chain_of`)."""
    from pipeline.models import build, neuron_structure

    run_dir = Path(run_dir)
    hparams = io.read_json(run_dir / "hparams.json")
    state = io.load_torch(run_dir / "final.pt")["model"]
    options = {k: v for k, v in hparams["model"].items() if k != "name"}
    model = build(hparams["model"]["name"], input_shape, num_classes, options, 0, dtype)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise io.ArtifactError(
            f"{run_dir / 'final.pt'}: does not fit the run's model ({err})"
        ) from None
    chain = chain_of(neuron_structure(model, input_shape), math.prod(input_shape))
    params = stack([{k: state[k].to(dtype) for k in chain.shapes()}])
    return chain, params


# -- probing ---------------------------------------------------------------------------------------
@dataclass
class ProbeData:
    """Teacher-probed data: ``x [n, d]``, ``y [n, o]`` (training), ``x_test``, ``y_test``
    (held out), and ``informative [d]`` (inputs that vary over ``x``; ``None``: all)."""

    x: torch.Tensor
    y: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    informative: torch.Tensor | None = None
    notes: dict = field(default_factory=dict)

    def to(self, device, dtype=None) -> ProbeData:
        move = {k: getattr(self, k).to(device, dtype) for k in ("x", "y", "x_test", "y_test")}
        mask = self.informative.to(device) if self.informative is not None else None
        return ProbeData(**move, informative=mask, notes=self.notes)


@torch.no_grad()
def probe(chain: Chain, params: dict, x: torch.Tensor, batch: int = 65536) -> torch.Tensor:
    """Teacher outputs ``[n, o]`` for inputs ``x [n, d]`` (network 0 of the stack)."""
    one = {k: v[:1] for k, v in params.items()}
    return torch.cat([forward(chain, one, x[i : i + batch])[0] for i in range(0, len(x), batch)])


def distribution_inputs(
    n: int, dim: int, kind: str, seed: int, tag: str, scale: float = 1.0, dtype=torch.float64
) -> torch.Tensor:
    gen = seeding.generator(seed, "probe-inputs", tag)
    if kind == "gaussian":
        return scale * torch.randn(n, dim, generator=gen, dtype=dtype)
    if kind == "uniform":
        return scale * (2 * torch.rand(n, dim, generator=gen, dtype=dtype) - 1)
    raise ValueError(
        f"probe.inputs: {kind!r} not allowed; allowed: gaussian, uniform, or a dataset name"
    )


def informative_inputs(x: torch.Tensor, rel_tol: float = 1e-6) -> torch.Tensor:
    """Inputs whose standard deviation over ``x`` exceeds ``rel_tol`` x the largest one: the rest
    (e.g. constant border pixels) are not identifiable from the data."""
    std = x.std(dim=0)
    return std > rel_tol * std.max()


def probe_distribution(
    chain, params, n: int, n_test: int, kind: str = "gaussian", seed: int = 0, scale: float = 1.0
) -> ProbeData:
    """Probe with ``n`` training and ``n_test`` held-out inputs from a distribution."""
    dtype = params[f"{chain.layers[0]}.weight"].dtype
    x = distribution_inputs(n, chain.input_dim, kind, seed, "train", scale, dtype)
    xt = distribution_inputs(n_test, chain.input_dim, kind, seed, "test", scale, dtype)
    return ProbeData(
        x,
        probe(chain, params, x),
        xt,
        probe(chain, params, xt),
        None,
        {"inputs": kind, "n": n, "n_test": n_test},
    )


def probe_dataset(
    chain,
    params,
    dataset: str,
    data_dir,
    noise: float = 0.0,
    seed: int = 0,
    subset: int = 0,
    mask_inputs: bool = True,
) -> ProbeData:
    """Probe with a registered dataset's training images (flattened and normalised, plus
    ``N(0, noise^2)``); the held-out set is its test split. ``mask_inputs``: mark the inputs that
    are constant over the probe inputs as uninformative (none are, once noise is added)."""
    from pipeline.data import load

    dtype = params[f"{chain.layers[0]}.weight"].dtype
    splits = load(dataset, data_dir, val_fraction=0.0, subset=subset, dtype=dtype)

    def flat(split):
        return torch.cat([xb.reshape(len(xb), -1) for xb, _ in split.eval_batches(8192)])

    x, xt = flat(splits.train), flat(splits.test)
    if x.shape[1] != chain.input_dim:
        raise ValueError(
            f"probe dataset {dataset!r} has {x.shape[1]} inputs, the teacher {chain.input_dim}"
        )
    if noise:
        gen = seeding.generator(seed, "probe-noise")
        x = x + noise * torch.randn(x.shape, generator=gen, dtype=dtype)
        xt = xt + noise * torch.randn(xt.shape, generator=gen, dtype=dtype)
    mask = informative_inputs(x) if mask_inputs else None
    return ProbeData(
        x,
        probe(chain, params, x),
        xt,
        probe(chain, params, xt),
        mask,
        {"inputs": dataset, "noise": noise, "n": len(x), "n_test": len(xt)},
    )
