"""Mask logits, hard Gumbel-sigmoid samples with a straight-through gradient, binary masks.

One logit ``l`` per masked weight. A training sample is ``m = 1[s > 1/2]`` with
``s = sigmoid(l + e)`` (temperature 1) and ``e ~ Logistic(0, 1)``, the difference of two
Gumbels, drawn as ``logit(u) = log(u / (1 - u))`` with ``u ~ U(0, 1)``; so ``m = 1[l + e > 0]`` and
``P(m = 1) = sigmoid(l)``. The forward pass sees ``m``, the backward pass the gradient of ``s``:
``m + s - stopgrad(s)``. At evaluation the mask is deterministic, ``1[l > 0]`` (the paper's
analysis convention; its evaluation used ``l >= 0``, which differs only at exactly 0).
"""

from __future__ import annotations

import torch

TINY = 1e-10  # keeps log(u) finite


def init_logits(weights: dict[str, torch.Tensor], names, value: float) -> dict[str, torch.Tensor]:
    """Trainable logit tensors shaped like ``weights[name]`` for each name, all ``value``."""
    return {n: torch.full_like(weights[n], value).requires_grad_(True) for n in names}


def logistic_noise(shape, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Logistic(0, 1) samples ``log(u / (1 - u))`` (``u < 1`` always, so finite)."""
    u = torch.rand(shape, generator=generator, device=like.device, dtype=like.dtype)
    return u.clamp_min_(TINY).logit_()


class _StraightThrough(torch.autograd.Function):
    """Forward: ``1[soft > 1/2]``; backward: the gradient passes to ``soft`` unchanged."""

    @staticmethod
    def forward(soft):
        return (soft > 0.5).to(soft.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad


def sample(logits: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """``k`` hard masks ``[k, *logits.shape]`` (values 0/1) carrying the straight-through
    gradient of ``sigmoid(logits + noise)``."""
    soft = torch.sigmoid(logits + logistic_noise((k, *logits.shape), generator, logits))
    return _StraightThrough.apply(soft)


def sample_all(logits: dict[str, torch.Tensor], k: int, generator) -> dict[str, torch.Tensor]:
    return {n: sample(l, k, generator) for n, l in logits.items()}


def binary(logits: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The deterministic masks ``logit > 0`` (bool tensors)."""
    return {n: (l.detach() > 0) for n, l in logits.items()}
