"""Teleported networks: parameters scaled in place, modified operations inserted by fx.

:func:`materialise` turns a model into a ``torch.fx.GraphModule`` that shares the model's
parameters and buffers (same names) and can carry a change of basis: :func:`teleport_` multiplies
the parameters (and SGD's momentum buffers: ``v' = D v``) by ``D`` in place and rewrites the
graph so that

- every activation or max-pool acting on neurons whose ``tau`` is not a symmetry of it computes
  ``tau * op(x / tau)`` (``x * (1/tau)`` and ``y * tau`` nodes around the original node, on the
  channels of the neuron structure's :class:`~pipeline.models.structure.Site`);
- every BatchNorm whose input basis is not 1 computes ``BN(x / tau_in)`` (its running
  statistics keep the original basis, so it is exact in train and eval mode);
- every residual Add whose summands carry different per-branch factors computes
  ``x1 + (tau_x1 / tau_x2) x2`` (a ``Scale`` node on its second argument).

Nothing is inserted where the change of basis leaves an operation alone (ReLU with ``tau > 0``,
BatchNorm with ``tau_in = 1``), so a pure weight-space teleport runs the stock graph. Working on
fx nodes rather than module paths also covers modules called at several places (torchvision's
ResNet reuses one ReLU per block) and functional activations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from pipeline.models import neuron_structure
from pipeline.models.derivation import record_shapes
from pipeline.models.structure import NeuronStructure
from pipeline.teleport.cob import (
    ChangeOfBasis,
    branch_factors,
    identity,
    join_factors,
    norm_input_basis,
    parameter_scales,
    symmetric,
)

SITES = "teleport_sites"


class Scale(nn.Module):
    """``x * factor`` (factor broadcast over the batch and spatial axes; not in the state dict)."""

    def __init__(self, factor: torch.Tensor):
        super().__init__()
        self.register_buffer("factor", factor, persistent=False)

    def forward(self, x):
        return x * self.factor


@dataclass
class _Teleport:
    structure: NeuronStructure
    base: torch.fx.Graph  # the model's own graph
    shapes: dict  # node name -> shape of its first input
    cob: ChangeOfBasis  # cumulative, relative to the model's own parameters


def materialise(model: nn.Module, input_shape) -> torch.fx.GraphModule:
    """A module computing ``model``'s function, sharing its parameters and buffers, that
    :func:`teleport_` can teleport (any CoB). It starts at the identity CoB."""
    from torch.fx import symbolic_trace

    structure = neuron_structure(model, input_shape)
    gm = symbolic_trace(model)
    param = next(model.parameters())
    was = model.training
    model.eval()
    try:
        example = torch.zeros((2, *input_shape), dtype=param.dtype, device=param.device)
        record_shapes(gm, example)
    finally:
        model.train(was)
    shapes = {}
    for node in gm.graph.nodes:
        args = [a for a in node.args if isinstance(a, torch.fx.Node)]
        if args and "shape" in args[0].meta:
            shapes[node.name] = args[0].meta["shape"]
    gm._teleport = _Teleport(structure, gm.graph, shapes, identity(structure))
    gm.graph = _copy(gm.graph)[0]  # (the setter recompiles)
    gm.train(was)
    object.__setattr__(gm, "_neuron_structure", structure)
    return gm


def _copy(graph: torch.fx.Graph):
    new = torch.fx.Graph()
    env: dict = {}
    out = new.graph_copy(graph, env)
    new.output(out)
    return new, {old.name: env[old] for old in graph.nodes if old in env}


def structure_of(module: nn.Module) -> NeuronStructure:
    """The neuron structure of a materialised module, or the one cached on a stock model."""
    state = getattr(module, "_teleport", None)
    if state is not None:
        return state.structure
    cached = getattr(module, "_neuron_structure", None)
    if cached is None:
        raise ValueError(
            "the module has no neuron structure yet: call "
            "pipeline.models.neuron_structure(model, input_shape) first"
        )
    return cached


def current_cob(module: nn.Module) -> ChangeOfBasis:
    """The cumulative CoB a materialised module carries."""
    return module._teleport.cob


def _modified_sites(structure: NeuronStructure, cob: ChangeOfBasis):
    """``(group, site, tau)`` for every activation / max-pool site the CoB modifies."""
    for g in structure.groups:
        tau = cob.tau.get(g.name)
        if tau is None:
            continue
        for site in g.sites:
            t = branch_factors(tau, site.branch)
            ok = bool(symmetric(g.activation, t).all()) if site.kind == "act" else None
            if site.kind == "pool":
                ok = bool((t > 0).all())
            if not ok:
                yield g, site, t


def _view(tau: torch.Tensor, shape) -> torch.Tensor:
    return tau.reshape((1, -1) + (1,) * (len(shape) - 2))


def _site_factors(structure: NeuronStructure, cob: ChangeOfBasis, shapes: dict) -> dict:
    """``node name -> (factor on its input, factor on its output)``, broadcastable to the node's
    input, for every activation / max-pool node the CoB modifies."""
    vectors: dict[str, torch.Tensor] = {}
    for g, site, tau in _modified_sites(structure, cob):
        if site.node not in vectors:
            vectors[site.node] = torch.ones(shapes[site.node][1], dtype=torch.float64)
        span = slice(site.start, site.start + g.size * site.block)
        vectors[site.node][span] = tau.repeat_interleave(site.block)
    return {
        node: (_view(1.0 / tau, shapes[node]), _view(tau, shapes[node]))
        for node, tau in vectors.items()
    }


def _norm_factors(structure, cob, graph: torch.fx.Graph, shapes) -> dict:
    by_target = {n.target: n.name for n in graph.nodes if n.op == "call_module"}
    out = {}
    for bn, tau in norm_input_basis(structure, cob).items():
        if bool((tau == 1).all()):
            continue
        node = by_target[bn]
        out[node] = (_view(1.0 / tau, shapes[node]), None)
    return out


def _join_factors(structure: NeuronStructure, cob: ChangeOfBasis, shapes: dict) -> dict:
    """``(Add node name, argument) -> factor`` on the second summand of every Add the CoB
    modifies, broadcastable to it."""
    vectors: dict[tuple, torch.Tensor] = {}
    for g in structure.groups:
        tau = cob.tau.get(g.name)
        if tau is None:
            continue
        for join, ratio in join_factors(g, tau):
            key = (join.node, join.arg)
            if key not in vectors:
                vectors[key] = torch.ones(shapes[join.node][1], dtype=torch.float64)
            span = slice(join.start, join.start + g.size * join.block)
            vectors[key][span] = ratio.repeat_interleave(join.block)
    return {key: _view(v, shapes[key[0]]) for key, v in vectors.items()}


def _rebuild(gm: torch.fx.GraphModule) -> None:
    state: _Teleport = gm._teleport
    param = next(gm.parameters())
    graph, nodes = _copy(state.base)
    factors = _site_factors(state.structure, state.cob, state.shapes)
    factors.update(_norm_factors(state.structure, state.cob, state.base, state.shapes))
    if hasattr(gm, SITES):
        delattr(gm, SITES)
    sites = nn.Module()
    for k, (name, (before, after)) in enumerate(sorted(factors.items())):
        node = nodes[name]
        inp = next(a for a in node.args if isinstance(a, torch.fx.Node))
        sites.add_module(f"in{k}", Scale(before.to(device=param.device, dtype=param.dtype)))
        with graph.inserting_before(node):
            pre = graph.call_module(f"{SITES}.in{k}", (inp,))
        node.replace_input_with(inp, pre)
        if after is not None:
            sites.add_module(f"out{k}", Scale(after.to(device=param.device, dtype=param.dtype)))
            with graph.inserting_after(node):
                post = graph.call_module(f"{SITES}.out{k}", (node,))
            node.replace_all_uses_with(post, delete_user_cb=lambda u, post=post: u is not post)
    joins = _join_factors(state.structure, state.cob, state.shapes)
    for k, ((name, arg), factor) in enumerate(sorted(joins.items(), key=lambda e: str(e[0]))):
        node = nodes[name]
        sites.add_module(f"join{k}", Scale(factor.to(device=param.device, dtype=param.dtype)))
        summand = node.kwargs[arg] if isinstance(arg, str) else node.args[arg]
        with graph.inserting_before(node):
            scaled = graph.call_module(f"{SITES}.join{k}", (summand,))
        if isinstance(arg, str):
            node.update_kwarg(arg, scaled)
        else:
            node.update_arg(arg, scaled)
    gm.add_module(SITES, sites)
    gm.graph = graph  # (the setter recompiles)


def changes_operations(structure: NeuronStructure, cob: ChangeOfBasis) -> bool:
    """Does the CoB modify any activation, max-pool, BatchNorm or residual Add (else it is a
    pure weight-space symmetry of the stock model)?"""
    if next(_modified_sites(structure, cob), None) is not None:
        return True
    for g in structure.groups:
        tau = cob.tau.get(g.name)
        if tau is not None and next(join_factors(g, tau), None) is not None:
            return True
    return any(not bool((t == 1).all()) for t in norm_input_basis(structure, cob).values())


def _transform_optimizer_state(optimizer, param, scale) -> None:
    state = optimizer.state.get(param)
    if not state:
        return
    if not isinstance(optimizer, torch.optim.SGD):
        raise TypeError(
            f"teleporting the state of {type(optimizer).__name__} is not supported "
            "(SGD momentum buffers transform as v' = D v)"
        )
    buf = state.get("momentum_buffer")
    if buf is not None:
        buf.mul_(scale)


@torch.no_grad()
def teleport_(module: nn.Module, cob: ChangeOfBasis, optimizer=None) -> None:
    """Teleport ``module`` by ``cob`` in place (composing with any earlier teleport): parameters
    and momentum buffers times D, modified operations updated. A stock (not materialised) module
    accepts only CoBs that modify no operation."""
    structure = structure_of(module)
    state = getattr(module, "_teleport", None)
    if state is None and changes_operations(structure, cob):
        raise ValueError(
            "this change of basis modifies activations, max-pools or BatchNorms; teleport the "
            "module returned by pipeline.teleport.network.materialise(model, input_shape)"
        )
    params = dict(module.named_parameters())
    for name, scale in parameter_scales(structure, cob, params).items():
        params[name].mul_(scale)
        if optimizer is not None:
            _transform_optimizer_state(optimizer, params[name], scale)
    if state is not None:
        state.cob = state.cob.compose(cob)
        _rebuild(module)


@torch.no_grad()
def set_teleported(module: nn.Module, state_dict: dict, cob: ChangeOfBasis) -> None:
    """Load ``state_dict`` (parameters already in the teleported basis, buffers in the original
    one) into a materialised module and make it carry ``cob``: for interpolation paths."""
    module.load_state_dict(state_dict)
    module._teleport.cob = cob
    _rebuild(module)


def teleported_parameters(structure: NeuronStructure, params: dict, cob: ChangeOfBasis) -> dict:
    """New dict: every parameter of ``params`` times D (the teleported network's weights)."""
    scales = parameter_scales(structure, cob, params)
    return {k: v * scales[k] if k in scales else v.clone() for k, v in params.items()}
