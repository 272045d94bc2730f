"""Change of basis (CoB) of a network, on its neuron structure (Armenta et al., neural
teleportation).

A CoB holds one nonzero factor ``tau`` per hidden neuron: per neuron group (a Linear/Conv
output, a BatchNorm output, a residual stream, the affine outputs of a BatchNorm reading a
concatenation) and, for every BatchNorm directly after a Linear/Conv, the factors of that
Linear/Conv's outputs (``norm_in``: the basis the BatchNorm reads). Network inputs and logits keep
``tau = 1``. Teleporting multiplies every parameter entry by

    D[W_ij] = tau_out,i / tau_in,j      (Linear/Conv weight, any kernel size; through a Flatten
                                         each input channel's tau covers its block of columns)
    D[b_i]  = tau_out,i                 (bias)
    D[gamma_i] = D[beta_i] = tau_i      (BatchNorm affine; its running statistics stay)

where ``tau_out`` is the factor of the neurons the entry feeds and ``tau_in`` that of the neurons
it reads; a BatchNorm computes ``BN(x / tau_in)`` and every activation and max-pool whose
neurons' ``tau`` is not a symmetry of it computes ``tau * op(x / tau)``
(:mod:`pipeline.teleport.network`). The teleported network computes the same function, and its
gradients transform contravariantly: ``grad' = grad / D``.

Residual streams (``residual``): a stream is one neuron group with several branches (the stem
and every block's last Linear/Conv or BatchNorm, projection shortcuts) tied by Adds.

- ``per_branch`` (the original's group, Armenta et al.): every branch has its own factors,
  ``tau[group]`` is ``[branches, size]``. The stream between two Adds holds the first summand's
  basis, so the weights reading it divide by that branch's factors and every Add computes
  ``x1 + (tau_x1 / tau_x2) x2``: the skip edge acquires a diagonal weight.
- ``tied``: one factor per stream channel for all branches (``[size]``), a subgroup that
  modifies no Add (for ReLU with ``tau > 0`` a symmetry of the stock network).

A ``[size]`` factor of a multi-branch group is the tied case of ``[branches, size]`` (products
broadcast), so tied and per-branch CoBs compose.

CoBs compose by elementwise product (teleporting by ``a`` then ``b`` is teleporting by
``a * b``), and :func:`recover` finds the CoB relating two networks in closed form.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pipeline.models import activations
from pipeline.models.reductions import per_neuron
from pipeline.models.structure import Branch, NeuronStructure
from pipeline.symmetry.actions import slice_factor

SAMPLINGS = ("intra_landscape", "inter_landscape", "centered", "positive", "negative")
RESIDUAL = ("per_branch", "tied")


@dataclass
class ChangeOfBasis:
    """``tau[group] [size]`` (or ``[branches, size]``: per-branch factors of a residual stream)
    and ``norm_in[batchnorm module] [channels]`` (float64, nonzero); a group or BatchNorm left
    out has factors 1."""

    tau: dict[str, torch.Tensor]
    norm_in: dict[str, torch.Tensor] = field(default_factory=dict)

    def compose(self, then: ChangeOfBasis) -> ChangeOfBasis:
        """The CoB of teleporting by ``self``, then by ``then``."""

        def product(a: dict, b: dict) -> dict:
            out = dict(a)
            for k, v in b.items():
                out[k] = out[k] * v if k in out else v.clone()
            return out

        return ChangeOfBasis(product(self.tau, then.tau), product(self.norm_in, then.norm_in))

    def inverse(self) -> ChangeOfBasis:
        """The CoB undoing this one."""
        return ChangeOfBasis(
            {k: 1.0 / v for k, v in self.tau.items()},
            {k: 1.0 / v for k, v in self.norm_in.items()},
        )

    def to_dict(self) -> dict:
        """Plain lists (JSON) of every factor."""
        return {
            "tau": {k: v.tolist() for k, v in self.tau.items()},
            "norm_in": {k: v.tolist() for k, v in self.norm_in.items()},
        }

    @classmethod
    def from_dict(cls, raw: dict) -> ChangeOfBasis:
        def tensors(d):
            return {k: torch.as_tensor(v, dtype=torch.float64) for k, v in d.items()}

        return cls(tensors(raw["tau"]), tensors(raw.get("norm_in", {})))


def branch_factors(tau: torch.Tensor, branch: int) -> torch.Tensor:
    """The factors ``[size]`` of one branch of a group: row ``branch`` of per-branch factors,
    or the tied factors themselves."""
    return tau[branch] if tau.ndim == 2 else tau


def join_factors(group, tau: torch.Tensor):
    """``(join, tau_first / tau_second)`` for every Add of the group whose two summands'
    factors differ (the second summand is multiplied by the ratio)."""
    if tau.ndim != 2:
        return
    for join in group.joins:
        ratio = tau[join.first] / tau[join.second]
        if not bool((ratio == 1).all()):
            yield join, ratio


def norm_module(branch: Branch) -> str | None:
    """Module path of the BatchNorm directly after the branch's Linear/Conv (None: no BN)."""
    for sl in branch.norm + branch.stats:
        return sl.param.rsplit(".", 1)[0]
    return None


def _join_channels(name: str, parts: dict[int, torch.Tensor]) -> torch.Tensor:
    """One BatchNorm's factors from the groups sharing it (``first channel -> factors``): the
    zero-padded streams of option-A ResNets split a BatchNorm's channels over several groups."""
    starts = sorted(parts)
    ends = [k + len(parts[k]) for k in starts]
    if starts[0] != 0 or starts[1:] != ends[:-1]:
        spans = [f"{a}:{b}" for a, b in zip(starts, ends, strict=True)]
        raise ValueError(
            f"{name}: the neuron groups cover its channels {spans}, not one contiguous range from 0"
        )
    return torch.cat([parts[k] for k in starts])


def identity(structure: NeuronStructure) -> ChangeOfBasis:
    """The CoB with every factor 1."""
    return ChangeOfBasis(
        {g.name: torch.ones(g.size, dtype=torch.float64) for g in structure.groups}
    )


def symmetric(activation: str, tau: torch.Tensor) -> torch.Tensor:
    """Per neuron: is ``tau * sigma(x / tau) == sigma(x)`` for every ``x``?"""
    props = activations.get(activation)
    ok = torch.zeros_like(tau, dtype=torch.bool)
    if props.homogeneous:
        ok |= tau > 0
    if props.odd:
        ok |= tau.abs() == 1
    if props.homogeneous and props.odd:
        ok |= torch.ones_like(ok)
    return ok


def _draw(n: int, sampling: str, cob_range: float, center: float, gen) -> torch.Tensor:
    u = 1.0 - torch.rand(n, generator=gen, dtype=torch.float64)  # (0, 1]
    r = cob_range
    if sampling == "intra_landscape":
        tau = 1.0 - r + 2.0 * r * u
    elif sampling == "inter_landscape":
        sign = torch.randint(0, 2, (n,), generator=gen).to(torch.float64) * 2.0 - 1.0
        tau = sign * (1.0 - r + 2.0 * r * u)
    elif sampling == "centered":
        tau = center - r + 2.0 * r * u
    elif sampling == "positive":
        tau = r * u
    else:
        tau = -r * u
    return tau


def sample(
    structure: NeuronStructure,
    sampling: str,
    cob_range: float,
    gen: torch.Generator,
    center: float = 1.0,
    norm_inputs: bool = True,
    residual: str = "per_branch",
) -> ChangeOfBasis:
    """A random CoB, i.i.d. per neuron (``r`` = ``cob_range``, ``c`` = ``center``):

    - intra_landscape: U[1-r, 1+r], 0 < r <= 1 (positive: ReLU networks keep their activations);
    - inter_landscape: a fair random sign times U[1-r, 1+r] (any r > 0);
    - centered: U[c-r, c+r], 0 < r <= c;
    - positive: U(0, r]; negative: [-r, 0).

    ``norm_inputs``: also draw the factors of every Linear/Conv output that a BatchNorm reads
    (the paper gives them their own factors); otherwise those stay 1. ``residual``:
    ``per_branch`` (the paper's group: each branch of a residual stream its own factors) or
    ``tied`` (one factor per stream channel); see the module docstring.
    """
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling: {sampling!r} not allowed; allowed: {', '.join(SAMPLINGS)}")
    if residual not in RESIDUAL:
        raise ValueError(f"residual: {residual!r} not allowed; allowed: {', '.join(RESIDUAL)}")
    if not cob_range > 0:
        raise ValueError(f"cob_range must be positive; got {cob_range}")
    if sampling == "intra_landscape" and cob_range > 1:
        raise ValueError(f"cob_range: intra_landscape needs cob_range <= 1; got {cob_range}")
    if sampling == "centered" and cob_range > center:
        raise ValueError(
            f"cob_range: centered needs cob_range <= center ({center}); got {cob_range}"
        )
    cob = ChangeOfBasis({})
    norm_parts: dict[str, dict[int, torch.Tensor]] = {}
    for g in structure.groups:
        if residual == "per_branch" and len(g.branches) > 1:
            tau = _draw(len(g.branches) * g.size, sampling, cob_range, center, gen)
            cob.tau[g.name] = tau.reshape(len(g.branches), g.size)
        else:
            cob.tau[g.name] = _draw(g.size, sampling, cob_range, center, gen)
        if norm_inputs:
            for branch in g.branches:
                bn = norm_module(branch)
                if bn is not None:
                    tau = _draw(g.size, sampling, cob_range, center, gen)
                    norm_parts.setdefault(bn, {})[branch.linear[0].start] = tau
    cob.norm_in = {bn: _join_channels(bn, parts) for bn, parts in norm_parts.items()}
    for name, values in (*cob.tau.items(), *cob.norm_in.items()):
        if (values == 0).any():
            raise ValueError(f"sampled a zero factor for {name}; use a smaller cob_range")
    return cob


def parameter_scales(
    structure: NeuronStructure, cob: ChangeOfBasis, params: dict
) -> dict[str, torch.Tensor]:
    """``D[name]``, broadcastable to ``params[name]`` (same dtype and device): teleporting
    multiplies each parameter entry by D. Parameters the CoB leaves alone are absent."""
    scales: dict[str, torch.Tensor] = {}

    def times(sl, values, inverse=False):
        t = params[sl.param]
        f = slice_factor(values.to(device=t.device, dtype=t.dtype), sl, t.shape)
        f = 1.0 / f if inverse else f
        scales[sl.param] = scales[sl.param] * f if sl.param in scales else f

    for g in structure.groups:
        tau = cob.tau.get(g.name)
        for b, branch in enumerate(g.branches):
            bn = norm_module(branch)
            lin = cob.norm_in.get(bn) if bn is not None else None
            if lin is not None:
                start = branch.linear[0].start  # the group's channels of the BatchNorm
                for sl in branch.linear:
                    times(sl, lin[start : start + g.size])
            if tau is None:
                continue
            if bn is not None and not branch.norm:
                raise ValueError(
                    f"{bn}: a BatchNorm without affine parameters cannot carry the change of "
                    f"basis of group {g.name}"
                )
            for sl in branch.incoming:
                times(sl, branch_factors(tau, b))
        if tau is not None:
            for sl in g.outgoing:
                times(sl, branch_factors(tau, sl.branch), inverse=True)
    return scales


def norm_input_basis(structure: NeuronStructure, cob: ChangeOfBasis) -> dict[str, torch.Tensor]:
    """``batchnorm module -> tau_in [channels]``: the basis each BatchNorm reads (it computes
    ``BN(x / tau_in)``). A BatchNorm directly after a Linear/Conv reads ``cob.norm_in``; one after
    a concatenation reads the factors of the groups its outputs are tied to."""
    segments: dict[str, dict[int, torch.Tensor]] = {}
    for g in structure.groups:
        if g.tied_to is not None:
            (sl, *_) = g.branches[0].linear
            tau = cob.tau.get(g.tied_to)
            tau = (
                torch.ones(g.size, dtype=torch.float64)
                if tau is None
                else branch_factors(tau, g.tied_branch)
            )
            segments.setdefault(sl.param.rsplit(".", 1)[0], {})[sl.start] = tau
    out = dict(cob.norm_in)
    for bn, parts in segments.items():
        out[bn] = torch.cat([parts[k] for k in sorted(parts)])
    return out


def recover(
    structure: NeuronStructure, before: dict, after: dict, residual: str = "per_branch"
) -> ChangeOfBasis:
    """The CoB ``tau`` with ``after = teleport(before, tau)`` (two state dicts), in closed form.

    Per group (``residual: per_branch``: per branch of a residual stream, giving
    ``[branches, size]`` factors), row-wise least squares over its incoming slices whose input
    factors are known: ``tau_i = <x_i, y_i> / |x_i|^2`` with ``x = before / tau_in`` (broadcast
    over columns) and ``y = after``. Groups are solved as their inputs become known (BatchNorm
    affine rows and biases need none; a tied residual stream is solved from its stem); then the
    factors of the Linear/Conv outputs read by BatchNorms. A neuron whose incoming entries are
    all zero gets 1.
    """
    if residual not in RESIDUAL:
        raise ValueError(f"residual: {residual!r} not allowed; allowed: {', '.join(RESIDUAL)}")
    readers: dict[str, list] = {}
    for g in structure.groups:
        for sl in g.outgoing:
            readers.setdefault(sl.param, []).append((g.name, sl))
    solved: dict[tuple[str, int], torch.Tensor] = {}  # (group, branch) -> factors

    def known(param):
        return all((name, sl.branch) in solved for name, sl in readers.get(param, []))

    def least_squares(slices, size):
        num = den = None
        for sl in slices:
            x = before[sl.param].detach().to(torch.float64)
            for name, col in readers.get(sl.param, []):
                x = x / slice_factor(solved[(name, col.branch)], col, x.shape)
            y = after[sl.param].detach().to(torch.float64)
            n_i = per_neuron(x * y, sl, size, fn=lambda t: t)
            d_i = per_neuron(x, sl, size)
            num, den = (n_i, d_i) if num is None else (num + n_i, den + d_i)
        if num is None:
            return None
        return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), torch.ones_like(num))

    # the units solved together: a whole group, or one branch of a per-branch stream
    pending = []
    for g in structure.groups:
        if residual == "per_branch" and len(g.branches) > 1:
            pending += [(g, (b,)) for b in range(len(g.branches))]
        else:
            pending.append((g, tuple(range(len(g.branches)))))
    while pending:
        progress = []
        for unit in pending:
            g, branches = unit
            incoming = [sl for b in branches for sl in g.branches[b].incoming]
            usable = [sl for sl in incoming if known(sl.param)]
            tau = least_squares(usable, g.size) if usable else None
            if tau is not None:
                for b in branches:
                    solved[(g.name, b)] = tau
                progress.append(unit)
        if not progress:
            raise ValueError(
                "cannot recover the change of basis of groups "
                f"{sorted({g.name for g, _ in pending})}: no incoming slice with known inputs"
            )
        pending = [u for u in pending if not any(u is p for p in progress)]
    tau = {}
    for g in structure.groups:
        rows = [solved[(g.name, b)] for b in range(len(g.branches))]
        per_branch = residual == "per_branch" and len(rows) > 1
        tau[g.name] = torch.stack(rows) if per_branch else rows[0]
    norm_parts: dict[str, dict[int, torch.Tensor]] = {}
    for g in structure.groups:
        for branch in g.branches:
            bn = norm_module(branch)
            if bn is not None:
                t = least_squares(branch.linear, g.size)
                norm_parts.setdefault(bn, {})[branch.linear[0].start] = t
    norm_in = {bn: _join_channels(bn, parts) for bn, parts in norm_parts.items()}
    return ChangeOfBasis(tau, norm_in)
