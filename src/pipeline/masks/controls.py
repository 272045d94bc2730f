"""Controls applied to a trained network before its masks are learned.

``copy_pairs`` (double addition, the paper's ``copyweight`` control): the input features and the
outputs each come in two equal halves, pair 1 then pair 2. Copying pair 2's input weights (the
second half of the input layer's columns) over pair 1's, and pair 2's output rows (weights and
bias) over pair 1's, makes the two pathways compute the same function with the same hidden
weights, so any difference between the two pairs' masks is then down to the mask training, not
the network.
"""

from __future__ import annotations

import torch

from pipeline.masks.layers import MaskedLayer

CONTROLS = ("none", "copy_pairs")


@torch.no_grad()
def copy_pairs(model: torch.nn.Module, layers: list[MaskedLayer]) -> None:
    """Pair 2's input columns over pair 1's, pair 2's output rows over pair 1's (in place)."""
    params = dict(model.named_parameters())
    inputs = [layer for layer in layers if layer.role == "input"]
    outputs = [layer for layer in layers if layer.role == "output"]
    if len(inputs) != 1 or len(outputs) != 1:
        raise ValueError("copy_pairs needs exactly one input and one output layer")
    w = params[f"{inputs[0].name}.weight"]
    if w.ndim != 2 or w.shape[1] % 2:
        raise ValueError(f"copy_pairs: input layer weight {tuple(w.shape)} has no two halves")
    half = w.shape[1] // 2
    w[:, :half] = w[:, half:]
    for suffix in ("weight", "bias"):
        p = params.get(f"{outputs[0].name}.{suffix}")
        if p is not None:
            if p.shape[0] % 2:
                raise ValueError(f"copy_pairs: output {suffix} {tuple(p.shape)} has no two halves")
            p[: p.shape[0] // 2] = p[p.shape[0] // 2 :]


def apply_control(model: torch.nn.Module, layers: list[MaskedLayer], control: str) -> None:
    if control == "none":
        return
    if control == "copy_pairs":
        copy_pairs(model, layers)
        return
    raise ValueError(f"masks.control: {control!r} not allowed; allowed: {', '.join(CONTROLS)}")
