"""Per-neuron reductions over the neuron structure, for numpy arrays and torch tensors alike.

The training trace logs, and the metric cache recomputes from checkpoints, the same numbers:
for every neuron group, per neuron, the sum of squares over its incoming slices, over its
outgoing slices, and over the pre-BatchNorm linear slices of each normalised branch. These
*parts* are metric-agnostic; which symmetry conserves which combination is
:mod:`pipeline.symmetry.groups`' business.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.models.structure import NeuronStructure, Slice


@dataclass(frozen=True)
class Part:
    key: str  # "<group>/in", "<group>/out" or "<group>/linear<b>"
    group: str
    slices: tuple[Slice, ...]
    size: int


def parts(structure: NeuronStructure) -> list[Part]:
    """Every part of every group, in a fixed order (the columns of the trace)."""
    out = []
    for g in structure.groups:
        out.append(Part(f"{g.name}/in", g.name, g.incoming, g.size))
        out.append(Part(f"{g.name}/out", g.name, g.outgoing, g.size))
        for b, branch in enumerate(g.branches):
            if branch.norm:
                out.append(Part(f"{g.name}/linear{b}", g.name, branch.linear, g.size))
    return out


def per_neuron(x, sl: Slice, size: int, lead: int = 0, fn=None):
    """Sum of ``fn(x)`` (default: squares) over each neuron's entries: shape ``lead dims + [size]``.

    ``x`` is the parameter (numpy or torch) with ``lead`` extra leading axes (e.g. time).
    """
    axis = sl.axis + lead
    if axis != lead:
        x = x.swapaxes(lead, axis)
    x = x[(slice(None),) * lead + (slice(sl.start, sl.start + size * sl.block),)]
    x = x * x if fn is None else fn(x)
    return x.reshape(tuple(x.shape[:lead]) + (size, -1)).sum(-1)


def part_sumsq(arrays, part: Part, lead: int = 0):
    """Sum over the part's slices of the per-neuron sums of squares; ``arrays[param]``.

    A part without slices (the outgoing part of neurons only a following BatchNorm reads, as
    in DenseNet) is zeros, shaped and typed like the lead axes of any array of ``arrays``."""
    total = None
    for sl in part.slices:
        red = per_neuron(arrays[sl.param], sl, part.size, lead)
        total = red if total is None else total + red
    if total is None:
        like = next(iter(arrays.values()))
        shape = tuple(like.shape[:lead]) + (part.size,)
        if hasattr(like, "new_zeros"):  # torch
            return like.new_zeros(shape)
        import numpy as np

        return np.zeros(shape, dtype=like.dtype)
    return total


def column_sums(weight, bias, lead: int = 0):
    """Translation quantity of the logit layer: per input column, the sum over classes;
    the bias' sum over classes is appended as a last column. Shape ``lead + [inputs (+1)]``."""
    cols = weight.sum(lead)
    if bias is None:
        return cols
    b = bias.sum(lead)[..., None]
    try:
        import torch

        if isinstance(cols, torch.Tensor):
            return torch.cat([cols, b], -1)
    except ImportError:
        pass
    import numpy as np

    return np.concatenate([cols, b], -1)
