"""Activation modules by config name (one fresh module per use, so each can be found by path)."""

from __future__ import annotations

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
