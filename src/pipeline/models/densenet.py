"""DenseNet-121 (Huang et al. 2017), written to trace with torch.fx.

torchvision's layout and module names (``features.conv0/norm0/relu0/pool0``,
``features.denseblockB.denselayerL.{norm1,relu1,conv1,norm2,relu2,conv2}``,
``features.transitionT.{norm,relu,conv,pool}``, ``features.norm5``, ``classifier``), without the
memory-efficient checkpointing branch that stops torchvision's version from tracing. A dense
layer is BN-act-conv1x1(bn_size*k)-BN-act-conv3x3(k) on the concatenation of every earlier
feature map of its block; a transition is BN-act-conv1x1(c/2)-AvgPool2. Every BatchNorm except
``norm0`` and ``norm2`` reads a concatenation: the neuron structure treats it as a consumer
normalisation (see :mod:`pipeline.models.structure`).

``stem``: ``imagenet`` (7x7/2 conv + 3x3/2 max-pool; the neural-teleportation code keeps it on
CIFAR, where 32x32 inputs end at 1x1 in the last block) or ``cifar`` (3x3/1 conv, no pool).
Init as torchvision: Kaiming-normal convolutions, BN weight 1 and bias 0, Linear bias 0.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn

from pipeline.models import register_model
from pipeline.models.activations import make


class DenseLayer(nn.Module):
    def __init__(self, c_in, growth, bn_size, activation, bn_eps, dropout):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(c_in, eps=bn_eps)
        self.relu1 = make(activation)
        self.conv1 = nn.Conv2d(c_in, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth, eps=bn_eps)
        self.relu2 = make(activation)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, features: list):
        x = self.conv1(self.relu1(self.norm1(torch.cat(features, 1))))
        return self.dropout(self.conv2(self.relu2(self.norm2(x))))


class DenseBlock(nn.Module):
    def __init__(self, layers, c_in, growth, bn_size, activation, bn_eps, dropout):
        super().__init__()
        for i in range(layers):
            layer = DenseLayer(c_in + i * growth, growth, bn_size, activation, bn_eps, dropout)
            self.add_module(f"denselayer{i + 1}", layer)

    def forward(self, x):
        features = [x]
        for layer in self.children():
            features.append(layer(features))
        return torch.cat(features, 1)


def _transition(c_in, c_out, activation, bn_eps):
    return nn.Sequential(
        OrderedDict(
            norm=nn.BatchNorm2d(c_in, eps=bn_eps),
            relu=make(activation),
            conv=nn.Conv2d(c_in, c_out, 1, bias=False),
            pool=nn.AvgPool2d(2),
        )
    )


@register_model("densenet121")
def densenet121(
    input_shape,
    num_classes,
    growth_rate: int = 32,
    block_config: tuple = (6, 12, 24, 16),
    num_init_features: int = 64,
    bn_size: int = 4,
    stem: str = "imagenet",
    activation: str = "relu",
    bn_eps: float = 1e-5,
    dropout: float = 0.0,
):
    """DenseNet-121 (growth 32, blocks 6-12-24-16, 64 stem features). ``block_config``,
    ``growth_rate``, ``num_init_features`` and ``bn_size`` give smaller DenseNets (tests)."""
    if stem not in ("imagenet", "cifar"):
        raise ValueError(f"stem: {stem!r} not allowed; allowed: imagenet, cifar")
    c = num_init_features
    layers: dict[str, nn.Module] = {}
    if stem == "imagenet":
        layers["conv0"] = nn.Conv2d(input_shape[0], c, 7, 2, 3, bias=False)
    else:
        layers["conv0"] = nn.Conv2d(input_shape[0], c, 3, 1, 1, bias=False)
    layers["norm0"] = nn.BatchNorm2d(c, eps=bn_eps)
    layers["relu0"] = make(activation)
    if stem == "imagenet":
        layers["pool0"] = nn.MaxPool2d(3, 2, 1)
    for b, n in enumerate(block_config, start=1):
        layers[f"denseblock{b}"] = DenseBlock(
            n, c, growth_rate, bn_size, activation, bn_eps, dropout
        )
        c += n * growth_rate
        if b < len(block_config):
            layers[f"transition{b}"] = _transition(c, c // 2, activation, bn_eps)
            c //= 2
    layers["norm5"] = nn.BatchNorm2d(c, eps=bn_eps)
    layers["relu5"] = make(activation)
    model = nn.Sequential(
        OrderedDict(
            features=nn.Sequential(OrderedDict(layers)),
            pool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(),
            classifier=nn.Linear(c, num_classes),
        )
    )
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)
    return model
