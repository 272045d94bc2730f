"""Evaluating a network under deterministic masks: accuracy, inverse masks, half masks.

- Masked accuracy: the network with ``W * m`` on each subtask's items (an item counts as correct
  when every head it asks about is: labels ``IGNORE`` are skipped).
- Inverse-mask test (``P_specialize``): keep only the weights a subtask's mask does *not* select,
  ``W * (1 - m)``. Unmasked parameters (biases by default) stay. Policy for the input and output
  layers: ``invert`` (inverted like the rest, the paper's default), ``ones`` (left whole) or
  ``reference`` (the reference mask, the paper's ``fullmask``). A mask specialised to its subtask
  makes that subtask collapse under its inverse while the others survive.
- Half-mask test: the reference mask applied only to a subset of the layers (the others whole):
  the first ``ceil(L / 2)`` layers in forward order (``early``), the complement (``late``), and
  up to ``random_halves`` random ``ceil(L / 2)``-subsets with their complements. The drop is the
  full-mask accuracy minus the half-mask one.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from pipeline import seeding
from pipeline.data.tasks import IGNORE
from pipeline.masks.batched import masked_outputs, model_weights
from pipeline.masks.layers import MaskedLayer
from pipeline.masks.views import View
from pipeline.train.optim import multi_head_ce

INVERSE_IO = ("invert", "ones", "reference")


def correct(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-item correctness ``[N]``: every asked head's argmax equals its label."""
    if y.ndim == 1:
        return out.argmax(1) == y
    hit = out.reshape(*y.shape, -1).argmax(-1) == y
    return (hit | (y == IGNORE)).all(1)


@torch.no_grad()
def outputs(model, masks: dict | None, view: View, batch_size: int = 2048):
    """The model's outputs ``[N, ...]`` and labels on every item of ``view`` under ``masks``
    (None: unmasked)."""
    model.eval()
    weights = model_weights(model)
    outs, ys = [], []
    for x, y in view.eval_batches(batch_size):
        outs.append(masked_outputs(model, weights, masks or {}, x))
        ys.append(y)
    return torch.cat(outs), torch.cat(ys)


def score(model, masks: dict | None, view: View, batch_size: int = 2048) -> dict:
    out, y = outputs(model, masks, view, batch_size)
    return {
        "items": len(y),
        "loss": float(multi_head_ce(out, y)),
        "accuracy": float(correct(out, y).float().mean()),
    }


def masked_accuracy(
    model, masks: dict[str, dict | None], views: dict[str, View], batch_size: int = 2048
) -> pd.DataFrame:
    """Rows ``(mask, view, items, loss, accuracy)`` for every mask (None: unmasked) on every
    view."""
    rows = [
        {"mask": name, "view": v, **score(model, m, view, batch_size)}
        for name, m in masks.items()
        for v, view in views.items()
    ]
    return pd.DataFrame(rows)


def inverse(
    mask: dict[str, torch.Tensor],
    roles: dict[str, str],
    policy: str = "invert",
    reference: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """``~mask``, with the input/output layers handled by ``policy`` (see module docstring)."""
    if policy not in INVERSE_IO:
        raise ValueError(
            f"masks.inverse_io: {policy!r} not allowed; allowed: " + ", ".join(INVERSE_IO)
        )
    if policy == "reference" and reference is None:
        raise ValueError("masks.inverse_io: 'reference' needs a reference mask")
    out = {}
    for n, m in mask.items():
        io_layer = roles.get(n) in ("input", "output")
        if policy == "invert" or not io_layer:
            out[n] = ~m
        elif policy == "ones":
            out[n] = torch.ones_like(m)
        else:
            out[n] = reference[n]
    return out


def inverse_test(
    model,
    masks: dict[str, dict],
    views: dict[str, View],
    roles: dict[str, str],
    policy: str = "invert",
    reference: dict | None = None,
    batch_size: int = 2048,
) -> pd.DataFrame:
    """Rows ``(mask, view, accuracy, unmasked_accuracy, drop)``: each mask inverted, on every
    view; ``drop = unmasked - inverted accuracy``."""
    unmasked = {v: score(model, None, view, batch_size)["accuracy"] for v, view in views.items()}
    rows = []
    for name, mask in masks.items():
        inv = inverse(mask, roles, policy, reference)
        for v, view in views.items():
            acc = score(model, inv, view, batch_size)["accuracy"]
            rows.append(
                {
                    "mask": name,
                    "view": v,
                    "policy": policy,
                    "accuracy": acc,
                    "unmasked_accuracy": unmasked[v],
                    "drop": unmasked[v] - acc,
                }
            )
    return pd.DataFrame(rows)


def half_subsets(
    layers: list[MaskedLayer], random_halves: int = 5, seed: int = 0
) -> dict[str, list[str]]:
    """``name -> layer names``: ``early`` / ``late`` halves in forward order, then up to
    ``random_halves`` distinct random ``ceil(L/2)``-subsets (``random<i>``) and their
    complements (``random<i>_rest``)."""
    names = [layer.name for layer in layers]
    half = math.ceil(len(names) / 2)
    out = {"early": names[:half], "late": names[half:]}
    rng = np.random.default_rng(seeding.derive(seed, "half-mask"))
    wanted = min(random_halves, math.comb(len(names), half))
    chosen: list[tuple[int, ...]] = []
    while len(chosen) < wanted:
        pick = tuple(sorted(rng.choice(len(names), half, replace=False).tolist()))
        if pick not in chosen:
            chosen.append(pick)
    for i, pick in enumerate(chosen):
        out[f"random{i}"] = [names[j] for j in pick]
        out[f"random{i}_rest"] = [n for j, n in enumerate(names) if j not in pick]
    return out


def half_mask_test(
    model,
    mask: dict[str, torch.Tensor],
    layers: list[MaskedLayer],
    view: View,
    random_halves: int = 5,
    seed: int = 0,
    batch_size: int = 2048,
) -> pd.DataFrame:
    """Rows ``(subset, layers, accuracy, full_mask_accuracy, drop)`` for the subsets of
    :func:`half_subsets` (the mask applied only to the listed layers)."""
    full = score(model, mask, view, batch_size)["accuracy"]
    params = {layer.name: layer.params for layer in layers}
    rows = []
    for subset, names in half_subsets(layers, random_halves, seed).items():
        keep = {p for n in names for p in params[n]}
        partial = {p: m for p, m in mask.items() if p in keep}
        acc = score(model, partial, view, batch_size)["accuracy"]
        rows.append(
            {
                "subset": subset,
                "layers": ",".join(names),
                "accuracy": acc,
                "full_mask_accuracy": full,
                "drop": full - acc,
            }
        )
    return pd.DataFrame(rows)
