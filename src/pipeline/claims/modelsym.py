"""Model symmetries (Godfrey et al. 2022): independently trained ReLU networks differ mostly by
an element of G_ReLU (permutations times positive scalings) at their activations.

Penalties are in accuracy units (0.15 = 15 points): the members' mean test accuracy minus the
stitched (or retrained) network's. A stitching type is found by its registered ``type`` (and
``options``), not by its label in the config. Each claim checks the rows its figure shows (the
figure's ``where``, e.g. one zoo), every row where the study has no such figure.
"""

from __future__ import annotations

import json

import pandas as pd

from pipeline.claims import register_claim
from pipeline.claims.check import Context, Tables, check


def _pair(zoo, a, b) -> str:
    return f"{zoo}: seeds {int(a)},{int(b)}"


def _of_type(table: pd.DataFrame, kind: str, **options) -> pd.DataFrame:
    """The rows of stitching type ``kind`` whose options include ``options``."""
    rows = table[table.type == kind]
    if options and len(rows):
        keep = [all(json.loads(o).get(k) == v for k, v in options.items()) for o in rows.options]
        rows = rows[keep]
    return rows


def _penalties(rows: pd.DataFrame) -> pd.Series:
    """Penalty per (zoo, seed_a, seed_b, position, layer); the smallest where one type has
    several labels (e.g. two alphas)."""
    keys = ["zoo", "seed_a", "seed_b", "position", "layer"]
    return rows.groupby(keys, sort=True).penalty.min()


@register_claim(
    "grelu_stitching_close_to_linear", tables=("tables/stitching",), figure="stitching_penalty"
)
def grelu_stitching_close_to_linear(tables: Tables, context: Context, points: float = 0.15):
    """G_ReLU stitching (a permutation times positive scales) costs at most 15 points more than
    a full linear stitching layer, at every layer (the paper: 6-17 points against 1.5-2.7).

    Per pair and layer: G_ReLU penalty <= linear penalty + 0.15."""
    table = context.shown(tables["tables/stitching"], "stitching_penalty")
    grelu, linear = _penalties(_of_type(table, "birkhoff")), _penalties(_of_type(table, "linear"))
    rows = []
    for key in grelu.index.intersection(linear.index):
        zoo, a, b, position, layer = key
        rows.append(
            check(
                _pair(zoo, a, b),
                f"layer {position} ({layer})",
                grelu[key],
                "<=",
                linear[key] + points,
            )
        )
    return rows


@register_claim(
    "grelu_stitching_beats_rank1", tables=("tables/stitching",), figure="stitching_penalty"
)
def grelu_stitching_beats_rank1(tables: Tables, context: Context):
    """G_ReLU stitching beats a rank-1 stitching layer at every layer (the paper: 6-17 points
    against 42-63).

    Per pair and layer: G_ReLU penalty < rank-1 penalty."""
    table = context.shown(tables["tables/stitching"], "stitching_penalty")
    grelu = _penalties(_of_type(table, "birkhoff"))
    rank1 = _penalties(_of_type(table, "low_rank", rank=1))
    rows = []
    for key in grelu.index.intersection(rank1.index):
        zoo, a, b, position, layer = key
        rows.append(
            check(_pair(zoo, a, b), f"layer {position} ({layer})", grelu[key], "<", rank1[key])
        )
    return rows


@register_claim("rotation_grelu_absorbed", tables=("tables/rotation",), figure="rotation_penalty")
def rotation_grelu_absorbed(tables: Tables, context: Context):
    """A random G_ReLU map inserted after a layer is absorbed by retraining the layers above at
    least as well as a random orthogonal map: G_ReLU penalty <= orthogonal penalty at every
    layer (the paper: 0/1.7/1.3 against 0.7/4.6/8.3 points).

    Per member and layer, penalties averaged over the repeats. The comparison needs a layer
    that is a bottleneck for the task: with units to spare both maps are absorbed and it is
    noise (``benchmarks/bench_rotation_widths.py``: on the digits, 32-unit MLPs against 8)."""
    table = context.shown(tables["tables/rotation"], "rotation_penalty")
    mean = table.groupby(["zoo", "seed", "position", "layer", "group"], sort=True).penalty.mean()
    wide = mean.unstack("group")
    if not {"grelu", "orthogonal"} <= set(wide.columns):
        return []
    return [
        check(
            f"{zoo}: seed {int(seed)}",
            f"layer {position} ({layer})",
            r.grelu,
            "<=",
            r.orthogonal,
            seed,
        )
        for (zoo, seed, position, layer), r in wide.iterrows()
    ]


@register_claim(
    "weight_matching_removes_barrier",
    tables=("tables/alignment",),
    figure="weight_matching_barrier",
)
def weight_matching_removes_barrier(tables: Tables, context: Context, factor: float = 0.2):
    """Weight matching (a permutation of the second network's neurons) removes most of the loss
    barrier on the linear path between two networks: after matching it is below 0.2x the
    barrier before.

    Per pair and split: barrier after < 0.2 x barrier before. Git Re-Basin (Ainsworth et al.)
    finds this for wide enough networks only: the claim checks the zoos the barrier figure
    shows."""
    table = tables["tables/alignment"]
    if "metric" not in table or not (table.metric == "weight_matching").any():
        return []
    wm = context.shown(table[table.metric == "weight_matching"], "weight_matching_barrier")
    barrier = wm.groupby(["zoo", "seed_a", "seed_b", "split", "aligned"], sort=True).loss_barrier
    wide = barrier.first().unstack("aligned")
    return [
        check(_pair(zoo, a, b), f"{split} loss", r[True], "<", factor * r[False])
        for (zoo, a, b, split), r in wide.iterrows()
        if True in r and False in r
    ]
