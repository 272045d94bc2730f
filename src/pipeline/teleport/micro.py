"""Micro-teleportation (Armenta et al., Fig. 4): teleports with factors near 1 move the weights
orthogonally to the loss gradient.

With ``tau = 1 + eps u`` the displacement is ``delta W_ij = eps (u_i - u_j) W_ij`` (to first
order), the generator of the rescale symmetry; where the CoB is a symmetry of the stock network
(ReLU-like activations with ``tau > 0``), invariance gives ``<grad L, delta> = 0``: the angle is
90 degrees up to ``O(eps)``. Residual streams keep one factor per channel (the ``tied`` group:
per-branch factors modify the Adds, so they are no symmetry of the stock network). Controls:
uniform random vectors ``U[-0.5, 0.5]^P`` against the gradient, the displacement and each other,
whose angles spread by about ``1/sqrt(P)`` radians.
"""

from __future__ import annotations

import itertools
import math

import pandas as pd
import torch

from pipeline import seeding
from pipeline.models import neuron_structure
from pipeline.teleport.cob import parameter_scales, sample

PAIRS = ("gradient_vs_teleport", "teleport_vs_random", "gradient_vs_random", "random_vs_random")


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def micro_teleport_angles(
    model: torch.nn.Module,
    batches,
    loss_fn,
    iterations: int = 100,
    cob_range: float = 1e-3,
    sampling: str = "intra_landscape",
    seed: int = 0,
    input_shape=None,
    stream: tuple = (),
) -> pd.DataFrame:
    """Angles (degrees) between the minibatch gradient at the model's weights, the displacement
    of a fresh micro-teleport of those weights, and random vectors, per iteration.

    ``batches``: iterable of ``(x, y)``, cycled. ``stream``: tags of this call's random draws
    (CoBs and random vectors), e.g. the model and batch size, so every call of one study draws
    its own. Columns: iteration, pair, cosine, angle.
    """
    structure = neuron_structure(model, input_shape)
    params = dict(model.named_parameters())
    gen = seeding.generator(seed, "micro-teleport", *stream)
    rows = []
    source = itertools.cycle(batches)
    for it in range(iterations):
        x, y = next(source)
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        grad = torch.cat(
            [
                (p.grad if p.grad is not None else torch.zeros_like(p)).detach().double().flatten()
                for p in params.values()
            ]
        )
        cob = sample(structure, sampling, cob_range, gen, residual="tied")
        scales = parameter_scales(structure, cob, params)
        delta = torch.cat(
            [
                (p.detach() * (scales[k] - 1.0) if k in scales else torch.zeros_like(p))
                .double()
                .flatten()
                for k, p in params.items()
            ]
        )
        r1 = torch.rand(grad.numel(), generator=gen, dtype=torch.float64) - 0.5
        r2 = torch.rand(grad.numel(), generator=gen, dtype=torch.float64) - 0.5
        pairs = dict(zip(PAIRS, ((grad, delta), (delta, r1), (grad, r1), (r1, r2)), strict=True))
        for pair, (a, b) in pairs.items():
            cos = _cosine(a, b)
            rows.append((it, pair, cos, math.degrees(math.acos(max(-1.0, min(1.0, cos))))))
    model.zero_grad(set_to_none=True)
    return pd.DataFrame(rows, columns=["iteration", "pair", "cosine", "angle"])
