"""ResNets: He et al.'s CIFAR ResNet-20/56/110 (and wide variants) and torchvision's ResNets.

CIFAR ResNets: a 3x3 stem, three stages of BasicBlocks at widths 16k/32k/64k (k = ``width``),
global average pool, Linear. Where a block changes shape the shortcut is either a projection
(option B: 1x1 conv + BN; Kaiming-normal fan_out convolutions) or parameter-free (option A, as in
Godfrey et al.'s ``resnet20``: stride-2 subsampling and zero channels padded evenly on both sides,
so stage s+1's stream holds stage s's at channels pad .. pad + c_in; Kaiming-normal fan_in
convolutions and Linear). Module names follow torchvision's (conv1, bn1,
layerN.i.{conv1,bn1,conv2,bn2,downsample}, fc), and every activation is its own module.

With option A the neuron structure follows the streams through the shortcuts: the stage-1 stream
is one group of 16k neurons living on in channels 8k..24k of the stage-2 stream and 24k..40k of
the stage-3 stream; the zero-padded channels of stage 2 are two groups (``layer2.residual[0:8]``
and ``layer2.residual[24:32]`` at width 1, embedded at offset 16 in stage 3), those of stage 3
two more. Permutations mixing the two padded ranges of one stage are symmetries too; the
structure leaves them out.
"""

from __future__ import annotations

import functools

import torch.nn as nn
import torch.nn.functional as F

from pipeline.models import register_model
from pipeline.models.activations import make


def _norm(batch_norm, channels, eps):
    return nn.BatchNorm2d(channels, eps=eps) if batch_norm else nn.Identity()


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut: stride-``stride`` subsampling, then ``pad`` zero channels each side."""

    def __init__(self, stride: int, pad: int):
        super().__init__()
        self.stride, self.pad = stride, pad

    def forward(self, x):
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, c_in, c_out, stride, batch_norm, activation, bn_eps, shortcut="projection"):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=not batch_norm)
        self.bn1 = _norm(batch_norm, c_out, bn_eps)
        self.act1 = make(activation)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=not batch_norm)
        self.bn2 = _norm(batch_norm, c_out, bn_eps)
        self.downsample = None
        if (stride != 1 or c_in != c_out) and shortcut == "zero_pad":
            if (c_out - c_in) % 2:
                raise ValueError(
                    f"option-A shortcut needs an even channel increase; {c_in}->{c_out}"
                )
            self.downsample = ZeroPadShortcut(stride, (c_out - c_in) // 2)
        elif stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=not batch_norm),
                _norm(batch_norm, c_out, bn_eps),
            )
        self.act2 = make(activation)

    def forward(self, x):
        out = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        identity = x if self.downsample is None else self.downsample(x)
        return self.act2(out + identity)


class CifarResNet(nn.Module):
    def __init__(
        self,
        depth,
        input_shape,
        num_classes,
        width,
        batch_norm,
        activation,
        bn_eps,
        shortcut="projection",
    ):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2; got {depth}")
        n = (depth - 2) // 6
        widths = [16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(input_shape[0], widths[0], 3, 1, 1, bias=not batch_norm)
        self.bn1 = _norm(batch_norm, widths[0], bn_eps)
        self.act = make(activation)
        c_in = widths[0]
        for stage, c in enumerate(widths):
            blocks = []
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(c_in, c, stride, batch_norm, activation, bn_eps, shortcut))
                c_in = c
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if shortcut == "zero_pad" and isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.act(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.avgpool(x)))


@register_model("resnet20")
def resnet20(
    input_shape,
    num_classes,
    width: int = 1,
    batch_norm: bool = True,
    activation: str = "relu",
    bn_eps: float = 1e-5,
):
    """CIFAR ResNet-20 (3 blocks per stage); ``width`` k gives the wide variant (16k/32k/64k)."""
    return CifarResNet(20, input_shape, num_classes, width, batch_norm, activation, bn_eps)


@register_model("resnet20_option_a")
def resnet20_option_a(
    input_shape,
    num_classes,
    width: int = 1,
    batch_norm: bool = True,
    activation: str = "relu",
    bn_eps: float = 1e-5,
):
    """CIFAR ResNet-20 with option-A (subsample + zero-pad) shortcuts, 0.27M parameters."""
    return CifarResNet(
        20, input_shape, num_classes, width, batch_norm, activation, bn_eps, shortcut="zero_pad"
    )


@register_model("resnet56")
def resnet56(
    input_shape,
    num_classes,
    width: int = 1,
    batch_norm: bool = True,
    activation: str = "relu",
    bn_eps: float = 1e-5,
):
    """CIFAR ResNet-56 (9 blocks per stage)."""
    return CifarResNet(56, input_shape, num_classes, width, batch_norm, activation, bn_eps)


@register_model("resnet110")
def resnet110(
    input_shape,
    num_classes,
    width: int = 1,
    batch_norm: bool = True,
    activation: str = "relu",
    bn_eps: float = 1e-5,
):
    """CIFAR ResNet-110 (18 blocks per stage)."""
    return CifarResNet(110, input_shape, num_classes, width, batch_norm, activation, bn_eps)


def _torchvision(arch, input_shape, num_classes, stem, bn_eps):
    import torchvision

    norm = functools.partial(nn.BatchNorm2d, eps=bn_eps)
    model = getattr(torchvision.models, arch)(
        weights=None, num_classes=num_classes, norm_layer=norm
    )
    if stem not in ("imagenet", "cifar", "cifar_maxpool"):
        raise ValueError(f"stem: {stem!r} not allowed; allowed: imagenet, cifar, cifar_maxpool")
    if input_shape[0] != 3 or stem != "imagenet":
        k, s, p = (7, 2, 3) if stem == "imagenet" else (3, 1, 1)
        model.conv1 = nn.Conv2d(input_shape[0], 64, k, s, p, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    if stem == "cifar":
        model.maxpool = nn.Identity()
    return model


@register_model("resnet18")
def resnet18(input_shape, num_classes, stem: str = "imagenet", bn_eps: float = 1e-5):
    """torchvision ResNet-18. ``stem``: imagenet (7x7/2 + max-pool), cifar (3x3/1, no max-pool)
    or cifar_maxpool (3x3/1, max-pool kept, as in the neural-teleportation code)."""
    return _torchvision("resnet18", input_shape, num_classes, stem, bn_eps)


@register_model("resnet34")
def resnet34(input_shape, num_classes, stem: str = "imagenet", bn_eps: float = 1e-5):
    """torchvision ResNet-34."""
    return _torchvision("resnet34", input_shape, num_classes, stem, bn_eps)


@register_model("resnet50")
def resnet50(input_shape, num_classes, stem: str = "imagenet", bn_eps: float = 1e-5):
    """torchvision ResNet-50 (bottleneck blocks)."""
    return _torchvision("resnet50", input_shape, num_classes, stem, bn_eps)
