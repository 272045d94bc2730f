"""Neural teleportation (Armenta et al.): teleports keep the function, micro-teleports move the
weights orthogonally to the gradient, and a teleport before training speeds SGD up."""

from __future__ import annotations

import numpy as np

from pipeline.claims import register_claim
from pipeline.claims.check import Context, Tables, check


@register_claim(
    "teleport_invariance", tables=("tables/interpolation",), figure="teleport_interpolation"
)
def teleport_invariance(tables: Tables, context: Context, tolerance: float = 1e-5):
    """A teleported network computes the same function: at both ends of the interpolation path
    the teleported network's loss equals the plain one's to 1e-5, relative (fp32).

    Per end (alpha 0 and 1) the largest relative loss difference over the splits."""
    table = tables["tables/interpolation"]
    rows = []
    for alpha in (0.0, 1.0):
        at = table[np.isclose(table.alpha, alpha)]
        plain = at[~at.teleported.astype(bool)].set_index("split").loss
        moved = at[at.teleported.astype(bool)].set_index("split").loss
        common = plain.index.intersection(moved.index)
        if common.empty:
            continue
        rel = ((moved[common] - plain[common]).abs() / plain[common].abs()).max()
        rows.append(check("", f"alpha {alpha:g}", rel, "<=", tolerance))
    return rows


@register_claim("micro_teleport_angle", tables=("tables/micro",), figure="micro_teleport")
def micro_teleport_angle(tables: Tables, context: Context, tolerance: float = 0.25):
    """A micro-teleport moves the weights orthogonally to the gradient: the angle is 90 +/- 0.25
    degrees on every iteration.

    Per model and batch size: the largest |angle - 90| over the iterations."""
    table = tables["tables/micro"]
    grad = table[table.pair == "gradient_vs_teleport"]
    rows = []
    for (model, size), g in grad.groupby(["model", "batch_size"], sort=True):
        dev = float((g.angle - 90.0).abs().max())
        rows.append(check("", f"{model}, batch {size}", dev, "<=", tolerance))
    return rows


def _first_box_epoch(context: Context) -> int | None:
    specs = context.spec.get("figures", {}).values()
    epochs = [min(f["box_epochs"]) for f in specs if f.get("box_epochs")]
    return min(epochs) if epochs else None


@register_claim(
    "teleport_speeds_up_sgd", tables=("tables/validation",), figure="teleport_validation"
)
def teleport_speeds_up_sgd(tables: Tables, context: Context, margin: float = 0.0):
    """Teleporting before training speeds SGD up: at the first box epoch, teleported SGD's mean
    validation accuracy is at least plain SGD's, for each model and optimizer.

    The box pools the learning rates of a seed (each seed is a check) or of all seeds (the
    figure's box, the "all seeds" check); diverged runs count with accuracy 0. The first box
    epoch is the figure's (``box_epochs``), else epoch 1."""
    table = tables["tables/validation"].copy()
    epoch = _first_box_epoch(context) or 1
    at = table[(table.epoch == epoch) & table.teleport.isin(["none", "teleport"])].copy()
    at["accuracy"] = at.accuracy.fillna(0.0)
    rows = []
    for (model, optimizer), g in at.groupby(["model", "optimizer"], sort=True):
        units = [(f"seed~{s}", s, g[g.seed == s]) for s in sorted(g.seed.unique())]
        units.append(("all seeds", None, g))
        for run, seed, part in units:
            mean = part.groupby("teleport").accuracy.mean()
            if {"none", "teleport"} - set(mean.index):
                continue
            rows.append(
                check(
                    run,
                    f"{model}, {optimizer}, epoch {epoch}",
                    mean["teleport"] - mean["none"],
                    ">=",
                    margin,
                    seed,
                )
            )
    return rows
