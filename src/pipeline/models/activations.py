"""Activation modules by config name (one fresh module per use, so each can be found by path),
and their backward kernels for code that backpropagates by hand."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

FACTORIES = {
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.01),
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "softplus": nn.Softplus,
    "elu": nn.ELU,
    "silu": nn.SiLU,
    "identity": nn.Identity,
}


def make(name: str) -> nn.Module:
    if name not in FACTORIES:
        raise ValueError(f"unknown activation {name!r}; allowed: {', '.join(FACTORIES)}")
    return FACTORIES[name]()


_aten = torch.ops.aten
#: name -> ``(module, grad wrt the output a, input z, output a) -> grad wrt z``: the kernels
#: autograd itself calls for the modules of :data:`FACTORIES`.
BACKWARD: dict[str, Callable] = {
    "relu": lambda m, g, z, a: _aten.threshold_backward(g, a, 0),
    "leaky_relu": lambda m, g, z, a: _aten.leaky_relu_backward(g, z, m.negative_slope, False),
    "tanh": lambda m, g, z, a: _aten.tanh_backward(g, a),
    "sigmoid": lambda m, g, z, a: _aten.sigmoid_backward(g, a),
    "gelu": lambda m, g, z, a: _aten.gelu_backward(g, z, approximate=m.approximate),
    "softplus": lambda m, g, z, a: _aten.softplus_backward(g, z, m.beta, m.threshold),
    "elu": lambda m, g, z, a: _aten.elu_backward(g, m.alpha, 1, 1, False, z),
    "silu": lambda m, g, z, a: _aten.silu_backward(g, z),
    "identity": lambda m, g, z, a: g,
}


def _autograd_backward(m: nn.Module, g, z, a):
    """An activation without a kernel in :data:`BACKWARD`: its gradient by autograd."""
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        return torch.autograd.grad(m(z), z, g)[0]


def backward(name: str) -> Callable:
    """``(module, g, z, a) -> g * act'(z)`` for activation ``name`` (``a = act(z)``)."""
    return BACKWARD.get(name, _autograd_backward)
