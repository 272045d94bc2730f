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


class _MaskedSample(torch.autograd.Function):
    """``W * m_k`` for ``k`` hard samples ``m_k = 1[l + e_k > 0]``, straight-through to ``l``.

    Forward: ``z = l + e`` (``[k, *l.shape]``), output ``where(z > 0, W, 0)``. Backward: the
    gradient the soft sample ``s = sigmoid(z)`` would get, ``dL/dl = W * sum_k G_k s_k (1 - s_k)``
    with ``G = dL/d(W m)``, and ``dL/dW = sum_k G_k m_k`` where the weights train too.

    One function instead of sample, cast and multiply keeps the elementwise work (which
    dominates mask training on large layers) to a few passes over ``[k, *l.shape]``, each
    contiguous whatever layout the layer's backward hands back.
    """

    @staticmethod
    def forward(weight, logits, k, generator):
        z = torch.empty((k, *logits.shape), dtype=logits.dtype, device=logits.device)
        out = torch.empty_like(z)
        zero = torch.zeros((), dtype=weight.dtype, device=weight.device)
        for j in range(k):  # one sample at a time: its buffers stay in cache across the passes
            z[j].uniform_(generator=generator).clamp_min_(TINY).logit_().add_(logits)
            torch.where(z[j] > 0, weight, zero, out=out[j])
        return out, z

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], output[1])
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad, _):
        weight, z = ctx.saved_tensors
        want_weight, want_logits = ctx.needs_input_grad[:2]
        acc_weight = torch.zeros_like(z[0]) if want_weight else None
        acc_logits = torch.zeros_like(z[0]) if want_logits else None
        scratch = torch.empty_like(z[0])
        for j in range(len(z)):
            g = grad[j]
            if want_weight:  # weights trained with the mask (permuted transfer)
                acc_weight.add_(torch.where(z[j] > 0, g, torch.zeros((), dtype=g.dtype)))
            if want_logits:
                torch.sigmoid(z[j], out=scratch)
                torch.ops.aten.sigmoid_backward.grad_input(g, scratch, grad_input=scratch)
                acc_logits.add_(scratch)
        if want_logits:
            acc_logits.mul_(weight)
        return acc_weight, acc_logits, None, None


def sample_masked(
    weight: torch.Tensor, logits: torch.Tensor, k: int, generator: torch.Generator
) -> torch.Tensor:
    """``k`` masked copies ``[k, *weight.shape]`` of ``weight``, ``W * m_k`` with hard samples
    ``m_k`` of ``logits`` (gradient to ``logits`` straight through ``sigmoid(logits + noise)``)."""
    return _MaskedSample.apply(weight, logits, k, generator)[0]


def sample(logits: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """``k`` hard masks ``[k, *logits.shape]`` (values 0/1) carrying the straight-through
    gradient of ``sigmoid(logits + noise)``."""
    return sample_masked(torch.ones((), dtype=logits.dtype).expand_as(logits), logits, k, generator)


def sample_masked_all(
    weights: dict[str, torch.Tensor], logits: dict[str, torch.Tensor], k: int, generator
) -> dict[str, torch.Tensor]:
    """:func:`sample_masked` for every masked name: the K masked parameter sets, stacked."""
    return {n: sample_masked(weights[n], l, k, generator) for n, l in logits.items()}


def binary(logits: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The deterministic masks ``logit > 0`` (bool tensors)."""
    return {n: (l.detach() > 0) for n, l in logits.items()}
