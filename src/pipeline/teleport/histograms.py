"""Weight histograms (Armenta et al., Fig. 11): a network at initialisation, the same network
teleported, and the *same distribution* control (every Linear/Conv weight resampled i.i.d. from
the histogram of its teleported value)."""

from __future__ import annotations

import copy

import pandas as pd
import torch

from pipeline import seeding
from pipeline.models import neuron_structure
from pipeline.teleport.cob import sample
from pipeline.teleport.network import teleported_parameters
from pipeline.teleport.training import same_distribution_

KINDS = ("init", "teleported", "same_distribution")


@torch.no_grad()
def weight_histograms(
    model: torch.nn.Module,
    input_shape,
    cob_range: float = 0.9,
    sampling: str = "intra_landscape",
    bins: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """Densities of the weights of each kind, over all parameters (``layer == "all"``) and per
    Linear/Conv weight, on bins shared by the three kinds. Columns: kind, layer, left, right,
    density (integrates to 1 over a (kind, layer))."""
    structure = neuron_structure(model, input_shape)
    params = {k: p.detach() for k, p in model.named_parameters()}
    cob = sample(structure, sampling, cob_range, seeding.generator(seed, "histogram-teleport"))
    control = copy.deepcopy(model)
    same_distribution_(control, structure, cob, seeding.generator(seed, "histogram-same"))
    kinds = {
        "init": params,
        "teleported": teleported_parameters(structure, params, cob),
        "same_distribution": {k: p.detach() for k, p in control.named_parameters()},
    }
    layers = {"all": list(params)} | {k: [k] for k, p in params.items() if p.ndim >= 2}
    rows = []
    for layer, names in layers.items():
        values = {
            kind: torch.cat([ps[n].double().flatten() for n in names]) for kind, ps in kinds.items()
        }
        lo = min(float(v.min()) for v in values.values())
        hi = max(float(v.max()) for v in values.values())
        edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
        width = (hi - lo) / bins
        for kind, v in values.items():
            counts = torch.histc(v, bins, lo, hi)
            density = counts / (v.numel() * width) if width > 0 else counts
            rows += [
                (kind, layer, float(edges[i]), float(edges[i + 1]), float(density[i]))
                for i in range(bins)
            ]
    return pd.DataFrame(rows, columns=["kind", "layer", "left", "right", "density"])
