"""Permutations, rescalings and BatchNorm scalings of a state dict, through the neuron structure.

For a neuron group with permutation ``p`` (neuron i moves to position ``p^-1(i)``: new[i] =
old[p[i]]), every slice of its branches (linear, norm, stats) and its outgoing weights is
re-indexed along the neuron axis. A *rescaling* by ``a`` (one nonzero factor per neuron)
multiplies the incoming slices (BN affine if present, else the Linear/Conv) by ``a`` and divides
the outgoing ones by ``a``; with ``a > 0`` it is a symmetry of positively homogeneous
activations, with ``a = +-1`` of odd ones; the running statistics of BatchNorms reading the
neurons downstream (``normalised_by``) scale with them by ``a**power``. A *BatchNorm scaling*
multiplies a normalised branch's linear slices by ``a > 0`` and its running statistics by
``a**power`` (mean: 1, variance: 2): exact in train mode, and in eval mode up to BN's eps.

A group ``tied_to`` another (the affine outputs of a BatchNorm reading that group) has no
permutation of its own: it follows the permutation of the group it is tied to.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pipeline.models.structure import NeuronStructure, Slice


def slice_factor(values: torch.Tensor, sl: Slice, shape) -> torch.Tensor:
    """Per-entry multipliers (``values[i]`` on neuron ``i``'s entries, 1 elsewhere) along the
    slice's axis, broadcastable to a tensor of ``shape``."""
    total = shape[sl.axis]
    full = torch.ones(total, dtype=values.dtype, device=values.device)
    full[sl.start : sl.start + values.numel() * sl.block] = values.repeat_interleave(sl.block)
    view = [1] * len(shape)
    view[sl.axis] = total
    return full.reshape(view)


def _scale(state: dict, sl: Slice, values: torch.Tensor, power: int = 1) -> None:
    t = state[sl.param]
    f = slice_factor(values.to(device=t.device, dtype=t.dtype), sl, t.shape)
    state[sl.param] = t * f**power


def permuted(t: torch.Tensor, sl: Slice, perm: torch.Tensor) -> torch.Tensor:
    """``t`` with the neurons of slice ``sl`` reordered by ``perm`` (new i = old ``perm[i]``)."""
    idx = torch.arange(t.shape[sl.axis], device=t.device)
    block = torch.arange(sl.block, device=t.device)
    moved = (perm.to(t.device)[:, None] * sl.block + block).reshape(-1) + sl.start
    idx[sl.start : sl.start + moved.numel()] = moved
    return t.index_select(sl.axis, idx)


def group_slices(group):
    """Every slice a group's neurons own: incoming (per branch: linear, BatchNorm affine and
    statistics), outgoing, and downstream BatchNorm statistics (``normalised_by``)."""
    for b in group.branches:
        yield from b.linear
        yield from b.norm
        yield from b.stats
    yield from group.outgoing
    yield from group.normalised_by


def permute(state: dict, structure: NeuronStructure, perms: dict) -> dict:
    """New state dict with group ``g``'s neurons permuted by ``perms[g]`` (new[i] = old[p[i]]).

    A tied group moves with the group it is tied to (its own entry in ``perms`` is ignored)."""
    state = dict(state)
    for g in structure.groups:
        perm = perms.get(g.tied_to if g.tied_to else g.name)
        if perm is not None:
            for sl in group_slices(g):
                state[sl.param] = permuted(state[sl.param], sl, perm)
    return state


def rescale(state: dict, structure: NeuronStructure, scales: dict) -> dict:
    """Incoming x a, outgoing / a, downstream BatchNorm statistics x a**power for each group in
    ``scales`` (``a``: one factor per neuron)."""
    state = dict(state)
    for g in structure.groups:
        if g.name in scales:
            a = scales[g.name]
            for sl in g.incoming:
                _scale(state, sl, a)
            for sl in g.outgoing:
                _scale(state, sl, 1.0 / a)
            for sl in g.normalised_by:
                _scale(state, sl, a, sl.power)
    return state


def bn_scale(state: dict, structure: NeuronStructure, scales: dict) -> dict:
    """Scale the linear slices of normalised branch ``(group, b)`` by ``scales[(group, b)] > 0``."""
    state = dict(state)
    for g in structure.groups:
        for b, branch in enumerate(g.branches):
            a = scales.get((g.name, b))
            if a is None:
                continue
            for sl in branch.linear:
                _scale(state, sl, a)
            for sl in branch.stats:
                _scale(state, sl, a, sl.power)
    return state


@dataclass
class GroupElement:
    """A random element of the model's declared symmetry group."""

    perms: dict = field(default_factory=dict)
    scales: dict = field(default_factory=dict)  # positive (homogeneous) times sign (odd)
    bn_scales: dict = field(default_factory=dict)

    def apply(self, state: dict, structure: NeuronStructure) -> dict:
        state = bn_scale(state, structure, self.bn_scales)
        state = rescale(state, structure, self.scales)
        return permute(state, structure, self.perms)


def random_element(
    structure: NeuronStructure,
    gen: torch.Generator,
    low: float = 0.5,
    high: float = 2.0,
    dtype=torch.float64,
) -> GroupElement:
    """Permutation for every group; positive scales in [low, high] where the activation is
    positively homogeneous; random signs where it is odd; positive scales for every
    BatchNorm-normalised branch."""
    el = GroupElement()

    def uniform(n):
        return low + (high - low) * torch.rand(n, generator=gen, dtype=dtype)

    for g in structure.groups:  # a tied group comes after the group it is tied to
        if g.tied_to is None:
            el.perms[g.name] = torch.randperm(g.size, generator=gen)
        else:
            el.perms[g.name] = el.perms[g.tied_to]
        a = torch.ones(g.size, dtype=dtype)
        if g.homogeneous:
            a = a * uniform(g.size)
        if g.odd:
            a = a * (torch.randint(0, 2, (g.size,), generator=gen) * 2 - 1).to(dtype)
        if g.homogeneous or g.odd:
            el.scales[g.name] = a
        for b, branch in enumerate(g.branches):
            if branch.norm or branch.stats:
                el.bn_scales[(g.name, b)] = uniform(g.size)
    return el
