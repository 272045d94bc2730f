"""Which parameters carry a mask, layer by layer, and each layer's role.

A masked *layer* is a Linear/Conv module: its weight always, its bias when ``biases`` is set
(the paper's ``bias_no_mask`` profiles leave biases out; BatchNorm affine parameters are never
masked). Layers come in module registration order, which is the forward order of every
registered model. Roles are read from the neuron structure, so no model needs a hand-written
map: the ``output`` layer is the structure's logit Linear; an ``input`` layer reads the model
input (no neuron group lists its weight among its outgoing slices); every other layer is
``hidden``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from pipeline.models import neuron_structure

ROLES = ("input", "hidden", "output")
_LINEAR = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class MaskedLayer:
    name: str  # module path, e.g. "fc1"
    params: tuple[str, ...]  # masked parameters: "fc1.weight" (and "fc1.bias")
    role: str  # input | hidden | output


def masked_layers(model: nn.Module, input_shape, biases: bool = False) -> list[MaskedLayer]:
    """The masked layers of ``model`` in forward order, with their roles."""
    structure = neuron_structure(model, tuple(input_shape))
    readers = {sl.param for g in structure.groups for sl in g.outgoing}
    modules = [(n, m) for n, m in model.named_modules() if isinstance(m, _LINEAR)]
    if not modules:
        raise ValueError(f"{type(model).__name__} has no Linear/Conv layer to mask")
    output = structure.output.weight if structure.output else f"{modules[-1][0]}.weight"
    layers = []
    for name, module in modules:
        weight = f"{name}.weight"
        params = (weight,)
        if biases and module.bias is not None:
            params += (f"{name}.bias",)
        role = "output" if weight == output else "hidden" if weight in readers else "input"
        layers.append(MaskedLayer(name, params, role))
    return layers


def masked_params(layers: list[MaskedLayer]) -> list[str]:
    return [p for layer in layers for p in layer.params]


def param_roles(layers: list[MaskedLayer]) -> dict[str, str]:
    """``parameter name -> role`` of its layer."""
    return {p: layer.role for layer in layers for p in layer.params}
