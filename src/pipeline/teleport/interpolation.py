"""Flatness by 1D interpolation (Armenta et al., Fig. 5), before and after teleporting.

Between two trained networks A and B, ``theta(alpha) = (1 - alpha) theta_A + alpha theta_B``
for alpha in [-0.5, 1.5]; then both are teleported and the path is repeated between ``T_a(A)``
and ``T_b(B)``. The teleported networks carry their CoBs too. Interpolating ``tau`` linearly
would pass through 0 (an infinite weight scale, the likely source of the original's NaNs), so:

- when neither CoB modifies an operation (positive factors on ReLU-like networks without
  BatchNorm inputs) the activations are stock and the weights alone are interpolated;
- otherwise ``log|tau|`` is interpolated (``|tau_a|^(1-alpha) |tau_b|^alpha``), with the sign of
  the nearer end (A for alpha < 1/2).

BatchNorm running statistics (in the original basis) are interpolated linearly.
"""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import torch

from pipeline import seeding
from pipeline.models import neuron_structure
from pipeline.teleport.cob import ChangeOfBasis, identity, sample
from pipeline.teleport.network import (
    changes_operations,
    materialise,
    set_teleported,
    teleported_parameters,
)
from pipeline.train.optim import evaluate


def interpolate_cob(a: ChangeOfBasis, b: ChangeOfBasis, alpha: float) -> ChangeOfBasis:
    """``sign * |tau_a|^(1 - alpha) |tau_b|^alpha`` per factor (sign of the nearer end)."""

    def mix(x: dict, y: dict) -> dict:
        out = {}
        for k in x.keys() | y.keys():
            u = x.get(k, torch.ones_like(y.get(k)))
            v = y.get(k, torch.ones_like(u))
            sign = torch.sign(u if alpha < 0.5 else v)
            out[k] = sign * torch.exp((1 - alpha) * u.abs().log() + alpha * v.abs().log())
        return out

    return ChangeOfBasis(mix(a.tau, b.tau), mix(a.norm_in, b.norm_in))


def _teleported_state(model, state: dict, structure, cob: ChangeOfBasis) -> dict:
    names = {k for k, _ in model.named_parameters()}
    params = teleported_parameters(structure, {k: state[k] for k in names}, cob)
    return {k: params.get(k, v) for k, v in state.items()}


@torch.no_grad()
def interpolation_profile(
    model: torch.nn.Module,
    state_a: dict,
    state_b: dict,
    input_shape,
    splits: dict,
    loss_fn,
    alphas=None,
    teleport: bool = False,
    cob_range: float = 0.9,
    sampling: str = "intra_landscape",
    same_cob: bool = False,
    seed: int = 0,
    batch_size: int = 1000,
) -> pd.DataFrame:
    """Loss and accuracy along the path between ``state_a`` and ``state_b`` (state dicts of
    ``model``'s architecture), evaluated in eval mode on each of ``splits`` (``name -> split``
    with ``eval_batches``). Columns: alpha, split, loss, accuracy, teleported, same_cob."""
    alphas = np.linspace(-0.5, 1.5, 101) if alphas is None else np.asarray(alphas)
    model = copy.deepcopy(model)
    structure = neuron_structure(model, input_shape)
    if teleport:
        cob_a = sample(structure, sampling, cob_range, seeding.generator(seed, "interp", "A"))
        cob_b = (
            cob_a
            if same_cob
            else sample(structure, sampling, cob_range, seeding.generator(seed, "interp", "B"))
        )
    else:
        cob_a = cob_b = identity(structure)
    ends = [
        _teleported_state(model, s, structure, c) for s, c in ((state_a, cob_a), (state_b, cob_b))
    ]
    stock = not (changes_operations(structure, cob_a) or changes_operations(structure, cob_b))
    net = model if stock else materialise(model, input_shape)
    net.eval()
    rows = []
    for alpha in alphas:
        state = {
            k: (1 - alpha) * ends[0][k] + alpha * ends[1][k]
            if ends[0][k].is_floating_point()
            else ends[0][k]
            for k in ends[0]
        }
        if stock:
            net.load_state_dict(state)
        else:
            set_teleported(net, state, interpolate_cob(cob_a, cob_b, float(alpha)))
        for name, split in splits.items():
            loss, acc = evaluate(net, split, loss_fn, batch_size)
            rows.append((float(alpha), name, loss, acc))
    out = pd.DataFrame(rows, columns=["alpha", "split", "loss", "accuracy"])
    return out.assign(teleported=teleport, same_cob=same_cob)
