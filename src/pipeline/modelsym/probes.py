"""The probe layers of a model: every activation *call* in its forward graph, read from torch.fx.

A layer is one node of the fx graph (so a ReLU module called twice, as in torchvision's
BasicBlock, is two layers: ``layer1_0_relu`` and ``layer1_0_relu_1``). Each carries

- ``name``: the fx node name (unique, stable for an architecture);
- ``module``: the module path it calls ('' for a functional activation);
- ``index``: the module's position in the pre-order ``named_modules()`` enumeration with the
  root at 0 (Godfrey et al.'s "layer index": mCNN's ReLUs are 3, 6, 10, 14), -1 for functions;
- ``position``: its rank among the model's layers in execution order (the x axis of figures);
- ``activation``: the activation's name; ``after_add``: it reads a residual sum (the ResNet
  ReLUs after the add, unstarred in the paper's figures; inside-block ReLUs are starred).

Declared hidden layers beyond activations are given by node name (:func:`node_layers`).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn as nn

from pipeline.models import activations

_ADDS = {operator.add, operator.iadd, torch.add}


class LayerError(KeyError):
    """A requested layer is not a node of the model's forward graph."""

    def __str__(self):
        return str(self.args[0])


@dataclass(frozen=True)
class Layer:
    name: str
    module: str
    index: int
    position: int
    activation: str
    after_add: bool

    @property
    def label(self) -> str:
        """Short axis label: the module index where it exists, starred inside residual blocks."""
        return f"{self.index if self.index >= 0 else self.name}{'' if self.after_add else '*'}"


def trace(model: nn.Module) -> torch.fx.GraphModule:
    """The fx graph of ``model`` (its submodules are shared, not copied)."""
    return torch.fx.symbolic_trace(model)


def _activation(node, modules) -> str | None:
    if node.op == "call_module":
        mod = modules[node.target]
        name = activations.module_types().get(type(mod))
        if name is not None:
            return name
        named = getattr(mod, "activation_name", None)
        return named if isinstance(named, str) else None
    if node.op == "call_function":
        return activations.function_targets().get(node.target)
    if node.op == "call_method":
        return activations.method_names().get(node.target)
    return None


def _reads_add(node) -> bool:
    src = node.args[0] if node.args else None
    return isinstance(src, torch.fx.Node) and src.op == "call_function" and src.target in _ADDS


def activation_layers(model: nn.Module, graph: torch.fx.GraphModule | None = None) -> list[Layer]:
    """Every activation call of ``model`` in execution order."""
    gm = graph if graph is not None else trace(model)
    modules = dict(gm.named_modules())
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    has_residual = any(n.op == "call_function" and n.target in _ADDS for n in gm.graph.nodes)
    layers: list[Layer] = []
    for node in gm.graph.nodes:
        act = _activation(node, modules)
        if act is None:
            continue
        module = node.target if node.op == "call_module" else ""
        layers.append(
            Layer(
                node.name,
                module,
                order.get(module, -1) if module else -1,
                len(layers),
                act,
                _reads_add(node) or not has_residual,
            )
        )
    return layers


def node_layers(model: nn.Module, names: list[str]) -> list[Layer]:
    """Layers for explicitly declared node names (activations or not), in execution order."""
    gm = trace(model)
    modules = dict(gm.named_modules())
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    nodes = {n.name: n for n in gm.graph.nodes}
    missing = [n for n in names if n not in nodes]
    if missing:
        raise LayerError(
            f"layers {missing} are not nodes of the model's graph; nodes: "
            + ", ".join(n for n in nodes if n not in ("output",))
        )
    wanted = set(names)
    out = []
    for node in gm.graph.nodes:
        if node.name in wanted:
            module = node.target if node.op == "call_module" else ""
            out.append(
                Layer(
                    node.name,
                    module,
                    order.get(module, -1) if module else -1,
                    len(out),
                    _activation(node, modules) or "identity",
                    _reads_add(node),
                )
            )
    return out


def select_layers(model: nn.Module, layers="activations") -> list[Layer]:
    """``"activations"`` (every activation call) or a list of node names."""
    if layers == "activations":
        return activation_layers(model)
    if isinstance(layers, list | tuple):
        return node_layers(model, list(layers))
    raise ValueError(f"layers: expected 'activations' or a list of node names; got {layers!r}")


def feature_extractor(model: nn.Module, names: list[str]) -> torch.fx.GraphModule:
    """A module sharing ``model``'s weights whose forward returns ``(logits, {name: value})``."""
    gm = trace(model)
    nodes = {n.name: n for n in gm.graph.nodes}
    missing = [n for n in names if n not in nodes]
    if missing:
        raise LayerError(f"layers {missing} are not nodes of the model's graph")
    (output,) = [n for n in gm.graph.nodes if n.op == "output"]
    logits = output.args[0]
    output.args = ((logits, {name: nodes[name] for name in names}),)
    gm.graph.lint()
    gm.recompile()
    return gm
