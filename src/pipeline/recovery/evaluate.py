"""Evaluate a reconstruction against its teacher.

Layer by layer, with ``t_j = [w_j; b_j]`` the teacher's incoming vectors and ``r_k`` the
reconstruction's *in the teacher's basis of the layer below*:

- ``d_w(j, k) = 1 - |cos(t_j, r_k)|`` where the activation has a sign symmetry, else ``1 -
  cos``, on the informative inputs only (plus the bias); one matrix product per layer;
- every teacher neuron's nearest recovered neuron ``k*(j)``, and its ``d_w``; the outgoing
  distance of that pair, ``d_a = 1 - cos(a_j, s a_k)`` with ``s`` the pair's orientation (the
  sign of ``t_j . r_k``) where the activation is odd (tanh, identity, sigmoid) and ``s = 1``
  for even-linear ones (a flip there leaves the outgoing weights alone);
- *excess* neurons: recovered neurons that are no teacher neuron's nearest, each with its
  nearest teacher distance and outgoing norm.

The basis change from one layer to the next: every recovered neuron ``k`` is ``f_k`` times its
nearest teacher neuron ``j`` (``f_k = r_k . t_j / |t_j|^2``: a positive scale for relu, a sign
for tanh), so ``h_k = c_k h_j + o_k`` plus, for even-linear activations, a linear term:

- odd (tanh): ``c_k = f_k``, ``o_k = 0``;
- odd with a constant (sigmoid, ``sigma(-u) = kappa - sigma(u)``, ``kappa = 2 sigma(0)``):
  ``c_k = f_k``, ``o_k = kappa`` where ``f_k < 0``;
- even-linear (relu, softplus: ``sigma(-u) = sigma(u) - lambda u``): ``c_k = |f_k|`` (a
  positive scale, and a flip leaves the outgoing weights alone); the flip's ``-lambda |f_k|
  t_j . h`` is affine in the layer below: its linear part a skip, which the teacher has not and
  which is not compared, its constant ``o_k = lambda b_k`` (``b_k``: the neuron's bias).

The next layer's column for teacher neuron ``j`` is ``sum_{k: j nearest to k} c_k W[:, k]``
and its bias gains ``sum_k o_k W[:, k]``; the next layer's rows (outgoing vectors) are divided
by their neuron's own ``f``. This is exact when the reconstruction equals the teacher up to its
symmetry group, which is the case to detect.

Recovery of a teacher: every layer's inferred width equals the teacher's and every teacher
neuron is matched with ``d_w < tolerance``. A reconstruction's skips (the linear corrections of
even-linear activations, small once its neurons are oriented) are not compared.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from pipeline.models.activations import flip_terms
from pipeline.recovery.chain import Chain, incoming, outgoing
from pipeline.recovery.cluster import cosine_distances, symmetry_of


def _masked(v: torch.Tensor, layer: int, informative) -> torch.Tensor:
    if layer > 0 or informative is None:
        return v
    keep = torch.cat(
        [
            informative.to(v.device),
            torch.ones(v.shape[1] - len(informative), dtype=torch.bool, device=v.device),
        ]
    )
    return v[:, keep]


def compare(
    teacher: Chain,
    teacher_params: dict,
    chain: Chain,
    params: dict,
    informative: torch.Tensor | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(neurons, layers)``: per teacher neuron (and excess neuron) its distances, per layer
    the widths and distance summaries. Both networks are stacks of one."""
    if teacher.depth != chain.depth:
        raise ValueError(
            f"teacher has {teacher.depth} hidden layers, the reconstruction {chain.depth}"
        )
    symmetry = symmetry_of(teacher.activation)
    odd_out = symmetry.sign in ("odd", "odd_constant")
    chain = chain.with_skips(())  # the skips (linear corrections) are no neurons' weights
    t_params = {k: v[0] for k, v in teacher_params.items()}
    r_params = {k: v[0].clone() for k, v in params.items() if not k.startswith("skip.")}
    rows, layers = [], []
    col_map = None  # [K_prev recovered] -> teacher index of the layer below, and the factors
    for layer in range(teacher.depth):
        name = teacher.layers[layer]
        t_in = incoming(teacher, {k: v[None] for k, v in t_params.items()}, layer)[0]
        r_in = incoming(chain, {k: v[None] for k, v in r_params.items()}, layer)[0]
        if col_map is not None:
            r_in = _to_teacher_basis(r_in, col_map, chain.bias)
        d = cosine_distances(
            _masked(t_in, layer, informative),
            _masked(r_in, layer, informative),
            symmetry.sign_invariant,
        )
        nearest_r = d.argmin(dim=1)  # per teacher neuron
        nearest_t = d.argmin(dim=0)  # per recovered neuron
        factor = _factor(r_in, t_in, nearest_t)
        t_out = outgoing(teacher, {k: v[None] for k, v in t_params.items()}, layer)[0]
        r_out = outgoing(chain, {k: v[None] for k, v in r_params.items()}, layer)[0]
        r_bias = r_in[:, -1] if chain.bias else torch.zeros_like(factor)
        this_map = _column_map(nearest_t, factor, r_bias, len(t_in), teacher.activation)
        r_out_aligned = _rows_to_teacher(r_out, layer, teacher, chain, t_params, r_params, this_map)
        sign = torch.sign(factor) if odd_out else torch.ones_like(factor)
        oriented = r_out_aligned * sign[:, None]
        d_out = 1 - torch.nn.functional.cosine_similarity(t_out[:, None, :], oriented[None], dim=-1)
        for j in range(len(t_in)):
            k = int(nearest_r[j])
            rows.append(
                {
                    "layer": name,
                    "kind": "teacher",
                    "neuron": j,
                    "match": k,
                    "d_w": float(d[j, k]),
                    "d_a": float(d_out[j, k]),
                    "sign": int(torch.sign(factor[k])),
                    "out_norm": float(t_out[j].norm()),
                }
            )
        excess = sorted(set(range(len(r_in))) - set(nearest_r.tolist()))
        for k in excess:
            j = int(nearest_t[k])
            rows.append(
                {
                    "layer": name,
                    "kind": "excess",
                    "neuron": k,
                    "match": j,
                    "d_w": float(d[j, k]),
                    "d_a": float(d_out[j, k]),
                    "sign": int(torch.sign(factor[k])),
                    "out_norm": float(r_out[k].norm()),
                }
            )
        matched = d[torch.arange(len(t_in)), nearest_r]
        layers.append(
            {
                "layer": name,
                "teacher_width": len(t_in),
                "inferred_width": len(r_in),
                "excess": len(excess),
                "max_d_w": float(matched.max()),
                "median_d_w": float(matched.median()),
                "unique_matches": len(set(nearest_r.tolist())),
            }
        )
        col_map = this_map
    return pd.DataFrame(rows), pd.DataFrame(layers)


def _factor(r_in: torch.Tensor, t_in: torch.Tensor, nearest: torch.Tensor) -> torch.Tensor:
    """``f_k = r_k . t_j / |t_j|^2`` with ``j`` the nearest teacher neuron of recovered ``k``."""
    return (r_in * t_in[nearest]).sum(1) / (t_in[nearest] ** 2).sum(1)


def _column_map(
    nearest: torch.Tensor, factor: torch.Tensor, bias: torch.Tensor, width: int, activation: str
):
    """``(nearest, c, o, width)``: per recovered neuron (biases ``bias [K]``, zero without)
    its nearest teacher neuron and ``h_k = c_k h_j + o_k`` (the module docstring: ``o_k`` is
    ``kappa`` for a flipped sigmoid neuron, ``lambda b_k`` for a flipped even-linear one), and
    the teacher's width."""
    sign = symmetry_of(activation).sign
    kappa, lam = flip_terms(activation)
    flipped = (factor < 0).to(factor.dtype)
    c = factor.abs() if sign == "even_linear" else factor
    o = kappa * flipped + lam * flipped * bias
    return nearest, c, o, width


def _to_teacher_basis(r_in: torch.Tensor, col_map, bias: bool) -> torch.Tensor:
    """Columns of a recovered layer's incoming vectors ``[K, K_prev (+1)]`` re-expressed on the
    teacher neurons of the layer below (``col_map`` from :func:`_column_map`); the constants
    ``o`` of the neurons below go into the bias."""
    nearest, c, o, width = col_map
    columns = r_in[:, : len(nearest)]
    out = torch.zeros(len(r_in), width, dtype=r_in.dtype, device=r_in.device)
    out.index_add_(1, nearest, columns * c[None, :])
    if bias:
        shift = columns @ o
        out = torch.cat([out, r_in[:, len(nearest) :] + shift[:, None]], dim=1)
    return out


def _rows_to_teacher(r_out, layer, teacher, chain, t_params, r_params, col_map):
    """Outgoing vectors of recovered neurons with the next layer's rows on the teacher's next
    neurons (hidden next layer: its incoming vectors put in the teacher's basis of this layer
    by ``col_map``, each matched to its nearest teacher neuron, each row divided by its
    neuron's ``f`` (a row is ``f`` times its teacher's, flips included), then averaged over
    the recovered neurons sharing a nearest teacher neuron)."""
    if layer == teacher.depth - 1:
        return r_out
    symmetry = symmetry_of(teacher.activation)
    nxt_t = incoming(teacher, {k: v[None] for k, v in t_params.items()}, layer + 1)[0]
    nxt_r = incoming(chain, {k: v[None] for k, v in r_params.items()}, layer + 1)[0]
    nxt_r = _to_teacher_basis(nxt_r, col_map, chain.bias)
    d2 = cosine_distances(nxt_t, nxt_r, symmetry.sign_invariant)
    near2 = d2.argmin(dim=0)
    rows = r_out / _factor(nxt_r, nxt_t, near2)[None, :]  # entries of rows scaled by f
    out = torch.zeros(len(r_out), len(nxt_t), dtype=r_out.dtype, device=r_out.device)
    out.index_add_(1, near2, rows)
    counts = torch.bincount(near2, minlength=len(nxt_t)).clamp_min(1).to(r_out.dtype)
    return out / counts[None, :]


def recovery_summary(layers: pd.DataFrame, tolerance: float = 1e-3) -> bool:
    """True when every layer's width is the teacher's and every teacher neuron has ``d_w <
    tolerance``."""
    return bool(
        ((layers.inferred_width == layers.teacher_width) & (layers.max_d_w < tolerance)).all()
    )


def recovery_table(
    problem: str,
    layers: pd.DataFrame,
    student_test: torch.Tensor,
    reconstruction_test: float,
    tolerance: float = 1e-3,
) -> pd.DataFrame:
    """One row per hidden layer: widths, distances, the held-out probe errors of the best
    student and of the reconstruction, and whether the whole teacher was recovered."""
    table = layers.copy()
    table.insert(0, "problem", problem)
    table["best_student_test"] = float(np.nanmin(student_test.cpu().numpy()))
    table["reconstruction_test"] = float(reconstruction_test)
    table["recovered"] = recovery_summary(layers, tolerance)
    return table
