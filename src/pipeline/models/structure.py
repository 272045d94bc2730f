"""The neuron structure of a model: the spine every symmetry operation reads.

For each hidden *neuron group* (a set of units permuted together: one layer's channels, or a whole
residual stream tied by its Add joins) the structure says which slices of which parameters are
each neuron's

- ``branches``: the computations summed into the neuron's pre-activation. Each branch is a
  Linear/Conv (``linear``: its weight rows and bias, neuron axis 0) optionally followed by a
  BatchNorm (``norm``: its affine weight and bias; ``stats``: running mean and variance, which
  scale with power 1 and 2 when the linear part is scaled);
- ``outgoing``: the weights that read the neuron (the input axis of the next Linear/Conv; through
  a Flatten each neuron owns ``block`` consecutive columns);
- ``activation`` and whether a max-pool acts on it (max-pool commutes with positive scaling and
  permutation, not with sign flips);
- ``normalised_by``: the running statistics of BatchNorms that read the neurons *after* other
  operations (a BatchNorm after a concatenation, as in DenseNet, or after an activation). They
  scale with the neurons' output (mean: power 1, variance: power 2);
- ``tied_to``: for the neurons a BatchNorm outputs when it reads other neurons (a *consumer*
  normalisation), the group it reads: these neurons have their own scale (the BatchNorm's affine
  weight and bias are their incoming slices) but follow the read group's permutation;
- ``sites``: where in the fx trace the activation and max-pools act on the neurons (node name and
  channel offset), so a change of basis can modify exactly those operations;
- ``joins``: for a residual stream, every Add that sums two of its branches (node name, which
  argument is the second summand, the branches of both summands), and on every outgoing slice,
  normalisation and site the ``branch`` whose output the stream holds there (the first summand's
  of the last Add before it). The tied group (one factor per channel) ignores them; the
  original neural-teleportation group gives each branch its own factor and the second summand of
  every Add the ratio of the two (:mod:`pipeline.teleport.cob`).

Also the ``output`` layer: the Linear producing the logits (translation symmetry of softmax-CE).

:func:`pipeline.models.derivation.derive` reads all of this from a torch.fx trace of the model
(so a registered model needs no hand-written map).

The dataclasses are plain data (JSON round trip), importable without torch, so the metric cache
can use them on stored artifacts.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from pipeline.models import activations


@dataclass(frozen=True)
class Slice:
    """Entries of parameter ``param`` owned by the neurons of a group, along ``axis``.

    Neuron ``i`` owns entries ``start + i*block ... start + (i+1)*block - 1``. ``power`` is how the
    entries scale when the neuron's linear pre-activation is scaled by ``a`` (``a**power``).
    ``branch``: for a slice reading the neurons (outgoing weights, downstream statistics), the
    index of the group's branch whose output it reads (0 but on residual streams).
    """

    param: str
    axis: int
    start: int = 0
    block: int = 1
    power: int = 1
    branch: int = 0


@dataclass(frozen=True)
class Site:
    """An operation acting on a group's neurons in the fx trace of the model: node ``node`` (an
    activation, ``kind="act"``, or a max-pool, ``kind="pool"``) whose input holds neuron ``i`` at
    channels ``start + i*block ... start + (i+1)*block - 1`` (axis 1); ``branch``: the group's
    branch whose output the input holds (0 but on residual streams)."""

    node: str
    kind: str
    start: int = 0
    block: int = 1
    branch: int = 0


@dataclass(frozen=True)
class Join:
    """A residual Add summing two branches of a group: fx node ``node``, whose argument
    ``arg`` (the second summand: a position, or a keyword's name) holds neuron ``i`` at channels
    ``start + i*block ...``; the
    first summand holds branch ``first``'s output and the second branch ``second``'s. The sum
    holds ``first``'s (its layout is the first summand's)."""

    node: str
    arg: int | str
    first: int
    second: int
    start: int = 0
    block: int = 1


@dataclass(frozen=True)
class Branch:
    linear: tuple[Slice, ...]
    norm: tuple[Slice, ...] = ()
    stats: tuple[Slice, ...] = ()

    @property
    def incoming(self) -> tuple[Slice, ...]:
        """The last linear map into the neuron: BN's affine if present, else the Linear/Conv."""
        return self.norm or self.linear


@dataclass(frozen=True)
class NeuronGroup:
    name: str
    size: int
    branches: tuple[Branch, ...]
    outgoing: tuple[Slice, ...]
    activation: str = "identity"
    max_pool: bool = False
    normalised_by: tuple[Slice, ...] = ()
    tied_to: str | None = None
    sites: tuple[Site, ...] = ()
    joins: tuple[Join, ...] = ()
    tied_branch: int = 0  # the branch of ``tied_to`` a consumer BatchNorm reads

    @property
    def incoming(self) -> tuple[Slice, ...]:
        return tuple(s for b in self.branches for s in b.incoming)

    @property
    def homogeneous(self) -> bool:
        """Positive rescaling (incoming x a, outgoing / a, ``normalised_by`` x a**power) leaves
        the function unchanged (with ``normalised_by``: up to BatchNorm's eps)."""
        return activations.get(self.activation).homogeneous

    @property
    def odd(self) -> bool:
        """Sign flips (incoming x -1, outgoing x -1) leave the function unchanged (not when a
        max-pool or a downstream BatchNorm reads the neurons)."""
        return activations.get(self.activation).odd and not self.max_pool and not self.normalised_by


@dataclass(frozen=True)
class OutputLayer:
    """The Linear producing the logits: ``weight [classes, inputs]`` and optional ``bias``."""

    weight: str
    bias: str | None
    size: int


@dataclass(frozen=True)
class NeuronStructure:
    groups: tuple[NeuronGroup, ...]
    output: OutputLayer | None = None
    notes: tuple[str, ...] = field(default=())

    def group(self, name: str) -> NeuronGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(f"no neuron group {name!r}; groups: {[g.name for g in self.groups]}")

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> NeuronStructure:
        raw = json.loads(text)

        def slices(items):
            return tuple(Slice(**s) for s in items)

        groups = tuple(
            NeuronGroup(
                g["name"],
                g["size"],
                tuple(
                    Branch(slices(b["linear"]), slices(b["norm"]), slices(b["stats"]))
                    for b in g["branches"]
                ),
                slices(g["outgoing"]),
                g["activation"],
                g["max_pool"],
                slices(g.get("normalised_by", ())),
                g.get("tied_to"),
                tuple(Site(**s) for s in g.get("sites", ())),
                tuple(Join(**j) for j in g.get("joins", ())),
                g.get("tied_branch", 0),
            )
            for g in raw["groups"]
        )
        out = OutputLayer(**raw["output"]) if raw["output"] else None
        return cls(groups, out, tuple(raw.get("notes", ())))


class StructureError(ValueError):
    """The model contains an operation the structure derivation does not understand."""
