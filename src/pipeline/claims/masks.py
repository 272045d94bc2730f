"""Weight masks (Csordas et al. 2021): networks specialise (P_specialize), do not reuse weights
for identical subtasks (P_reuse: no), and hold class-specific weights.

Every masks table has a ``run`` column; a mask's subtask is its stage's ``subtask`` in the
study's ``masks`` block.
"""

from __future__ import annotations

from pipeline.claims import register_claim
from pipeline.claims.check import Context, Tables, check


def _seed(context: Context, run: str):
    return context.runs.get(run, {}).get("seed")


def _subtasks(context: Context) -> dict[str, str]:
    return {name: st["subtask"] for name, st in context.spec["masks"].get("stages", {}).items()}


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else (float("inf") if num > 0 else float("nan"))


@register_claim(
    "inverse_mask_specialises", tables=("masks/tables/inverse", "masks/tables/accuracy")
)
def inverse_mask_specialises(
    tables: Tables, context: Context, factor: float = 3.0, solves: float = 0.5
):
    """Removing a subtask's weights (the inverted mask) drops that subtask's accuracy at least
    3x more than any other subtask's (add vs mul; pair 1 vs pair 2 of double addition) - of a
    mask that solves its subtask: alone it keeps at least half the network's accuracy there
    (a mask that solves little removes little, and its ratio says nothing).

    Per run, mask and other subtask: own drop / other drop; per run and mask: the mask's
    accuracy on its subtask / the unmasked network's."""
    table, accuracy = tables["masks/tables/inverse"], tables["masks/tables/accuracy"]
    acc = {(r.run, r.mask, r.view): r.accuracy for r in accuracy.itertuples()}
    subtask = _subtasks(context)
    rows = []
    for (run, mask), g in table.groupby(["run", "mask"], sort=True):
        drops = g.set_index("view")["drop"]
        own = subtask.get(mask)
        if own not in drops.index:
            continue
        if (run, mask, own) in acc and (run, "none", own) in acc:
            rows.append(
                check(
                    run,
                    f"{mask} alone solves {own}",
                    _ratio(acc[(run, mask, own)], acc[(run, "none", own)]),
                    ">=",
                    solves,
                    _seed(context, run),
                )
            )
        for other in sorted(set(drops.index) - {own}):
            rows.append(
                check(
                    run,
                    f"remove {mask}: {own} vs {other}",
                    _ratio(drops[own], drops[other]),
                    ">=",
                    factor,
                    _seed(context, run),
                )
            )
    return rows


def _hidden_iou(table):
    hidden = table[(table.kind == "role") & (table.layer == "hidden")]
    return {(r.run, r.a, r.b): r.iou for r in hidden.itertuples()}


@register_claim(
    "specialised_masks_overlap_less",
    tables=("masks/tables/overlap", "masks/tables/stability"),
    figure="mask_iou",
)
def specialised_masks_overlap_less(tables: Tables, context: Context):
    """Masks of two subtasks overlap less than two masks of one subtask trained on different
    data orders: the hidden-layer IoU of add and mul is below that of add/add and mul/mul.

    Per run and pair of different-subtask masks: value their hidden IoU, threshold the smallest
    hidden IoU of the two same-subtask pairs."""
    overlap, stability = tables["masks/tables/overlap"], tables["masks/tables/stability"]
    if overlap.empty or stability.empty:
        return []
    subtask = _subtasks(context)
    different = _hidden_iou(overlap)
    same = _hidden_iou(stability)
    rows = []
    for (run, a, b), iou in sorted(different.items()):
        if subtask.get(a) == subtask.get(b):
            continue
        pair = (subtask.get(a), subtask.get(b))
        controls = [v for (r, x, _), v in same.items() if r == run and subtask.get(x) in pair]
        if not controls:
            continue
        rows.append(check(run, f"{a} vs {b}", iou, "<", min(controls), _seed(context, run)))
    return rows


@register_claim("pairs_do_not_share", tables=("masks/tables/overlap",), figure="mask_iou")
def pairs_do_not_share(tables: Tables, context: Context, limit: float = 0.5):
    """Identical subtasks on separate inputs use different weights (P_reuse: no): the hidden
    IoU of the double-addition pairs' masks is below 0.5.

    Studies on the double-addition task; per run and pair of masks of different subtasks."""
    if context.spec.get("dataset", {}).get("name") != "double_add":
        return []
    overlap = tables["masks/tables/overlap"]
    if overlap.empty:
        return []
    subtask = _subtasks(context)
    return [
        check(run, f"{a} vs {b}", iou, "<", limit, _seed(context, run))
        for (run, a, b), iou in sorted(_hidden_iou(overlap).items())
        if subtask.get(a) != subtask.get(b)
    ]


@register_claim(
    "class_removal_is_specific",
    tables=("masks/tables/class_drop",),
    figure="confusion_difference",
)
def class_removal_is_specific(tables: Tables, context: Context, factor: float = 3.0):
    """Class-specific weights exist: masking out a class's weights drops that class at least 3x
    more than the largest drop of any other class.

    Per run and removed class: target drop / largest other drop (relative drops, in percent)."""
    table = tables["masks/tables/class_drop"]
    return [
        check(
            r.run,
            f"class {r.removed}",
            _ratio(r.target_drop, r.largest_other_drop),
            ">=",
            factor,
            _seed(context, r.run),
        )
        for r in table.itertuples()
    ]
