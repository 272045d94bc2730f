"""The neuron structure of a model, derived from its torch.fx trace.

:func:`derive` reads a :class:`~pipeline.models.structure.NeuronStructure` from a torch.fx
trace of the model, so a registered model needs no hand-written map.

Every tensor gets a channel *layout*: which channel of which *space* each of its channels holds
(or a zero channel). Linear/Conv open a new space, BatchNorm attaches to the
space its Linear/Conv just opened, activations and pools annotate the channels they act on,
Flatten widens their blocks, Concat (channels) lays layouts side by side, ``F.pad`` on the
channel axis adds zero channels, and indexing that keeps the batch and channel axes whole
(``x[:, :, ::2, ::2]``) or spatial padding leaves the layout. Add ties its inputs channel by
channel in a union-find over every space's channels (a zero channel ties nothing). The tied
channel sets are grouped into neuron groups: the sets touching the same spaces, in maximal runs
of consecutive channels in every one of them, so a group owns channels ``start ... start + size
- 1`` of each of its spaces (the ``start`` of its slices and sites).

This covers option-A ResNets, whose shortcuts subsample and zero-pad the stream of stage ``s``
into the middle channels of stage ``s+1``: the stage-``s`` group runs on inside the wider stream
(its slices there start at the padding), and the padded channels below and above it are two
groups of their own. Permutations mixing those two ranges are symmetries too, which the
structure leaves out (a group is one contiguous range of channels per space).

A BatchNorm that does not directly follow a Linear/Conv is a consumer normalisation: each group
it reads gets ``normalised_by`` entries, and its affine outputs form one group per read group,
``tied_to`` it (it must read whole groups).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

from pipeline.models import activations
from pipeline.models.structure import (
    Branch,
    Join,
    NeuronGroup,
    NeuronStructure,
    OutputLayer,
    Site,
    Slice,
    StructureError,
)


@dataclass
class _Space:
    """Channels opened by a Linear/Conv (``producer``), by a consumer BatchNorm (``reads``) or
    by the model input (neither). Channel ``c`` is union-find element ``base + c``."""

    size: int
    base: int
    producer: str | None = None
    norm: str | None = None  # the BatchNorm directly after the producer
    activations: set = field(default_factory=set)
    max_pool: bool = False
    reads: tuple | None = None  # consumer BatchNorm: (module, space read, first channel, offset)


@dataclass(frozen=True)
class _Seg:
    """Channels ``start ... start + size - 1`` of space ``space`` (None: zero channels), each
    spanning ``block`` features after a Flatten."""

    space: int | None
    start: int
    size: int
    block: int


def _channels(layout) -> list[tuple]:
    """Per channel of a layout: ``(space or None, channel within the space, block)``."""
    return [
        (s.space, s.start + k if s.space is not None else 0, s.block)
        for s in layout
        for k in range(s.size)
    ]


def _segments(channels) -> list[_Seg]:
    """Inverse of :func:`_channels`: maximal runs of consecutive channels of one space."""
    out: list[_Seg] = []
    for space, ch, block in channels:
        last = out[-1] if out else None
        if (
            last is not None
            and last.space == space
            and last.block == block
            and (space is None or last.start + last.size == ch)
        ):
            out[-1] = _Seg(space, last.start, last.size + 1, block)
        else:
            out.append(_Seg(space, ch, 1, block))
    return out


def _zeros(size: int) -> _Seg:
    return _Seg(None, 0, size, 1)


def _classify_module(mod) -> tuple[str, str | None]:
    import torch.nn as nn

    table = [
        ((nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d), "linear", None),
        ((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d), "norm", None),
        ((nn.Identity,), "pass", None),
        ((nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d), "maxpool", None),
        (
            (
                nn.AvgPool1d,
                nn.AvgPool2d,
                nn.AdaptiveAvgPool1d,
                nn.AdaptiveAvgPool2d,
                nn.Dropout,
                nn.Dropout1d,
                nn.Dropout2d,
            ),
            "pass",
            None,
        ),
        ((nn.Flatten,), "flatten", None),
    ]
    for cls, act in activations.module_types().items():
        if isinstance(mod, cls):
            return "act", act
    for types, kind, act in table:
        if isinstance(mod, types):
            if kind == "linear" and getattr(mod, "groups", 1) != 1:
                raise StructureError(f"grouped convolution {type(mod).__name__} is not supported")
            return kind, act
    # registered activations defined in pipeline.models.activations carry their name
    name = getattr(mod, "activation_name", None)
    if name in activations.TABLE:
        return "act", name
    raise StructureError(f"module type {type(mod).__name__} is not understood")


def _classify_function(target) -> tuple[str, str | None]:
    import torch
    import torch.nn.functional as F

    table = {
        F.max_pool2d: ("maxpool", None),
        F.adaptive_max_pool2d: ("maxpool", None),
        F.avg_pool2d: ("pass", None),
        F.adaptive_avg_pool2d: ("pass", None),
        F.dropout: ("pass", None),
        torch.flatten: ("flatten", None),
        operator.add: ("add", None),
        operator.iadd: ("add", None),
        torch.add: ("add", None),
        torch.cat: ("cat", None),
        operator.mul: ("scalar", None),
        operator.truediv: ("scalar", None),
        F.pad: ("pad", None),
        operator.getitem: ("getitem", None),
        getattr: ("ignore", None),
    }
    if target in table:
        return table[target]
    act = activations.function_targets().get(target)
    if act is not None:
        return "act", act
    raise StructureError(f"function {getattr(target, '__name__', target)} is not understood")


_METHODS = {
    **{m: ("act", name) for m, name in activations.method_names().items()},
    "flatten": ("flatten", None),
    "view": ("flatten", None),
    "reshape": ("flatten", None),
    "size": ("ignore", None),
    "dim": ("ignore", None),
    "add": ("add", None),
    "mul": ("scalar", None),
    "div": ("scalar", None),
    "contiguous": ("pass", None),
}


def derive(model, input_shape: tuple[int, ...]) -> NeuronStructure:
    """Read the neuron structure of ``model`` (inputs of shape ``input_shape``) from an fx trace."""
    import torch
    from torch.fx import symbolic_trace

    was_training = model.training
    model.eval()
    try:
        gm = symbolic_trace(model)
        param = next(model.parameters())
        example = torch.zeros((2, *input_shape), dtype=param.dtype, device=param.device)
        record_shapes(gm, example)
    finally:
        model.train(was_training)
    trace = _Trace(dict(gm.named_modules()), input_shape)
    for node in gm.graph.nodes:
        trace.visit(node)
    return _assemble(trace)


def record_shapes(gm, example) -> None:
    """Run ``gm`` on ``example`` and record each node's output shape, where it is a tensor, as
    ``node.meta["shape"]`` (a tuple): fx's ``ShapeProp`` without its per-node import of
    ``torch.fx.experimental.symbolic_shapes`` (sympy: about 1.5 s, once per process)."""
    import torch

    class Shapes(torch.fx.Interpreter):
        def run_node(self, node):
            out = super().run_node(node)
            if isinstance(out, torch.Tensor):
                node.meta["shape"] = tuple(out.shape)
            return out

    with torch.no_grad():
        Shapes(gm).run(example)


def _shape(node) -> tuple | None:
    return node.meta.get("shape")


class _Trace:
    """One walk over the fx graph: the channel layout of every tensor node (which channel of
    which space each channel holds), the spaces, a union-find over their channels (residual
    Adds tie channels one by one) and every *use* of channels: read by a Linear/Conv, acted on
    by an activation or a max-pool (``(kind, module or node, layout, activation)``)."""

    def __init__(self, modules: dict, input_shape):
        self.modules = modules
        self.input_shape = tuple(input_shape)
        self.spaces: list[_Space] = []
        self.parent: list[int] = []
        self.layouts: dict = {}
        self.uses: list[tuple] = []
        self.adds: list[tuple] = []  # (node name, arg of the second summand, layouts of both)
        self.used_linear: set[str] = set()
        self.output = None

    def new_space(self, size: int, producer: str | None = None) -> int:
        self.spaces.append(_Space(size, len(self.parent), producer))
        self.parent.extend(range(len(self.parent), len(self.parent) + size))
        return len(self.spaces) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def visit(self, node) -> None:
        if node.op == "placeholder":
            size = self.input_shape[0]
            self.layouts[node] = [_Seg(self.new_space(size), 0, size, 1)]
            return
        if node.op == "output":
            self.output = self.layouts.get(node.args[0])
            return
        if node.op == "get_attr":
            raise StructureError(f"direct use of attribute {node.target} is not understood")
        if node.op == "call_module":
            kind, act = _classify_module(self.modules[node.target])
        elif node.op == "call_function":
            kind, act = _classify_function(node.target)
        elif node.op == "call_method":
            if node.target not in _METHODS:
                raise StructureError(f"tensor method .{node.target}() is not understood")
            kind, act = _METHODS[node.target]
        else:
            raise StructureError(f"fx node kind {node.op} is not understood")
        ins = [a for a in node.all_input_nodes if a in self.layouts]
        if kind == "ignore" or not ins:
            return
        where = f"{node.op} {node.target}"
        layout = self.layouts[ins[0]]
        if kind == "linear":
            out = self.linear(node, layout)
        elif kind == "norm":
            out = self.norm(node, ins[0], layout)
        elif kind in ("act", "maxpool"):
            out = self.activation(node, layout, "act" if kind == "act" else "pool", act, where)
        elif kind in ("pass", "scalar"):
            if kind == "scalar" and len(ins) > 1:
                raise StructureError(f"{where}: product of two tensors is not understood")
            out = layout
        elif kind == "flatten":
            out = self.flatten(node, ins[0], layout, where)
        elif kind == "add":
            out = self.add(node, ins, where)
        elif kind == "cat":
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
            if dim != 1:
                raise StructureError(f"{where}: concatenation along dim {dim} is not understood")
            out = [seg for arg in node.args[0] for seg in self.layouts[arg]]
        elif kind == "pad":
            out = self.pad(node, ins[0], layout, where)
        else:  # getitem
            if node.args[0] not in self.layouts:
                return  # indexing a size tuple or another non-tensor value
            out = self.getitem(node, layout, where)
        self.layouts[node] = out

    def linear(self, node, layout):
        name = node.target
        if name in self.used_linear:
            raise StructureError(f"{name}: a Linear/Conv used twice is not supported")
        self.used_linear.add(name)
        self.uses.append(("linear", name, layout, None))
        out = self.modules[name].weight.shape[0]
        return [_Seg(self.new_space(out, name), 0, out, 1)]

    def norm(self, node, source, layout):
        seg = layout[0] if len(layout) == 1 else None
        sp = self.spaces[seg.space] if seg is not None and seg.space is not None else None
        direct = (
            sp is not None
            and sp.producer is not None
            and sp.norm is None
            and (seg.start, seg.size) == (0, sp.size)
            and source.op == "call_module"
            and source.target == sp.producer
        )
        if direct:
            sp.norm = node.target
            return layout
        return self.consumer_norm(node.target, layout)

    def consumer_norm(self, name, layout) -> list[_Seg]:
        """A BatchNorm reading neurons after other operations (a concatenation, an activation):
        its statistics scale with the read neurons' output; each read segment opens a space."""
        if not self.modules[name].affine:
            raise StructureError(
                f"{name}: a BatchNorm without affine parameters after a "
                "concatenation or activation is not supported"
            )
        out, offset = [], 0
        for seg in layout:
            if seg.block != 1:
                raise StructureError(f"{name}: BatchNorm of flattened features is not supported")
            src = self.spaces[seg.space] if seg.space is not None else None
            if src is None or src.producer is None:
                what = (
                    "zero-padded channels"
                    if src is None
                    else "a BatchNorm's output"
                    if src.reads
                    else "the model input"
                )
                raise StructureError(f"{name}: BatchNorm of {what} is not supported")
            opened = self.new_space(seg.size)
            self.spaces[opened].reads = (name, seg.space, seg.start, offset)
            out.append(_Seg(opened, 0, seg.size, 1))
            offset += seg.size
        return out

    def activation(self, node, layout, kind, act, where):
        for seg in layout:
            if seg.space is None:
                if kind == "act" and not activations.get(act).zero_at_zero:
                    raise StructureError(
                        f"{where}: {act} of zero-padded channels is not "
                        "understood (it does not map 0 to 0)"
                    )
                continue
            sp = self.spaces[seg.space]
            if kind == "act":
                sp.activations.add(act)
            else:
                sp.max_pool = True
        self.uses.append((kind, node.name, layout, act))
        return layout

    def flatten(self, node, source, layout, where):
        before, after = _shape(source), _shape(node)
        if before is None or after is None or len(after) != 2 or before[0] != after[0]:
            raise StructureError(f"{where}: only flattening to [batch, features] is understood")
        spatial = 1
        for d in before[2:]:
            spatial *= d
        return [_Seg(s.space, s.start, s.size, s.block * spatial) for s in layout]

    def add(self, node, ins, where):
        """Residual Add: tie the two inputs channel by channel; a zero channel ties nothing."""
        if len(ins) != 2:
            raise StructureError(f"{where}: addition with a constant is not understood")
        args = list(node.args) + list(node.kwargs.values())
        keys = list(range(len(node.args))) + list(node.kwargs)
        second = keys[next(k for k, a in enumerate(args) if a is ins[1])]
        self.adds.append((node.name, second, self.layouts[ins[0]], self.layouts[ins[1]]))
        a, b = (_channels(self.layouts[i]) for i in ins)
        if len(a) != len(b) or any(x[2] != y[2] for x, y in zip(a, b, strict=True)):
            raise StructureError(f"{where}: residual Add of differently laid out tensors")
        out = []
        for x, y in zip(a, b, strict=True):
            if x[0] is not None and y[0] is not None:
                for s in (self.spaces[x[0]], self.spaces[y[0]]):
                    if s.producer is None:
                        what = (
                            "a BatchNorm output after other operations"
                            if s.reads
                            else "the model input"
                        )
                        raise StructureError(f"{where}: residual Add with {what}")
                ra = self.find(self.spaces[x[0]].base + x[1])
                rb = self.find(self.spaces[y[0]].base + y[1])
                self.parent[rb] = ra
            out.append(x if x[0] is not None else y)
        return _segments(out)

    def pad(self, node, source, layout, where):
        """F.pad: zero channels on the channel axis (option-A shortcuts); padding of the spatial
        axes (zeros, reflection, replication) leaves the channel layout."""
        args = dict(zip(("input", "pad", "mode", "value"), node.args, strict=False))
        args.update(node.kwargs)
        widths, mode, value = args["pad"], args.get("mode", "constant"), args.get("value")
        if _shape(source) is None:
            raise StructureError(f"{where}: padding a tensor of unknown shape")
        ndim = len(_shape(source))
        pairs = [tuple(widths[2 * k : 2 * k + 2]) for k in range(len(widths) // 2)]
        by_dim = {ndim - 1 - k: p for k, p in enumerate(pairs)}  # pairs run from the last dim
        if by_dim.get(0, (0, 0)) != (0, 0):
            raise StructureError(f"{where}: padding the batch axis is not understood")
        if mode == "constant" and value not in (None, 0, 0.0):
            raise StructureError(
                f"{where}: padding with the constant {value} is not understood "
                "(only zeros commute with rescaling)"
            )
        lo, hi = by_dim.get(1, (0, 0))
        if (lo, hi) == (0, 0):
            return layout
        if mode != "constant":
            raise StructureError(f"{where}: {mode} padding of the channel axis is not understood")
        if lo < 0 or hi < 0 or any(s.block != 1 for s in layout):
            raise StructureError(f"{where}: only zero-padding unflattened channels is understood")
        return [seg for seg in (_zeros(lo), *layout, _zeros(hi)) if seg.size]

    def getitem(self, node, layout, where):
        """Indexing a tensor: understood when it leaves the batch and channel axes whole
        (spatial subsampling or cropping, as option-A shortcuts do)."""
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        if Ellipsis in index and _shape(node.args[0]) is not None:
            k = index.index(Ellipsis)
            fill = len(_shape(node.args[0])) - (len(index) - 1)
            index = index[:k] + (slice(None),) * fill + index[k + 1 :]
        understood = all(
            isinstance(i, int)
            or (
                isinstance(i, slice)
                and all(v is None or isinstance(v, int) for v in (i.start, i.stop, i.step))
            )
            for i in index
        )
        if not understood or any(i != slice(None) for i in index[:2]):
            raise StructureError(
                f"{where}: indexing {index} is not understood (only indexing "
                "that keeps the batch and channel axes whole is)"
            )
        return layout


@dataclass(eq=False)
class _Group:
    """A neuron group under assembly: ``starts[space]`` is the channel of neuron 0 in each of its
    spaces (ascending); neuron ``i`` is channel ``starts[space] + i`` of every one."""

    spaces: tuple
    starts: dict
    size: int = 1
    tied_to: _Group | None = None
    tied_space: int | None = None  # the space of ``tied_to`` a consumer BatchNorm reads
    name: str = ""
    outgoing: list = field(default_factory=list)  # (space, use, Slice)
    sites: list = field(default_factory=list)  # (space, use, Site, activation)
    normalised_by: list = field(default_factory=list)  # (space read, BN's space, Slices)
    joins: list = field(default_factory=list)  # (use, Join)

    def branch(self, space: int) -> int:
        return self.spaces.index(space)

    @property
    def first(self) -> tuple[int, int]:
        return self.spaces[0], self.starts[self.spaces[0]]


def _producer_groups(trace: _Trace, owner: dict) -> list[_Group]:
    """Components of tied channels of Linear/Conv outputs, grouped into neuron groups: the
    components touching the same spaces, in maximal runs of consecutive channels in every one."""
    components: dict[int, dict[int, int]] = {}
    for i, sp in enumerate(trace.spaces):
        if sp.producer is None:
            continue
        for ch in range(sp.size):
            members = components.setdefault(trace.find(sp.base + ch), {})
            if i in members:
                raise StructureError(
                    f"{sp.producer}: residual Adds tie its channels "
                    f"{members[i]} and {ch} to each other"
                )
            members[i] = ch
    groups: list[_Group] = []
    previous = None
    for members in sorted(components.values(), key=lambda m: (sorted(m), m[min(m)])):
        spaces = tuple(sorted(members))
        if (
            previous is not None
            and tuple(sorted(previous)) == spaces
            and all(members[s] == previous[s] + 1 for s in spaces)
        ):
            groups[-1].size += 1
        else:
            groups.append(_Group(spaces, dict(members)))
        for s, ch in members.items():
            owner[trace.spaces[s].base + ch] = (groups[-1], groups[-1].size - 1)
        previous = members
    return groups


def _neuron_runs(trace: _Trace, layout, owner: dict) -> list[list]:
    """Maximal runs of a layout's channels holding consecutive neurons of one group, as
    ``[group, first neuron, count, first entry on the axis, block, space of the first]``."""
    runs: list[list] = []
    entry = 0
    for space, ch, block in _channels(layout):
        own = owner.get(trace.spaces[space].base + ch) if space is not None else None
        if own is not None:
            g, i = own
            r = runs[-1] if runs else None
            if (
                r is not None
                and r[0] is g
                and r[1] + r[2] == i
                and r[4] == block
                and r[3] + r[2] * block == entry
                and r[5] == space
            ):
                r[2] += 1
            else:
                runs.append([g, i, 1, entry, block, space])
        entry += block
    return runs


def _whole(run, what: str) -> None:
    g, first, count = run[:3]
    if (first, count) != (0, g.size):
        raise StructureError(
            f"{what} reads neurons {first}..{first + count - 1} of the "
            f"{g.size} of neuron group {g.name}: a part of a group is not "
            "supported"
        )


def _consumer_groups(trace: _Trace, owner: dict) -> list[_Group]:
    """The affine outputs of consumer BatchNorms: one group per read group, tied to it (the
    read group's ``normalised_by`` gets the BatchNorm's statistics)."""
    groups = []
    for i, sp in enumerate(trace.spaces):
        if sp.reads is None:
            continue
        bn, read, start, offset = sp.reads
        layout = [_Seg(read, start, sp.size, 1)]
        for run in _neuron_runs(trace, layout, owner):
            _whole(run, bn)
            parent, _, size, k = run[:4]
            g = _Group(
                (i,),
                {i: k},
                size,
                tied_to=parent,
                tied_space=run[5],
                name=f"{bn}[{offset + k}:{offset + k + size}]",
            )
            for j in range(size):
                owner[sp.base + k + j] = (g, j)
            stats = _stat_slices(trace.modules, bn, offset + k, parent.branch(run[5]))
            parent.normalised_by.append((run[5], i, stats))
            groups.append(g)
    return groups


def _name(trace: _Trace, g: _Group) -> str:
    """A producer group's name: the Linear/Conv for a lone space, ``<stage>.residual`` for a
    residual stream (after its last space holding the whole group); a group that fills none of
    its spaces (the zero-padded channels of an option-A stream) adds its channel range in its
    narrowest space."""
    spaces = [trace.spaces[s] for s in g.spaces]
    full = [
        sp for s, sp in zip(g.spaces, spaces, strict=True) if (g.starts[s], g.size) == (0, sp.size)
    ]
    if full and len(spaces) == 1:
        return full[0].producer
    if full:
        return f"{full[-1].producer.split('.')[0]}.residual"
    narrowest = min(sp.size for sp in spaces)
    s, sp = [(s, sp) for s, sp in zip(g.spaces, spaces, strict=True) if sp.size == narrowest][-1]
    home = sp.producer if len(spaces) == 1 else f"{sp.producer.split('.')[0]}.residual"
    return f"{home}[{g.starts[s]}:{g.starts[s] + g.size}]"


def _stat_slices(modules, norm, offset=0, branch=0):
    bn = modules[norm]
    if not bn.track_running_stats:
        return ()
    return (
        Slice(f"{norm}.running_mean", 0, offset, power=1, branch=branch),
        Slice(f"{norm}.running_var", 0, offset, power=2, branch=branch),
    )


def _branch(trace: _Trace, g: _Group, s: int) -> Branch:
    sp, start = trace.spaces[s], g.starts[s]
    if sp.reads is not None:  # the affine output of a consumer BatchNorm
        bn = sp.reads[0]
        offset = sp.reads[3] + start
        return Branch((Slice(f"{bn}.weight", 0, offset), Slice(f"{bn}.bias", 0, offset)))
    linear = [Slice(f"{sp.producer}.weight", 0, start)]
    if getattr(trace.modules[sp.producer], "bias", None) is not None:
        linear.append(Slice(f"{sp.producer}.bias", 0, start))
    norm, stats = (), ()
    if sp.norm:
        if trace.modules[sp.norm].affine:
            norm = (Slice(f"{sp.norm}.weight", 0, start), Slice(f"{sp.norm}.bias", 0, start))
        stats = _stat_slices(trace.modules, sp.norm, start)
    return Branch(tuple(linear), norm, stats)


def _assemble(trace: _Trace) -> NeuronStructure:
    owner: dict[int, tuple[_Group, int]] = {}
    producers = _producer_groups(trace, owner)
    for g in producers:
        g.name = _name(trace, g)
    groups = sorted(producers + _consumer_groups(trace, owner), key=lambda g: g.first)
    names = [g.name for g in groups]
    if len(set(names)) != len(names):
        raise StructureError(f"neuron group names are not unique: {names}")
    for use, (kind, name, layout, act) in enumerate(trace.uses):
        for run in _neuron_runs(trace, layout, owner):
            _whole(run, name)
            g, _, _, entry, block, space = run
            b = g.branch(space)
            if kind == "linear":
                g.outgoing.append((space, use, Slice(f"{name}.weight", 1, entry, block, branch=b)))
            else:
                g.sites.append((space, use, Site(name, kind, entry, block, b), act))
    for use, (node, arg, first, second) in enumerate(trace.adds):
        for g, join in _joins(trace, owner, node, arg, first, second):
            g.joins.append((use, join))
    output_groups = {
        owner[trace.spaces[s].base + ch][0].name
        for s, ch, _ in _channels(trace.output or [])
        if s is not None and trace.spaces[s].base + ch in owner
    }
    out = []
    for g in groups:
        if g.name in output_groups:
            continue
        acts = {act for *_, act in g.sites if act is not None}
        if len(acts) > 1:
            raise StructureError(f"neuron group {g.name} has activations {acts}")
        out.append(
            NeuronGroup(
                g.name,
                g.size,
                tuple(_branch(trace, g, s) for s in g.spaces),
                tuple(sl for *_, sl in sorted(g.outgoing, key=lambda e: e[:2])),
                acts.pop() if acts else "identity",
                any(site.kind == "pool" for _, _, site, _ in g.sites),
                tuple(sl for *_, sls in sorted(g.normalised_by, key=lambda e: e[:2]) for sl in sls),
                g.tied_to.name if g.tied_to is not None else None,
                tuple(site for _, _, site, _ in sorted(g.sites, key=lambda e: e[:2])),
                tuple(join for _, join in sorted(g.joins, key=lambda e: e[0])),
                g.tied_to.branch(g.tied_space) if g.tied_to is not None else 0,
            )
        )
    return NeuronStructure(tuple(out), _output_layer(trace, owner))


def _joins(trace: _Trace, owner: dict, node: str, arg: int, first, second):
    """``(group, Join)`` for every group two different branches of which the Add ``node``
    sums (channels where either summand is zero padding, or both hold one branch, need none)."""
    runs: list[list] = []  # [group, first neuron, count, start, block, branch a, branch b]
    entry = 0
    for (sa, ca, block), (sb, _, _) in zip(_channels(first), _channels(second), strict=True):
        if sa is not None and sb is not None and sa != sb:
            g, i = owner[trace.spaces[sa].base + ca]
            ba, bb = g.branch(sa), g.branch(sb)
            r = runs[-1] if runs else None
            if (
                r is not None
                and r[0] is g
                and r[1] + r[2] == i
                and r[3] + r[2] * block == entry
                and (r[4], r[5], r[6]) == (block, ba, bb)
            ):
                r[2] += 1
            else:
                runs.append([g, i, 1, entry, block, ba, bb])
        entry += block
    for g, i, count, start, block, ba, bb in runs:
        _whole([g, i, count], f"residual Add {node}")
        yield g, Join(node, arg, ba, bb, start, block)


def _output_layer(trace: _Trace, owner: dict) -> OutputLayer | None:
    """The Linear producing the logits, when nothing else (no Add, BatchNorm, activation or
    pool) acts on its outputs."""
    import torch.nn as nn

    layout = trace.output
    if not layout or len(layout) != 1 or layout[0].space is None:
        return None
    sp = trace.spaces[layout[0].space]
    if not sp.producer or sp.norm or sp.activations or sp.max_pool:
        return None
    mod = trace.modules[sp.producer]
    alone = all(len(owner[sp.base + ch][0].spaces) == 1 for ch in range(sp.size))
    if not isinstance(mod, nn.Linear) or not alone:
        return None
    bias = f"{sp.producer}.bias" if mod.bias is not None else None
    return OutputLayer(f"{sp.producer}.weight", bias, mod.out_features)
