"""VGG-11/13/16/19, with or without BatchNorm (Kunin et al.'s Tiny-ImageNet variant).

3x3 convolutions (bias on, also with BN, as in the neural-mechanics code), max-pools, then the
classifier Linear(d, d/2)-act-Dropout-Linear(d/2, d/2)-act-Dropout-Linear(d/2, classes), where
d = 512 x the spatial size left after the five pools (512 on 32x32 inputs, 2048 on 64x64).
Conv weights: Kaiming normal (fan_out); Linear weights N(0, 0.01); biases zero.
"""

from __future__ import annotations

from collections import OrderedDict

import torch.nn as nn

from pipeline.models import register_model
from pipeline.models.activations import make

CONFIGS = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [
        64,
        64,
        "M",
        128,
        128,
        "M",
        256,
        256,
        256,
        "M",
        512,
        512,
        512,
        "M",
        512,
        512,
        512,
        "M",
    ],
    "vgg19": [
        64,
        64,
        "M",
        128,
        128,
        "M",
        256,
        256,
        256,
        256,
        "M",
        512,
        512,
        512,
        512,
        "M",
        512,
        512,
        512,
        512,
        "M",
    ],
}


def features(cfg, input_shape, batch_norm, activation, bn_eps, width):
    """The convolutional part of VGG config ``cfg``: ``(module, channels out, (h, w) out)``."""
    c, h, w = input_shape
    pools = cfg.count("M")
    if h >> pools < 1 or w >> pools < 1:
        raise ValueError(
            f"VGG needs inputs of at least {2**pools}x{2**pools}; got {h}x{w} "
            "(use mlp, conv or myrtle for small images)"
        )
    layers: list[nn.Module] = []
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
            continue
        v = int(v * width)
        layers.append(nn.Conv2d(c, v, 3, padding=1, bias=True))
        if batch_norm:
            layers.append(nn.BatchNorm2d(v, eps=bn_eps))
        layers.append(make(activation))
        c = v
    return nn.Sequential(*layers), c, (h, w)


def init_weights(model: nn.Module) -> nn.Module:
    """Kaiming-normal (fan_out) convolutions, Linear N(0, 0.01), zero biases (BN: torch's)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
    return model


def classifier(dim_in: int, hidden: int, num_classes: int, activation: str, dropout: float):
    """Linear(dim_in, hidden)-act-Dropout-Linear(hidden, hidden)-act-Dropout-Linear(hidden, C)."""
    return nn.Sequential(
        nn.Linear(dim_in, hidden),
        make(activation),
        nn.Dropout(dropout),
        nn.Linear(hidden, hidden),
        make(activation),
        nn.Dropout(dropout),
        nn.Linear(hidden, num_classes),
    )


def _vgg(cfg, input_shape, num_classes, batch_norm, activation, bn_eps, dropout, width):
    conv, c, (h, w) = features(cfg, input_shape, batch_norm, activation, bn_eps, width)
    dim = c * h * w
    head = classifier(dim, dim // 2, num_classes, activation, dropout)
    return init_weights(
        nn.Sequential(OrderedDict(features=conv, classifier=nn.Sequential(nn.Flatten(), *head)))
    )


@register_model("vgg11")
def vgg11(
    input_shape,
    num_classes,
    batch_norm: bool = False,
    activation: str = "relu",
    bn_eps: float = 1e-5,
    dropout: float = 0.5,
    width: float = 1.0,
):
    """VGG-11 (config A). ``width`` multiplies every conv's channel count."""
    return _vgg(
        CONFIGS["vgg11"], input_shape, num_classes, batch_norm, activation, bn_eps, dropout, width
    )


@register_model("vgg13")
def vgg13(
    input_shape,
    num_classes,
    batch_norm: bool = False,
    activation: str = "relu",
    bn_eps: float = 1e-5,
    dropout: float = 0.5,
    width: float = 1.0,
):
    """VGG-13 (config B)."""
    return _vgg(
        CONFIGS["vgg13"], input_shape, num_classes, batch_norm, activation, bn_eps, dropout, width
    )


@register_model("vgg16")
def vgg16(
    input_shape,
    num_classes,
    batch_norm: bool = False,
    activation: str = "relu",
    bn_eps: float = 1e-5,
    dropout: float = 0.5,
    width: float = 1.0,
):
    """VGG-16 (config D)."""
    return _vgg(
        CONFIGS["vgg16"], input_shape, num_classes, batch_norm, activation, bn_eps, dropout, width
    )


@register_model("vgg19")
def vgg19(
    input_shape,
    num_classes,
    batch_norm: bool = False,
    activation: str = "relu",
    bn_eps: float = 1e-5,
    dropout: float = 0.5,
    width: float = 1.0,
):
    """VGG-19 (config E)."""
    return _vgg(
        CONFIGS["vgg19"], input_shape, num_classes, batch_norm, activation, bn_eps, dropout, width
    )
