"""VGG-16 as torchvision builds it (the neural-teleportation paper's ``vgg16_bnCOB``).

Config D: 3x3 convolutions (bias on) with BatchNorm (default) and ReLU, five max-pools, then
AdaptiveAvgPool2d(7x7), Flatten and the classifier Linear(512*49, 4096)-act-Dropout-
Linear(4096, 4096)-act-Dropout-Linear(4096, classes). On 32x32 inputs the features end at 1x1
and the adaptive pool repeats them 49 times, as in the paper's CIFAR runs. Init as torchvision:
Kaiming-normal (fan_out) convolutions, BN weight 1 and bias 0, Linear N(0, 0.01), biases 0.
``width`` multiplies the channel counts and ``hidden`` sets the classifier width (small
variants for tests).
"""

from __future__ import annotations

from collections import OrderedDict

import torch.nn as nn

from pipeline.models import register_model
from pipeline.models.vgg import CONFIGS, classifier, features, init_weights


@register_model("vgg16_torchvision")
def vgg16_torchvision(
    input_shape,
    num_classes,
    batch_norm: bool = True,
    activation: str = "relu",
    bn_eps: float = 1e-5,
    dropout: float = 0.5,
    width: float = 1.0,
    hidden: int = 4096,
    pool_size: int = 7,
):
    """torchvision's VGG-16 (with BatchNorm by default: vgg16_bn)."""
    conv, c, _ = features(CONFIGS["vgg16"], input_shape, batch_norm, activation, bn_eps, width)
    return init_weights(
        nn.Sequential(
            OrderedDict(
                features=conv,
                avgpool=nn.AdaptiveAvgPool2d(pool_size),
                flatten=nn.Flatten(),
                classifier=classifier(
                    c * pool_size * pool_size, hidden, num_classes, activation, dropout
                ),
            )
        )
    )
