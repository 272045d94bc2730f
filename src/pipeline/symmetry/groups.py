"""The continuous symmetry groups that give conservation laws, derived from the neuron structure.

- translation: the Linear producing the logits, under softmax cross-entropy (adding a constant
  to every class' weights changes nothing), conserving the column sums of [W | b];
- scale: every BatchNorm-normalised branch (scaling its Linear/Conv by a > 0 changes nothing in
  train mode), conserving its per-neuron squared norm up to weight decay;
- rescale: every neuron whose activation is positively homogeneous (incoming x a, outgoing / a),
  conserving incoming minus outgoing squared norms up to weight decay.

Never from name maps: whatever model the structure describes gets its groups. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.models.reductions import Part, parts
from pipeline.models.structure import NeuronStructure, OutputLayer


@dataclass(frozen=True)
class ConservedSet:
    """Q = sum of squares over ``plus`` minus over ``minus`` (one value per neuron)."""

    symmetry: str
    layer: str
    plus: Part
    minus: Part | None = None

    @property
    def size(self) -> int:
        return self.plus.size


def scale_sets(structure: NeuronStructure) -> list[ConservedSet]:
    by_key = {p.key: p for p in parts(structure)}
    out = []
    for g in structure.groups:
        normed = [b for b, br in enumerate(g.branches) if br.norm]
        for b in normed:
            layer = g.name if len(g.branches) == 1 else f"{g.name}/branch{b}"
            out.append(ConservedSet("scale", layer, by_key[f"{g.name}/linear{b}"]))
    return out


def rescale_sets(structure: NeuronStructure) -> list[ConservedSet]:
    by_key = {p.key: p for p in parts(structure)}
    return [
        ConservedSet("rescale", g.name, by_key[f"{g.name}/in"], by_key[f"{g.name}/out"])
        for g in structure.groups
        if g.homogeneous
    ]


def translation_layer(structure: NeuronStructure, loss: str) -> OutputLayer | None:
    """The logit layer when the loss is softmax cross-entropy, else None."""
    return structure.output if loss == "ce" else None
