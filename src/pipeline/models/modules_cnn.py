"""The simple CIFAR-10 CNN of the weight-mask modularity study (Csordas et al. 2021).

conv32-ReLU-MaxPool, conv64-ReLU-MaxPool, conv128-Dropout(0.25)-ReLU-MaxPool,
conv256-ReLU-Dropout(0.5), global average pool, Linear(256 -> classes); every conv 3x3 with
padding 1. ``dropout=False`` is the paper's no-dropout variant; ``width`` scales the channel
counts (1.0: the paper's; 0.25 for 8x8 digits on the CPU).
"""

from __future__ import annotations

from collections import OrderedDict

import torch.nn as nn

from pipeline.models import register_model

CHANNELS = (32, 64, 128, 256)


@register_model("modules_cnn")
def modules_cnn(input_shape, num_classes, dropout: bool = True, width: float = 1.0):
    """The paper's four-conv CIFAR-10 network (dropout 0.25 after conv3, 0.5 after conv4)."""
    c = [max(1, round(ch * width)) for ch in CHANNELS]
    drop3, drop4 = (0.25, 0.5) if dropout else (0.0, 0.0)
    mods: dict[str, nn.Module] = OrderedDict(
        conv1=nn.Conv2d(input_shape[0], c[0], 3, padding=1),
        act1=nn.ReLU(),
        pool1=nn.MaxPool2d(2),
        conv2=nn.Conv2d(c[0], c[1], 3, padding=1),
        act2=nn.ReLU(),
        pool2=nn.MaxPool2d(2),
        conv3=nn.Conv2d(c[1], c[2], 3, padding=1),
        drop3=nn.Dropout(drop3),
        act3=nn.ReLU(),
        pool3=nn.MaxPool2d(2),
        conv4=nn.Conv2d(c[2], c[3], 3, padding=1),
        act4=nn.ReLU(),
        drop4=nn.Dropout(drop4),
        gap=nn.AdaptiveAvgPool2d(1),
        flatten=nn.Flatten(),
        out=nn.Linear(c[3], num_classes),
    )
    return nn.Sequential(mods)
