"""Permutation alignment of two networks: by their weights (git re-basin) or their activations.

Weight matching (Ainsworth et al. 2023): find one permutation ``p_g`` per neuron group ``g`` of
the neuron structure maximising ``sum_params <theta_A, pi(theta_B)>``. Holding the other groups'
permutations fixed, the objective is linear in ``p_g``::

    C_g[i, j] = sum over every slice s of g (Linear/Conv rows, BN affine and statistics,
                outgoing columns)  <A_s[i], pi_{-g}(B)_s[j]>

so ``p_g`` is a linear assignment (scipy's ``linear_sum_assignment``, maximising); the groups
are swept in a seeded random order until no assignment improves. The convention is
:mod:`pipeline.symmetry.actions`': ``permute(theta_B, structure, perms)`` is B aligned to A
(new unit i = old unit ``p[i]``).

Activation matching: ``y_i ~ d_i x_{p(i)}`` from the channel correlation matrix of two layers'
features (a linear assignment on correlations), with least-squares positive scales ``d``; units
whose activation is constant on the probe set are *dead* and reported as such.

Loss barrier on the linear path ``theta(t) = (1-t) theta_A + t theta_B``:
``max_t L(theta(t)) - ((1-t) L(theta_A) + t L(theta_B))`` (accuracy: the mirror image), before
and after aligning B. BatchNorm statistics are re-estimated at every ``t`` (a no-grad pass over
training batches, cumulative average), as interpolated running statistics mean nothing.
"""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import torch
from scipy.optimize import linear_sum_assignment

from pipeline.models.structure import NeuronStructure, Slice, StructureError
from pipeline.modelsym.moments import pair_moments, tensor_blocks
from pipeline.modelsym.similarity import register_similarity
from pipeline.symmetry.actions import group_slices, permute, permuted


def _neuron_rows(t: torch.Tensor, sl: Slice, size: int) -> torch.Tensor:
    """``[size, -1]``: each neuron's entries of ``t`` along the slice's axis."""
    x = t.movedim(sl.axis, 0)[sl.start : sl.start + size * sl.block]
    return x.reshape(size, sl.block, *x.shape[1:]).reshape(size, -1)


def _free_groups(structure: NeuronStructure) -> dict:
    """``group name -> [groups moving with it]``: a group ``tied_to`` another has no permutation
    of its own and follows that group's."""
    free = {g.name: [g] for g in structure.groups if not getattr(g, "tied_to", None)}
    for g in structure.groups:
        parent = getattr(g, "tied_to", None)
        if parent:
            if parent not in free or free[parent][0].size != g.size:
                raise StructureError(
                    f"group {g.name} is tied to {parent!r}, which is not a "
                    "free group of the same size"
                )
            free[parent].append(g)
    return free


def weight_matching(
    state_a: dict, state_b: dict, structure: NeuronStructure, max_sweeps: int = 100, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Permutations aligning ``state_b`` to ``state_a``, one per neuron group."""
    gen = torch.Generator().manual_seed(seed)
    a = {k: v.detach().double() for k, v in state_a.items() if v.is_floating_point()}
    b = {k: v.detach().double() for k, v in state_b.items() if v.is_floating_point()}
    free = _free_groups(structure)
    owned = {name: [sl for g in ms for sl in group_slices(g)] for name, ms in free.items()}
    touching: dict[str, list] = {}  # parameter -> [(free group, slice)] that index it
    for name, slices in owned.items():
        for sl in slices:
            touching.setdefault(sl.param, []).append((name, sl))
    sizes = {name: members[0].size for name, members in free.items()}
    perms = {name: torch.arange(size) for name, size in sizes.items()}
    order = list(free)

    def others_applied(param: str, group: str) -> torch.Tensor:
        """B's ``param`` with every other group's current permutation applied."""
        t = b[param]
        for name, sl in touching[param]:
            if name != group:
                t = permuted(t, sl, perms[name])
        return t

    for _ in range(max_sweeps):
        improved = False
        for gi in torch.randperm(len(order), generator=gen).tolist():
            name, size = order[gi], sizes[order[gi]]
            cost = torch.zeros(size, size, dtype=torch.float64)
            for sl in owned[name]:
                moved = others_applied(sl.param, name)
                cost += _neuron_rows(a[sl.param], sl, size) @ _neuron_rows(moved, sl, size).T
            _, cols = linear_sum_assignment(cost.numpy(), maximize=True)
            new = torch.as_tensor(cols)
            idx = torch.arange(size)
            gain = float(cost[idx, new].sum() - cost[idx, perms[name]].sum())
            if gain > 1e-12 * max(1.0, float(cost.abs().max())):
                perms[name], improved = new, True
        if not improved:
            break
    return perms


def activation_matching(
    x: torch.Tensor, y: torch.Tensor, rows: int | None = None, min_std: float = 1e-12
):
    """Match units of ``y`` to units of ``x`` (features ``[N, C, ...]`` of two models at one
    layer): ``y_i ~ d_i x_{p(i)}``. Returns ``(p, d, live)``: ``live[i]`` is False where
    ``y_i`` or its match is constant on the probe set (there the match means nothing)."""
    m = pair_moments(tensor_blocks(y, rows), tensor_blocks(x, rows))
    corr = m.correlation()  # [C_y, C_x]
    rows_, cols = linear_sum_assignment(corr.cpu().numpy(), maximize=True)
    p = torch.full((corr.shape[0],), -1, dtype=torch.long)
    p[torch.as_tensor(rows_)] = torch.as_tensor(cols)
    std_y = m.centred_norm_a() / m.count**0.5
    std_x = m.centred_norm_b() / m.count**0.5
    live = (std_y > min_std) & (p >= 0)
    live &= std_x[p.clamp_min(0)] > min_std
    sq_x = m.sq_b[p.clamp_min(0)]
    cross = m.cross[torch.arange(len(p)), p.clamp_min(0)]
    d = torch.where(sq_x > 0, cross / sq_x.clamp_min(1e-300), torch.zeros_like(sq_x))
    return p, d, live


# -- linear paths ---------------------------------------------------------------------------------
def interpolate(state_a: dict, state_b: dict, t: float) -> dict:
    """``(1-t) A + t B`` for floating tensors; integer buffers (BN counters) from A."""
    return {
        k: (1 - t) * v + t * state_b[k] if v.is_floating_point() else v for k, v in state_a.items()
    }


def has_batch_norm(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def reestimate_bn(model: torch.nn.Module, batches, eval_modules=()) -> None:
    """Reset every BatchNorm's running statistics and re-estimate them as the cumulative
    average over ``batches`` (inputs only), with the model in train mode except
    ``eval_modules``; the model ends in eval mode."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for m in eval_modules:
        m.eval()
    for x in batches:
        model(x)
    for m, mom in zip(bns, saved, strict=True):
        m.momentum = mom
    model.eval()


@torch.no_grad()
def evaluate_model(model, split, batch_size: int = 1024) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on a split
    (:func:`pipeline.train.optim.evaluate`); the model is left in eval mode."""
    from pipeline.train.optim import evaluate

    model.eval()
    return evaluate(model, split, batch_size=batch_size)


def interpolation_curve(
    model, state_a, state_b, splits: dict, ts, bn_batches=None, batch_size: int = 1024
) -> pd.DataFrame:
    """Loss and accuracy at each ``t`` of the linear path; ``splits``: ``{name: split}``;
    ``bn_batches()``: fresh input batches for BN re-estimation (required with BatchNorm)."""
    work = copy.deepcopy(model)
    bn = has_batch_norm(work)
    if bn and bn_batches is None:
        raise ValueError(
            "the model has BatchNorm: interpolation needs bn_batches to re-estimate its statistics"
        )
    rows = []
    for t in ts:
        work.load_state_dict(interpolate(state_a, state_b, float(t)))
        if bn:
            reestimate_bn(work, bn_batches())
        for name, split in splits.items():
            loss, acc = evaluate_model(work, split, batch_size)
            rows.append({"t": float(t), "split": name, "loss": loss, "accuracy": acc})
    return pd.DataFrame(rows)


def barriers(curve: pd.DataFrame) -> pd.DataFrame:
    """Per split: loss barrier ``max_t L(t) - lerp(L(0), L(1))`` and accuracy barrier
    ``max_t lerp(acc(0), acc(1)) - acc(t)``."""
    out = []
    for split, c in curve.groupby("split", sort=False):
        c = c.sort_values("t")
        t = c.t.to_numpy()
        lo, ac = c.loss.to_numpy(), c.accuracy.to_numpy()
        out.append(
            {
                "split": split,
                "loss_barrier": float(np.max(lo - ((1 - t) * lo[0] + t * lo[-1]))),
                "accuracy_barrier": float(np.max((1 - t) * ac[0] + t * ac[-1] - ac)),
            }
        )
    return pd.DataFrame(out)


def structure_for(model, input_shape, name: str) -> NeuronStructure:
    """The model's neuron structure, or a :class:`StructureError` saying who needs it."""
    from pipeline.models import neuron_structure

    try:
        return neuron_structure(model, input_shape)
    except StructureError as err:
        raise StructureError(
            f"weight matching needs the neuron structure of model {name!r}, which cannot be "
            f"derived: {err}"
        ) from None


@register_similarity("weight_matching")
def weight_matching_barrier(
    pair,
    points: int = 11,
    splits: list = ("train", "test"),
    max_sweeps: int = 100,
    seed: int = 0,
    bn_batches: int = 0,
    batch_size: int = 256,
):
    """Loss/accuracy along the linear path from member a to member b, before and after weight
    matching; columns aligned, t, split, loss, accuracy, loss_barrier, accuracy_barrier.
    ``bn_batches``: training batches for BN re-estimation (0: the whole training split)."""
    from pipeline.modelsym.members import load_member, member_data

    model_a, rec_a = load_member(pair.a, pair.device)
    model_b, rec_b = load_member(pair.b, pair.device)
    name = rec_a["hparams"]["model"]["name"]
    if rec_b["hparams"]["model"] != rec_a["hparams"]["model"]:
        raise ValueError(
            f"{pair.a} and {pair.b} are different architectures; weight matching "
            "needs two members of one zoo"
        )
    structure = structure_for(model_a, rec_a["info"]["input_shape"], name)
    dtype = next(model_a.parameters()).dtype
    data = member_data(rec_a, pair.data_dir, pair.device, dtype)
    parts = {"train": data.train, "val": data.val, "test": data.test}
    unknown = [s for s in splits if parts.get(s) is None]
    if unknown:
        raise ValueError(
            f"weight_matching splits {unknown}: allowed: "
            + ", ".join(k for k, v in parts.items() if v is not None)
        )

    def train_inputs():
        for i, (x, _) in enumerate(data.train.eval_batches(batch_size)):
            if bn_batches and i >= bn_batches:
                break
            yield x

    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    perms = weight_matching(state_a, state_b, structure, max_sweeps, seed)
    aligned_b = permute(state_b, structure, perms)
    ts = np.linspace(0.0, 1.0, points)
    tables = []
    for aligned, target in ((False, state_b), (True, aligned_b)):
        curve = interpolation_curve(
            model_a, state_a, target, {s: parts[s] for s in splits}, ts, train_inputs
        )
        curve = curve.merge(barriers(curve), on="split")
        curve.insert(0, "aligned", aligned)
        tables.append(curve)
    table = pd.concat(tables, ignore_index=True)
    table["moved_fraction"] = float(
        np.mean(np.concatenate([(p != torch.arange(len(p))).numpy() for p in perms.values()]))
    )
    return table
