"""Cluster one hidden layer of N trained students (Expand-and-Cluster, steps 1-4).

Per hidden layer, with ``v_i = [w_i; b_i]`` the incoming vector of neuron ``i`` (all N
students' neurons pooled, ``M = N x width``) and ``a_i`` its outgoing vector:

1. *Canonicalise* by the activation's symmetry (:data:`SYMMETRIES`): where positive scaling is
   a symmetry (relu, leaky_relu, identity) ``u_i = v_i / |v_i|`` and ``|v_i|`` moves into
   ``a_i``; elsewhere ``u_i = v_i``. Where a sign flip is a symmetry up to a known correction
   (odd: tanh, identity; odd-constant: sigmoid; even-linear: relu, leaky_relu, softplus, gelu,
   silu) the sign is quotiented out by the distance itself, ``d(u, u') = min(|u - u'|,
   |u + u'|)``, instead of a canonical coordinate's sign (which flips erratically when that
   coordinate is near zero); each kept cluster is then oriented along its winner's member.
2. *Distances* by matrix products (``|u|^2 + |u'|^2 - 2|u.u'|``), in row blocks straight into
   scipy's condensed vector (near-duplicate pairs, where that form cancels, recomputed
   directly); *average-linkage* (UPGMA) hierarchical clustering.
3. *Cut* where the number of clusters with support ``>= s = floor(gamma N)`` is largest: one
   pass over the linkage (each merge changes the count by ``[a+b >= s] - [a >= s] - [b >=
   s]``), merges of equal height grouped (a cut at height t applies all of them). Within the
   first run of cuts attaining the maximum: the one followed by the largest gap in merge
   height (the most stable partition; the published code takes the highest cut of the run,
   ``cut: highest``, where stray neurons join the big clusters and spoil them). Support:
   distinct students among the members by default (a neuron and its duplicates in one student
   are one observation; the published code counts members, ``support: members``). Where the
   vectors are unit (a scale symmetry), a cluster counts only if it formed below the spread
   limit's height (``tight_count``): with 4x wider students most neurons are leftovers (linear
   terms, dead units), and high in the tree their loose unions gain enough students to
   outnumber the real neurons, which would set the cut there and merge real neurons away; and
   the cut is made in the run of that count which holds longest below the limit (a short spike
   low in the tree, with a neuron still in two fragments, no longer wins).
4. *Filters*: keep clusters of support ``>= s``; drop those whose median pairwise cosine
   distance (``1 - |cos|`` with a sign symmetry, else ``1 - cos``) exceeds ``1 - cos(beta)``;
   merge kept clusters whose mean directions are within ``merge_angle`` (fragments of one
   neuron: a student holding two slightly different copies of it can make each fragment big).
   Every cluster, kept, merged or dropped and why, is a row of the cluster table.

Collapsing the kept clusters into a network is :mod:`pipeline.recovery.collapse`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from scipy.cluster.hierarchy import fcluster, linkage

from pipeline.recovery.students import FitHparams, checked_keys


@dataclass(frozen=True)
class Symmetry:
    scale: bool  # positive scaling: sigma(a z) = a sigma(z), a > 0
    sign: str | None  # odd | odd_constant | even_linear | None

    @property
    def sign_invariant(self) -> bool:
        return self.sign is not None


SYMMETRIES = {
    "relu": Symmetry(True, "even_linear"),
    "leaky_relu": Symmetry(True, "even_linear"),
    "identity": Symmetry(True, "odd"),
    "tanh": Symmetry(False, "odd"),
    "sigmoid": Symmetry(False, "odd_constant"),
    "softplus": Symmetry(False, "even_linear"),
    "gelu": Symmetry(False, "even_linear"),
    "silu": Symmetry(False, "even_linear"),
    "elu": Symmetry(False, None),
}


def symmetry_of(activation: str) -> Symmetry:
    if activation not in SYMMETRIES:
        raise ValueError(
            f"no Expand-and-Cluster symmetry for activation {activation!r}; "
            f"known: {', '.join(SYMMETRIES)}"
        )
    return SYMMETRIES[activation]


@dataclass(frozen=True)
class ClusterHparams:
    gamma: float = 0.5
    beta: float = 30.0  # degrees
    support: str = "students"  # students (distinct owners) | members (the published count)
    cut: str = "gap"  # gap (most stable cut of the best run) | highest (the published rule)
    merge_angle: float = 2.0  # degrees: kept clusters closer than this are one neuron
    tight_count: bool = True  # the cut counts only clusters formed below beta (False: published)
    min_nonlinearity: float = 0.02  # drop neurons this close to linear (x a unit neuron's)
    min_contribution: float = 0.01  # after finetuning, drop neurons below this x the largest
    prune_rounds: int = 3  # rounds of dropping unneeded neurons and finetuning again
    redundant_trials: int = 3  # weakest neurons tried for removal per round (0: never)
    redundant_factor: float = 10.0  # a removal stands if the refit loss is within this factor
    mask_inputs: bool = True
    finetune: FitHparams = field(default_factory=lambda: FitHparams(lr=1e-4, max_epochs=5000))
    final: FitHparams = field(default_factory=lambda: FitHparams(lr=1e-4, max_epochs=5000))

    @classmethod
    def from_dict(cls, raw: dict, where: str = "cluster") -> ClusterHparams:
        raw = dict(raw)
        fits = {
            k: FitHparams(**checked_keys(FitHparams, raw.pop(k), f"{where}.{k}"))
            for k in ("finetune", "final")
            if k in raw
        }
        return cls(**checked_keys(cls, raw, where), **fits)


# -- canonicalisation and distances -----------------------------------------------------------
def canonical(v: torch.Tensor, symmetry: Symmetry) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u, scale)``: ``v = scale * u`` with ``|u| = 1`` where scaling is a symmetry, else
    ``u = v`` and ``scale = 1``. ``v: [M, k]``."""
    if symmetry.scale:
        scale = v.norm(dim=1)
        return v / scale.clamp_min(torch.finfo(v.dtype).tiny)[:, None], scale
    return v, torch.ones(len(v), dtype=v.dtype, device=v.device)


def condensed_distances(u: np.ndarray, sign_invariant: bool, block: int = 1024) -> np.ndarray:
    """scipy's condensed distance vector of the rows of ``u [M, k]``, ``|u_i - u_j|`` or, with
    ``sign_invariant``, ``min(|u_i - u_j|, |u_i + u_j|)``, by blocked matrix products."""
    u = np.ascontiguousarray(u, dtype=np.float64)
    m = len(u)
    out = np.empty(m * (m - 1) // 2)
    sq = np.einsum("ij,ij->i", u, u)
    for start in range(0, m, block):
        stop = min(start + block, m)
        gram = u[start:stop] @ u[start:].T
        if sign_invariant:
            np.abs(gram, out=gram)
        scale = sq[start:stop, None] + sq[None, start:]
        d2 = scale - 2 * gram
        # near-duplicates: the Gram form cancels to round-off (~1e-8 after the square root);
        # recompute those few pairs directly, copies equal to round-off at distance 0
        rows, cols = np.nonzero(d2 < 1e-8 * scale)
        if len(rows):
            a, b = u[start + rows], u[start + cols]
            close = np.einsum("ij,ij->i", a - b, a - b)
            if sign_invariant:
                close = np.minimum(close, np.einsum("ij,ij->i", a + b, a + b))
            d2[rows, cols] = np.where(close < 1e-24 * scale[rows, cols], 0.0, close)
        np.sqrt(np.maximum(d2, 0.0, out=d2), out=d2)
        for r in range(stop - start):
            i = start + r
            offset = i * m - i * (i + 1) // 2
            out[offset : offset + m - i - 1] = d2[r, r + 1 :]
    return out


def cosine_distances(u: torch.Tensor, w: torch.Tensor, sign_invariant: bool) -> torch.Tensor:
    """``[len(u), len(w)]`` matrix of ``1 - cos`` (``1 - |cos|`` with ``sign_invariant``)."""
    tiny = torch.finfo(u.dtype).tiny
    un = u / u.norm(dim=1, keepdim=True).clamp_min(tiny)
    wn = w / w.norm(dim=1, keepdim=True).clamp_min(tiny)
    cos = un @ wn.T
    return (1 - (cos.abs() if sign_invariant else cos)).clamp_min(0.0)


def chord(degrees: float) -> float:
    """Distance ``|u - u'| = 2 sin(angle / 2)`` of two unit vectors ``degrees`` apart."""
    return 2 * math.sin(math.radians(degrees) / 2)


def cut(
    link: np.ndarray,
    min_support: int,
    owner: np.ndarray | None = None,
    rule: str = "gap",
    max_height: float | None = None,
    run: str = "max",
) -> tuple[np.ndarray, float, int]:
    """Flat cluster labels (1-based) where the number of clusters with support ``>=
    min_support`` is largest: ``(labels, height, count)``; see the module docstring (step 3).

    ``max_height``: a cluster formed by a merge above it does not count (average linkage: its
    members' mean pairwise distance is at most its merge height, so one formed below a height
    that stands for the spread limit is tight enough to be kept; loose unions of leftover
    neurons, which can outnumber the real neurons high up the tree, no longer set the cut).
    ``run``: ``max``, the first run of cuts attaining the largest count (the published rule), or
    ``stable`` (needs ``max_height``), the run of a nonzero count that holds over the longest
    stretch of merge height up to ``max_height``: a spike of the count low in the tree (one
    neuron still in two fragments while another's looser copies have not joined yet) loses to
    the plateau where every neuron is one cluster.

    Support is the number of members, or with ``owner`` (the student of every leaf) the number
    of distinct students among the members (several copies of a neuron inside one student are
    one piece of evidence, not several), tracked as a bit set per cluster. Among the cuts of the
    first run attaining the maximum, ``rule`` picks the ``highest`` (the published choice: it
    lets the big clusters swallow every stray neuron below the next merge) or the one followed
    by the largest ``gap`` in merge height (the most stable partition).
    """
    if rule not in ("gap", "highest"):
        raise ValueError(f"cluster.cut: {rule!r} not allowed; allowed: gap, highest")
    m = len(link) + 1
    a, b = link[:, 0].astype(np.int64), link[:, 1].astype(np.int64)
    if owner is None:
        support = np.concatenate([np.ones(m), link[:, 3]])
    else:
        sets = [1 << int(o) for o in owner]
        for i in range(m - 1):
            sets.append(sets[a[i]] | sets[b[i]])
        support = np.fromiter((s.bit_count() for s in sets), dtype=np.int64, count=2 * m - 1)
    big = support >= min_support
    if max_height is not None:
        big[m:] &= link[:, 2] <= max_height
    delta = big[m:].astype(np.int64) - big[a] - big[b]
    count = np.cumsum(delta)
    heights = link[:, 2]
    ends = np.flatnonzero(np.append(heights[1:] != heights[:-1], True))  # last merge of each tie
    at_ends = count[ends]
    best = at_ends.max()
    first = int(np.argmax(at_ends == best))
    below = np.flatnonzero(at_ends[first:] < best)
    last = first + (int(below[0]) - 1 if len(below) else len(at_ends) - 1 - first)
    if run == "stable" and max_height is not None:
        h_end = np.minimum(heights[ends], max_height)
        span = np.append(h_end[1:], max_height) - h_end
        starts = np.append(0, np.flatnonzero(np.diff(at_ends)) + 1)
        stops = np.append(starts[1:], len(at_ends))
        runs = [(span[a:b].sum(), at_ends[a], a, b - 1) for a, b in zip(starts, stops, strict=True)]
        runs = [r for r in runs if r[1] > 0]
        if runs:
            _, best, first, last = max(runs)
    elif run != "max":
        raise ValueError(f"cut run: {run!r} not allowed; allowed: max, stable")
    if rule == "highest":
        chosen = last
    else:
        after = np.append(heights, heights[-1])[ends[first : last + 1] + 1]
        chosen = first + int(np.argmax(after - heights[ends[first : last + 1]]))
    height = float(heights[ends[chosen]])
    labels = fcluster(link, t=height, criterion="distance")
    return labels, height, int(best)


# -- one layer ----------------------------------------------------------------------------------
@dataclass
class LayerClusters:
    """Clustering of one hidden layer's pooled neurons.

    ``members[k]``: indices (into the pooled ``M`` neurons) of kept cluster ``k``; ``sign[i]``:
    orientation of neuron ``i`` relative to its cluster (+1 outside kept clusters); ``winner``:
    per kept cluster, the student whose members define it; ``table``: one row per cluster.
    """

    members: list[np.ndarray]
    sign: torch.Tensor
    winner: list[int]
    table: pd.DataFrame
    height: float


def cluster_layer(
    v: torch.Tensor,
    owner: np.ndarray,
    rank: np.ndarray,
    symmetry: Symmetry,
    n_students: int,
    gamma: float,
    beta: float,
    layer: str,
    support: str = "students",
    rule: str = "gap",
    merge_angle: float = 2.0,
    tight_count: bool = True,
) -> LayerClusters:
    """Cluster pooled incoming vectors ``v [M, k]`` (``owner[i]``: student of neuron i; ``rank``:
    students best first). ``support``: a cluster is big when it holds ``floor(gamma N)``
    distinct ``students`` or ``members``. Kept clusters whose mean directions are within
    ``merge_angle`` degrees are fragments of one neuron (students that hold two slightly
    different copies of it can make each fragment big): they are merged, the absorbed ones
    reported as ``merged``. ``tight_count``: where vectors are unit (a scale symmetry), count
    only clusters formed below the spread limit ``beta`` and cut in the most stable run of
    that count (:func:`cut`, ``run="stable"``)."""
    if support not in ("students", "members"):
        raise ValueError(f"cluster.support: {support!r} not allowed; allowed: students, members")
    min_size = math.floor(gamma * n_students)
    if min_size < 2:
        raise ValueError(
            f"cluster.gamma: gamma x students = {gamma * n_students} < 2; a cluster "
            "must hold neurons of at least two students"
        )
    u, _ = canonical(v, symmetry)
    if len(u) < 2:
        raise ValueError(f"layer {layer}: fewer than two neurons to cluster")
    link = linkage(condensed_distances(u.cpu().numpy(), symmetry.sign_invariant), "average")
    limit = 1 - math.cos(math.radians(beta))
    # unit vectors (scale symmetry): the chord of beta is the spread limit's height
    tight = chord(beta) if symmetry.scale and tight_count else None
    labels, height, _ = cut(
        link,
        min_size,
        owner if support == "students" else None,
        rule,
        max_height=tight,
        run="stable" if tight is not None else "max",
    )
    position = {int(s): p for p, s in enumerate(rank)}
    rows, kept = [], []
    order = np.argsort(labels, kind="stable")
    for idx in np.split(order, np.flatnonzero(np.diff(labels[order])) + 1):
        owners = owner[idx]
        spread = 0.0
        if len(idx) > 1:
            d = cosine_distances(u[idx], u[idx], symmetry.sign_invariant)
            spread = float(d[torch.triu_indices(len(idx), len(idx), 1).unbind()].median())
        students = len(set(owners.tolist()))
        if (students if support == "students" else len(idx)) < min_size:
            status = "dropped_small"
        elif spread > limit:
            status = "dropped_spread"
        else:
            status = "kept"
            kept.append((len(rows), idx))
        rows.append(
            {
                "layer": layer,
                "cluster": int(labels[idx[0]]),
                "size": len(idx),
                "students": students,
                "spread": spread,
                "status": status,
                "winner": _winner(owners, position),
                "recovered": -1,
            }
        )
    groups = _fragments(u, kept, symmetry, 1 - math.cos(math.radians(merge_angle)))
    sign = torch.ones(len(u), dtype=u.dtype)
    members, winners = [], []
    for k, group in enumerate(groups):
        idx = np.concatenate([kept[g][1] for g in group])
        winner = _winner(owner[idx], position)
        if symmetry.sign_invariant:
            ref = u[idx[owner[idx] == winner][0]]
            s = torch.sign(u[idx] @ ref)
            sign[idx] = torch.where(s == 0, torch.ones_like(s), s).cpu()
        for g in group:
            row = rows[kept[g][0]]
            row["recovered"] = k
            if g != group[0]:
                row["status"] = "merged"
        rows[kept[group[0]][0]]["winner"] = winner
        members.append(idx)
        winners.append(winner)
    table = pd.DataFrame(rows)
    table["height"] = height
    table["nonlinearity"] = np.nan
    table.loc[table.status == "merged", "recovered"] = -1
    return LayerClusters(members, sign, winners, table, height)


def _winner(owners: np.ndarray, position: dict) -> int:
    return int(min(owners, key=lambda s: position[int(s)]))


def _fragments(u: torch.Tensor, kept: list, symmetry: Symmetry, tol: float) -> list[list[int]]:
    """Groups of kept clusters (indices into ``kept``) whose mean directions are within
    ``tol`` cosine distance of each other (single linkage), in order of first member."""
    if not kept:
        return []
    unit = u / u.norm(dim=1, keepdim=True).clamp_min(torch.finfo(u.dtype).tiny)
    centres = []
    for _, idx in kept:
        block = unit[idx]
        if symmetry.sign_invariant:
            s = torch.sign(block @ block[0])
            block = block * torch.where(s == 0, torch.ones_like(s), s)[:, None]
        centres.append(block.mean(0))
    close = (
        cosine_distances(torch.stack(centres), torch.stack(centres), symmetry.sign_invariant) < tol
    )
    parent = list(range(len(kept)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in torch.nonzero(torch.triu(close, 1)).tolist():
        parent[find(j)] = find(i)
    groups: dict[int, list[int]] = {}
    for i in range(len(kept)):
        groups.setdefault(find(i), []).append(i)
    return list(groups.values())
