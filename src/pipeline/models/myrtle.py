"""The Myrtle CNN (Page's 5-layer net, as in Godfrey et al.'s mCNN).

conv3x3(c)-BN-act; conv(2c)-BN-act-MaxPool2; conv(4c)-BN-act-MaxPool2; conv(8c)-BN-act-MaxPool2;
global max-pool; Linear(8c, classes). Without BatchNorm the convs carry biases (mCNN_k).
"""

from __future__ import annotations

from collections import OrderedDict

import torch.nn as nn

from pipeline.models import register_model
from pipeline.models.activations import make


@register_model("myrtle")
def myrtle(
    input_shape,
    num_classes,
    width: int = 64,
    batch_norm: bool = True,
    activation: str = "relu",
    bn_eps: float = 1e-5,
    constant_width: bool = False,
):
    """Myrtle CNN with base width ``width``; ``constant_width`` keeps every layer at 8*width."""
    widths = [8 * width] * 4 if constant_width else [width, 2 * width, 4 * width, 8 * width]
    layers: dict[str, nn.Module] = {}
    c = input_shape[0]
    for i, w in enumerate(widths, start=1):
        layers[f"conv{i}"] = nn.Conv2d(c, w, 3, padding=1, bias=not batch_norm)
        if batch_norm:
            layers[f"bn{i}"] = nn.BatchNorm2d(w, eps=bn_eps)
        layers[f"act{i}"] = make(activation)
        if i > 1:
            layers[f"pool{i}"] = nn.MaxPool2d(2)
        c = w
    layers["global_pool"] = nn.AdaptiveMaxPool2d(1)
    layers["flatten"] = nn.Flatten()
    layers["fc"] = nn.Linear(c, num_classes)
    return nn.Sequential(OrderedDict(layers))
