"""Logistic regression, MLPs (with or without BatchNorm) and the small conv net."""

from __future__ import annotations

import math
from collections import OrderedDict

import torch.nn as nn

from pipeline.models import register_model
from pipeline.models.activations import make


@register_model("logistic")
def logistic(input_shape, num_classes, bias: bool = True):
    """Flatten, then one Linear layer to the logits."""
    fc = nn.Linear(math.prod(input_shape), num_classes, bias=bias)
    return nn.Sequential(OrderedDict(flatten=nn.Flatten(), fc=fc))


@register_model("mlp")
def mlp(
    input_shape,
    num_classes,
    widths: list = (100, 100),
    activation: str = "relu",
    batch_norm: bool = False,
    bn_eps: float = 1e-5,
    bias: bool = True,
    dropout: float = 0.0,
):
    """Flatten, then [Linear -> (BatchNorm1d) -> activation (-> Dropout)] per width, then Linear."""
    layers: dict[str, nn.Module] = {"flatten": nn.Flatten()}
    fan_in = math.prod(input_shape)
    for i, width in enumerate(widths, start=1):
        layers[f"fc{i}"] = nn.Linear(fan_in, width, bias=bias)
        if batch_norm:
            layers[f"bn{i}"] = nn.BatchNorm1d(width, eps=bn_eps)
        layers[f"act{i}"] = make(activation)
        if dropout:
            layers[f"drop{i}"] = nn.Dropout(dropout)
        fan_in = width
    layers["out"] = nn.Linear(fan_in, num_classes, bias=bias)
    return nn.Sequential(OrderedDict(layers))


@register_model("conv")
def conv(
    input_shape,
    num_classes,
    channels: int = 32,
    layers: int = 2,
    activation: str = "relu",
    batch_norm: bool = False,
    bn_eps: float = 1e-5,
    bias: bool = True,
    pool: bool = False,
):
    """[Conv3x3(channels) -> (BatchNorm2d) -> activation (-> MaxPool2)] x layers, then
    Flatten and Linear."""
    mods: dict[str, nn.Module] = {}
    c_in, (h, w) = input_shape[0], input_shape[1:]
    for i in range(1, layers + 1):
        mods[f"conv{i}"] = nn.Conv2d(c_in, channels, 3, padding=1, bias=bias)
        if batch_norm:
            mods[f"bn{i}"] = nn.BatchNorm2d(channels, eps=bn_eps)
        mods[f"act{i}"] = make(activation)
        if pool:
            mods[f"pool{i}"] = nn.MaxPool2d(2)
            h, w = h // 2, w // 2
        c_in = channels
    mods["flatten"] = nn.Flatten()
    mods["fc"] = nn.Linear(channels * h * w, num_classes)
    return nn.Sequential(OrderedDict(mods))
