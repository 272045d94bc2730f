"""The network under masked weights: one mask, or K mask samples in one batched call.

K samples per step (the paper's batched-mask trick): the batch ``x [B, ...]`` is cut into K
contiguous blocks of ``B / K`` and block ``k`` runs with weights ``W * m_k``. Here that is one
``torch.func.vmap`` over ``functional_call`` with the K masked parameter sets stacked on a
leading axis: a Linear becomes one batched matmul and a Conv one grouped convolution, for any
model ``functional_call`` can run (no per-architecture code). Unmasked parameters and buffers
are shared by the K blocks.
"""

from __future__ import annotations

import torch
from torch.func import functional_call, vmap


def model_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters as plain (detached) tensors."""
    return {n: p.detach() for n, p in model.named_parameters()}


def apply_masks(weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> dict:
    """``weights`` with ``W * m`` for every masked name (``m`` bool or 0/1)."""
    return {n: w * masks[n].to(w.dtype) if n in masks else w for n, w in weights.items()}


def masked_outputs(
    model, weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], x: torch.Tensor
) -> torch.Tensor:
    """The model's outputs on ``x`` with one mask per masked parameter."""
    return functional_call(model, apply_masks(weights, masks), (x,))


def sampled_outputs(
    model, weights: dict[str, torch.Tensor], samples: dict[str, torch.Tensor], x: torch.Tensor
) -> torch.Tensor:
    """Outputs ``[B, ...]`` on ``x [B, ...]``: block ``k`` of ``B / K`` examples under mask
    sample ``k`` (``samples[name]: [K, *weights[name].shape]``), in one vmapped call."""
    return stacked_outputs(model, weights, {n: weights[n] * m for n, m in samples.items()}, x)


def stacked_outputs(
    model, weights: dict[str, torch.Tensor], stacked: dict[str, torch.Tensor], x: torch.Tensor
) -> torch.Tensor:
    """Outputs ``[B, ...]`` on ``x [B, ...]``: block ``k`` of ``B / K`` examples with the
    parameters ``stacked[name][k]`` (already masked, e.g. by ``sampling.sample_masked_all``)
    and ``weights`` for every other name, in one vmapped call."""
    k = next(iter(stacked.values())).shape[0]
    if x.shape[0] % k:
        raise ValueError(f"batch of {x.shape[0]} examples does not split into {k} mask samples")
    shared = {n: w for n, w in weights.items() if n not in stacked}
    blocks = x.reshape(k, x.shape[0] // k, *x.shape[1:])

    def one(params, xs):
        return functional_call(model, (params, shared), (xs,))

    out = vmap(one)(stacked, blocks)
    return out.reshape(x.shape[0], *out.shape[2:])
