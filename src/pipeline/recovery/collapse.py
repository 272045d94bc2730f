"""Collapse clustered students into one network (Expand-and-Cluster, steps 5-6), finetune it
and prune what it does not need.

Before clustering, inputs constant over the probe data (``informative`` mask) are folded into
the first layer's bias (``b += w_p c_p``, ``w_p = 0``): the students' functions on the data are
unchanged and the unidentifiable weights no longer separate copies of one neuron.

After clustering a layer (:func:`pipeline.recovery.cluster.cluster_layer`), kept clusters whose
neuron is (almost) affine on the data are dropped (``dropped_linear``: ``1 - R^2`` of
``sigma(z)`` against ``z`` below ``min_nonlinearity`` x that of a neuron with unit Gaussian
pre-activations; relu active on almost none or all of the data, tanh near 0): students carry
linear terms with them (the linear parts of sign-flipped relu copies) and they are not
identifiable as neurons.

5. *Collapse*: each kept cluster becomes one neuron: the mean (in the cluster's orientation) of
   its winner's members, the winner being the best-ranked student owning a member (any
   student; with ``winners: 5``, published, the best of the five best, else the cluster was
   dropped). Outgoing weights of student n: the sum over its members of ``a_i |v_i| s_i``
   (``s_i = +-1`` the member's orientation, applied where the activation is odd; even-linear
   flips leave ``a_i`` and a linear term; a sigmoid flip adds ``a_i`` to the next bias, since
   ``sigmoid(-z) = 1 - sigmoid(z)``).
6. Hidden layers before the last, layer by layer as the paper describes: the K recovered
   neurons go into every student, each keeping its merged outgoing weights and its upper
   layers; the students are refitted (``finetune``) and the next layer is read from *these
   refitted* students (the published code reads stale weights: the preset does not copy
   that). With ``freeze`` the recovered layers stay fixed during the refit, so every student
   reads the next layer in one basis (published: all weights train). Students polished to
   round-off (``students_polish``, the expand stage's L-BFGS) are refitted by that same polish
   (``refit_as_students``): the refit must reach the students' own precision, or the next
   layer's incoming vectors carry the collapse's error and are not identifiable (two-layer
   relu teachers, measured: an Adam refit recovers 2 of 7, the polish 5 of 7). With
   ``layer_correction`` each student first gets the least-squares correction of the next
   layer's pre-activations in the collapsed layer's *own* input space (:func:`correct_layer`:
   a flipped even-linear copy leaves ``-a z``, linear in that layer's inputs, which for the
   layers above the first are the previous layer's activations, not the network's inputs),
   and the recovered neurons are flipped into the orientation that needs none
   (:func:`orient`: the teacher has no skips).
   The last hidden layer: one network; its output columns from each cluster's winner, lower
   layers and output bias from the best student. Then an exact bias correction (least squares
   of the residual on a constant) or, for even-linear activations, an affine correction
   (least squares, then trained along) in the last hidden layer's input space (the inputs for
   one hidden layer, as published), oriented away where ``layer_correction`` is on.

Finally the network is finetuned. Twin neurons (one teacher neuron that the fit split into two
copies pointing the same way, within ``merge_angle``) are folded into one and the network
refitted (``merged``, kept if the refit stays within ``redundant_factor``). Neurons it then
does not need are dropped and it is finetuned again: those with a contribution
``std(sigma(z)) |a|`` below ``min_contribution`` x their layer's largest or linear on the data
(``dropped_weak``, ``prune_rounds`` times at most, each time only if the refit stays within
``redundant_factor``: a relu neuron active on few probe points is weak by that measure and
still needed), then, one by one and weakest first, those
whose removal the refit does not notice (within ``redundant_factor`` of the loss before any
removal, and only if the network fits the data about as well as the best student;
``dropped_redundant``): the teacher is the smallest network with its function.

With ``polish`` (Levenberg-Marquardt, :func:`pipeline.recovery.students.fit`), the losses the
redundancy test compares are converged ones: the network before any removal and every trial
are refitted by it from where L-BFGS stopped, and so is the result, whose twins are then
folded once more. The teacher is a zero of the residuals, where Gauss-Newton converges
quadratically, while L-BFGS stalls in the flat valleys of nearly linear neurons (measured: near
1e-7 of mean(y^2) with neurons 5e-3..3e-2 off in 1 - |cos|, two-input teachers). A stalled
loss hides what a removal costs: a softplus network one neuron short of its teacher fits to
1e-9..1e-7 of mean(y^2), within ``redundant_factor`` of a stalled loss and 20 orders above a
converged one. The weak-neuron rounds stay with L-BFGS: with every fit at round-off, their
loss ratio would demand round-off of a network that still holds excess neurons, which
converges slowly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch

from pipeline.models.activations import flip_terms
from pipeline.recovery.chain import (
    Chain,
    incoming,
    outgoing,
    skip_name,
    states,
    with_incoming,
)
from pipeline.recovery.cluster import (
    ClusterHparams,
    LayerClusters,
    Symmetry,
    canonical,
    chord,
    cluster_layer,
    converged_students,
    symmetry_of,
)
from pipeline.recovery.students import FitHparams, FitResult, fit
from pipeline.recovery.teachers import ProbeData


def fold_constant_inputs(
    chain: Chain, params: dict, informative: torch.Tensor, x: torch.Tensor
) -> dict:
    """Move the first layer's weights on inputs constant over ``x`` into its bias (exact on
    ``x``): ``b += W[:, p] c_p``, ``W[:, p] = 0`` for every uninformative input ``p``."""
    name = chain.layers[0]
    constant = ~informative
    if not bool(constant.any()):
        return params
    if not chain.bias:
        raise ValueError("folding constant inputs needs first-layer biases")
    c = x[:, constant].mean(0)
    w = params[f"{name}.weight"]
    params = dict(params)
    params[f"{name}.bias"] = params[f"{name}.bias"] + w[:, :, constant] @ c
    params[f"{name}.weight"] = w.masked_fill(constant[None, None, :], 0.0)
    return params


def merged_outgoing(
    chain: Chain, params: dict, layer: int, clusters: LayerClusters, symmetry: Symmetry
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per student, the merged outgoing weights of each kept cluster, ``[N, next, K]``, the
    shift of the next layer's bias ``[N, next]``, and the recovered incoming vectors ``[K, k]``.
    """
    v = incoming(chain, params, layer)
    a = outgoing(chain, params, layer)
    n, width = v.shape[:2]
    flat_v, flat_a = v.reshape(n * width, -1), a.reshape(n * width, -1)
    u, scale = canonical(flat_v, symmetry)
    sign = clusters.sign.to(u)
    flip_out = symmetry.sign in ("odd", "odd_constant")
    effective = flat_a * scale[:, None] * (sign[:, None] if flip_out else 1.0)
    shift_each = torch.zeros_like(flat_a)
    if symmetry.sign == "odd_constant":  # sigma(-z) = kappa - sigma(z)
        kappa = flip_terms(chain.activation)[0]
        shift_each = torch.where((sign < 0)[:, None], kappa * flat_a, shift_each)
    owner = torch.arange(n * width, device=u.device) // width
    merged = torch.zeros(n, a.shape[-1], len(clusters.members), dtype=u.dtype, device=u.device)
    recovered = []
    for k, idx in enumerate(clusters.members):
        idx_t = torch.as_tensor(idx, device=u.device)
        merged[:, :, k].index_add_(0, owner[idx_t], effective[idx_t])
        mine = idx_t[owner[idx_t] == clusters.winner[k]]
        centre = (u[mine] * sign[mine, None]).mean(0)
        if symmetry.scale:
            centre = centre / centre.norm()
        recovered.append(centre)
    in_clusters = torch.zeros(n * width, dtype=torch.bool, device=u.device)
    for idx in clusters.members:
        in_clusters[torch.as_tensor(idx, device=u.device)] = True
    shift = torch.zeros(n, a.shape[-1], dtype=u.dtype, device=u.device)
    shift.index_add_(0, owner[in_clusters], shift_each[in_clusters])
    return merged, shift, torch.stack(recovered)


def _with_layer(
    chain: Chain,
    params: dict,
    layer: int,
    recovered: torch.Tensor,
    merged: torch.Tensor,
    shift: torch.Tensor,
) -> tuple[Chain, dict]:
    """Every student gets the K recovered neurons at ``layer`` and its merged outgoing weights."""
    n = merged.shape[0]
    widths = list(chain.widths)
    widths[layer] = len(recovered)
    new_chain = chain.with_widths(widths)
    nxt = chain.layers[layer + 1]
    params = with_incoming(new_chain, params, layer, recovered.expand(n, -1, -1).clone())
    if chain.bias:
        params[f"{nxt}.bias"] = params[f"{nxt}.bias"] + shift
    params[f"{nxt}.weight"] = merged
    return new_chain, params


def _select(params: dict, students: list[int]) -> dict:
    return {k: v[students] for k, v in params.items()}


def nonlinearity(
    chain: Chain, params: dict, layer: int, student: int, vectors: torch.Tensor, x: torch.Tensor
) -> torch.Tensor:
    """``1 - R^2`` of the best affine fit of ``sigma(z)`` by ``z`` over the inputs ``x``, for the
    pre-activations ``z`` of each incoming vector ``vectors [K, k]`` (the layout of
    :func:`~pipeline.recovery.chain.incoming`) fed by student ``student``'s layers below
    ``layer``: 0 for a neuron that is linear (or constant) on the data. For relu-like neurons it
    is small when they are active on almost none or almost all of the data, for tanh/sigmoid
    when their pre-activations stay near 0."""
    from pipeline.models.activations import make as make_activation

    act = make_activation(chain.activation)
    with torch.no_grad():
        one = {k: v[student : student + 1] for k, v in params.items()}
        z = layer_design(chain, states(chain, one, x), layer)[0] @ vectors.T
        s = act(z)
        zc, sc = z - z.mean(0), s - s.mean(0)
        cov, var_z, var_s = (zc * sc).mean(0), (zc * zc).mean(0), (sc * sc).mean(0)
        tiny = torch.finfo(z.dtype).tiny
        r2 = cov**2 / (var_z * var_s).clamp_min(tiny)
    return torch.where(var_s > tiny, 1 - r2, torch.zeros_like(r2)).clamp(0.0, 1.0)


def layer_design(chain: Chain, hidden: list[torch.Tensor], layer: int) -> torch.Tensor:
    """``[N, B, k]``: what Linear ``layer``'s incoming vectors (:func:`incoming`'s layout) are
    applied to, ``[h_layer; h_(layer-1) if it has a skip; 1]``, from :func:`states` output."""
    n = hidden[-1].shape[0]
    parts = [hidden[layer]]
    if layer in chain.skips:
        parts.append(hidden[layer - 1])
    parts = [p.expand(n, -1, -1) if p.dim() == 2 else p for p in parts]
    if chain.bias:
        parts.append(torch.ones_like(parts[0][..., :1]))
    return torch.cat(parts, dim=-1)


def reference_nonlinearity(activation: str, points: int = 4001) -> float:
    """``1 - R^2`` of ``sigma(z)`` against ``z`` for ``z ~ N(0, 1)`` (quantile grid): how
    nonlinear a neuron with unit pre-activations is. ``min_nonlinearity`` is relative to it, so
    one setting serves relu (0.27), tanh (0.07) and sigmoid (0.016) alike."""
    from pipeline.models.activations import make as make_activation

    p = (torch.arange(points, dtype=torch.float64) + 0.5) / points
    z = math.sqrt(2.0) * torch.special.erfinv(2 * p - 1)
    s = make_activation(activation)(z)
    zc, sc = z - z.mean(), s - s.mean()
    return float(1 - (zc @ sc) ** 2 / ((zc @ zc) * (sc @ sc)))


def drop_linear(clusters: LayerClusters, score: torch.Tensor, min_nonlinearity: float) -> None:
    """Drop (in place, reported as ``dropped_linear``) the kept clusters whose neuron is linear
    on the data (``nonlinearity < min_nonlinearity``): students carry linear terms with such
    neurons (the linear parts of sign-flipped relu copies, near-zero tanh pairs) and they are
    not identifiable as neurons; the affine correction or the finetuning takes their part."""
    table = clusters.table
    keep = []
    for k, value in enumerate(score.tolist()):
        row = table.index[table.recovered == k][0]
        table.loc[row, "nonlinearity"] = value
        if value < min_nonlinearity:
            table.loc[row, "status"] = "dropped_linear"
        else:
            keep.append(k)
    clusters.members = [clusters.members[k] for k in keep]
    clusters.winner = [clusters.winner[k] for k in keep]
    table["recovered"] = -1
    kept = table.status == "kept"
    table.loc[kept, "recovered"] = np.arange(int(kept.sum()))


# -- the whole reconstruction ---------------------------------------------------------------
@dataclass
class Reconstruction:
    chain: Chain  # the reconstructed network (one network; skip for even-linear activations)
    params: dict  # stacked, N = 1
    widths: tuple[int, ...]  # inferred width per hidden layer
    clusters: pd.DataFrame  # one row per cluster of every layer (kept and dropped)
    collapsed_chain: Chain  # the collapsed network before finetuning and neuron pruning ...
    before_finetune: dict  # ... and its parameters
    finetune: FitResult
    student_fits: list[FitResult]  # the students' finetuning after each non-final layer
    clustered: tuple[int, ...] = ()  # the students clustered (converged_students), by index


def reconstruct(
    chain: Chain,
    students: FitResult,
    data: ProbeData,
    h: ClusterHparams,
    seed: int = 0,
    students_polish: FitHparams | None = None,
) -> Reconstruction:
    """Cluster the trained ``students`` (of architecture ``chain``, any float dtype) layer by
    layer into one network and finetune it, in the probe data's dtype; ``students_polish``:
    the polish the students had after their fit (``ExpandHparams.polish``), if any; see the
    module docstring.

    All the students are clustered; if that reconstruction does not fit the probe data to
    round-off (training loss above ``redundant_factor`` x 1e-14 var(y)), or fails, and the
    converged students (:func:`pipeline.recovery.cluster.converged_students`) are fewer, they
    are clustered too. Which evidence is right is not known beforehand (many stuck students can
    outvote the converged ones, and a few converged students are weak evidence at a support of
    two), so the data decide: a fit at round-off is the teacher's function on the data, and of
    two reconstructions the narrowest of those whose training loss is within
    ``redundant_factor`` of the lower one (or of round-off) is kept, the lower loss breaking
    ties (the teacher is the smallest network that fits the data, as in
    :func:`prune_redundant`)."""
    n = len(students.train_loss)
    chosen = converged_students(students.train_loss, h)
    results, failure = [], None
    for index in (np.arange(n), chosen):
        try:
            results.append(_reconstruct(chain, students, index, data, h, seed, students_polish))
        except RecoveryFailed as err:
            failure = failure or err
        if len(chosen) == n or (results and _loss(results[0]) <= _fit_limit(0.0, data, h)):
            break
    if not results:
        raise failure
    loss = [_loss(r) for r in results]
    limit = _fit_limit(min(loss), data, h)
    fits = [(sum(r.widths), ell, k) for k, (r, ell) in enumerate(zip(results, loss, strict=True))]
    return results[min(f for f in fits if f[1] <= limit)[2]]


def _loss(rec: Reconstruction) -> float:
    return float(torch.nan_to_num(rec.finetune.train_loss[0], nan=math.inf))


def _reconstruct(
    chain: Chain,
    students: FitResult,
    clustered: np.ndarray,
    data: ProbeData,
    h: ClusterHparams,
    seed: int,
    students_polish: FitHparams | None,
) -> Reconstruction:
    """:func:`reconstruct` from the students ``clustered`` (indices into ``students``)."""
    students = students.select(clustered)
    refit = h.finetune
    if h.refit_as_students and students_polish is not None:
        refit = students_polish
    symmetry = symmetry_of(chain.activation)
    dtype = data.x.dtype
    params = {k: v.detach().to(dtype) for k, v in students.params.items()}
    n = next(iter(params.values())).shape[0]
    coordinate = 0
    if h.mask_inputs and data.informative is not None:
        informative = data.informative.to(data.x.device)
        params = fold_constant_inputs(chain, params, informative, data.x)
        coordinate = int(torch.nonzero(informative)[0, 0])
    rank = students.ranking().cpu().numpy()
    linear_below = 0.0
    if chain.activation != "identity" and h.min_nonlinearity > 0:
        linear_below = h.min_nonlinearity * reference_nonlinearity(chain.activation)
    tables, fits = [], []
    for layer in range(chain.depth):
        name = chain.layers[layer]
        v = incoming(chain, params, layer)
        width = v.shape[1]
        owner = np.repeat(np.arange(n), width)
        clusters = cluster_layer(
            v.reshape(n * width, -1),
            owner,
            rank,
            symmetry,
            n,
            h,
            name,
            coordinate if layer == 0 else 0,
        )
        if linear_below and clusters.members:
            _, _, centres = merged_outgoing(chain, params, layer, clusters, symmetry)
            score = nonlinearity(chain, params, layer, int(rank[0]), centres, data.x[:8192])
            drop_linear(clusters, score, linear_below)
        tables.append(clusters.table.assign(winner=clustered[clusters.table.winner]))
        if not clusters.members:
            raise RecoveryFailed(
                f"layer {name}: no cluster survived (gamma={h.gamma}, beta={h.beta})",
                pd.concat(tables, ignore_index=True),
            )
        merged, shift, recovered = merged_outgoing(chain, params, layer, clusters, symmetry)
        if layer < chain.depth - 1:
            before_chain, before = chain, params
            chain, params = _with_layer(chain, params, layer, recovered, merged, shift)
            if h.layer_correction:
                chain, params = correct_layer(
                    before_chain, before, chain, params, layer, data.x[:8192], symmetry
                )
            frozen = _recovered_names(chain, layer) if h.freeze else ()
            result = fit(chain, params, data, refit, seed, tag=f"finetune-{name}", frozen=frozen)
            fits.append(result)
            params, rank = result.params, result.ranking().cpu().numpy()
            continue
        best = int(rank[0])
        chain, params = _with_layer(chain, params, layer, recovered, merged, shift)
        out_w = torch.stack([merged[w, :, k] for k, w in enumerate(clusters.winner)], dim=1)
        params = _select(params, [best])
        params[f"{chain.layers[-1]}.weight"] = out_w[None]
    net_chain, net = _correct(chain, params, data, symmetry, flip=h.layer_correction)
    collapsed, before = net_chain, {k: v.clone() for k, v in net.items()}
    final = fit(net_chain, net, data, h.final, seed, tag="final")
    table = pd.concat(tables, ignore_index=True)
    net_chain, final = _fold_twins(net_chain, final, data, h, symmetry, seed, table)
    for _ in range(h.prune_rounds if h.min_contribution > 0 or linear_below else 0):
        weak = weak_neurons(
            net_chain, final.params, data.x[:8192], h.min_contribution, linear_below
        )
        if not any(bool(w.any()) for w in weak):
            break
        smaller, net = drop_neurons(net_chain, final.params, weak, data.x[:8192])
        refit = fit(smaller, net, data, h.final, seed, tag="final-pruned")
        if float(refit.train_loss[0]) > _removal_limit(final, data, h):
            break  # the fit notices: e.g. a relu neuron active on few points, weak but needed
        _mark_weak(table, net_chain, weak)
        net_chain, final = smaller, refit
    reference = float(torch.nan_to_num(students.train_loss, nan=math.inf).min())
    net_chain, final = prune_redundant(net_chain, final, data, h, seed, table, reference)
    if h.polish is not None:
        final = _polished(net_chain, final, data, h.polish, seed)
        # converged, a neuron may show as two copies the pruning kept (each too strong to try)
        net_chain, final = _fold_twins(net_chain, final, data, h, symmetry, seed, table, True)
    return Reconstruction(
        net_chain,
        final.params,
        net_chain.widths,
        table,
        collapsed,
        before,
        final,
        fits,
        tuple(clustered.tolist()),
    )


def _recovered_names(chain: Chain, layer: int) -> list[str]:
    """Parameters of Linear 0..``layer`` (the recovered layers, skips into them included)."""
    names = []
    for i in range(layer + 1):
        names.append(f"{chain.layers[i]}.weight")
        if chain.bias:
            names.append(f"{chain.layers[i]}.bias")
        if i in chain.skips:
            names.append(skip_name(chain, i))
    return names


def _pre_activations(chain: Chain, params: dict, x: torch.Tensor, j: int) -> torch.Tensor:
    """``[N, B, fan_out(j)]``: the pre-activations of Linear ``j`` for inputs ``x``."""
    hidden = states(chain, params, x)
    design = layer_design(chain, hidden, j)
    return torch.einsum("nbk,nok->nbo", design, incoming(chain, params, j))


def correct_layer(
    before_chain: Chain,
    before: dict,
    chain: Chain,
    params: dict,
    layer: int,
    x: torch.Tensor,
    symmetry: Symmetry,
) -> tuple[Chain, dict]:
    """Each student's correction of the next layer's pre-activations after hidden layer
    ``layer`` was collapsed: the least-squares fit of what it lost, ``z_before - z_after``, by
    the collapsed layer's own inputs ``[h; 1]`` (even-linear activations: a flipped copy left
    ``-a z``, linear in that space, and so do dropped neurons affine on the data) or by a
    constant (the others: a dropped neuron's mean). The linear part becomes a skip into Linear
    ``layer + 1`` (:func:`orient` then flips the recovered neurons so that it is as small as it
    can be), the constant its bias."""
    nxt = layer + 1
    with torch.no_grad():
        residual = _pre_activations(before_chain, before, x, nxt) - _pre_activations(
            chain, params, x, nxt
        )
    params = dict(params)
    if symmetry.sign != "even_linear":
        if chain.bias:
            params[f"{chain.layers[nxt]}.bias"] = params[
                f"{chain.layers[nxt]}.bias"
            ] + residual.mean(1)
        return chain, params
    hidden = states(chain, params, x)[layer]
    n = residual.shape[0]
    design = hidden.expand(n, -1, -1) if hidden.dim() == 2 else hidden
    design = torch.cat([design, torch.ones_like(design[..., :1])], dim=-1)
    theta = torch.linalg.lstsq(design, residual).solution  # [N, k + 1, out]
    chain, params = _add_skip(chain, params, nxt, theta[:, :-1].mT)
    if chain.bias:
        params[f"{chain.layers[nxt]}.bias"] = params[f"{chain.layers[nxt]}.bias"] + theta[:, -1]
    return orient(chain, params, layer)


def _add_skip(chain: Chain, params: dict, j: int, weight: torch.Tensor) -> tuple[Chain, dict]:
    """Add ``weight [N, fan_out(j), fan_in(j - 1)]`` to the skip into Linear ``j`` (made if
    absent)."""
    params = dict(params)
    if j not in chain.skips:
        chain = chain.with_skips((*chain.skips, j))
        params[skip_name(chain, j)] = torch.zeros_like(weight)
    params[skip_name(chain, j)] = params[skip_name(chain, j)] + weight
    return chain, params


def orient(chain: Chain, params: dict, layer: int) -> tuple[Chain, dict]:
    """Flip recovered even-linear neurons of hidden ``layer`` (shared by every network of the
    stack) so that the skip into the next Linear is as small as it can be, the function
    unchanged: ``a sigma(v.h) = a sigma(-v.h) + lambda a v.h`` (``lambda``: 1 for relu,
    softplus, gelu, silu; 1 + the slope for leaky relu; :func:`flip_terms`), so flipping neuron
    ``j`` adds ``lambda A_j v_j^T`` to each network's skip (``A_j``: its column in the next
    layer). The teacher has no skips, so in its orientation the students need none: with every
    network's skip ``S_n ~ -lambda sum_(j in F) A_nj v_j^T`` for the neurons ``F`` recovered
    flipped, the least-squares ``f`` of ``sum_n |S_n + lambda sum_j f_j A_nj v_j^T|^2``,
    rounded, is ``1_F``."""
    nxt = layer + 1
    if nxt not in chain.skips:
        return chain, params
    lam = flip_terms(chain.activation)[1]
    v = incoming(chain, params, layer)[0]  # [K, k] shared
    k = chain.fan_in(layer)
    s = params[skip_name(chain, nxt)]  # [N, out, k]
    a = lam * params[f"{chain.layers[nxt]}.weight"]  # [N, out, K]
    terms = torch.einsum("noj,jk->jnok", a, v[:, :k]).reshape(len(v), -1)  # [K, N out k]
    f = torch.linalg.lstsq(terms.T, -s.reshape(-1, 1)).solution[:, 0]
    flip = f > 0.5
    if not bool(flip.any()):
        return chain, params
    params = dict(params)
    params[skip_name(chain, nxt)] = s + torch.einsum("noj,jk->nok", a[:, :, flip], v[flip, :k])
    if chain.bias:
        bias = f"{chain.layers[nxt]}.bias"
        params[bias] = params[bias] + a[:, :, flip] @ v[flip, -1]
    sign = torch.where(flip, -1.0, 1.0).to(v)
    return chain, with_incoming(
        chain, params, layer, incoming(chain, params, layer) * sign[:, None]
    )


def _hidden(chain: Chain, params: dict, x: torch.Tensor) -> list[torch.Tensor]:
    """Activations ``[n, width]`` of every hidden layer of network 0 of a stack."""
    with torch.no_grad():
        one = {k: v[:1] for k, v in params.items()}
        return [h[0] for h in states(chain, one, x)[1:-1]]


def _readers(chain: Chain, layer: int) -> list[tuple[str, int]]:
    """``(weight name, Linear index)`` of the matrices whose columns read hidden ``layer``'s
    neurons: the next Linear, and the skip into the one after it."""
    out = [(f"{chain.layers[layer + 1]}.weight", layer + 1)]
    if layer + 2 in chain.skips:
        out.append((skip_name(chain, layer + 2), layer + 2))
    return out


def _out_norm(chain: Chain, params: dict, layer: int) -> torch.Tensor:
    """``[width]``: norm of each neuron's outgoing weights (network 0), skips included."""
    cols = torch.cat([params[w][0] for w, _ in _readers(chain, layer)], dim=0)
    return cols.norm(dim=0)


def weak_neurons(
    chain: Chain,
    params: dict,
    x: torch.Tensor,
    min_contribution: float,
    min_nonlinearity: float = 0.0,
) -> list[torch.Tensor]:
    """Per hidden layer of a finetuned reconstruction, the neurons it does not need (the
    teacher has none): those whose contribution ``std_x(sigma(z_k)) |a_k|`` (``a_k``: outgoing
    vector) is below ``min_contribution`` x the layer's largest, and those that became linear
    on the data (``1 - R^2 < min_nonlinearity``, see :func:`nonlinearity`)."""
    out = []
    for layer, h in enumerate(_hidden(chain, params, x)):
        contribution = h.std(dim=0) * _out_norm(chain, params, layer)
        weak = contribution < min_contribution * contribution.max()
        if min_nonlinearity > 0 and chain.activation != "identity":
            vectors = incoming(chain, params, layer)[0]
            weak |= nonlinearity(chain, params, layer, 0, vectors, x) < min_nonlinearity
        if bool(weak.all()):  # a layer keeps at least its strongest neuron
            weak[contribution.argmax()] = False
        out.append(weak)
    return out


def drop_neurons(chain: Chain, params: dict, drop: list[torch.Tensor], x: torch.Tensor):
    """The network without the ``drop`` neurons; each one's mean output moves into the biases
    of the layers reading it (its constant part), the rest of its (small) contribution is lost."""
    if chain.bias:
        hidden = _hidden(chain, params, x)
        params = dict(params)
        for layer, mask in enumerate(drop):
            mean = hidden[layer].mean(0)[mask]
            for weight, j in _readers(chain, layer):
                bias = f"{chain.layers[j]}.bias"
                params[bias] = params[bias] + (params[weight][0][:, mask] @ mean)[None]
    return _without(chain, params, drop)


def _without(chain: Chain, params: dict, drop: list[torch.Tensor]):
    """The network with the ``drop`` neurons' rows, biases and outgoing columns cut out."""
    params = dict(params)
    widths = list(chain.widths)
    for layer, mask in enumerate(drop):
        keep = ~mask
        name = chain.layers[layer]
        params[f"{name}.weight"] = params[f"{name}.weight"][:, keep]
        if chain.bias:
            params[f"{name}.bias"] = params[f"{name}.bias"][:, keep]
        if layer in chain.skips:
            params[skip_name(chain, layer)] = params[skip_name(chain, layer)][:, keep]
        for weight, _ in _readers(chain, layer):
            params[weight] = params[weight][:, :, keep]
        widths[layer] = int(keep.sum())
    return chain.with_widths(widths), params


def twin_neurons(chain: Chain, params: dict, symmetry: Symmetry, tol: float):
    """Pairs of neurons of one hidden layer (network 0) pointing the same way up to the
    activation's symmetry: ``(layer, keep, drop, factor, sign)`` with ``v_drop ~ factor * sign
    * v_keep``, directions within ``tol`` (chord of unit vectors); sign flips only where they
    are exact up to a constant (odd, odd-constant). A finetune can split one teacher neuron into
    two such copies sharing its outgoing weight (a saddle of the loss, not its minimum)."""
    pairs = []
    for layer in range(chain.depth):
        v = incoming(chain, params, layer)[0]
        norm = v.norm(dim=1).clamp_min(torch.finfo(v.dtype).tiny)
        unit = v / norm[:, None]
        cos = unit @ unit.T
        flips = symmetry.sign in ("odd", "odd_constant")
        close = (2 - 2 * (cos.abs() if flips else cos)).clamp_min(0).sqrt() < tol
        taken: set[int] = set()
        for i, j in torch.nonzero(torch.triu(close, 1)).tolist():
            if i in taken or j in taken:
                continue
            taken.update((i, j))
            sign = 1.0 if cos[i, j] >= 0 else -1.0
            factor = float(norm[j] / norm[i]) if symmetry.scale else 1.0
            pairs.append((layer, i, j, factor, sign))
    return pairs


def merge_twins(chain: Chain, params: dict, symmetry: Symmetry, tol: float):
    """Fold every :func:`twin_neurons` pair into one neuron: ``a_keep += factor * sign *
    a_drop`` (``sigma(c v) = c sigma(v)`` for a scale symmetry, ``sigma(-z) = -sigma(z)`` for odd
    ones; a flipped sigmoid adds ``a_drop`` to the next bias, ``sigmoid(-z) = 1 -
    sigmoid(z)``). Without a scale symmetry the two may differ in norm: the kept neuron takes
    their mean ``(v_keep + sign v_drop) / 2`` (exact for equal copies; the refit that follows
    decides). Returns ``(chain, params, drop masks)``, or ``None`` when there is no pair."""
    pairs = twin_neurons(chain, params, symmetry, tol)
    if not pairs:
        return None
    params = dict(params)
    kappa = flip_terms(chain.activation)[0]  # odd_constant: sigma(-z) = kappa - sigma(z)
    drop = [torch.zeros(w, dtype=torch.bool) for w in chain.widths]
    for layer, keep, gone, factor, sign in pairs:
        for weight, j in _readers(chain, layer):
            w = params[weight].clone()
            w[:, :, keep] += factor * sign * w[:, :, gone]
            if symmetry.sign == "odd_constant" and sign < 0 and chain.bias:
                bias = f"{chain.layers[j]}.bias"
                params[bias] = params[bias] + kappa * params[weight][:, :, gone]
            w[:, :, gone] = 0.0
            params[weight] = w
        if not symmetry.scale:
            v = incoming(chain, params, layer).clone()
            v[:, keep] = (v[:, keep] + sign * v[:, gone]) / 2
            params = with_incoming(chain, params, layer, v)
        drop[layer][gone] = True
    return *_without(chain, params, drop), drop


def prune_redundant(
    chain: Chain,
    final: FitResult,
    data: ProbeData,
    h: ClusterHparams,
    seed: int,
    table: pd.DataFrame,
    reference: float = math.inf,
) -> tuple[Chain, FitResult]:
    """Greedy width minimisation of the finetuned reconstruction: remove the weakest neuron
    (of the ``redundant_trials`` weakest, in order) whose removal and refit keeps the training
    loss within ``redundant_factor`` of the loss before any removal (not of the last one, so
    removals cannot compound); repeat until none can go. The teacher
    is the smallest network with its function, so a neuron the fit does without is an excess
    one (e.g. two that cancel each other); such clusters are reported ``dropped_redundant``.
    Only a reconstruction that fits the data about as well as the best student (within
    ``redundant_factor`` of ``reference``) is pruned: for a poor one the test means nothing."""
    x = data.x[:8192]
    if h.polish is not None:  # compare converged losses (see the module docstring)
        final = _polished(chain, final, data, h.polish, seed)
    loss = float(final.train_loss[0])
    limit = _removal_limit(final, data, h)
    trials = h.redundant_trials if loss <= h.redundant_factor * reference else 0
    # a trial only has to show whether the loss can get back within the limit
    trial_fit = replace(
        h.final,
        max_epochs=max(1, h.final.max_epochs // 4),
        tolerance=max(h.final.tolerance, 1e-9),
    )
    while trials > 0:
        candidates = []
        for layer, hid in enumerate(_hidden(chain, final.params, x)):
            share = hid.std(dim=0) * _out_norm(chain, final.params, layer)
            share = share / share.max().clamp_min(torch.finfo(share.dtype).tiny)
            if chain.widths[layer] > 1:
                candidates += [(float(c), layer, k) for k, c in enumerate(share.tolist())]
        for _, layer, k in sorted(candidates)[:trials]:
            drop = [torch.zeros(w, dtype=torch.bool) for w in chain.widths]
            drop[layer][k] = True
            smaller, params = drop_neurons(chain, final.params, drop, x)
            refit = fit(smaller, params, data, trial_fit, seed, tag="final-redundant")
            if h.polish is not None:
                refit = _polished(smaller, refit, data, h.polish, seed)
            if float(refit.train_loss[0]) <= limit:
                _mark_weak(table, chain, drop, "dropped_redundant")
                chain, final = smaller, refit
                break
        else:
            break
    return chain, final


def _fold_twins(chain, final, data, h: ClusterHparams, symmetry, seed, table, polish=False):
    """Twin neurons folded (:func:`merge_twins`) and the network refitted (``polish``: by
    ``h.polish`` after ``h.final``); kept if the refit stays within ``redundant_factor`` of
    the loss before (or of round-off)."""
    twins = merge_twins(chain, final.params, symmetry, chord(h.merge_angle)) if h.twins else None
    if twins is None:
        return chain, final
    refit = fit(twins[0], twins[1], data, h.final, seed, tag="final-merged")
    if polish:
        refit = _polished(twins[0], refit, data, h.polish, seed)
        limit = _removal_limit(final, data, h)
    else:
        limit = h.redundant_factor * float(final.train_loss[0])
    if float(refit.train_loss[0]) > limit:
        return chain, final
    _mark_weak(table, chain, twins[2], "merged")
    return twins[0], refit


def _polished(chain: Chain, result: FitResult, data: ProbeData, h, seed: int) -> FitResult:
    """``result`` refitted by the polish ``h`` (Levenberg-Marquardt), if that lowers the loss."""
    polished = fit(chain, result.params, data, h, seed, tag="final-polish")
    return polished if float(polished.train_loss[0]) <= float(result.train_loss[0]) else result


def _removal_limit(final: FitResult, data: ProbeData, h: ClusterHparams) -> float:
    """The training loss a refit without some neurons may reach for their removal to stand:
    within ``redundant_factor`` of the loss with them (or of round-off)."""
    return _fit_limit(float(final.train_loss[0]), data, h)


def _fit_limit(loss: float, data: ProbeData, h: ClusterHparams) -> float:
    """The training loss a fit may reach and count as fitting as well as one at ``loss``:
    ``redundant_factor`` x ``loss``, or x round-off (1e-14 var(y)) where ``loss`` is below it."""
    return h.redundant_factor * max(loss, 1e-14 * float(data.y.var()))


def _mark_weak(
    table: pd.DataFrame, chain: Chain, weak: list[torch.Tensor], status: str = "dropped_weak"
) -> None:
    """Mark the clusters of dropped neurons ``status``; renumber the others."""
    for layer, mask in enumerate(weak):
        rows = table.index[(table.layer == chain.layers[layer]) & (table.status == "kept")]
        rows = rows[np.argsort(table.loc[rows, "recovered"].to_numpy())]
        for k, row in enumerate(rows):
            if bool(mask[k]):
                table.loc[row, "status"] = status
                table.loc[row, "recovered"] = -1
        kept = table.index[(table.layer == chain.layers[layer]) & (table.status == "kept")]
        kept = kept[np.argsort(table.loc[kept, "recovered"].to_numpy())]
        table.loc[kept, "recovered"] = np.arange(len(kept))


class RecoveryFailed(RuntimeError):
    """No neuron of a layer survived the filters; ``clusters``: the cluster table so far."""

    def __init__(self, message: str, clusters: pd.DataFrame):
        super().__init__(message)
        self.clusters = clusters


def _correct(chain: Chain, params: dict, data: ProbeData, symmetry: Symmetry, flip: bool = True):
    """Least-squares correction of the collapsed network: the output bias, or (even-linear
    activations) an affine skip into the output from the last hidden layer's inputs (the space
    its flipped neurons' linear terms live in: the inputs for one hidden layer, as published),
    then, with ``flip``, the last hidden layer flipped to make it small (:func:`orient`)."""
    from pipeline.recovery.chain import forward

    with torch.no_grad():
        residual = data.y - forward(chain, params, data.x)[0]
    out = chain.layers[-1]
    params = dict(params)
    if symmetry.sign == "even_linear":
        source = states(chain, params, data.x)[chain.depth - 1]
        source = source[0] if source.dim() == 3 else source
        design = torch.cat([source, torch.ones_like(source[:, :1])], dim=1)
        theta = torch.linalg.lstsq(design, residual).solution
        chain, params = _add_skip(chain, params, chain.depth, theta[:-1].T[None].contiguous())
        if chain.bias:
            params[f"{out}.bias"] = params[f"{out}.bias"] + theta[-1][None]
        if flip:
            chain, params = orient(chain, params, chain.depth - 1)
    elif chain.bias:
        params[f"{out}.bias"] = params[f"{out}.bias"] + residual.mean(0)[None]
    return chain, params
