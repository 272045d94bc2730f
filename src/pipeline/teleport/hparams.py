"""The ``teleport`` hyperparameter section of a training run (torch-free: the config reads it).

A study with a ``teleport:`` block (or ``teleport.<key>`` in its sweep) trains every run through
:class:`pipeline.teleport.training.TeleportCallback`; ``mode: none`` is the no-teleport arm.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.config import register_section


def _h(text: str, **kw):
    return field(metadata={"help": text}, **kw)


@dataclass(frozen=True)
class TeleportHparams:
    mode: str = _h("none, teleport, pseudo or same_distribution", default="none")
    sampling: str = _h(
        "intra_landscape, inter_landscape, centered, positive or negative",
        default="inter_landscape",
    )
    cob_range: float = _h("range of the change of basis", default=0.9)
    center: float = _h("centre of the centered sampling", default=1.0)
    every_n_epochs: int = _h(
        "0: teleport once, before the first update; n: every n epochs", default=0
    )
    norm_inputs: bool = _h("give BatchNorm inputs their own factors", default=True)
    residual: str = _h(
        "per_branch (the paper's group: skip edge and branch their own factors at every Add) "
        "or tied (one factor per residual-stream channel)",
        default="per_branch",
    )
    histogram_bins: int = _h("bins of the same-distribution control", default=1000)
    initializer: str = _h(
        "none, normal or xavier: re-initialise before training (Fig. 9)", default="none"
    )
    init_gain: float = _h("std (normal) or gain (xavier) of the initializer", default=0.02)


@register_section("teleport")
def teleport_section():
    """The teleport section's dataclass."""
    return TeleportHparams
