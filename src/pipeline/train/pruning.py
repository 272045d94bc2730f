"""Pruning masks and lottery levels, for any trainer (core: the pruning science trains ordinary
runs with them, Expand-and-Cluster its stacked students).

Masks: which weights a level removes, with exact counts.

A mask is ``{name: tensor of 0/1}`` over the *prunable* tensors (the weights of Linear/Conv
layers; biases and normalisation parameters are never pruned). One level removes, among the
weights still present, the ``ceil(p x remaining)`` of smallest magnitude (ties broken by
position, so the count is exact; OpenLTH's threshold ``|w| > sorted[k]`` removes one more, and
more on ties):

- ``sparse_global``: one ranking over every prunable tensor, fraction ``p``;
- ``fc19`` (Frankle & Carbin 2019): the hidden tensors ranked together at ``p``, the output
  layer on its own at ``p / 2``;
- ``han`` (Han et al. 2015): the ``sparse_global`` ranking; the difference is in the lottery
  (training continues from the pruned trained weights, no rewinding).

Training with a mask: :class:`PruningMasks`, a callback of the training engine
(:mod:`pipeline.train.engine`).

Stacked models (``stacked=True``: every tensor has a leading model axis, e.g. N students):
each model is ranked on its own (``joint=False``: every model gets exactly the requested
count) or all models together (``joint=True``: the published students' behaviour).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

STRATEGIES = ("sparse_global", "fc19", "han")


def prunable_names(
    state: dict, output: str | None = None, stacked: bool = False, exclude: tuple[str, ...] = ()
) -> list[str]:
    """Names of the weights of Linear/Conv layers (``*.weight`` with >= 2 axes per model)."""
    lead = 1 if stacked else 0
    return [
        k
        for k, v in state.items()
        if k.endswith(".weight") and v.dim() - lead >= 2 and k not in exclude
    ]


def ones_mask(state: dict, names: list[str]) -> dict:
    return {k: torch.ones_like(state[k], dtype=torch.bool) for k in names}


def _remove_smallest(
    weights: dict, mask: dict, names: list[str], fraction: float, stacked: bool, joint: bool
) -> dict:
    """Remove ``ceil(fraction x remaining)`` of the present weights of ``names`` with smallest
    magnitude, per model (stacked, not joint) or over everything."""
    if not names:
        return {}
    per_model = stacked and not joint
    rows = weights[names[0]].shape[0] if per_model else 1
    mags = torch.cat([weights[k].detach().abs().reshape(rows, -1) for k in names], dim=1)
    keep = torch.cat([mask[k].reshape(rows, -1) for k in names], dim=1)
    mags = torch.where(
        keep, mags.to(torch.float64), torch.full_like(mags, math.inf, dtype=torch.float64)
    )
    remaining = keep.sum(dim=1)
    count = torch.ceil(fraction * remaining.to(torch.float64) - 1e-9).long()
    order = torch.argsort(mags, dim=1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1]).expand_as(order).contiguous())
    new_keep = keep & (rank >= count[:, None])
    out, offset = {}, 0
    for k in names:
        size = mask[k].numel() // rows
        out[k] = new_keep[:, offset : offset + size].reshape(mask[k].shape)
        offset += size
    return out


def prune(
    weights: dict,
    mask: dict,
    strategy: str,
    fraction: float,
    output: str | None = None,
    stacked: bool = False,
    joint: bool = False,
) -> dict:
    """The next level's mask (a new dict; ``mask`` is not modified). ``mask`` holds every
    prunable tensor; ``output``: the output layer's weight name (``fc19``)."""
    if strategy not in STRATEGIES:
        raise ValueError(
            f"pruning.strategy: {strategy!r} not allowed; allowed: {', '.join(STRATEGIES)}"
        )
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"pruning.fraction must be in [0, 1), got {fraction}")
    names = list(mask)
    if strategy == "fc19":
        if output not in mask:
            raise KeyError(
                f"pruning fc19 needs the output layer's weight in the mask; "
                f"output={output!r}, masked: {names}"
            )
        hidden = [k for k in names if k != output]
        new = _remove_smallest(weights, mask, hidden, fraction, stacked, joint)
        new.update(_remove_smallest(weights, mask, [output], fraction / 2, stacked, joint))
        return new
    return _remove_smallest(weights, mask, names, fraction, stacked, joint)


def remaining_after(total: int, fraction: float, levels: int) -> int:
    """Weights left of ``total`` after ``levels`` levels at ``fraction`` (one ranking)."""
    for _ in range(levels):
        total -= math.ceil(fraction * total - 1e-9)
    return total


def sparsity(mask: dict, stacked: bool = False) -> torch.Tensor | float:
    """Fraction of pruned entries: a float, or per model ``[N]`` when ``stacked``."""
    if stacked:
        n = next(iter(mask.values())).shape[0]
        kept = sum(m.reshape(n, -1).sum(1) for m in mask.values())
        total = sum(m[0].numel() for m in mask.values())
        return 1 - kept.to(torch.float64) / total
    kept = sum(int(m.sum()) for m in mask.values())
    total = sum(m.numel() for m in mask.values())
    return 1 - kept / total


class PruningMasks:
    """Train with pruning masks (an engine callback): masked weights are zero and stay zero.

    The weights are masked when training starts, the gradients before every optimizer step and
    the weights after it, so Adam's moments of pruned weights stay zero too. ``params``: the
    model's ``{name: parameter}``; ``mask``: ``{name: 0/1 tensor}`` over some of them."""

    def __init__(self, params: dict, mask: dict):
        self.params = params
        self.masks = {k: m.to(params[k].device, params[k].dtype) for k, m in mask.items()}

    def mask_weights(self) -> None:
        with torch.no_grad():
            for k, m in self.masks.items():
                self.params[k].mul_(m)

    def on_start(self, run) -> None:
        self.mask_weights()

    def before_update(self, run) -> None:
        for k, m in self.masks.items():
            self.params[k].grad.mul_(m)

    def after_update(self, run, out) -> None:
        self.mask_weights()


def apply(state: dict, mask: dict) -> dict:
    """``state`` with every masked tensor multiplied by its mask."""
    return {k: (v * mask[k].to(v.dtype) if k in mask else v) for k, v in state.items()}


@dataclass(frozen=True)
class LotteryHparams:
    strategy: str = "sparse_global"
    fraction: float = 0.2  # of the remaining weights, per level (fc19: output layer at half)
    levels: int = 5
    rewind_step: int = 0  # 0: rewind to the initialisation
    joint: bool = False  # stacked models: rank all models' weights together
    # sparse_global/han: is the output layer prunable too? OpenLTH (and Expand-and-Cluster's
    # students) leave it out; fc19 prunes it at half the rate whatever this says
    prune_output: bool = False

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(
                f"lottery.strategy: {self.strategy!r} not allowed; allowed: {', '.join(STRATEGIES)}"
            )

    @property
    def rewinds(self) -> bool:
        return self.strategy != "han"


def lottery(
    train_level,
    state0: dict,
    names: list[str],
    output: str | None,
    h: LotteryHparams,
    stacked: bool = False,
    done: dict | None = None,
):
    """Run the levels. ``train_level(start_state, mask, level, start_step)`` returns
    ``(final_state, rewind_state, metrics)`` (``rewind_state``: the weights after
    ``h.rewind_step`` steps, needed from level 0 only). ``done``: ``{level: (mask, final,
    metrics)}`` of finished levels to reuse (resume). Yields ``(level, mask, final, metrics)``."""
    done = done or {}
    mask = ones_mask(state0, names)
    rewind_state = None
    final = None
    for level in range(h.levels + 1):
        if level > 0:
            mask = prune(apply(final, mask), mask, h.strategy, h.fraction, output, stacked, h.joint)
        if level in done:
            mask, final, metrics = done[level]
            if level == 0:
                rewind_state = metrics.pop("_rewind")
            yield level, mask, final, metrics
            continue
        if level == 0:
            start, step = state0, 0
        elif h.rewinds:
            start, step = apply(rewind_state, mask), h.rewind_step
        else:
            start, step = apply(final, mask), 0
        final, rewound, metrics = train_level(start, mask, level, step)
        if level == 0:
            rewind_state = rewound
            metrics = {**metrics, "_rewind": rewound}
        yield level, mask, final, metrics
        metrics.pop("_rewind", None)
