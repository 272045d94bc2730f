"""The one activation table: every fact the pipeline uses about an activation, by config name.

Each :class:`Activation` says how to build it (a fresh ``torch.nn`` module per use, so each can
be found by path), how it appears in an fx trace (its module class, functional forms and Tensor
method), and its symmetries: ``homogeneous`` (sigma(a x) = a sigma(x) for a > 0: positive
rescaling of a neuron is a symmetry), ``odd`` (sigma(-x) = -sigma(x): sign flips are), ``sign``
(Expand-and-Cluster's sign class: ``odd``; ``odd_constant``, sigma(-x) = c - sigma(x) (sigmoid);
``even_linear``, sigma(x) - sigma(-x) linear in x (relu, softplus, gelu, ...); ``None``) and
``zero_at_zero`` (sigma(0) = 0: zero-padded channels stay zero). The neuron structure, the zoo's
layer finder, teleportation and Expand-and-Cluster all read this table; backward kernels for
code that backpropagates by hand (:func:`backward`) are the ones autograd calls.

Importing this module does not import torch (the structure reads the facts on stored
artifacts); building modules and looking up trace targets do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache


@dataclass(frozen=True)
class Activation:
    module: str  # torch.nn class name
    homogeneous: bool = False
    odd: bool = False
    sign: str | None = None  # odd | odd_constant | even_linear | None
    zero_at_zero: bool = True
    functions: tuple[str, ...] = ()  # functional forms in a trace: "torch.relu", "F.relu"
    method: bool = False  # Tensor method of the same name (x.relu())
    site: bool = True  # an activation site in a trace (nn.Identity is not: it passes through)
    options: dict = field(default_factory=dict)  # constructor arguments


TABLE: dict[str, Activation] = {
    "relu": Activation(
        "ReLU", True, False, "even_linear", functions=("F.relu", "torch.relu"), method=True
    ),
    "leaky_relu": Activation(
        "LeakyReLU",
        True,
        False,
        "even_linear",
        functions=("F.leaky_relu",),
        options={"negative_slope": 0.01},
    ),
    "tanh": Activation("Tanh", False, True, "odd", functions=("F.tanh", "torch.tanh"), method=True),
    "sigmoid": Activation(
        "Sigmoid",
        False,
        False,
        "odd_constant",
        zero_at_zero=False,
        functions=("F.sigmoid", "torch.sigmoid"),
        method=True,
    ),
    "gelu": Activation("GELU", False, False, "even_linear", functions=("F.gelu",)),
    "softplus": Activation(
        "Softplus", False, False, "even_linear", zero_at_zero=False, functions=("F.softplus",)
    ),
    "elu": Activation("ELU", False, False, None, functions=("F.elu",)),
    "silu": Activation("SiLU", False, False, "even_linear", functions=("F.silu",)),
    "identity": Activation("Identity", True, True, "odd", site=False),
}
NAMES = tuple(TABLE)


def get(name: str) -> Activation:
    """The facts of activation ``name``; a ``ValueError`` naming the known ones otherwise."""
    if name not in TABLE:
        raise ValueError(f"unknown activation {name!r}; allowed: {', '.join(TABLE)}")
    return TABLE[name]


def make(name: str):
    """A fresh ``torch.nn`` module of activation ``name``."""
    import torch.nn as nn

    a = get(name)
    return getattr(nn, a.module)(**a.options)


@cache
def flip_terms(name: str) -> tuple[float, float]:
    """``(kappa, lambda)`` of a sign flip: ``sigma(-x) = kappa - sigma(x)`` for ``odd_constant``
    (sigmoid: 1) and ``sigma(-x) = sigma(x) - lambda x`` for ``even_linear`` (relu, softplus,
    gelu, silu: 1; leaky relu: 1 + its slope); 0 where the sign class has none."""
    import torch

    sign, act = get(name).sign, make(name)
    one = torch.ones((), dtype=torch.float64)
    kappa = 2.0 * float(act(0 * one)) if sign == "odd_constant" else 0.0
    lam = float(act(one) - act(-one)) if sign == "even_linear" else 0.0
    return kappa, lam


@cache
def module_types() -> dict[type, str]:
    """``torch.nn`` class -> name, for the activation sites of a trace."""
    import torch.nn as nn

    return {getattr(nn, a.module): n for n, a in TABLE.items() if a.site}


@cache
def function_targets() -> dict[Callable, str]:
    """Functional form (``torch.relu``, ``F.relu``, ...) -> name, for ``call_function`` nodes."""
    import torch
    import torch.nn.functional as F

    roots = {"torch": torch, "F": F}
    out = {}
    for n, a in TABLE.items():
        for dotted in a.functions:
            root, attr = dotted.split(".")
            out[getattr(roots[root], attr)] = n
    return out


def method_names() -> dict[str, str]:
    """Tensor method name -> activation name, for ``call_method`` nodes."""
    return {n: n for n, a in TABLE.items() if a.method}


@cache
def _kernels() -> dict[str, Callable]:
    """name -> ``(module, grad wrt the output a, input z, output a) -> grad wrt z``: the kernels
    autograd itself calls for the modules :func:`make` builds."""
    import torch

    aten = torch.ops.aten
    return {
        "relu": lambda m, g, z, a: aten.threshold_backward(g, a, 0),
        "leaky_relu": lambda m, g, z, a: aten.leaky_relu_backward(g, z, m.negative_slope, False),
        "tanh": lambda m, g, z, a: aten.tanh_backward(g, a),
        "sigmoid": lambda m, g, z, a: aten.sigmoid_backward(g, a),
        "gelu": lambda m, g, z, a: aten.gelu_backward(g, z, approximate=m.approximate),
        "softplus": lambda m, g, z, a: aten.softplus_backward(g, z, m.beta, m.threshold),
        "elu": lambda m, g, z, a: aten.elu_backward(g, m.alpha, 1, 1, False, z),
        "silu": lambda m, g, z, a: aten.silu_backward(g, z),
        "identity": lambda m, g, z, a: g,
    }


def _autograd_backward(m, g, z, a):
    """An activation without a kernel: its gradient by autograd."""
    import torch

    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        return torch.autograd.grad(m(z), z, g)[0]


def backward(name: str) -> Callable:
    """``(module, g, z, a) -> g * act'(z)`` for activation ``name`` (``a = act(z)``)."""
    return _kernels().get(name, _autograd_backward)
