"""Teleportation statistics (Armenta et al., Fig. 7): how much a teleport changes the gradient
norm relative to the weight norm, against the CoB range.

Gradients transform as ``grad' = grad / D``, so factors below 1 in magnitude amplify them. For
each CoB range, batch and draw: ``| |grad L(theta)| / |theta| - |grad L(T theta)| / |T theta| |``
with the gradient of the teleported network computed by back-propagating through it (train
mode). Every draw starts from the original network (the original code compounded them).
"""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import torch

from pipeline import seeding
from pipeline.teleport.cob import identity, sample
from pipeline.teleport.network import materialise, set_teleported, teleported_parameters


def _norms(net, x, y, loss_fn) -> tuple[float, float]:
    net.zero_grad(set_to_none=True)
    loss_fn(net(x), y).backward()
    params = [p for p in net.parameters()]
    grad = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params if p.grad is not None))
    weight = torch.sqrt(sum((p.detach().double() ** 2).sum() for p in params))
    return float(grad), float(weight)


def teleport_statistics(
    model: torch.nn.Module,
    input_shape,
    batches,
    loss_fn,
    cob_ranges=None,
    sampling: str = "intra_landscape",
    teleports: int = 10,
    seed: int = 0,
) -> pd.DataFrame:
    """Columns: cob_range, batch, teleport, grad_norm, weight_norm, grad_norm_teleported,
    weight_norm_teleported, ratio_change. ``batches``: a list of ``(x, y)``."""
    cob_ranges = np.linspace(0.01, 0.9, 15) if cob_ranges is None else np.asarray(cob_ranges)
    net = materialise(copy.deepcopy(model), input_shape)
    net.train()
    structure = net._teleport.structure
    original = {k: v.detach().clone() for k, v in net.state_dict().items()}
    names = {k for k, _ in net.named_parameters()}
    gen = seeding.generator(seed, "teleport-statistics")
    rows = []
    for b, (x, y) in enumerate(batches):
        set_teleported(net, original, identity(structure))
        grad0, weight0 = _norms(net, x, y, loss_fn)
        for r in cob_ranges:
            for t in range(teleports):
                cob = sample(structure, sampling, float(r), gen)
                params = teleported_parameters(structure, {k: original[k] for k in names}, cob)
                set_teleported(net, {**original, **params}, cob)
                grad1, weight1 = _norms(net, x, y, loss_fn)
                change = abs(grad0 / weight0 - grad1 / weight1)
                rows.append((float(r), b, t, grad0, weight0, grad1, weight1, change))
    net.zero_grad(set_to_none=True)
    return pd.DataFrame(
        rows,
        columns=[
            "cob_range",
            "batch",
            "teleport",
            "grad_norm",
            "weight_norm",
            "grad_norm_teleported",
            "weight_norm_teleported",
            "ratio_change",
        ],
    )
